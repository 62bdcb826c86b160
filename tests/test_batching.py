"""Continuous batching on the tiny bundle: answers decoded together are token for token the answers
each gets alone (greedy, fp32), seeded sampling too; joining, leaving, cancelling, queueing and
evicting idle caches never change an answer."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from PIL import Image

from model.weights.bundle import load_bundle
from model.prompt.conversation import Conversation, ImageInput
from model.serving.engine import Engine

QUESTIONS = ["What is it?", "Please describe the skin condition in this photo in detail, with its colour and border.",
             "Is this rash dangerous?", "Describe it."]


def _photo(seed: int) -> ImageInput:
    return ImageInput.of(Image.fromarray(np.random.default_rng(seed).integers(0, 256, (90, 120, 3), dtype=np.uint8)))


@pytest.fixture(scope="module")
def loaded(tiny_bundle):
    return load_bundle(tiny_bundle)


def _consult(engine: Engine, n: int, barrier: threading.Barrier | None = None, **settings) -> list[list[int]]:
    """Consultation n: its own photo and question, an answer, then a follow-up. Token ids per turn."""
    conversation = Conversation().ask(QUESTIONS[n % len(QUESTIONS)], [_photo(n)])
    turns = []
    for follow_up in ("What could cause it?", None):
        if barrier is not None:
            barrier.wait()
        generation = engine.stream(conversation, session=f"patient-{n}", fixed_length=True, **settings)
        text = "".join(generation)
        turns.append(list(generation.tokens))
        if follow_up is None:
            break
        conversation = conversation.answer(text.strip()).ask(follow_up)
    return turns


def _together(engine: Engine, count: int, **settings) -> dict[int, list[list[int]]]:
    barrier, results = threading.Barrier(count), {}
    threads = [threading.Thread(target=lambda n=n: results.setdefault(n, _consult(engine, n, barrier, **settings)))
               for n in range(count)]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    return results


def test_greedy_answers_decoded_together_equal_each_alone(loaded):
    settings = {"do_sample": False, "max_new_tokens": 14}
    alone = {n: _consult(Engine(loaded), n, **settings) for n in range(4)}
    engine = Engine(loaded, max_batch=4)
    together = _together(engine, 4, **settings)
    assert engine.scheduler.largest_batch >= 2, "the answers were not batched"
    assert together == alone


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(loaded):
    settings = {"do_sample": True, "temperature": 1.3, "top_p": 0.95, "top_k": 40, "seed": 7, "max_new_tokens": 14}
    alone = {n: _consult(Engine(loaded), n, **settings) for n in range(3)}
    engine = Engine(loaded, max_batch=3)
    assert _together(engine, 3, **settings) == alone and engine.scheduler.largest_batch >= 2


def test_one_cancelled_answer_leaves_the_others_alone_and_its_session_goes_on(loaded):
    settings = {"do_sample": False, "max_new_tokens": 30, "fixed_length": True}
    conversations = [Conversation().ask(QUESTIONS[n], [_photo(n)]) for n in range(3)]
    alone = [Engine(loaded).stream(c, **settings) for c in conversations]
    alone = ["".join(g) and g.tokens for g in alone]
    engine = Engine(loaded, max_batch=3)
    cancel = threading.Event()
    streams = [engine.stream(c, session=f"c{n}", cancel=cancel if n == 1 else None, **settings)
               for n, c in enumerate(conversations)]
    iterators = [iter(s) for s in streams]
    for it in iterators:
        next(it)  # all three are under way
    cancel.set()
    for it in iterators:
        list(it)
    assert streams[1].finish_reason == "cancelled" and len(streams[1].tokens) < 30
    assert [streams[0].tokens, streams[2].tokens] == [alone[0], alone[2]]
    follow = conversations[1].answer(streams[1].text.strip()).ask("And now?")
    again = engine.stream(follow, session="c1", max_new_tokens=5, do_sample=False)
    assert "".join(again) is not None and again.finish_reason in ("eos", "stop", "length")
    assert again.stats.reused_tokens > 0  # the stopped answer's cache serves the follow-up


def test_a_request_joins_a_running_batch_and_one_leaves_it(loaded):
    long_conv, short_conv = Conversation().ask(QUESTIONS[1], [_photo(1)]), Conversation().ask(QUESTIONS[0], [_photo(2)])
    alone_long = Engine(loaded).stream(long_conv, do_sample=False, max_new_tokens=40, fixed_length=True)
    alone_short = Engine(loaded).stream(short_conv, do_sample=False, max_new_tokens=6, fixed_length=True)
    "".join(alone_long), "".join(alone_short)
    engine = Engine(loaded, max_batch=4)
    running = engine.stream(long_conv, session="long", do_sample=False, max_new_tokens=40, fixed_length=True)
    pieces = iter(running)
    for _ in range(3):
        next(pieces)
    steps_before = engine.scheduler.steps
    joining = engine.stream(short_conv, session="short", do_sample=False, max_new_tokens=6, fixed_length=True)
    "".join(joining)  # joins, finishes and leaves while the long one goes on
    list(pieces)
    assert joining.tokens == alone_short.tokens and running.tokens == alone_long.tokens
    assert engine.scheduler.largest_batch == 2 and engine.scheduler.steps > steps_before


def test_a_full_batch_queues_and_says_where_each_request_stands(loaded):
    engine = Engine(loaded, max_batch=1)
    settings = {"do_sample": False, "max_new_tokens": 20, "fixed_length": True}
    first = engine.stream(Conversation().ask("What is it?", [_photo(0)]), session="a", **settings)
    first_pieces = iter(first)
    next(first_pieces)
    second = engine.stream(Conversation().ask("What is it?", [_photo(1)]), session="b", **settings)
    events = second.events()
    assert next(events) == ("queued", 1)
    list(first_pieces)
    kinds = {kind for kind, _ in events}
    assert kinds == {"text"} and second.finish_reason == "length" and len(second.tokens) == 20


def test_eviction_under_a_small_byte_budget_then_a_follow_up_gives_the_same_answer(loaded):
    settings = {"do_sample": False, "max_new_tokens": 10}
    kept, evicting = Engine(loaded), Engine(loaded, kv_cache_bytes=1)
    for n in range(2):
        assert _consult(kept, n, **settings) == _consult(evicting, n, **settings)
    assert evicting.cached_bytes() == 0 and kept.cached_bytes() > 0
    conversation = Conversation().ask("What is it?", [_photo(0)])
    turn = evicting.stream(conversation, session="patient-0", fixed_length=True, **settings)
    "".join(turn)
    assert turn.stats.reused_tokens == 0  # evicted: it prefilled everything again, transparently


def test_a_dropped_stream_frees_its_batch_slot(loaded):
    engine = Engine(loaded, max_batch=1)
    settings = {"do_sample": False, "max_new_tokens": 200, "fixed_length": True}
    dropped = engine.stream(Conversation().ask("What is it?", [_photo(0)]), session="gone", **settings)
    next(iter(dropped))
    dropped.close()
    nxt = engine.stream(Conversation().ask("What is it?", [_photo(1)]), session="next", **{**settings, "max_new_tokens": 5})
    assert "".join(nxt) is not None and nxt.finish_reason == "length"
    assert dropped.finish_reason == "cancelled" and len(dropped.tokens) < 200


def test_long_prefills_are_chunked_between_decode_steps(loaded):
    engine = Engine(loaded, max_batch=2, prefill_chunk=8)
    long_question = " ".join(["Please describe the plaque, its scale, colour and border."] * 12)
    running = engine.stream(Conversation().ask("What is it?", [_photo(0)]), session="r", do_sample=False,
                            max_new_tokens=60, fixed_length=True)
    pieces = iter(running)
    next(pieces)
    steps = engine.scheduler.steps
    joining = engine.stream(Conversation().ask(long_question, [_photo(1)]), session="j", do_sample=False,
                            max_new_tokens=2, fixed_length=True)
    "".join(joining)
    assert joining.stats.prefill_tokens > 8 * 5
    # a decode step per chunk: the text in chunks of 8, the image's 32 query positions as one chunk of
    # their own (never split); the old bound counted them as 4 and passed only by the race's luck
    text_chunks = (joining.stats.prefill_tokens - 32) // 8
    assert engine.scheduler.steps - steps >= text_chunks
    list(pieces)
