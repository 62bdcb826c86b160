"""Bundles written before the code was re-laid into folders still load, and answer token for token
as they did: `data/bundle-tiny-v1` (float) and `-int4` were written by the main of 2026-12-02
(10e4190), and `data/greedy-v1.json` holds that main's greedy answers over three turns (a photo, a
follow-up, a second photo), for them and for a demo bundle generated afresh."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model.prompt.conversation import Conversation, ImageInput
from model.serving.detokenize import printable
from model.serving.engine import Engine
from model.weights.bundle import load_bundle, verify_bundle
from tools.fixtures import write_demo_bundle

DATA = Path(__file__).parent / "data"
PINNED = json.loads((DATA / "greedy-v1.json").read_text())


def _photo(seed: int) -> ImageInput:
    return ImageInput.of(Image.fromarray(np.random.default_rng(seed).integers(0, 256, (90, 120, 3), dtype=np.uint8)))


def _consult(engine: Engine, pinned: list[dict]) -> list[dict]:
    """Three turns, each answered from the conversation the pinned run had (its answers as it wrote
    them), so that every turn is compared token for token."""
    turns = []
    conversation = Conversation().ask("What's wrong with my skin?", [_photo(0)])
    for n, (question, images) in enumerate((("What else do you see?", []), ("And in this second photo?", [_photo(1)]),
                                             (None, None))):
        gen = engine.stream(conversation, session="pin", do_sample=False, max_new_tokens=20)
        text = "".join(gen)
        turns.append({"tokens": gen.tokens, "text": text, "finish_reason": gen.finish_reason,
                      "prompt_tokens": gen.stats.prompt_tokens, "reused_tokens": gen.stats.reused_tokens})
        if question is None:
            break
        conversation = conversation.answer(pinned[n]["text"].strip()).ask(question, images)
    return turns


def _as_shown_now(pinned: list[dict]) -> list[dict]:
    """The pinned turns as the engine shows text since issue 23: printable characters only."""
    return [{**turn, "text": printable(turn["text"])} for turn in pinned]


@pytest.mark.parametrize("name", ["bundle-tiny-v1", "bundle-tiny-v1-int4"])
def test_a_bundle_of_the_old_layout_answers_as_it_did(name, tmp_path):
    bundle = tmp_path / name
    shutil.copytree(DATA / name, bundle)  # a copy: loading must not depend on where the files lie
    verify_bundle(bundle)
    assert _consult(Engine(load_bundle(bundle)), PINNED[name]) == _as_shown_now(PINNED[name])


def test_a_demo_bundle_generated_now_answers_as_the_old_one(tmp_path):
    engine = Engine(load_bundle(write_demo_bundle(tmp_path / "demo")))
    assert _consult(engine, PINNED["demo"]) == _as_shown_now(PINNED["demo"])
