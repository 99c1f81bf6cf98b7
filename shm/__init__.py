"""Shared memory transport: segments, the SPSC ring, doorbells and the record codec.

Knows nothing of SSE, providers or tokens (it never imports `pipeline/`): it moves records.
"""

from .doorbell import Doorbell, PeerDiedError, pid_sentinel
from .records import (
    KIND_CONTROL,
    KIND_END,
    KIND_EVENTS,
    KIND_OPEN,
    KIND_OUTPUT,
    Control,
    Event,
    EventBatch,
    Output,
    RecordCodec,
    Source,
    StreamEnd,
    StreamOpen,
    release_views,
)
from .ring import (
    DEFAULT_CAPACITY,
    MAX_KIND,
    Ring,
    RingClosedError,
    RingHandle,
    UnsupportedPlatformError,
    check_platform,
)
from .segment import Segment, cleanup_stale_segments, guardian_pid

__all__ = [
    "DEFAULT_CAPACITY", "MAX_KIND", "Ring", "RingHandle", "RingClosedError", "UnsupportedPlatformError",
    "check_platform", "Segment", "cleanup_stale_segments", "guardian_pid", "Doorbell", "PeerDiedError",
    "pid_sentinel", "RecordCodec", "release_views", "Source", "StreamOpen", "Event", "EventBatch",
    "StreamEnd", "Control", "Output", "KIND_OPEN", "KIND_EVENTS", "KIND_END", "KIND_CONTROL", "KIND_OUTPUT",
]
