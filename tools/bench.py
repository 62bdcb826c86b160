"""Speed and memory of the engine, against a reference-style baseline and a bare forward loop.

- reference-style: every turn re-prefills the whole conversation (a fresh KV cache), as the
  reference demo does; the engine reuses its session cache and prefills only new positions.
- bare loop: prefill, then greedy decode with direct LLM calls and nothing else; the engine's
  decode speed over it gives the engine's overhead.
Decoding runs a fixed number of tokens (EOS and stop strings ignored) so random weights time
the same work as real ones.
"""

from __future__ import annotations

import contextlib
import resource
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image

from model.weights.bundle import (LLM_DIR, LoadedBundle, auto_policy, load_bundle, quantized_mode, save_bundle,
                                  save_model_bundle)
from model.nn.config import SkinGPTConfig
from model.prompt.conversation import Conversation, ImageInput
from model.serving.engine import Engine
from model.weights.policy import WEIGHT_ONLY, LoadPolicy, PolicyError, fast_cpu_encoder, module_bytes
from model.nn.skingpt import ENCODER_PARTS, SkinGPT, build_skingpt
from model.weights.weight_only import assemble, entries, from_random, write_quantized
from model.weights.summary import format_bytes

# Peak memory bandwidth (bytes/s) of GPUs we report against; others can be passed in.
GPU_BANDWIDTH = {"H100 80GB HBM3": 3.35e12, "H100 PCIe": 2.0e12, "H200": 4.8e12, "A100-SXM4-80GB": 2.04e12}

QUESTIONS = ("What else do you see?", "What could cause this?", "How is it treated?", "Is it contagious?",
             "Should I see a doctor?", "Can it come back?", "What should I avoid?", "Is it serious?")


def random_bundle(config: SkinGPTConfig, policy: LoadPolicy, save: Path | None = None) -> LoadedBundle:
    """Full-size random weights: built straight on the device in the policy's dtype; the weight-only
    modes one LLM layer at a time (never the float model whole); bitsandbytes modes through a
    temporary bundle, so that the real loader quantises. `save` also writes the model as a bundle."""
    from tools.fixtures import train_tokenizer
    from model.nn.llm import load_tokenizer

    policy, note = auto_policy(policy, config)
    if save is not None and policy.quantize not in ("none", *WEIGHT_ONLY):
        raise PolicyError(f"--save writes float or weight-only bundles, not bitsandbytes {policy.quantize}")
    device, dtype = policy.resolve_device(), policy.resolve_dtype()
    # files live only while loading: a bitsandbytes 13B run writes ~26 GB of random weights here
    with tempfile.TemporaryDirectory(prefix="skingpt-bench-") as name:
        tmp = Path(name)
        train_tokenizer(tmp, min(config.llm.vocab_size, 4000))
        tokenizer = load_tokenizer(tmp)
        if policy.quantize in WEIGHT_ONLY:
            model = _random_weight_only(config, policy.quantize, save)
        else:
            bnb = policy.quantize != "none"
            with _default_dtype(torch.float32 if bnb else dtype), torch.device("cpu" if bnb else device):
                model = build_skingpt(config).eval()
            model.ln_vision.float()
            if bnb:
                save_model_bundle(tmp / "bundle", model, tokenizer)
                del model
                return load_bundle(tmp / "bundle", policy, verify=False)
        if save is not None:
            _save_random(save, model, tokenizer, policy.quantize)
    model.requires_grad_(False)
    footprint = {part: module_bytes(getattr(model, part)) for part in (*ENCODER_PARTS, "llm")}
    note = "; ".join(n for n in (note, fast_cpu_encoder(policy, model.vision)) if n)
    return LoadedBundle(model, tokenizer, config, Path(f"random:{config.name}"), {"files": {}}, device, footprint,
                        policy=policy, note=note)


