"""The streaming engine on the tiny bundle: KV reuse is exact, images stay in context, stops,
cancellation, context budget, and concurrent callers."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from PIL import Image

import model.serving.engine as engine_module
from model.weights.bundle import load_bundle
from model.prompt.conversation import Conversation, ImageInput, render
from model.serving.engine import Engine
from model.serving.detokenize import visible as _visible
from model.serving.requests import ImagePosition
from model.nn.skingpt import IMAGE_TOKEN_ID, tokenize_prompt


def _photo(seed: int) -> ImageInput:
    return ImageInput.of(Image.fromarray(np.random.default_rng(seed).integers(0, 256, (90, 120, 3), dtype=np.uint8)))


@pytest.fixture(scope="module")
def engine(tiny_bundle):
    return Engine(load_bundle(tiny_bundle))


def _greedy_from_scratch(engine: Engine, conversation: Conversation, n: int) -> list[int]:
    """Independent of any cache: every step runs the full prompt plus what was generated so far."""
    model = engine.model
    text = render(engine.template, conversation)
    ids = tokenize_prompt(engine.tokenizer, text, "<ImageHere>", engine.config.qformer.num_query_tokens)
    images = torch.stack([engine.encode(img) for img in conversation.images])
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            embeds = model.embed_inputs(torch.tensor([ids + out]), images)
            out.append(int(model.llm(inputs_embeds=embeds, use_cache=False).logits[0, -1].argmax()))
    return out


def test_kv_reuse_over_three_turns_equals_full_recompute(engine):
    conversation = Conversation().ask("Describe the skin condition in this photo.", [_photo(0)])
    questions = ["What else do you see?", "What could cause it?"]
    for turn in range(3):
        gen = engine.stream(conversation, session="exact", do_sample=False, max_new_tokens=12, fixed_length=True)
        text = "".join(gen)
        assert gen.tokens == _greedy_from_scratch(engine, conversation, 12), f"turn {turn}"
        if turn:
            assert gen.stats.reused_tokens > 0 and gen.stats.prefill_tokens < gen.stats.prompt_tokens
        if turn < 2:
            conversation = conversation.answer(text.strip()).ask(questions[turn])
    engine.forget("exact")


def test_reuse_after_the_history_changes_is_exact(engine):
    """Regenerating with an edited question diverges inside the cached prefix: the cache must be cut
    back to the divergence, not merely appended to."""
    image = _photo(10)
    base = Conversation().ask("Describe the skin condition in this photo.", [image])
    first = engine.stream(base, session="edit", do_sample=False, max_new_tokens=10, fixed_length=True)
    conversation = base.answer("".join(first).strip()).ask("What could cause it?")
    "".join(engine.stream(conversation, session="edit", do_sample=False, max_new_tokens=10, fixed_length=True))
    edited = base.answer("".join(first).strip()).ask("Is it contagious to my children?")
    gen = engine.stream(edited, session="edit", do_sample=False, max_new_tokens=10, fixed_length=True)
    "".join(gen)
    assert 0 < gen.stats.reused_tokens < gen.stats.prompt_tokens
    assert gen.tokens == _greedy_from_scratch(engine, edited, 10)
    engine.forget("edit")


def test_followup_prefill_holds_the_image(engine):
    """Inspect what the model is fed for a follow-up: the image's 32 embeddings are in it."""
    image = _photo(1)
    conversation = Conversation().ask("Describe this.", [image])
    first = engine.stream(conversation, session="img", do_sample=False, max_new_tokens=4, fixed_length=True)
    conversation = conversation.answer("".join(first).strip()).ask("And the cause?")

    captured = []
    hook = engine.model.llm.register_forward_pre_hook(
        lambda module, args, kwargs: captured.append(kwargs.get("inputs_embeds")), with_kwargs=True)
    try:
        fresh = engine.stream(conversation, session=None, do_sample=False, max_new_tokens=2)  # no reuse
        "".join(fresh)
    finally:
        hook.remove()
    positions, _, _ = engine.prompt.positions(conversation, 10_000)
    opening = fresh.stats.shared_tokens  # the opening every prompt starts with is not fed again
    assert fresh.stats.reused_tokens == 0 and opening == len(engine.prompt.opening())
    prefill = torch.cat([c[0] for c in captured if c is not None])[:len(positions) - opening]  # over its chunks
    positions = [i for i, s in enumerate(positions) if isinstance(s, ImagePosition)]
    assert len(positions) == 32
    torch.testing.assert_close(prefill[[i - opening for i in positions]], engine.encode(image))

    # with reuse, the image stays in the session's KV cache: its positions are there, in place
    reused = engine.stream(conversation, session="img", do_sample=False, max_new_tokens=2, fixed_length=True)
    "".join(reused)
    cached = engine.sessions.positions_of("img")
    assert [cached[i] for i in positions] == [ImagePosition(image.key, j) for j in range(32)]
    assert reused.stats.reused_tokens > positions[-1]
    engine.forget("img")


