"""Benchmark: TokenDecoder against the usual incremental detokenizer, per token, one run.

The peer ("baseline") is what streaming code commonly does: append the id's bytes
(`enc.decode_single_token_bytes`), try a strict UTF-8 decode of everything pending, and hold the
bytes on UnicodeDecodeError; one id per call. We measure `TokenDecoder.decode_token` (one id per
call) and `TokenDecoder.decode_tokens` (16 ids per call) on the same multilingual token stream,
check that all three produce the same text, and print the median ns/token of several runs and the
ratios. Run: `python -m bench.decoder [--quick]`.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

# Ten-plus scripts: CJK, emoji with ZWJ and skin tones, combining marks, RTL, Indic, Thai...
TEXT = (
    "The quick brown fox jumps over the lazy dog, then writes a short report about it. "
    "机器学习是人工智能的一个分支，它使计算机能够从数据中学习并做出预测。"
    "東京の天気は晴れです。今日は良い一日になりますように！カタカナもひらがなも。"
    "한국어 텍스트도 포함됩니다. 안녕하세요, 반갑습니다. "
    "Emoji: 🚀🔥✨👍🏽🎉 flags 🇯🇵🇫🇷, family 👨‍👩‍👧‍👦, astronaut 👩🏽‍🚀. "
    "Ελληνικά γράμματα και λέξεις. Русский текст с буквами ё и й. "
    "العربية لغة جميلة ومليئة بالتاريخ. עברית היא שפה עתיקה. "
    "हिन्दी में लिखा हुआ वाक्य। ภาษาไทยไม่มีช่องว่างระหว่างคำ "
    "Combining: e\u0301 a\u0308 n\u0303 o\u0302\u0323. "
    "def main():\n    return {\"key\": [1, 2, 3], \"naïve\": \"café\"}\n"
)


class BaselineDecoder:
    """The peer: pending bytes + strict decode per id, hold on UnicodeDecodeError."""

    def __init__(self, enc: Any) -> None:
        self._bytes = enc.decode_single_token_bytes
        self._pending = b""

    def decode_token(self, token_id: int) -> str:
        self._pending += self._bytes(token_id)
        try:
            out = self._pending.decode("utf-8")
        except UnicodeDecodeError:
            return ""
        self._pending = b""
        return out


def _time_per_token(fn: Any, n_tokens: int) -> float:
    t0 = time.perf_counter_ns()
    fn()
    return (time.perf_counter_ns() - t0) / n_tokens


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark once; print and return medians (ns/token) and ratios to the baseline."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer tokens and runs (a smoke run)")
    parser.add_argument("--runs", type=int, default=None)
    parser.add_argument("--tokens", type=int, default=None, help="tokens per run (approximate)")
    args = parser.parse_args(argv)
    runs = args.runs or (3 if args.quick else 9)
    target = args.tokens or (20_000 if args.quick else 200_000)

    from pipeline.decoder import TokenDecoder, load_encoding

    enc = load_encoding("cl100k_base")
    unit = enc.encode(TEXT)
    ids = unit * max(1, target // len(unit))
    n = len(ids)
    expected = enc.decode(ids)
    batches = [ids[i : i + 16] for i in range(0, n, 16)]

    def run_baseline() -> str:
        dec = BaselineDecoder(enc)
        step = dec.decode_token
        return "".join([step(t) for t in ids])

    def run_one() -> str:
        dec = TokenDecoder(enc)
        step = dec.decode_token
        return "".join([step(t) for t in ids]) + dec.flush()

    def run_batch() -> str:
        dec = TokenDecoder(enc)
        step = dec.decode_tokens
        return "".join([step(b) for b in batches]) + dec.flush()

    cases = {"baseline": run_baseline, "decode_token": run_one, "decode_tokens16": run_batch}
    for name, fn in cases.items():  # warm up (tables built) and check every case is correct
        out = fn()
        if out != expected:
            raise AssertionError(f"{name} produced different text")
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(runs):
        for name, fn in cases.items():  # interleaved, so machine noise hits all cases alike
            samples[name].append(_time_per_token(fn, n))
    med = {name: statistics.median(v) for name, v in samples.items()}
    base = med["baseline"]
    result = {
        "tokens": n,
        "runs": runs,
        "ns_per_token": med,
        "ratio_to_baseline": {name: v / base for name, v in med.items()},
    }
    print(f"TokenDecoder vs baseline, {n} multilingual cl100k tokens, median of {runs} runs")
    for name, v in med.items():
        print(f"  {name:16s} {v:8.1f} ns/token   x{v / base:.3f} of baseline")
    return result


if __name__ == "__main__":
    main()