def write_random_gguf_bundle(config: SkinGPTConfig, mode: str, out: Path) -> Path:
    """A full-size random bundle whose LLM is one GGUF file: drawn and written one LLM tensor at a time
    (an f16 file, then llama.cpp's quantiser), never the float model whole; the encoder random, bf16."""
    from model.nn.llm import ExternalLLM, load_tokenizer
    from model.weights.bundle import write_gguf_llm
    from model.weights.weight_only import random_tensors
    from tools.fixtures import train_tokenizer

    with tempfile.TemporaryDirectory(prefix="skingpt-bench-") as name:
        train_tokenizer(Path(name), min(config.llm.vocab_size, 4000))
        tokenizer = load_tokenizer(Path(name))
    with _default_dtype(torch.bfloat16):
        model = SkinGPT(config, ExternalLLM(config.llm)).eval()
    model.ln_vision.float()
    made = {"mode": mode}  # filled in by write_llm, before the manifest is written

    def write_llm(llm_dir: Path) -> None:
        model.llm.config.save_pretrained(llm_dir)
        tokenizer.save_pretrained(llm_dir)
        made.update(write_gguf_llm(llm_dir, config.llm, tokenizer, random_tensors(config.llm), mode))

    return save_bundle(out, config, model.encoder_state_dict(), write_llm,
                       {"random_init": config.name, "quantized_from": made})


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _random_weight_only(config: SkinGPTConfig, mode: str, save: Path | None) -> SkinGPT:
    """The LLM drawn and quantised one linear at a time (written out as it goes with `save`), then the
    encoder in bf16."""
    groups = entries(config.llm, *from_random(config.llm, mode))
    if save is not None:
        (save / LLM_DIR).mkdir(parents=True, exist_ok=True)
        groups = write_quantized(save / LLM_DIR, mode, groups)
    llm = assemble(config.llm, mode, groups)
    with _default_dtype(torch.bfloat16):
        model = SkinGPT(config, llm).eval()
    model.ln_vision.float()
    return model


def _save_random(out: Path, model: SkinGPT, tokenizer: Any, mode: str) -> None:
    if mode == "none":
        save_model_bundle(out, model, tokenizer, {"random_init": model.config.name})
        return

    def write_llm(llm_dir: Path) -> None:  # the quantised shards are there already
        model.llm.config.save_pretrained(llm_dir)
        tokenizer.save_pretrained(llm_dir)

    save_bundle(out, model.config, model.encoder_state_dict(), write_llm, {"random_init": model.config.name})


def bench_photo(seed: int) -> ImageInput:
    """A 640x480 noise photo: the same inputs for every bench (the API's included)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    return ImageInput.of(Image.fromarray(pixels))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _encode_ms(engine: Engine, device: str) -> list[float]:
    """Milliseconds to encode each of three different photos (nothing cached)."""
    out = []
    for i in range(3):
        image = bench_photo(i)
        _sync(device)
        t = time.perf_counter()
        engine.encode(image)
        _sync(device)
        out.append((time.perf_counter() - t) * 1000)
    return out


def _followups(engine: Engine, conversation: Conversation, turns: int, settings: dict[str, Any]) -> list[dict]:
    """Each follow-up on the first answer's session (only its new tail prefilled), against the same
    prompt prefilled from nothing."""
    rows = []
    for turn in range(1, turns + 1):
        conversation = conversation.ask(QUESTIONS[(turn - 1) % len(QUESTIONS)])
        ours = engine.stream(conversation, session="bench0", fixed_length=True, **settings)
        answer = "".join(ours).strip()
        baseline = engine.stream(conversation, session=None, fixed_length=True, max_new_tokens=1, do_sample=False)
        "".join(baseline)
        rows.append({"turn": turn, "prompt_tokens": ours.stats.prompt_tokens,
                     "prefill_tokens": ours.stats.prefill_tokens,
                     "ttft_ms": ours.stats.time_to_first_token_s * 1000,
                     "baseline_ttft_ms": baseline.stats.time_to_first_token_s * 1000,
                     "speedup": baseline.stats.time_to_first_token_s / max(ours.stats.time_to_first_token_s, 1e-9)})
        conversation = conversation.answer(answer)
    return rows


def run(engine: Engine, load_s: float, turns: int = 8, new_tokens: int = 32, repeats: int = 1) -> dict[str, Any]:
    """The bench's figures. The first answer, its bare loop and (llama.cpp) the peer are timed `repeats`
    times back to back, each time on a fresh session: their figures are medians, and the ratios the
    medians of each repeat's own ratio (a busy host moves all three of one repeat together)."""
    loaded = engine.loaded
    device = loaded.device
    settings = {"max_new_tokens": new_tokens, "do_sample": False}

    encode_ms = _encode_ms(engine, device)
    conversation = Conversation().ask("Please describe the skin condition in this photo.", [bench_photo(0)])
    engine.answer(conversation, session="warmup", fixed_length=True, **settings)  # kernels, allocator
    engine.forget("warmup")
    opening, peak_rss, paired = conversation, None, []
    for repeat in range(repeats):
        first = engine.stream(opening, session=f"bench{repeat}", fixed_length=True, **settings)
        text = "".join(first).strip()
        if repeat:
            engine.forget(f"bench{repeat}")
        else:
            conversation = opening.answer(text)  # the follow-ups go on from the first repeat's session
        bare = _bare_decode(engine, opening, new_tokens)  # right after, same prompt
        pair = {"ttft_ms": first.stats.time_to_first_token_s * 1000, "prompt_tokens": first.stats.prompt_tokens,
                "shared_tokens": first.stats.shared_tokens, "decode_tokens_per_s": first.stats.decode_tokens_per_s,
                "bare_decode_tokens_per_s": bare["decode_tokens_per_s"], "whole_prefill_ms": bare["prefill_ms"]}
        if loaded.runtime == "llama.cpp":  # the peer, timed by llama.cpp itself on the same file, right after too
            # serving's peak is taken before the peer's context exists (llama.cpp's pool is allocated up
            # front, so the follow-ups below add next to nothing)
            peak_rss = peak_rss or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            plain = list(range(3, 3 + first.stats.prompt_tokens))  # a plain token prompt of the same length
            pair["llama_cpp"] = engine.runner.plain_timing(plain, new_tokens)
        paired.append(pair)

    rows = _followups(engine, conversation, turns, settings)
    median = lambda key: statistics.median(p[key] for p in paired)  # noqa: E731
    result = {
        "model": loaded.config.name, "runtime": loaded.runtime, "device": _device_name(engine),
        "dtype": _llm_dtype(loaded),
        "load_s": load_s, "image_encode_ms": statistics.median(encode_ms),
        "first_turn_ttft_ms": median("ttft_ms"),
        "first_turn_prompt_tokens": paired[0]["prompt_tokens"],
        "first_turn_shared_tokens": paired[0]["shared_tokens"],
        "whole_prefill_ms": median("whole_prefill_ms"),
        "decode_tokens_per_s": median("decode_tokens_per_s"),
        "bare_decode_tokens_per_s": median("bare_decode_tokens_per_s"),
        "engine_overhead": statistics.median(1 - p["decode_tokens_per_s"] / p["bare_decode_tokens_per_s"]
                                             for p in paired if p["bare_decode_tokens_per_s"]) if paired else None,
        "repeats": paired,
        "followups": rows,
        "peak_rss_bytes": peak_rss or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_cuda_bytes": torch.cuda.max_memory_allocated() if device.startswith("cuda") else None,
        "weight_bytes": sum(loaded.footprint.values()),
    }
    result.update(_bandwidth(result, loaded, device))
    if loaded.runtime == "llama.cpp":
        result.update(_against_llama_cpp(paired))
    return result


