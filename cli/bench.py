"""`bench`: load time, encode, time to first token, decode speed, follow-ups, many sessions at once."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cli.common import ArgumentProblem, empty_out, model_args, policy, record
from model.errors import UserFacingError, spell
from model.choices import GGUF, PRESETS


def register(sub) -> None:
    bench = sub.add_parser("bench", help="load time, encode, TTFT, decode speed, follow-ups vs the reference style")
    bench.add_argument("--preset", default="tiny", choices=PRESETS,
                       help="with --random-init: the architecture (see `inspect`)")
    bench.add_argument("--random-init", action="store_true", help="random weights, no files (int8w / int4 are built one "
                       "layer at a time: a 7B int4 fits in 8 GB)")
    bench.add_argument("--turns", type=int, default=8, help="follow-up turns timed after the first")
    bench.add_argument("--new-tokens", type=int, default=32, help="tokens decoded per answer (EOS ignored)")
    bench.add_argument("--repeat", type=int, default=1, help="time the first answer, its bare loop and llama.cpp's "
                       "own figure N times back to back and report medians (a busy host moves by 10%% or more)")
    bench.add_argument("--concurrency", help="also serve N sessions at once (e.g. 1,2,4,8), against the same N "
                                              "one after another")
    bench.add_argument("--save", help="with --random-init: also write the model as a bundle here (weight-only modes "
                                      "layer by layer), to time loading it with --weights")
    bench.add_argument("--engine-url", help="also time the same consultation through a vLLM server of this bundle "
                                            "(export-vllm), side by side with our engine: first token, decode "
                                            "tok/s, --concurrency sessions at once (default 1,8)")
    bench.add_argument("--engine-key", help="that server's --api-key (better: SKINGPT_ENGINE_KEY)")
    bench.add_argument("--gguf", help="with --engine-url: the bundle's GGUF copy (`quantize --mode f32`), timed too, "
                                      "through our llama.cpp runner")
    bench.add_argument("--json", action="store_true")
    model_args(bench, GGUF, " | q4_k_m | q4_0 | q8_0 | f16 (with --random-init --save DIR: a GGUF bundle "
               "written there one tensor at a time, then served by llama.cpp)")
    bench.set_defaults(func=run)


def _write_gguf(preset_name: str, mode: str, out: Path) -> Path:
    """The random GGUF bundle, written in a child process so that the bench's peak memory is serving's
    alone (llama.cpp's quantiser maps the whole f16 file); an existing bundle there is reused."""
    import multiprocessing

    from model.nn.config import preset

    if (out / "manifest.json").is_file():
        print(f"using the bundle already at {out}", file=sys.stderr)
        return out
    empty_out(out)
    print(f"writing a random {preset_name} {mode} GGUF bundle to {out} ...", file=sys.stderr)
    from tools.bench import write_random_gguf_bundle

    child = multiprocessing.get_context("spawn").Process(target=write_random_gguf_bundle,
                                                         args=(preset(preset_name), mode, out))
    child.start()
    child.join()
    if child.exitcode != 0:
        raise UserFacingError(f"writing the GGUF bundle failed (exit {child.exitcode}); see above")
    return out


def _levels(args: argparse.Namespace) -> list[int]:
    try:
        levels = [int(n) for n in args.concurrency.split(",")] if args.concurrency else []
    except ValueError:
        raise ArgumentProblem(f"--concurrency takes session counts like 1,2,4,8, not {args.concurrency!r}") from None
    if any(n < 1 for n in levels):
        raise ArgumentProblem("--concurrency counts must be at least 1")
    return levels


def run(args: argparse.Namespace) -> int:
    if not args.random_init and not args.weights:
        raise ArgumentProblem("pass --preset NAME --random-init, or --weights DIR")
    levels = _levels(args)
    if args.repeat < 1:
        raise ArgumentProblem("--repeat must be at least 1")
    if args.save and not args.random_init:
        raise ArgumentProblem("--save writes a --random-init model; to quantise a bundle use `launch.py quantize`")
    if args.engine_url:
        return _side_by_side(args, levels or [1, 8])
    weights = args.weights
    if args.quantize in GGUF:
        if not (args.random_init and args.save):
            raise ArgumentProblem(f"--quantize {args.quantize} with --random-init writes a GGUF bundle: pass --save "
                             f"DIR (a 7B q4_0 takes about 4 GB, and 13 GB more while it is written); for a bundle "
                             f"of your own use `launch.py quantize --mode {args.quantize}`, then --weights")
        weights = _write_gguf(args.preset, args.quantize, Path(args.save))
        args.random_init, args.quantize, args.save = False, "auto", None
    from tools.bench import followup_ttft, format_concurrency, format_followups, format_table, load_for_bench, \
        run as bench, run_concurrency

    engine, load_s = load_for_bench(args.preset if args.random_init else None, weights, policy(args),
                                    Path(args.save) if args.save else None, max_batch=max(levels or [8]))
    if engine.loaded.note:
        print(spell(engine.loaded.note, cli=True), file=sys.stderr)
    result = bench(engine, load_s, turns=args.turns, new_tokens=args.new_tokens, repeats=args.repeat)
    result["api_followups"] = followup_ttft(engine, args.turns, args.new_tokens)
    if levels:
        result["concurrency"] = run_concurrency(engine, levels, new_tokens=args.new_tokens)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(format_table(result))
    print("\n" + format_followups(result["api_followups"]))
    if levels:
        print("\n" + format_concurrency(result["concurrency"]))
    return 0


def _side_by_side(args: argparse.Namespace, levels: list[int]) -> int:
    """Our torch engine, our llama.cpp runner (--gguf) and the vLLM server, one table."""
    import os

    from app.remote_engine import EngineUnavailable, RemoteEngine
    from model.serving.engine import Engine
    from model.weights.bundle import load_bundle
    from tools.bench_engines import format_side_by_side, measure

    if not args.weights:
        raise ArgumentProblem("--engine-url needs --weights: the bundle the server serves (export-vllm of it)")
    loaded = load_bundle(args.weights, policy(args), record=record(args.weights))
    remote = RemoteEngine(loaded.config, loaded.tokenizer, args.engine_url, max_batch=max(levels),
                          key=args.engine_key or os.environ.get("SKINGPT_ENGINE_KEY"))
    try:
        remote.probe()
    except EngineUnavailable as err:
        raise ArgumentProblem(f"{err}") from None
    rows = [measure(f"torch ({loaded.device})", Engine(loaded, max_batch=max(levels)), levels, args.new_tokens,
                    args.repeat)]
    if args.gguf:
        gguf = load_bundle(args.gguf, record=record(args.gguf))
        rows.append(measure("llama.cpp", Engine(gguf, max_batch=max(levels)), levels, args.new_tokens, args.repeat))
    rows.append(measure(f"vLLM ({remote.model})", remote, levels, args.new_tokens, args.repeat))
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(format_side_by_side(rows, args.new_tokens))
    return 0