def test_second_image_goes_to_its_own_turn(engine):
    a, b = _photo(2), _photo(3)
    conversation = Conversation().ask("Here is my arm.", [a]).answer("I see a red patch.").ask("And my leg, weeks later.", [b])
    positions, images, _ = engine.prompt.positions(conversation, 10_000)
    keys = [s.key for s in positions if isinstance(s, ImagePosition)]
    assert keys == [a.key] * 32 + [b.key] * 32 and images == [a, b]
    gen = engine.stream(conversation, do_sample=False, max_new_tokens=3, fixed_length=True)
    "".join(gen)
    assert len(gen.tokens) == 3 and gen.stats.prompt_tokens == len(positions)


class _Scripted:
    """Stands in for the sampler: returns the scripted tokens in order, whatever the logits."""

    script: list[int] = []

    def __init__(self, *args, **kwargs):
        self.tokens = iter(type(self).script)

    def __call__(self, logits):
        return next(self.tokens)


@pytest.fixture
def scripted(monkeypatch, engine):
    def use(text: str, eos: bool = False) -> list[int]:
        ids = engine.tokenizer(text, add_special_tokens=False).input_ids
        _Scripted.script = ids + ([engine.tokenizer.eos_token_id] if eos else []) + [engine.tokenizer.eos_token_id] * 50
        return ids
    monkeypatch.setattr(engine_module, "Sampler", _Scripted)
    return use


def _ask(engine, **kw):
    return engine.stream(Conversation().ask("What is it?", [_photo(4)]), **kw)


def test_stop_string_is_held_back_never_shown(engine, scripted):
    scripted("It looks like eczema. ###Human: more")
    gen = _ask(engine, max_new_tokens=40)
    pieces = list(gen)
    assert gen.finish_reason == "stop"
    assert "".join(pieces) == gen.text
    assert gen.text.strip() == "It looks like eczema."
    assert not any("#" in p for p in pieces)


def test_partial_stop_is_released_when_it_is_not_a_stop(engine, scripted):
    scripted("Use cream #2 daily")
    gen = _ask(engine, max_new_tokens=40)
    pieces = list(gen)
    assert "".join(pieces).strip() == "Use cream #2 daily" and gen.finish_reason == "eos"
    shown = ""
    for piece in pieces:  # no piece ever ends on a '#' that a later piece would have to take back
        shown += piece
        assert "###" not in shown


def test_eos_and_max_tokens(engine, scripted):
    ids = scripted("Psoriasis plaque", eos=True)
    gen = _ask(engine, max_new_tokens=40)
    assert "".join(gen).strip() == "Psoriasis plaque" and gen.finish_reason == "eos" and gen.tokens == ids
    scripted("one two three four five six seven eight nine ten")
    gen = _ask(engine, max_new_tokens=3)
    "".join(gen)
    assert gen.finish_reason == "length" and len(gen.tokens) == 3