def _against_llama_cpp(paired: list[dict[str, Any]]) -> dict[str, Any]:
    """The peer's medians, and the median of each repeat's own ratio to it."""
    peers = [p["llama_cpp"] for p in paired]
    ratio = lambda ours, theirs: statistics.median(p[ours] / p["llama_cpp"][theirs] for p in paired)  # noqa: E731
    return {"llama_cpp": {key: statistics.median(p[key] for p in peers) for key in peers[0]},
            "decode_vs_llama_cpp": ratio("decode_tokens_per_s", "decode_tokens_per_s"),
            "ttft_vs_llama_cpp_prefill": ratio("ttft_ms", "prefill_ms"),
            "whole_prefill_vs_llama_cpp": ratio("whole_prefill_ms", "prefill_ms")}


def _llm_dtype(loaded: LoadedBundle) -> str:
    if loaded.runtime == "llama.cpp":
        return f"{quantized_mode(loaded.manifest) or 'gguf'} GGUF"
    return str(next(loaded.model.llm.parameters()).dtype)


def run_concurrency(engine: Engine, levels: list[int], new_tokens: int = 32) -> list[dict[str, Any]]:
    """N consultations at once through `Engine.stream` (the app's path), each with its own photo and
    question, fixed-length answers; and the same N one after another (today's baseline), per N. The
    engine's `max_batch` must be at least max(levels)."""
    loaded = engine.loaded
    settings = {"max_new_tokens": new_tokens, "do_sample": False, "fixed_length": True}
    engine.answer(Conversation().ask("Describe it.", [bench_photo(99)]), **settings)  # warm-up
    rows = []
    for n in levels:
        together = _sessions_at_once(engine, n, f"c{n}", settings, photos=1000 + 100 * n)
        serial_start = time.perf_counter()
        for i in range(n):
            engine.answer(_consultation(i, 2000 + 100 * n + i), session=f"s{n}-{i}", **settings)
        serial_s = time.perf_counter() - serial_start
        for i in range(n):
            engine.forget(f"c{n}-{i}"), engine.forget(f"s{n}-{i}")
        ttft = sorted(t["ttft_s"] * 1000 for t in together["answers"])
        rows.append({
            "sessions": n,
            "aggregate_tokens_per_s": n * new_tokens / together["wall_s"],
            "per_session_tokens_per_s": statistics.mean(t["decode_tokens_per_s"] for t in together["answers"]),
            "ttft_p50_ms": statistics.median(ttft), "ttft_p95_ms": ttft[min(len(ttft) - 1, int(0.95 * len(ttft)))],
            "max_gap_ms": max(t["max_gap_s"] for t in together["answers"]) * 1000,
            "serial_aggregate_tokens_per_s": n * new_tokens / serial_s,
            "largest_batch": engine.scheduler.largest_batch,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "peak_cuda_bytes": torch.cuda.max_memory_allocated() if loaded.device.startswith("cuda") else None,
        })
    return rows


