"""A bundle as a directory `vllm serve` loads with the SkinGPT plugin (`skingpt_vllm`).

    OUT/
      config.json             a BLIP-2 config naming SkinGPTForConditionalGeneration; its "skingpt"
                              entry holds what BLIP-2 has no field for (ln_vision's eps, the
                              placeholder, preprocessing, the photo limit)
      encoder.safetensors     the ViT, ln_vision, Q-Former, query tokens and projection in vLLM's names
      model*.safetensors      the LLM's shards as the bundle stores them (hard links where possible)
      model.safetensors.index.json   every tensor of both, so that vLLM reads both
      tokenizer files         the bundle's, with the image placeholder added as one special token
      chat_template.jinja     the bundle's prompt template: the prompt our engine renders, byte for byte
      generation_config.json  BOS/EOS and the bundle's sampling defaults

vLLM serves float weights (fp32, bf16, fp16: pick one with `vllm serve --dtype`); a bundle whose LLM
is GGUF or weight-only quantised, or whose encoder is int8, is refused with the way out.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model.prompt.conversation import Template, template
from model.nn.config import SkinGPTConfig
from model.nn.llm import hf_config as llama_config, load_tokenizer
from model.weights.bundle import (ENCODER_FILE, LLM_DIR, BundleError, load_config, quantized_mode,
                                  verify_bundle)
from model.weights.encoder_int8 import stored_int8

ARCHITECTURE = "SkinGPTForConditionalGeneration"  # skingpt_vllm.ARCHITECTURE (that package imports vLLM)
IMAGE_PAD_NAME = "unk_token"  # the id written at image positions; never embedded, any real id would do


def export_vllm(bundle: str | Path, out: str | Path, max_images: int, record: Path | None = None) -> Path:
    """Verify the bundle, then write OUT (which must not exist or be empty)."""
    bundle, out = Path(bundle), Path(out)
    manifest = verify_bundle(bundle, record)
    config = load_config(bundle)
    _refuse_quantised(bundle, manifest)
    if out.exists() and any(out.iterdir()):
        raise BundleError(f"{out} is not empty: pass a new directory to --out")
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(bundle / LLM_DIR)
    tokenizer.add_tokens([config.image_placeholder], special_tokens=True)
    tpl = template(config.prompt_template)
    tokenizer.chat_template = chat_template(tpl, config.image_placeholder)
    tokenizer.save_pretrained(out)
    encoder = vllm_encoder_tensors(_read(bundle / ENCODER_FILE), config)
    save_file(encoder, str(out / ENCODER_FILE), metadata={"format": "pt"})
    shards = _link_llm_shards(bundle / LLM_DIR, out)
    _write_index(out, {name: ENCODER_FILE for name in encoder} | shards)
    pad = getattr(tokenizer, IMAGE_PAD_NAME + "_id")
    (out / "config.json").write_text(json.dumps(hf_config(config, max_images, pad), indent=2))
    (out / "generation_config.json").write_text(json.dumps(generation_config(config), indent=2))
    return out


def _refuse_quantised(bundle: Path, manifest: dict[str, Any]) -> None:
    mode = quantized_mode(manifest)
    if mode is not None or (bundle / LLM_DIR / "model.gguf").is_file():
        raise BundleError(f"{bundle} holds its LLM quantised ({mode or 'GGUF'}); vLLM serves this model from "
                          f"float weights: export the bundle it was quantised from (its manifest names it under "
                          f"sources.quantized_from), and pick bf16 or fp16 with `vllm serve --dtype`")
    with safe_open(str(bundle / ENCODER_FILE), framework="pt") as handle:
        if stored_int8(list(handle.keys())):
            raise BundleError(f"{bundle}'s encoder is stored in int8 (`quantize --encoder int8`), which vLLM's "
                              f"BLIP vision tower cannot load: export the bundle it was quantised from")


def _read(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}


def vllm_encoder_tensors(tensors: dict[str, torch.Tensor], config: SkinGPTConfig) -> dict[str, torch.Tensor]:
    """Our encoder names (timm's EVA, transformers' Q-Former) -> vLLM's BLIP-2 names, every tensor
    used once. timm's fused qkv is split into q/k/v (vLLM stacks them per tensor-parallel rank), with
    the key bias timm keeps as a zero buffer written out."""
    width = config.vision.embed_dim
    out = {"vision_model.embeddings.class_embedding": tensors.pop("vision.cls_token"),
           "vision_model.embeddings.position_embedding": tensors.pop("vision.pos_embed"),
           "vision_model.embeddings.patch_embedding.weight": tensors.pop("vision.patch_embed.proj.weight"),
           "vision_model.embeddings.patch_embedding.bias": tensors.pop("vision.patch_embed.proj.bias"),
           "vision_model.post_layernorm.weight": tensors.pop("ln_vision.weight"),
           "vision_model.post_layernorm.bias": tensors.pop("ln_vision.bias"),
           "query_tokens": tensors.pop("query_tokens"),
           "language_projection.weight": tensors.pop("proj.weight"),
           "language_projection.bias": tensors.pop("proj.bias")}
    for i in range(config.vision.depth):
        src, dst = f"vision.blocks.{i}.", f"vision_model.encoder.layers.{i}."
        qkv = tensors.pop(src + "attn.qkv.weight")  # (3C, C)
        q_bias, v_bias = tensors.pop(src + "attn.q_bias"), tensors.pop(src + "attn.v_bias")
        biases = (q_bias, torch.zeros_like(q_bias), v_bias)
        for name, weight, bias in zip(("q", "k", "v"), qkv.split(width), biases):
            out[f"{dst}self_attn.{name}_proj.weight"] = weight.contiguous()
            out[f"{dst}self_attn.{name}_proj.bias"] = bias
        for ours, theirs in (("attn.proj", "self_attn.projection"), ("norm1", "layer_norm1"),
                             ("norm2", "layer_norm2"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
            for kind in ("weight", "bias"):
                out[f"{dst}{theirs}.{kind}"] = tensors.pop(f"{src}{ours}.{kind}")
    for name in [k for k in tensors if k.startswith("qformer.")]:
        out[name] = tensors.pop(name)  # transformers' Q-Former names are vLLM's
    if tensors:
        raise BundleError(f"the encoder file holds tensors vLLM's SkinGPT has no place for: {sorted(tensors)[:5]}")
    return out


def _link_llm_shards(llm_dir: Path, out: Path) -> dict[str, str]:
    """The LLM's safetensors files beside the encoder, hard-linked where the filesystem allows."""
    names: dict[str, str] = {}
    for shard in sorted(llm_dir.glob("*.safetensors")):
        target = out / shard.name
        try:
            os.link(shard, target)
        except OSError:
            shutil.copyfile(shard, target)
        with safe_open(str(shard), framework="pt") as handle:
            names.update({k: shard.name for k in handle.keys()})
    if not names:
        raise BundleError(f"{llm_dir} holds no .safetensors weights")
    return names