@pytest.mark.parametrize("text", ["湿疹 eczema 🙂 ok", "a🙂b", "红斑，鳞屑。###Human: more", "🙂"])
def test_multibyte_characters_stream_exactly(engine, scripted, text):
    """The tiny tokenizer falls back to bytes for CJK and emoji, as Llama's does: 3-4 tokens a
    character. Every piece shown is whole text, and the pieces add up to the exact answer."""
    ids = scripted(text, eos=True)
    assert len(ids) > len(text.split("###")[0]) // 2  # byte fallback really is in play
    gen = _ask(engine, max_new_tokens=80)
    pieces = list(gen)
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) == gen.text
    assert gen.text.strip() == text.split("###")[0].strip()


def test_stored_answer_is_the_streamed_text(engine, scripted):
    """What the app stores and feeds back next turn is exactly what was shown."""
    scripted("湿疹 eczema 🙂 ok", eos=True)
    gen = _ask(engine, max_new_tokens=80, session="multibyte")
    shown = "".join(gen)
    conversation = Conversation().ask("What is it?", [_photo(4)]).answer(shown.strip())
    assert conversation.turns[0].answer == "湿疹 eczema 🙂 ok"


def test_incremental_decoder_reproduces_any_mixed_text(engine):
    """Random texts of English words, Chinese, emoji, digits and punctuation: streamed token by token,
    the pieces are exactly the whole decode, and no piece holds a replacement character."""
    from model.serving.detokenize import IncrementalDecoder

    rng = np.random.default_rng(0)
    vocabulary = ["plaque", " scale", "湿疹", "红斑", "🙂", "👍🏽", " 3", ".", "，", "ö", " the", "\n", "é"]
    tok = engine.tokenizer
    for _ in range(40):
        text = "".join(rng.choice(vocabulary, 12))
        ids = tok(text, add_special_tokens=False).input_ids
        decoder = IncrementalDecoder(tok)
        pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
        assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True)
        assert not any("\ufffd" in piece for piece in pieces)


def test_a_session_left_open_by_its_consumer_does_not_block_the_next_answer(engine):
    """A consumer that goes away without closing the stream (a cancelled request) leaves its answer
    suspended; the session's next question must still be answered, not wait for it."""
    conversation = Conversation().ask("What is it?", [_photo(5)])
    abandoned = engine.stream(conversation, session="left-open", do_sample=False, max_new_tokens=20, fixed_length=True)
    next(iter(abandoned))  # started, then never resumed nor closed
    result = {}
    worker = threading.Thread(target=lambda: result.setdefault("text", engine.answer(
        conversation, session="left-open", do_sample=False, max_new_tokens=5, fixed_length=True)))
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive() and result["text"]
    again = engine.stream(conversation, session="left-open", do_sample=False, max_new_tokens=5, fixed_length=True)
    assert "".join(again) == result["text"] and again.stats.reused_tokens > 0  # the cache serves again


def test_cancel_stops_within_one_token(engine):
    cancel = threading.Event()
    gen = _ask(engine, do_sample=False, max_new_tokens=50, fixed_length=True, cancel=cancel)
    pieces = []
    for piece in gen:
        pieces.append(piece)
        cancel.set()
    assert gen.finish_reason == "cancelled"
    assert len(gen.tokens) <= 2 + len(pieces)  # the token in flight, then it stops
    assert len(gen.tokens) < 50


def test_budget_drops_oldest_text_keeps_images_and_question(engine):
    image = _photo(5)
    conversation = Conversation().ask("First look " + "very " * 40, [image])
    for i in range(6):
        conversation = conversation.answer("Answer " + "long " * 40).ask(f"Question {i} " + "more " * 30)
    conversation = conversation.answer("ok").ask("What now?")
    gen = engine.stream(conversation, do_sample=False, max_new_tokens=8, max_context=300)
    "".join(gen)
    assert gen.stats.dropped_turns and gen.notices and "photos kept" in gen.notices[0]
    assert gen.stats.prompt_tokens <= 300 - 8
    positions, _, dropped = engine.prompt.positions(conversation, 300 - 8)
    assert sum(isinstance(s, ImagePosition) for s in positions) == 32  # the image survived
    text = engine.tokenizer.decode([s for s in positions if isinstance(s, int)])
    assert "What now?" in text and "Question 0" not in text