def _consultation(i: int, photo: int) -> Conversation:
    question = f"{QUESTIONS[i % len(QUESTIONS)]} Please describe the skin in this photo."
    return Conversation().ask(question, [bench_photo(photo)])


def _sessions_at_once(engine: Engine, n: int, prefix: str, settings: dict[str, Any], photos: int) -> dict[str, Any]:
    """Start n answers together (a barrier), stream each in its own thread, time every piece. Each has a
    photo the engine has not seen (seeds from `photos`), so the n photos are encoded in the window, as
    the app encodes a photo when its question is sent."""
    import threading

    barrier, answers = threading.Barrier(n), [None] * n

    def one(i: int) -> None:
        barrier.wait()
        start = time.perf_counter()
        generation = engine.stream(_consultation(i, photos + i), session=f"{prefix}-{i}", **settings)
        "".join(generation)
        stamps = generation.stats.token_times  # (random weights often sample ids that print nothing)
        gaps = [b - a for a, b in zip(stamps, stamps[1:])]
        answers[i] = {"start": start, "end": stamps[-1], "ttft_s": generation.stats.time_to_first_token_s,
                      "decode_tokens_per_s": generation.stats.decode_tokens_per_s, "max_gap_s": max(gaps, default=0.0)}

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    wall = max(a["end"] for a in answers) - min(a["start"] for a in answers)
    return {"wall_s": wall, "answers": answers}


def format_concurrency(rows: list[dict[str, Any]]) -> str:
    lines = ["sessions  aggregate tok/s  serial tok/s  gain  per-session tok/s  TTFT p50 ms  p95 ms  max gap ms  peak RSS"]
    for r in rows:
        lines.append(f"{r['sessions']:>8}  {r['aggregate_tokens_per_s']:>15.1f}  {r['serial_aggregate_tokens_per_s']:>12.1f}"
                     f"  {r['aggregate_tokens_per_s'] / r['serial_aggregate_tokens_per_s']:>4.1f}x"
                     f"  {r['per_session_tokens_per_s']:>17.1f}  {r['ttft_p50_ms']:>11.0f}  {r['ttft_p95_ms']:>6.0f}"
                     f"  {r['max_gap_ms']:>10.0f}  {format_bytes(r['peak_rss_bytes'])}")
    return "\n".join(lines)