def _write_index(out: Path, weight_map: dict[str, str]) -> None:
    size = sum((out / f).stat().st_size for f in set(weight_map.values()))
    index = {"metadata": {"total_size": size}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def hf_config(config: SkinGPTConfig, max_images: int, image_pad_id: int) -> dict[str, Any]:
    """config.json: transformers' Blip2Config fields, with the LLM's config as its text_config."""
    vis, qf, llm = config.vision, config.qformer, config.llm
    text = llama_config(llm).to_dict()
    return {
        "architectures": [ARCHITECTURE],
        "model_type": "blip-2",
        "num_query_tokens": qf.num_query_tokens,
        "image_token_index": None,
        "vision_config": {"model_type": "blip_2_vision_model", "hidden_size": vis.embed_dim,
                          "intermediate_size": int(vis.embed_dim * vis.mlp_ratio), "num_hidden_layers": vis.depth,
                          "num_attention_heads": vis.num_heads, "image_size": vis.img_size,
                          "patch_size": vis.patch_size, "hidden_act": "gelu", "layer_norm_eps": vis.norm_eps,
                          "qkv_bias": True},
        "qformer_config": {"model_type": "blip_2_qformer", "hidden_size": qf.hidden_size,
                           "num_hidden_layers": qf.num_layers, "num_attention_heads": qf.num_heads,
                           "intermediate_size": qf.intermediate_size, "hidden_act": "gelu",
                           "layer_norm_eps": qf.layer_norm_eps, "cross_attention_frequency": qf.cross_attention_frequency,
                           "encoder_hidden_size": vis.embed_dim, "max_position_embeddings": qf.max_position_embeddings,
                           "use_qformer_text_input": False},
        "text_config": text,
        "torch_dtype": "float32",
        "skingpt": {"name": config.name, "prompt_template": config.prompt_template,
                    "placeholder": config.image_placeholder, "ln_vision_eps": vis.ln_vision_eps,
                    "preprocess": config.to_dict()["preprocess"], "max_images": max_images,
                    "image_pad_id": image_pad_id, "stop": list(template(config.prompt_template).stop)},
    }


def generation_config(config: SkinGPTConfig) -> dict[str, Any]:
    gen = config.generation
    out: dict[str, Any] = {"bos_token_id": config.llm.bos_token_id, "eos_token_id": config.llm.eos_token_id,
                           "max_new_tokens": gen.max_new_tokens}
    if gen.do_sample:
        out |= {"do_sample": True, "temperature": gen.temperature, "top_p": gen.top_p}
        if gen.top_k:
            out["top_k"] = gen.top_k
    if gen.repetition_penalty != 1.0:
        out["repetition_penalty"] = gen.repetition_penalty
    return out


def _literal(text: str) -> str:
    """A Jinja string literal for any text (Jinja reads Python's escapes)."""
    return "'" + text.encode("unicode_escape").decode("ascii").replace("'", "\\'") + "'"


def chat_template(tpl: Template, placeholder: str) -> str:
    """The template as Jinja over OpenAI messages: what `model.prompt.conversation.render` writes
    for the same turns. A user message's photos (any image part, wherever it stands) go first,
    joined by a space, then a space and its text; a user message with photos and no text is a turn
    whose text was dropped for room. A system message is refused: the system text is the bundle's."""
    human_first = tpl.first_human or tpl.human
    pieces = {"SYSTEM": tpl.system, "IMAGE": tpl.image, "END": tpl.prompt_end}
    for key, fmt in (("HUMAN", tpl.human), ("FIRST", human_first), ("ANSWER", tpl.assistant)):
        before, after = fmt.split("{text}")
        pieces[key + "_A"], pieces[key + "_B"] = before, after
    if placeholder not in tpl.image:
        raise BundleError(f"template {tpl.name!r} writes no {placeholder} in its image markers")
    sets = "".join(f"{{%- set {key} = {_literal(value)} -%}}\n" for key, value in pieces.items())
    return sets + _BODY


_BODY = """\
{{- bos_token -}}{{- SYSTEM -}}
{%- set ns = namespace(first=true) -%}
{%- for message in messages -%}
{%- set part = namespace(text='', images=0) -%}
{%- if message['content'] is string -%}
{%- set part.text = message['content'] -%}
{%- elif message['content'] -%}
{%- for item in message['content'] -%}
{%- if item['type'] == 'text' -%}
{%- set part.text = part.text ~ (' ' if part.text else '') ~ item['text'] -%}
{%- elif item['type'] in ['image', 'image_url', 'input_image'] -%}
{%- set part.images = part.images + 1 -%}
{%- endif -%}
{%- endfor -%}
{%- endif -%}
{%- if message['role'] == 'user' -%}
{%- set photos = ([IMAGE] * part.images) | join(' ') -%}
{%- set question = (photos ~ ' ' ~ part.text) if (part.images and part.text) else (photos ~ part.text) -%}
{%- if ns.first -%}{{- FIRST_A ~ question ~ FIRST_B -}}{%- else -%}{{- HUMAN_A ~ question ~ HUMAN_B -}}{%- endif -%}
{%- set ns.first = false -%}
{%- elif message['role'] == 'assistant' -%}
{{- ANSWER_A ~ part.text ~ ANSWER_B -}}
{%- else -%}
{{- raise_exception('SkinGPT takes user and assistant messages only: its system text is fixed by the model') -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- END -}}{%- endif -%}
"""