def test_question_too_long_for_context_is_a_clear_error(engine):
    from model.prompt.conversation import ConversationError

    conversation = Conversation().ask("word " * 400, [_photo(6)])
    with pytest.raises(ConversationError, match="context positions but only"):
        "".join(engine.stream(conversation, max_new_tokens=8, max_context=200))


def test_two_threads_get_their_own_answers(engine):
    conversations = {"a": Conversation().ask("Describe the rash.", [_photo(7)]),
                     "b": Conversation().ask("What is this lesion on my back?", [_photo(8)])}
    alone = {k: engine.stream(c, session=f"alone-{k}", do_sample=False, max_new_tokens=16, fixed_length=True)
             for k, c in conversations.items()}
    alone = {k: ("".join(g), g.tokens)[1] for k, g in alone.items()}
    assert alone["a"] != alone["b"]
    results: dict[str, list[int]] = {}
    barrier = threading.Barrier(2)

    def worker(key):
        barrier.wait()
        gen = engine.stream(conversations[key], session=f"thread-{key}", do_sample=False, max_new_tokens=16,
                            fixed_length=True)
        "".join(gen)
        results[key] = gen.tokens

    threads = [threading.Thread(target=worker, args=(k,)) for k in conversations]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results == alone


def test_sampling_is_seeded(engine):
    conversation = Conversation().ask("Describe it.", [_photo(9)])
    runs = [engine.stream(conversation, do_sample=True, temperature=1.5, top_p=0.95, top_k=50, seed=s,
                          max_new_tokens=16, fixed_length=True) for s in (1, 1, 2)]
    tokens = [("".join(g), g.tokens)[1] for g in runs]
    assert tokens[0] == tokens[1] and tokens[0] != tokens[2]


def test_visible_holds_back_prefixes_of_stops():
    assert _visible("Hello #", ("###",)) == (6, False)
    assert _visible("Hello ##", ("###",)) == (6, False)
    assert _visible("Hello ###Human", ("###",)) == (6, True)
    assert _visible("Hello #2", ("###",)) == (8, False)
    assert _visible("end [IN", ("[INST]",)) == (4, False)


def test_image_placeholder_ids_are_never_real_tokens(engine):
    assert IMAGE_TOKEN_ID < 0 and len(engine.tokenizer) <= engine.config.llm.vocab_size


def test_skingpt4_prompt_is_the_reference_demo_prompt_exactly():
    """Converted SkinGPT-4 weights were trained and demoed with this exact text (shared REFERENCE.md)."""
    from model.prompt.conversation import TEMPLATES

    first = Conversation().ask("What's wrong with my skin?", [_photo(0)])
    assert render(TEMPLATES["skingpt4"], first) == (
        "Give the following image: <Img>ImageContent</Img>. You will be able to see the image once I provide it "
        "to you. Please answer my questions.###Human: <Img><ImageHere></Img> What's wrong with my skin?"
        "###Assistant:")
    second = first.answer("It looks like eczema.").ask("What could cause it?")
    assert render(TEMPLATES["skingpt4"], second).endswith(
        "###Assistant: It looks like eczema.###Human: What could cause it?###Assistant:")
    assert "dermatology assistant" in render(TEMPLATES["assistant"], first)  # our wording lives apart


def _quadratic_slots(engine: Engine, conversation: Conversation, budget: int):
    """The prompt builder as it was: drop the oldest turn's text, re-render, re-tokenise, again."""
    dropped, droppable = [], list(range(len(conversation.turns) - 1))
    while True:
        ids = tokenize_prompt(engine.tokenizer, render(engine.template, conversation, frozenset(dropped)),
                              "<ImageHere>", engine.config.qformer.num_query_tokens)
        if len(ids) <= budget or not droppable:
            return (ids, tuple(dropped)) if len(ids) <= budget else (None, None)
        dropped.append(droppable.pop(0))