def _bare_decode(engine: Engine, conversation: Conversation, new_tokens: int) -> dict[str, float]:
    """Greedy decoding of the first turn's prompt (the same positions the engine was timed at) with
    nothing but LLM forwards and argmax: the floor the engine is held to. Its decode tokens/s, and the
    milliseconds its prefill of the whole prompt took (nothing shared, the photo's embeddings ready)."""
    from model.nn.skingpt import IMAGE_TOKEN_ID
    from model.serving.requests import ImagePosition

    positions, images, _ = engine.prompt.positions(conversation, engine.config.generation.max_context - new_tokens)
    embeds = {image.key: engine.encode(image) for image in images}
    if engine.loaded.runtime == "llama.cpp":
        return _bare_runner_decode(engine, positions, embeds, new_tokens)
    model = engine.model
    ids = [IMAGE_TOKEN_ID if isinstance(s, ImagePosition) else s for s in positions]
    image = torch.stack([embeds[image.key] for image in images])  # (N, Q, D)
    with torch.no_grad():
        from model.serving.kv_cache import new_cache

        cache = new_cache()
        _sync(str(engine.device))
        started = time.perf_counter()
        embeds = model.embed_inputs(torch.tensor([ids], device=engine.device), image)
        logits = model.llm(inputs_embeds=embeds, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
        token = int(logits[0, -1].argmax())
        _sync(str(engine.device))
        prefill_s = (start := time.perf_counter()) - started
        for _ in range(new_tokens - 1):
            logits = model.llm(input_ids=torch.tensor([[token]], device=engine.device), past_key_values=cache,
                               use_cache=True).logits
            token = int(logits[0, -1].argmax())
        _sync(str(engine.device))
        elapsed = time.perf_counter() - start
    return {"decode_tokens_per_s": (new_tokens - 1) / elapsed, "prefill_ms": 1000 * prefill_s}


def _bare_runner_decode(engine: Engine, positions: list, embeds: dict[str, torch.Tensor],
                        new_tokens: int) -> dict[str, float]:
    """The same loop on a runtime of its own (llama.cpp): the runner's prefill and decode calls alone,
    on an engine with nothing else in flight; the whole prompt is prefilled (nothing shared)."""
    runner = engine.runner
    state = runner.new_state()
    started = time.perf_counter()
    token = int(runner.prefill(state, positions, embeds).argmax())
    prefill_s = time.perf_counter() - started
    runner.join(state)
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        token = int(runner.decode([token])[0].argmax())
    elapsed = time.perf_counter() - start
    runner.free(runner.leave(0))  # the only row: nothing else decodes during the bench
    return {"decode_tokens_per_s": (new_tokens - 1) / elapsed, "prefill_ms": 1000 * prefill_s}



def _device_name(engine: Engine) -> str:
    if engine.loaded.device.startswith("cuda"):
        return torch.cuda.get_device_name()
    threads = getattr(engine.runner, "threads", None) or torch.get_num_threads()
    return f"cpu ({threads} threads)"


def _bandwidth(result: dict[str, Any], loaded: LoadedBundle, device: str) -> dict[str, Any]:
    """Decode reads every LLM weight once a token (of the input embeddings, one row): bytes read per
    token over the memory bandwidth (a GPU's data sheet; a CPU's measured here) bounds tokens/s."""
    llm = loaded.model.llm
    per_token = loaded.footprint["llm"] - module_bytes(llm.get_input_embeddings())  # (a GGUF's table row: ignored)
    if device.startswith("cuda"):
        peak = next((bw for name, bw in GPU_BANDWIDTH.items() if name in torch.cuda.get_device_name()), None)
    else:
        peak = read_bandwidth()
    if not peak:
        return {"bytes_per_token": per_token}
    bound = peak / per_token
    return {"bytes_per_token": per_token, "bandwidth_bytes_per_s": peak, "bound_tokens_per_s": bound,
            "bandwidth_used_bytes_per_s": result["decode_tokens_per_s"] * per_token,
            "bandwidth_fraction": result["decode_tokens_per_s"] / bound}


def read_bandwidth(megabytes: int = 512, reps: int = 5) -> float:
    """This machine's read bandwidth in bytes/s: summing a buffer far larger than any cache."""
    buffer = torch.ones(megabytes << 18)  # fp32: 4 bytes each
    buffer.sum()
    start = time.perf_counter()
    for _ in range(reps):
        buffer.sum()
    return reps * buffer.numel() * 4 / (time.perf_counter() - start)


def format_table(r: dict[str, Any]) -> str:
    lines = [f"model {r['model']} on {r['device']}, {r['dtype']} ({r['runtime']})",
             f"load                  {r['load_s']:.2f} s",
             f"image encode          {r['image_encode_ms']:.1f} ms",
             f"first turn TTFT       {r['first_turn_ttft_ms']:.1f} ms ({r['first_turn_prompt_tokens']} prompt positions, "
             f"{r['first_turn_shared_tokens']} of them the opening every prompt shares); the whole prompt "
             f"prefilled alone {r['whole_prefill_ms']:.0f} ms",
             f"decode                {r['decode_tokens_per_s']:.1f} tokens/s "
             f"(bare loop {r['bare_decode_tokens_per_s']:.1f}; engine overhead {100 * r['engine_overhead']:.1f}%)",
             "", "turn  prompt  prefilled  TTFT ms  reference-style ms  speed-up"]
    for row in r["followups"]:
        lines.append(f"{row['turn']:>4}  {row['prompt_tokens']:>6}  {row['prefill_tokens']:>9}  {row['ttft_ms']:>7.1f}"
                     f"  {row['baseline_ttft_ms']:>18.1f}  {row['speedup']:>7.1f}x")
    if r.get("llama_cpp"):
        own = r["llama_cpp"]
        lines.insert(5, f"llama.cpp's own       prefill {own['prefill_tokens_per_s']:.1f} tokens/s "
                        f"({own['prompt_tokens']:.0f} positions in {own['prefill_ms']:.0f} ms), decode "
                        f"{own['decode_tokens_per_s']:.1f} tokens/s: ours is {r['decode_vs_llama_cpp']:.0%} "
                        f"of it; first token {r['ttft_vs_llama_cpp_prefill']:.2f}x its prefill, the whole prompt "
                        f"prefilled alone {r['whole_prefill_vs_llama_cpp']:.2f}x")
    if len(r.get("repeats", [])) > 1:
        lines.insert(5, f"(medians of {len(r['repeats'])} back-to-back repeats; ratios: the median of each repeat's own)")
    lines += ["", f"peak RSS              {format_bytes(r['peak_rss_bytes'])}",
              f"weights               {format_bytes(r['weight_bytes'])}"]
    if r.get("peak_cuda_bytes") is not None:
        lines.append(f"peak CUDA             {format_bytes(r['peak_cuda_bytes'])}")
    if r.get("bandwidth_fraction"):
        lines.append(f"decode bandwidth      {r['bandwidth_used_bytes_per_s'] / 1e9:.1f} GB/s of "
                     f"{r['bandwidth_bytes_per_s'] / 1e9:.1f} ({100 * r['bandwidth_fraction']:.0f}% of the bound: "
                     f"{r['bytes_per_token'] / 1e9:.2f} GB read a token allows {r['bound_tokens_per_s']:.1f} tokens/s)")
    return "\n".join(lines)


def load_for_bench(preset_name: str | None, weights: str | None, policy: LoadPolicy, save: Path | None = None,
                   max_batch: int = 8) -> tuple[Engine, float]:
    """The engine the bench measures, and the seconds from nothing to it (a llama.cpp runner loads its
    model as the engine is made)."""
    from model.nn.config import preset

    start = time.perf_counter()
    if weights:
        loaded = load_bundle(weights, policy)
    else:
        config = preset(preset_name)
        config = replace(config, generation=replace(config.generation, do_sample=False))
        loaded = random_bundle(config, policy, save)
    engine = Engine(loaded, max_batch=max_batch)
    _sync(loaded.device)
    return engine, time.perf_counter() - start


def followup_ttft(engine, turns: int, new_tokens: int) -> list[dict[str, Any]]:
    """For the bench: one conversation through the API's path (parsing, inline photo, prefix match),
    each request carrying the whole history as a client sends it; time to first token per turn."""
    import base64
    import io

    from app.api.chat import ChatAPI

    api = ChatAPI(engine, engine.config.name)
    buffer = io.BytesIO()
    bench_photo(0).image.save(buffer, "JPEG")
    photo = f"data:image/jpeg;base64,{base64.b64encode(buffer.getvalue()).decode()}"
    messages: list[dict[str, Any]] = [{"role": "user", "content": [
        {"type": "text", "text": "Please describe the skin condition in this photo."},
        {"type": "image_url", "image_url": {"url": photo}}]}]
    rows = []
    for turn in range(turns + 1):
        body = {"model": api.model_id, "messages": messages, "max_tokens": new_tokens, "temperature": 0,
                "prompt_cache_key": "bench"}  # one caller's conversation: its follow-ups reuse its cache
        generation = api.start(api.prepare(body))
        text = "".join(generation).strip() or "(no text)"
        if turn:  # turn 0 is the first question; follow-ups are what the table is about
            stats = generation.stats
            rows.append({"turn": turn, "prompt_tokens": stats.prompt_tokens, "cached_tokens": stats.reused_tokens,
                         "ttft_ms": stats.time_to_first_token_s * 1000})
        messages += [{"role": "assistant", "content": text},
                     {"role": "user", "content": QUESTIONS[turn % len(QUESTIONS)]}]
    return rows


def format_followups(rows: list[dict[str, Any]]) -> str:
    lines = ["through the API (the whole history each time): turn, prompt, cached, TTFT ms"]
    lines += [f"{r['turn']:>4}  {r['prompt_tokens']:>6}  {r['cached_tokens']:>6}  {r['ttft_ms']:>7.1f}" for r in rows]
    return "\n".join(lines)
