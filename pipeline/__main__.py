"""`python -m pipeline` is the `streamring` command."""

import sys

from .cli import main

sys.exit(main())