def test_the_linear_prompt_builder_keeps_what_the_quadratic_one_kept(engine):
    """Random conversations and budgets: the same turns dropped and the same ids, or the same refusal."""
    import random

    from model.prompt.conversation import ConversationError

    rng = random.Random(0)
    words = "red itchy patch rash since weeks é 中文 spreading  \n mole ###".split(" ")
    for _ in range(150):
        conversation, turns = Conversation(), rng.randint(1, 8)
        for i in range(turns):
            photos = [_photo(i)] if i == 0 or rng.random() < 0.3 else []
            conversation = conversation.ask(" ".join(rng.choices(words, k=rng.randint(0, 60))), photos)
            if i < turns - 1:
                conversation = conversation.answer(" ".join(rng.choices(words, k=rng.randint(0, 60))))
        budget = rng.randint(60, 900)
        expected, expected_dropped = _quadratic_slots(engine, conversation, budget)
        try:
            positions, _, dropped = engine.prompt.positions(conversation, budget)
        except ConversationError:
            assert expected is None
            continue
        assert [IMAGE_TOKEN_ID if isinstance(s, ImagePosition) else s for s in positions] == expected
        assert dropped == expected_dropped


def test_a_typed_image_placeholder_is_only_text(engine):
    """A question that types `<ImageHere>` cannot make the prompt claim a second image."""
    conversation = Conversation().ask("What is <ImageHere> this <ImageHere>?", [_photo(1)])
    positions, images, _ = engine.prompt.positions(conversation, 900)
    assert sum(isinstance(s, ImagePosition) for s in positions) == 32 and len(images) == 1
    assert "".join(engine.stream(conversation, max_new_tokens=2, do_sample=False)) is not None


def test_an_answer_past_its_deadline_ends_as_timeout(tiny_bundle):
    """Decoding is held (the scheduler's test hook) after the first token, so the deadline passes while
    the answer is under way on a machine of any speed; the held answer still ends, as "timeout"."""
    timed = Engine(load_bundle(tiny_bundle), request_timeout_s=0.3, hold=lambda: True)
    gen = timed.stream(Conversation().ask("Describe it.", [_photo(2)]), max_new_tokens=800, fixed_length=True,
                       do_sample=False)
    "".join(gen)
    assert gen.finish_reason == "timeout" and len(gen.tokens) == 1 and timed.scheduler.steps == 0


def test_only_printable_text_leaves_the_decoder():
    """Control characters and lone replacement characters never reach the chat, JSON or a PDF."""
    from model.serving.detokenize import IncrementalDecoder

    class CodePoints:  # a tokenizer whose ids are code points
        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(i) for i in ids)

    decoder = IncrementalDecoder(CodePoints())
    text = "".join(decoder.push(ord(c)) for c in "ok\x07\x1b[1m\x00 \ufffdred\r\n\tdone\x7f\x85") + decoder.flush()
    assert text == "ok[1m red\n\tdone"


def test_the_default_kv_budget_is_what_the_consultations_can_fill_not_a_third_of_the_machine(engine):
    """Issue 33: the idle-KV budget was a third of free memory whatever the model (4.8 GiB for the demo
    bundle on a 24 GB machine). Now it is what 32 consultations at the whole context can hold, capped at a
    third of free memory, at least 64 MiB."""
    import os

    from model.serving.engine import default_kv_budget
    from model.serving.llama_runner import kv_bytes_per_position

    llm = engine.config.llm
    context = min(engine.config.generation.max_context, llm.max_position_embeddings)
    fill = 32 * context * kv_bytes_per_position(llm, "f32")  # the tiny model runs in fp32 on a CPU
    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert engine.kv_cache_bytes == max(fill, 64 * 2**20) < free // 3
    seven_b = 32 * 2048 * 2 * 32 * 4096 * 2  # Vicuna-7B in bf16: 32 GiB would fill it
    budget = default_kv_budget(engine.device, seven_b)  # free memory moves a little between two readings
    assert budget == seven_b or abs(budget - free // 3) < free // 10
    assert default_kv_budget(engine.device, 1) == 64 * 2**20
