"""convert -> load round trips for every published source format, checked against an independent
forward pass over the source tensors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from model.weights.bundle import load_bundle
from model.nn.config import preset
from model.weights.convert import ConvertError, Sources, convert
from model.nn.skingpt import IMAGE_TOKEN_ID
from reference_forward import image_embeddings

CFG = preset("tiny")


def _load(path, entry=None):
    data = torch.load(path, map_location="cpu", weights_only=True)
    return data[entry] if entry else data


def _reference_inputs(sources, proj_file):
    vit = _load(sources.vit)
    blip2 = _load(sources.blip2, "model")
    state = _load(proj_file, "model")
    name = "llama_proj" if "llama_proj.weight" in state else "llm_proj"
    return vit, blip2, {"weight": state[f"{name}.weight"], "bias": state[f"{name}.bias"]}


FORMATS = {
    # name: (sources, projection file, LLM weights to compare against)
    "lavis-pth + llama_proj + safetensors LLM": lambda s: Sources(llm_dir=s.llm, vit=s.vit, blip2=s.blip2, finetune=s.finetune),
    "lavis-pth + llm_proj + .bin LLM": lambda s: Sources(llm_dir=s.llm_bin, vit=s.vit, blip2=s.blip2, finetune=s.finetune_llm_proj),
    "hf-blip2 safetensors + llama_proj + .bin LLM": lambda s: Sources(llm_dir=s.llm_bin, hf_blip2=s.hf_blip2, finetune=s.finetune),
}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_round_trip_matches_source_tensors(fmt, sources, tmp_path):
    src = FORMATS[fmt](sources)
    convert(src, tmp_path / "bundle", preset_name="tiny", log=lambda _: None)
    loaded = load_bundle(tmp_path / "bundle")
    model = loaded.model

    torch.manual_seed(1)
    pixels = torch.randn(2, 3, CFG.vision.img_size, CFG.vision.img_size)
    expected = image_embeddings(*_reference_inputs(sources, src.finetune), pixels, CFG)
    got = model.encode_image(pixels)
    assert got.shape == (2, CFG.qformer.num_query_tokens, CFG.llm.hidden_size)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

    # the LLM weights arrive unchanged, whichever container they came in
    source_llm = (load_file(str(src.llm_dir / "model.safetensors")) if (src.llm_dir / "model.safetensors").exists()
                  else _load(src.llm_dir / "pytorch_model.bin"))
    bundled = load_file(str(tmp_path / "bundle" / "llm" / "model.safetensors"))
    assert bundled.keys() == source_llm.keys()
    for key in source_llm:
        assert torch.equal(bundled[key], source_llm[key]), key


def test_logits_equal_source_llm_with_spliced_image(sources, tiny_bundle):
    model = load_bundle(tiny_bundle).model
    pixels = torch.randn(1, 3, CFG.vision.img_size, CFG.vision.img_size, generator=torch.Generator().manual_seed(3))
    q = CFG.qformer.num_query_tokens
    text_before, text_after = [1, 40, 41, 42], [50, 51, 52]
    ids = torch.tensor([text_before + [IMAGE_TOKEN_ID] * q + text_after])
    ours = model(ids, pixels=pixels).logits

    # independently: source LLM from its own directory, image embeddings from the source tensors
    source_llm = LlamaForCausalLM.from_pretrained(sources.llm, local_files_only=True).eval()
    image = image_embeddings(*_reference_inputs(sources, sources.finetune), pixels, CFG)
    table = source_llm.get_input_embeddings().weight
    embeds = torch.cat([table[text_before], image[0], table[text_after]]).unsqueeze(0)
    with torch.no_grad():
        theirs = source_llm(inputs_embeds=embeds).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_report_names_parts_and_ignored_keys(sources, tmp_path):
    lines = []
    report = convert(Sources(llm_dir=sources.llm, vit=sources.vit, blip2=sources.blip2, finetune=sources.finetune),
                     tmp_path / "b", preset_name="tiny", log=lines.append)
    by_role = {r.role: r for r in report.sources}
    assert set(by_role["vit"].supplied) == {"vision"}
    assert set(by_role["blip2"].supplied) == {"ln_vision", "query_tokens", "qformer"}
    assert by_role["finetune"].supplied == {"proj": 2}
    # the unused last ViT block, the Q-Former's text branch and the T5 projection are reported as ignored
    depth = CFG.vision.depth
    assert any(p.startswith("blocks.*.") for p in by_role["vit"].ignored)
    assert sum(by_role["vit"].ignored.values()) == 13  # one whole block: 13 tensors
    ignored = by_role["blip2"].ignored
    assert "t5_proj.weight" in ignored and "Qformer.bert.embeddings.word_embeddings.weight" in ignored
    assert ignored["Qformer.bert.encoder.layer.*.intermediate.dense.weight"] == CFG.qformer.num_layers
    text = "\n".join(lines)
    assert "ignored 13 keys" in text and "supplied: proj (2 tensors)" in text
    assert f"blocks.{depth}" not in str(load_file(str(tmp_path / "b" / "encoder.safetensors")).keys())
    manifest_sources = load_bundle(tmp_path / "b").manifest["sources"]
    assert manifest_sources["vit"]["file"] == "eva_vit_g.pth" and len(manifest_sources["vit"]["sha256"]) == 64


def test_finetune_qformer_overrides_blip2(sources, tmp_path):
    state = _load(sources.finetune, "model")
    new_queries = torch.full((1, CFG.qformer.num_query_tokens, CFG.qformer.hidden_size), 0.125)
    torch.save({"model": {**state, "query_tokens": new_queries}}, tmp_path / "ft.pth")
    report = convert(Sources(llm_dir=sources.llm, vit=sources.vit, blip2=sources.blip2, finetune=tmp_path / "ft.pth"),
                     tmp_path / "b", preset_name="tiny", log=lambda _: None)
    assert report.sources[-1].overridden == {"query_tokens": 1}
    assert torch.equal(load_file(str(tmp_path / "b" / "encoder.safetensors"))["query_tokens"], new_queries)


def test_projection_width_must_match_llm(sources, tmp_path):
    torch.save({"model": {"llama_proj.weight": torch.zeros(48, CFG.qformer.hidden_size),
                          "llama_proj.bias": torch.zeros(48)}}, tmp_path / "wrong.pth")
    with pytest.raises(ConvertError, match=r"projects to width 48 but the LLM directory has hidden size 64"):
        convert(Sources(llm_dir=sources.llm, vit=sources.vit, blip2=sources.blip2, finetune=tmp_path / "wrong.pth"),
                tmp_path / "b", preset_name="tiny", log=lambda _: None)


def test_preset_chosen_by_projection_width(sources, tmp_path):
    # a 4096-wide projection with a 64-wide LLM is refused, naming the 7B LLM it was trained for
    torch.save({"model": {"llama_proj.weight": torch.zeros(4096, 768), "llama_proj.bias": torch.zeros(4096)}},
               tmp_path / "v7b.pth")
    with pytest.raises(ConvertError, match="Vicuna-7B"):
        convert(Sources(llm_dir=sources.llm, vit=sources.vit, blip2=sources.blip2, finetune=tmp_path / "v7b.pth"),
                tmp_path / "b", log=lambda _: None)


def test_missing_projection_says_which_file(sources, tmp_path):
    with pytest.raises(ConvertError, match=r"proj: pass --finetune skinGPT_v1.pth"):
        convert(Sources(llm_dir=sources.llm, vit=sources.vit, blip2=sources.blip2), tmp_path / "b",
                preset_name="tiny", log=lambda _: None)


def test_wrong_shape_in_source_names_key_and_shapes(sources, tmp_path):
    vit = _load(sources.vit)
    vit["pos_embed"] = torch.zeros(1, 5, CFG.vision.embed_dim)
    torch.save(vit, tmp_path / "eva.pth")
    with pytest.raises(ConvertError, match=r"vision.pos_embed has shape \(1, 5, 48\), the model expects \(1, 17, 48\)"):
        convert(Sources(llm_dir=sources.llm, vit=tmp_path / "eva.pth", blip2=sources.blip2, finetune=sources.finetune),
                tmp_path / "b", preset_name="tiny", log=lambda _: None)


class _NotATensor:
    pass


def test_pickle_with_objects_is_refused_not_executed(sources, tmp_path):
    torch.save({"model": {"llama_proj.weight": _NotATensor()}}, tmp_path / "evil.pth")
    with pytest.raises(ConvertError, match="weights-only"):
        convert(Sources(llm_dir=sources.llm, vit=sources.vit, blip2=sources.blip2, finetune=tmp_path / "evil.pth"),
                tmp_path / "b", preset_name="tiny", log=lambda _: None)


def test_llm_directory_without_config(sources, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConvertError, match="has no config.json"):
        convert(Sources(llm_dir=tmp_path / "empty", vit=sources.vit, blip2=sources.blip2, finetune=sources.finetune),
                tmp_path / "b", preset_name="tiny", log=lambda _: None)
