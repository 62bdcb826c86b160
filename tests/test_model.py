"""Configs, presets on the meta device, shapes, and the placeholder splice."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from model.nn.config import PRESETS, ConfigError, SkinGPTConfig, preset
from model.nn.skingpt import IMAGE_TOKEN_ID, PlaceholderError, build_skingpt, tokenize_prompt
from model.weights.summary import describe


@pytest.mark.parametrize("name", list(PRESETS))
def test_yaml_round_trip(name, tmp_path):
    cfg = preset(name)
    cfg.to_yaml(tmp_path / "c.yaml")
    assert SkinGPTConfig.from_yaml(tmp_path / "c.yaml") == cfg


def test_unknown_key_is_rejected_with_its_place(tmp_path):
    (tmp_path / "c.yaml").write_text("qformer:\n  num_querys: 32\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) 'num_querys' in config.qformer; allowed: .*num_query_tokens"):
        SkinGPTConfig.from_yaml(tmp_path / "c.yaml")


def test_wrong_type_and_invalid_values():
    with pytest.raises(ConfigError, match=r"config.vision.depth must be int"):
        SkinGPTConfig.from_dict({"vision": {"depth": "many"}})
    with pytest.raises(ConfigError, match=r"top_p must be in \(0, 1\]"):
        SkinGPTConfig.from_dict({"generation": {"top_p": 1.5}})
    with pytest.raises(ConfigError, match=r"preprocess.mean .* 3 numbers"):
        SkinGPTConfig.from_dict({"preprocess": {"mean": [0.5, 0.5]}})
    with pytest.raises(ConfigError, match="must equal vision.img_size"):
        SkinGPTConfig.from_dict({"preprocess": {"image_size": 336}})
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("gpt-5")


def test_a_choice_outside_its_literal_names_the_field_the_choices_and_the_file(tmp_path):
    from model.training.config import StepConfig

    (tmp_path / "c.yaml").write_text("preprocess:\n  interpolation: lanczos\n")
    with pytest.raises(ConfigError, match=r"c.yaml: config.preprocess.interpolation must be 'bicubic', 'bilinear' "
                                          r"or 'nearest', got 'lanczos'"):
        SkinGPTConfig.from_yaml(tmp_path / "c.yaml")
    (tmp_path / "s.yaml").write_text("precision: fp8\n")
    with pytest.raises(ConfigError, match=r"s.yaml: step.precision must be 'auto', 'fp32', 'bf16' or 'fp16'"):
        StepConfig.from_yaml(tmp_path / "s.yaml")


def test_full_presets_on_meta_match_published_counts():
    info = describe(preset("skingpt4-vicuna13b"))
    p = info["parameters"]
    assert round(p["vision"] / 1e6, 1) == 985.9
    assert round(p["qformer"] / 1e6, 1) == 105.1
    assert round(p["proj"] / 1e6, 1) == 3.9
    assert round(p["llm"] / 1e9, 3) == 13.016
    assert round(info["total_parameters"] / 1e9, 1) == 14.1
    assert round(describe(preset("skingpt4-vicuna7b"))["parameters"]["llm"] / 1e9, 3) == 6.738
    assert describe(preset("skingpt4-llama2-13b"))["parameters"] == p


@pytest.mark.parametrize("name, d_llm", [("skingpt4-vicuna13b", 5120), ("skingpt4-vicuna7b", 4096), ("tiny", 64)])
def test_shapes_per_part(name, d_llm):
    cfg = preset(name)
    s = describe(cfg)["shapes"]
    tokens = (cfg.vision.img_size // cfg.vision.patch_size) ** 2 + 1
    assert s["image_tokens"] == [1, tokens, cfg.vision.embed_dim]
    assert s["qformer_out"] == [1, 32, cfg.qformer.hidden_size]
    assert s["proj_weight"] == [d_llm, cfg.qformer.hidden_size]
    assert s["image_embeds"] == [1, 32, d_llm]
    if name != "tiny":
        assert s["image_tokens"] == [1, 257, 1408] and s["qformer_out"] == [1, 32, 768]


def test_tiny_encode_shape_on_cpu():
    torch.manual_seed(0)
    model = build_skingpt(preset("tiny")).eval()
    assert model.encode_image(torch.randn(3, 3, 56, 56)).shape == (3, 32, 64)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_skingpt(preset("tiny")).eval()


def test_placeholder_count_mismatch_raises(tiny_model):
    images = tiny_model.encode_image(torch.randn(1, 3, 56, 56))
    with pytest.raises(PlaceholderError, match=r"has 0 image placeholder\(s\) but 1 image\(s\)"):
        tiny_model.embed_inputs(torch.tensor([[1, 5, 6]]), images)
    two_slots = torch.tensor([[1] + [IMAGE_TOKEN_ID] * 32 + [5] + [IMAGE_TOKEN_ID] * 32])
    with pytest.raises(PlaceholderError, match=r"has 2 image placeholder\(s\) but 1 image\(s\)"):
        tiny_model.embed_inputs(two_slots, images)
    with pytest.raises(PlaceholderError, match=r"has 1 image placeholder\(s\) but 0 image\(s\)"):
        tiny_model.embed_inputs(torch.tensor([[1] + [IMAGE_TOKEN_ID] * 32]), None)


def test_splice_puts_each_image_in_its_slot(tiny_model):
    images = tiny_model.encode_image(torch.randn(2, 3, 56, 56))  # (2, 32, 64)
    ids = torch.tensor([[1, 7] + [IMAGE_TOKEN_ID] * 32 + [8, 9] + [IMAGE_TOKEN_ID] * 32 + [10]])
    embeds = tiny_model.embed_inputs(ids, images)
    table = tiny_model.llm.get_input_embeddings().weight
    assert torch.equal(embeds[0, 2:34], images[0]) and torch.equal(embeds[0, 36:68], images[1])
    assert torch.equal(embeds[0, [0, 1, 34, 35, 68]], table[[1, 7, 8, 9, 10]])


def test_tokenize_prompt_places_runs_and_one_bos(tiny_bundle):
    from model.nn.llm import load_tokenizer

    tok = load_tokenizer(tiny_bundle / "llm")
    ids = tokenize_prompt(tok, "###Human: <Img><ImageHere></Img> Describe it. ###Assistant:", "<ImageHere>", 32)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    start = ids.index(IMAGE_TOKEN_ID)
    assert ids[start:start + 32] == [IMAGE_TOKEN_ID] * 32 and ids.count(IMAGE_TOKEN_ID) == 32
    assert tok.decode(ids[1:start]) == "###Human: <Img>"
    assert tok.decode(ids[start + 32:]).startswith("</Img> Describe it.")


def test_config_is_immutable():
    with pytest.raises(dataclasses.FrozenInstanceError):
        preset("tiny").vision.depth = 3
