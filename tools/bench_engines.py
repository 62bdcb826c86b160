"""One consultation timed on several runtimes of the same bundle, side by side (`bench --engine-url`):
our torch engine (a float bundle), our llama.cpp runner (its GGUF copy, `--gguf`) and a vLLM server
(its `export-vllm` directory behind `vllm serve`), each driven through the same `stream` call the app
makes. Every figure includes encoding the photo: each measurement asks about a photo no runtime has
seen (vLLM caches photos and prefixes too), and our engine's photo cache is emptied first.

- first answer: time to first token and decode tokens/s of one consultation, median of `repeat`;
- N at once: N consultations started together, each with its own photo; whole-window tokens/s
  (all tokens over first start to last token) and first-token p50 / p95.
"""

from __future__ import annotations

import statistics
import threading
import time
from typing import Any

from model.prompt.conversation import Conversation

from tools.bench import QUESTIONS, bench_photo

_SEED = [1000]  # each measurement's photos are new ones


def _fresh(n: int) -> list[Conversation]:
    start, _SEED[0] = _SEED[0], _SEED[0] + n
    return [Conversation().ask(f"{QUESTIONS[i % len(QUESTIONS)]} Please describe the skin in this photo.",
                               [bench_photo(start + i)]) for i in range(n)]


def _one(engine, conversation: Conversation, new_tokens: int, session: str) -> dict[str, float]:
    start = time.perf_counter()
    generation = engine.stream(conversation, session=session, do_sample=False, max_new_tokens=new_tokens,
                               fixed_length=True)
    "".join(generation)
    stats = generation.stats
    first = stats.token_times[0] if stats.token_times else time.perf_counter()
    decode = (stats.token_times[-1] - first) if len(stats.token_times) > 1 else 0.0
    return {"start": start, "end": stats.token_times[-1] if stats.token_times else time.perf_counter(),
            "ttft_s": first - start, "decode_tokens_per_s": (len(stats.token_times) - 1) / decode if decode else 0.0,
            "tokens": len(generation.tokens)}


def measure(label: str, engine, levels: list[int], new_tokens: int, repeat: int) -> dict[str, Any]:
    engine.forget_images()
    _one(engine, _fresh(1)[0], 4, "warm")  # warm-up: kernels, allocator, connections
    firsts = []
    for r in range(repeat):
        engine.forget_images()
        firsts.append(_one(engine, _fresh(1)[0], new_tokens, f"first-{r}"))
    row: dict[str, Any] = {"runtime": label,
                           "ttft_ms": statistics.median(f["ttft_s"] for f in firsts) * 1000,
                           "decode_tokens_per_s": statistics.median(f["decode_tokens_per_s"] for f in firsts),
                           "at_once": []}
    for n in levels:
        engine.forget_images()
        conversations, barrier, answers = _fresh(n), threading.Barrier(n), [None] * n

        def run(i: int) -> None:
            barrier.wait()
            answers[i] = _one(engine, conversations[i], new_tokens, f"n{n}-{i}")

        threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        wall = max(a["end"] for a in answers) - min(a["start"] for a in answers)
        ttft = sorted(a["ttft_s"] * 1000 for a in answers)
        row["at_once"].append({"sessions": n, "tokens_per_s": sum(a["tokens"] for a in answers) / wall,
                               "ttft_p50_ms": statistics.median(ttft),
                               "ttft_p95_ms": ttft[min(n - 1, int(0.95 * n))]})
    return row


def format_side_by_side(rows: list[dict[str, Any]], new_tokens: int) -> str:
    lines = [f"the same consultation, {new_tokens} tokens an answer, photo encoding included",
             "runtime            first token ms  decode tok/s" +
             "".join(f"  | {a['sessions']} at once: tok/s  TTFT p50  p95 ms" for a in rows[0]["at_once"])]
    for r in rows:
        line = f"{r['runtime']:<18} {r['ttft_ms']:>14.0f}  {r['decode_tokens_per_s']:>12.1f}"
        for a in r["at_once"]:
            line += f"  | {a['tokens_per_s']:>16.1f}  {a['ttft_p50_ms']:>8.0f}  {a['ttft_p95_ms']:>6.0f}"
        lines.append(line)
    return "\n".join(lines)
