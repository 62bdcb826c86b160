"""export-vllm in the app's own environment (no vLLM needed): the chat template renders what our
engine renders, the plugin's re-tokenisation gives our engine's ids, the encoder maps one to one,
and what vLLM cannot serve is refused with the way out."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from transformers import AutoTokenizer

from app.remote_engine import RemoteEngine
from model.prompt.conversation import TEMPLATES, Conversation, ImageInput, render
from model.clinical.history import ClinicalHistory, with_history
from model.nn.skingpt import IMAGE_TOKEN_ID, tokenize_prompt
from model.weights.bundle import BundleError, load_bundle, load_config
from model.weights.vllm_export import export_vllm, vllm_encoder_tensors
from skingpt_vllm.pieces import retokenize_pieces


def _photo(seed: int) -> ImageInput:
    return ImageInput.of(Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 50, 3), dtype=np.uint8)))


def _conversation() -> Conversation:
    """Three turns, a second photo in turn 2, the clinical history where the engine puts it, and text
    that looks like markup (braces, a typed placeholder, non-ASCII) that must stay text."""
    history = ClinicalHistory(age=54, sex="female", body_site="back", notes="it catches on {clothing}")
    first = Conversation().ask("Describe the skin condition in this photo.", [_photo(0)])
    first = with_history(first, history)
    return (first.answer("A red patch, 3 mm, with a raised border.")
            .ask("And this one, two weeks later?  It's 手臂 — über-itchy.", [_photo(1)])
            .answer("It looks larger.  ")
            .ask("What could cause it? '<ImageHere>' is only text here."))


@pytest.fixture(scope="module")
def exported(tiny_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("vllm") / "tiny"
    export_vllm(tiny_bundle, out, max_images=8)
    return out


def _engine_for(tiny_bundle, exported, name: str) -> RemoteEngine:
    config = dataclasses.replace(load_config(tiny_bundle), prompt_template=name)
    return RemoteEngine(config, AutoTokenizer.from_pretrained(exported), "http://127.0.0.1:9/v1")


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_the_chat_template_renders_what_our_engine_renders(tiny_bundle, exported, name):
    """The exported Jinja, fed the OpenAI messages our remote engine sends, writes `render`'s text
    byte for byte, whole turns kept and the oldest turn's text dropped for room alike."""
    from model.weights.vllm_export import chat_template

    tokenizer = AutoTokenizer.from_pretrained(exported)
    tokenizer.chat_template = chat_template(TEMPLATES[name], "<ImageHere>")
    remote = _engine_for(tiny_bundle, exported, name)
    conversation = _conversation()
    fed = Conversation(tuple(remote.prompt.plain(t) for t in conversation.turns))  # what our engine renders
    for dropped in (frozenset(), frozenset({0}), frozenset({0, 1})):
        messages = remote.messages(conversation, dropped)
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert text == tokenizer.bos_token + render(TEMPLATES[name], fed, dropped), (name, dropped)
        assert text.count("<ImageHere>") == len(conversation.images)  # the typed one is only text


def test_a_system_message_is_refused_by_the_template(exported):
    tokenizer = AutoTokenizer.from_pretrained(exported)
    with pytest.raises(Exception, match="system text is fixed"):
        tokenizer.apply_chat_template([{"role": "system", "content": "You are a pirate."},
                                       {"role": "user", "content": "hi"}], tokenize=False)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_the_plugins_pieces_are_our_engines_ids(exported, name):
    """vLLM tokenises the rendered chat whole; `retokenize_pieces` must give what our engine feeds."""
    tokenizer = AutoTokenizer.from_pretrained(exported)
    placeholder = tokenizer.convert_tokens_to_ids("<ImageHere>")
    text = render(TEMPLATES[name], _conversation())
    ours = tokenize_prompt(tokenizer, text, "<ImageHere>", 1)
    whole = tokenizer(tokenizer.bos_token + text, add_special_tokens=False).input_ids
    assert whole != [placeholder if t == IMAGE_TOKEN_ID else t for t in ours]  # the problem it solves is real
    fixed = retokenize_pieces(tokenizer, whole, placeholder)
    assert fixed == [placeholder if t == IMAGE_TOKEN_ID else t for t in ours]
    assert retokenize_pieces(tokenizer, fixed, placeholder) == fixed  # already right: left as it is


def test_the_export_holds_every_encoder_tensor_once_in_vllms_names(tiny_bundle, exported):
    config = load_config(tiny_bundle)
    with safe_open(str(tiny_bundle / "encoder.safetensors"), framework="pt") as handle:
        ours = {k: handle.get_tensor(k) for k in handle.keys()}
    with safe_open(str(exported / "encoder.safetensors"), framework="pt") as handle:
        theirs = {k: handle.get_tensor(k) for k in handle.keys()}
    assert vllm_encoder_tensors(dict(ours), config).keys() == theirs.keys()
    layer = "vision_model.encoder.layers.1.self_attn."
    qkv = torch.cat([theirs[f"{layer}{n}_proj.weight"] for n in "qkv"])
    torch.testing.assert_close(qkv, ours["vision.blocks.1.attn.qkv.weight"], rtol=0, atol=0)
    assert not theirs[f"{layer}k_proj.bias"].any()  # timm's zero key bias, written out
    index = json.loads((exported / "model.safetensors.index.json").read_text())["weight_map"]
    assert index["query_tokens"] == "encoder.safetensors" and index["lm_head.weight"] == "model.safetensors"
    saved = json.loads((exported / "config.json").read_text())
    assert saved["architectures"] == ["SkinGPTForConditionalGeneration"]
    assert saved["skingpt"]["ln_vision_eps"] == config.vision.ln_vision_eps
    assert saved["vision_config"]["layer_norm_eps"] == config.vision.norm_eps
    assert saved["vision_config"]["intermediate_size"] == ours["vision.blocks.0.mlp.fc1.weight"].shape[0]


def test_a_quantised_bundle_is_refused_with_the_way_out(tiny_bundle, tmp_path):
    from model.weights.bundle import quantize_bundle

    quantised = quantize_bundle(tiny_bundle, tmp_path / "q8", "q8_0")
    with pytest.raises(BundleError, match="export the bundle it was quantised from"):
        export_vllm(quantised, tmp_path / "out", max_images=8)
    assert not (tmp_path / "out").exists()


def test_an_export_never_writes_into_a_full_directory(tiny_bundle, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep me")
    with pytest.raises(BundleError, match="not empty"):
        export_vllm(tiny_bundle, tmp_path / "out", max_images=8)
    assert (tmp_path / "out" / "mine.txt").read_text() == "keep me"


def test_the_bundle_still_loads_after_its_shards_were_linked(tiny_bundle, exported):
    load_bundle(tiny_bundle)  # the hard links leave the bundle's files (and their hashes) as they were
