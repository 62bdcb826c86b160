"""llama.cpp as the LLM runtime: a tiny bundle written as a GGUF file answers through the same engine,
scheduler and session cache as the torch runner, token for token (f32), batching, cancelling,
regenerating and making room in its fixed KV pool without changing an answer."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT
from model.prompt.conversation import Conversation
from model.serving.engine import Engine
from model.serving.requests import ImagePosition
from model.weights.bundle import BundleError, load_bundle, quantize_bundle, verify_bundle
from model.weights.gguf_llm import GGUF_FILE, GGUFError
from test_batching import QUESTIONS, _consult, _photo  # the same consultations as the torch runner's tests



@pytest.fixture(scope="module")
def gguf_bundles(tiny_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf")
    return {mode: quantize_bundle(tiny_bundle, out / mode, mode) for mode in ("f32", "q8_0")}


@pytest.fixture(scope="module")
def loaded_f32(gguf_bundles):
    return load_bundle(gguf_bundles["f32"])


def _three_turns(engine: Engine, session: str = "pin", **settings) -> list[dict]:
    """A photo, a follow-up, a second photo: tokens and prompt figures per turn."""
    turns = []
    conversation = Conversation().ask("What's wrong with my skin?", [_photo(0)])
    for question, images in (("What else do you see?", []), ("And in this second photo?", [_photo(1)]), (None, None)):
        gen = engine.stream(conversation, session=session, do_sample=False, max_new_tokens=20, **settings)
        text = "".join(gen)
        turns.append({"tokens": gen.tokens, "text": text, "prompt_tokens": gen.stats.prompt_tokens,
                      "reused_tokens": gen.stats.reused_tokens, "prefill_tokens": gen.stats.prefill_tokens})
        if question is None:
            break
        conversation = conversation.answer(text.strip()).ask(question, images)
    return turns


def test_an_f32_gguf_answers_token_for_token_as_torch(tiny_bundle, loaded_f32):
    assert loaded_f32.runtime == "llama.cpp" and "llama.cpp runs the bundle's LLM (f32 GGUF)" in loaded_f32.note
    torch_turns = _three_turns(Engine(load_bundle(tiny_bundle)))
    llama_turns = _three_turns(Engine(loaded_f32))
    assert [t["tokens"] for t in llama_turns] == [t["tokens"] for t in torch_turns]
    assert llama_turns == torch_turns  # the same prompts, reuse and text too
    follow_up = llama_turns[1]
    assert follow_up["reused_tokens"] >= llama_turns[0]["prompt_tokens"]  # the session's sequence was kept
    assert follow_up["prefill_tokens"] == follow_up["prompt_tokens"] - follow_up["reused_tokens"]


def _teacher_forced_top1(engine: Engine, reference: Engine, photos: int, tokens: int) -> float:
    """Feed the reference's greedy tokens to the engine's runner; how often its own top-1 agrees."""
    agree = total = 0
    for seed in range(photos):
        conversation = Conversation().ask(QUESTIONS[seed % len(QUESTIONS)], [_photo(seed)])
        gen = reference.stream(conversation, fixed_length=True, do_sample=False, max_new_tokens=tokens)
        "".join(gen)
        forced = gen.tokens
        positions, images, _ = engine.prompt.positions(conversation, 900)
        runner = engine.runner
        state = runner.new_state()
        logits = runner.prefill(state, positions, {img.key: engine.encode(img) for img in images})
        runner.join(state)
        for token in forced:
            agree += int(logits.argmax()) == token
            total += 1
            logits = runner.decode([token])[0]
        runner.free(runner.leave(0))
    return agree / total


def test_q8_0_keeps_top1_agreement(gguf_bundles, loaded_f32):
    engine = Engine(load_bundle(gguf_bundles["q8_0"]))
    agreement = _teacher_forced_top1(engine, Engine(loaded_f32), photos=4, tokens=24)
    # measured on this tiny random model: 0.979 (94 of 96; q4_0: 0.73); random weights have many near-ties
    assert agreement >= 0.9, agreement


def test_four_consultations_decoded_together_equal_each_alone(loaded_f32):
    settings = {"do_sample": False, "max_new_tokens": 14}
    alone = {n: _consult(Engine(loaded_f32), n, **settings) for n in range(4)}
    engine = Engine(loaded_f32, max_batch=4)
    barrier, together = threading.Barrier(4), {}
    threads = [threading.Thread(target=lambda n=n: together.setdefault(n, _consult(engine, n, barrier, **settings)))
               for n in range(4)]
    [t.start() for t in threads]
    [t.join(120) for t in threads]
    assert engine.scheduler.largest_batch >= 2, "the answers were not batched"
    assert together == alone


def _fed_whole(engine: Engine, conversation: Conversation, tokens: int) -> list[int]:
    """Greedy tokens with every prompt position fed to the runner on a fresh state (nothing shared)."""
    positions, images, _ = engine.prompt.positions(conversation, 900)
    runner, state, out = engine.runner, engine.runner.new_state(), []
    logits = runner.prefill(state, positions, {img.key: engine.encode(img) for img in images})
    runner.join(state)
    for _ in range(tokens):
        out.append(int(logits.argmax()))
        logits = runner.decode([out[-1]])[0]
    runner.free(runner.leave(0))
    return out


def test_a_new_consultation_shares_the_opening_and_answers_as_if_fed_whole(loaded_f32):
    """Every prompt opens with BOS, the system text and the first question's words before its photo:
    computed once when the engine is made; each new consultation's sequence shares those cells. Its
    answer is the one a sequence fed the whole prompt gives, and a session that shared the opening
    and is then forgotten takes none of it away."""
    engine = Engine(loaded_f32)
    opening = engine.prompt.opening()
    assert len(opening) > 20 and all(isinstance(p, int) for p in opening)
    for seed, question in enumerate(("What's wrong with my skin?", "Is this mole dangerous?")):
        conversation = Conversation().ask(question, [_photo(seed)])
        positions, _, _ = engine.prompt.positions(conversation, 900)
        assert positions[:len(opening)] == opening and isinstance(positions[len(opening)], ImagePosition)
        gen = engine.stream(conversation, session=f"new{seed}", do_sample=False, max_new_tokens=12, fixed_length=True)
        "".join(gen)
        assert (gen.stats.shared_tokens, gen.stats.reused_tokens) == (len(opening), 0)
        assert gen.stats.prefill_tokens == gen.stats.prompt_tokens - len(opening)
        assert gen.tokens == _fed_whole(engine, conversation, 12)
        engine.forget(f"new{seed}")  # its sequence goes; the opening's cells stay for the next


def test_cancel_leaves_the_others_and_a_dropped_stream_frees_its_sequence(loaded_f32):
    settings = {"do_sample": False, "max_new_tokens": 24}
    alone = {n: _consult(Engine(loaded_f32), n, **settings)[0] for n in (0, 2)}
    engine = Engine(loaded_f32, max_batch=4)
    runner = engine.runner
    cancel = threading.Event()
    streams = {n: engine.stream(Conversation().ask(QUESTIONS[n], [_photo(n)]), session=f"patient-{n}",
                                fixed_length=True, cancel=cancel if n == 1 else None, **settings) for n in range(3)}
    dropped = engine.stream(Conversation().ask("Describe it.", [_photo(7)]), fixed_length=True, **settings)
    results = {}
    threads = [threading.Thread(target=lambda n=n: results.setdefault(n, ("".join(streams[n]), streams[n].tokens)))
               for n in (0, 2)]
    [t.start() for t in threads]
    next(iter(streams[1]))
    cancel.set()
    next(iter(dropped))
    dropped.close()
    [t.join(120) for t in threads]
    "".join(streams[1])  # drain what the cancelled answer still holds
    assert streams[1].finish_reason == "cancelled"
    assert {n: results[n][1] for n in (0, 2)} == alone
    # three named sessions keep their sequences, and the opening every prompt shares its own; the unnamed,
    # dropped one gave its back
    deadline = time.monotonic() + 120  # the scheduler frees it at its next step; the limit is a safety net
    while len(runner._free_seqs) != runner.max_sequences - 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(runner._free_seqs) == runner.max_sequences - 4


def test_regenerate_removes_the_old_answers_tail(loaded_f32):
    import llama_cpp

    engine = Engine(loaded_f32)
    conversation = Conversation().ask("What is it?", [_photo(3)])
    first = engine.stream(conversation, session="regen", do_sample=False, max_new_tokens=16)
    "".join(first)
    again = engine.stream(conversation, session="regen", do_sample=False, max_new_tokens=16)
    "".join(again)
    assert again.tokens == first.tokens
    assert again.stats.reused_tokens == again.stats.prompt_tokens - 1  # all of the prompt but its last position
    state = engine.sessions._sessions["regen"].state
    # what llama.cpp holds is the prompt and this answer only: the first answer's tail was removed
    assert llama_cpp.llama_memory_seq_pos_max(engine.runner.memory, state.seq) == state.length - 1
    assert state.length == again.stats.prompt_tokens + len(again.tokens) - 1  # the last token is sampled, not fed
    assert state.length == len(engine.sessions._sessions["regen"].positions)


def test_a_full_kv_pool_drops_idle_sessions_and_answers_alike(loaded_f32):
    engine = Engine(loaded_f32)  # a pool of one context (1024 positions) for the tiny bundle
    assert engine.runner.kv_cells == 1024
    settings = {"do_sample": False, "max_new_tokens": 40}
    first = [_consult(engine, n, **settings) for n in range(12)]  # ~12 x 170 positions: over the pool
    assert len(engine.sessions._sessions) < 12, "no idle session was dropped"
    assert [_consult(Engine(loaded_f32), n, **settings) for n in (0, 11)] == [first[0], first[11]]


def test_a_damaged_gguf_is_refused_by_name(gguf_bundles, tmp_path):
    bundle = tmp_path / "damaged"
    shutil.copytree(gguf_bundles["q8_0"], bundle)
    path = bundle / "llm" / GGUF_FILE
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=f"llm/{GGUF_FILE} fails its sha256 check"):
        verify_bundle(bundle)


def test_without_llama_cpp_the_message_names_the_install_step(gguf_bundles, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # `import llama_cpp` now fails
    with pytest.raises(GGUFError, match=r"llama-cpp-python is not installed.*pip install -r requirements.txt"):
        load_bundle(gguf_bundles["q8_0"])


def test_ask_and_chat_answer_through_llama_cpp(gguf_bundles, tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 300, 3), dtype=np.uint8)).save(tmp_path / "p.jpg")
    weights = str(gguf_bundles["q8_0"])
    ask = subprocess.run([sys.executable, str(ROOT / "launch.py"), "ask", "--weights", weights, "--image",
                          str(tmp_path / "p.jpg"), "--question", "What is this rash?", "--json",
                          "--max-new-tokens", "8"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert ask.returncode == 0, ask.stderr
    assert "llama.cpp runs the bundle's LLM (q8_0 GGUF)" in ask.stderr
    import json

    assert json.loads(ask.stdout)["finish_reason"] in ("stop", "eos", "length")
    script = "/image " + str(tmp_path / "p.jpg") + "\nWhat is it?\nAnd the cause?\n/quit\n"
    chat = subprocess.run([sys.executable, str(ROOT / "launch.py"), "chat", "--weights", weights,
                           "--max-new-tokens", "6"], input=script, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.count("skingpt> ") == 2 and "llama.cpp" in chat.stderr


def test_the_page_and_v1_answer_through_llama_cpp(gguf_bundles, tmp_path):
    import base64
    import io

    import httpx
    from gradio_client import Client, handle_file

    from conftest import start_server

    photo = tmp_path / "arm.png"
    Image.fromarray(np.random.default_rng(4).integers(0, 256, (96, 128, 3), dtype=np.uint8)).save(photo)
    servers = start_server(tmp_path, SKINGPT_WEIGHTS=str(gguf_bundles["q8_0"]))
    server = next(servers)
    try:
        assert "llama.cpp runs the bundle's LLM (q8_0 GGUF)" in server.output()
        # the start-up line names the CPU code llama.cpp runs (this install's is built for this machine)
        assert "llama.cpp's CPU code: built for this machine's CPU when it was installed" in server.output()
        client = Client(server.url, verbose=False, download_files=False)
        history = client.predict({"text": "What is this?", "files": [handle_file(str(photo))]}, 16, False, 1.0, 0.9,
                                 api_name="/ask")[0]
        assert history[-1]["role"] == "assistant" and history[-1]["content"][0]["text"]
        buffer = io.BytesIO()
        Image.open(photo).save(buffer, "PNG")
        url = f"data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}"
        message = {"role": "user", "content": [{"type": "text", "text": "Describe it."},
                                               {"type": "image_url", "image_url": {"url": url}}]}
        response = httpx.post(server.url + "v1/chat/completions", timeout=120,
                              json={"model": "tiny", "messages": [message], "max_tokens": 8, "temperature": 0})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["usage"]["prompt_tokens"] > 32 and body["usage"]["completion_tokens"] > 0
    finally:
        next(servers, None)


def test_a_prefill_chunk_longer_than_llama_cpps_batch_is_fed_in_pieces(loaded_f32, tiny_bundle):
    conversation = Conversation().ask(QUESTIONS[1] * 6, [_photo(5)])  # a prompt of some 300 positions
    alike = [Engine(loaded, prefill_chunk=512).stream(conversation, fixed_length=True, do_sample=False,
                                                      max_new_tokens=8) for loaded in (loaded_f32, load_bundle(tiny_bundle))]
    for gen in alike:
        "".join(gen)
    assert alike[0].stats.prompt_tokens > 192  # llama.cpp's batch here: the chunk needed pieces
    assert alike[0].tokens == alike[1].tokens


def test_inspect_names_a_gguf_bundle(gguf_bundles):
    from model.weights.summary import describe_bundle, format_text

    assert "the LLM is stored quantised to q8_0 (one GGUF file, run by llama.cpp)" in format_text(
        describe_bundle(gguf_bundles["q8_0"]))


def test_bench_writes_a_random_gguf_bundle_and_times_it_beside_llama_cpp(tmp_path):
    import json

    save = tmp_path / "tiny-q8_0"
    args = [sys.executable, str(ROOT / "launch.py"), "bench", "--preset", "tiny", "--random-init", "--quantize", "q8_0",
            "--save", str(save), "--turns", "1", "--new-tokens", "8", "--concurrency", "1,2", "--repeat", "3", "--json"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["runtime"] == "llama.cpp" and result["dtype"] == "q8_0 GGUF"
    own = result["llama_cpp"]  # llama.cpp's own counters on the same file
    assert own["prompt_tokens"] == result["first_turn_prompt_tokens"] and own["decode_tokens"] == 8
    assert own["decode_tokens_per_s"] > 0 and result["decode_tokens_per_s"] > 0
    repeats = result["repeats"]  # three back-to-back triples: ours, the bare loop, llama.cpp's own
    assert len(repeats) == 3 and all(r["llama_cpp"]["decode_tokens"] == 8 for r in repeats)
    ratios = sorted(r["decode_tokens_per_s"] / r["llama_cpp"]["decode_tokens_per_s"] for r in repeats)
    assert result["decode_vs_llama_cpp"] == pytest.approx(ratios[1])  # the median of each repeat's own ratio
    assert result["decode_tokens_per_s"] == sorted(r["decode_tokens_per_s"] for r in repeats)[1]
    assert [row["sessions"] for row in result["concurrency"]] == [1, 2]
    sources = json.loads((save / "manifest.json").read_text())["sources"]
    assert sources["quantized_from"]["mode"] == "q8_0" and sources["quantized_from"]["runtime"] == "llama.cpp"
    again = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert again.returncode == 0 and "using the bundle already at" in again.stderr


def test_a_gguf_bundle_keeps_the_policy_s_encoder_compute(gguf_bundles):
    """`encoder_compute="stored"` (training's, and a caller's choice) reached torch bundles only."""
    from torch.nn.utils import parametrize

    from model.weights.policy import LoadPolicy

    stored = load_bundle(gguf_bundles["f32"], LoadPolicy(encoder_compute="stored"))
    assert stored.policy.encoder_compute == "stored"
    assert not parametrize.is_parametrized(stored.model.vision.blocks[0].attn.qkv)


def test_llama_cpps_cpu_code_and_its_thread_pool_are_found_as_llama_bench_finds_them():
    import llama_cpp

    from model.serving.llama_backend import Threadpool, cpu_variant, ensure_backends

    ensure_backends(llama_cpp)  # linked in here: nothing to load, and no error
    assert cpu_variant() == "native"  # pip built it for this machine (GGML_NATIVE), no libggml-cpu-<variant>.so
    pool = Threadpool(llama_cpp, 2)
    assert pool.pool  # made through the CPU backend's registry entry, as llama-bench makes its own
    pool.close()
    assert pool.pool is None


def test_the_installed_llama_cpp_runs_its_own_thread_pool_not_openmp():
    """requirements.txt builds llama.cpp with GGML_OPENMP=OFF: with OpenMP its barriers are libgomp's,
    shared with PyTorch's pools, and a 7B decode step beside the photo encoder took 21% longer (issue 31).
    The check itself reads llama.cpp's own feature list, so a build with OpenMP is told."""
    import llama_cpp

    from model.serving.llama_backend import uses_openmp

    info = llama_cpp.llama_print_system_info()
    assert b"CPU :" in info  # the feature list the check reads is there
    assert not uses_openmp(llama_cpp), info.decode()
