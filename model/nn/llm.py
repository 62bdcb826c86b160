"""Thin adapter over the transformers Llama-family causal LM and its tokenizer.

Every call whose shape depends on the transformers version lives here, so that an upgrade touches
one file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from model.nn.config import LLMConfig
from model.errors import UserFacingError


class LLMLoadError(UserFacingError, RuntimeError):
    """The LLM directory is missing, incomplete, or does not match the bundle's config."""


def hf_config(cfg: LLMConfig) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        tie_word_embeddings=False,
    )


def config_from_dir(path: str | Path) -> LLMConfig:
    """Read an LLMConfig from a Hugging Face directory's config.json."""
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        raise LLMLoadError(f"{path} has no config.json: pass the Hugging Face directory of a Vicuna or "
                           f"Llama-2 model (config.json, tokenizer files, weight shards)")
    raw: dict[str, Any] = json.loads(config_path.read_text())
    if raw.get("model_type") != "llama":
        raise LLMLoadError(f"{config_path} describes model_type {raw.get('model_type')!r}; SkinGPT needs a "
                           f"Llama-family model (Vicuna, Llama-2-chat)")
    rope = raw.get("rope_parameters") or {}
    heads = raw["num_attention_heads"]
    return LLMConfig(
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"],
        num_layers=raw["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=raw.get("num_key_value_heads") or heads,
        max_position_embeddings=raw.get("max_position_embeddings", 2048),
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope.get("rope_theta", raw.get("rope_theta", 10000.0))),
        bos_token_id=raw.get("bos_token_id", 1) or 1,
        eos_token_id=raw.get("eos_token_id", 2) or 2,
    )


def build_llm(cfg: LLMConfig) -> LlamaForCausalLM:
    """A randomly initialised LM (on whatever default device is active, `meta` included)."""
    return LlamaForCausalLM(hf_config(cfg))


def load_llm(path: str | Path, *, dtype: torch.dtype, device: str,
             quantization_config: Any = None) -> LlamaForCausalLM:
    """Load safetensors weights strictly: a missing, unexpected or mismatched key is an error."""
    path = Path(path)
    if not any(path.glob("*.safetensors")):
        raise LLMLoadError(f"{path} holds no .safetensors weights; serving never unpickles .bin files. "
                           f"Build a bundle with {{command:convert}}, which converts them once.")
    model, info = LlamaForCausalLM.from_pretrained(
        path, dtype=dtype, device_map=device, quantization_config=quantization_config,
        local_files_only=True, use_safetensors=True, output_loading_info=True)
    problems = {name: info.get(name) for name in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    problems = {name: keys for name, keys in problems.items() if keys}
    if problems:
        detail = "; ".join(f"{name.replace('_', ' ')}: {sorted(map(str, keys))[:5]}" for name, keys in problems.items())
        raise LLMLoadError(f"LLM weights in {path} do not match its config.json ({detail})")
    return model.eval()


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(Path(path), local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # the reference pads with EOS
    return tokenizer


def token_embeddings(llm: LlamaForCausalLM) -> torch.nn.Embedding:
    return llm.get_input_embeddings()


class ExternalLLM(torch.nn.Module):
    """Stands in for an LLM that another runtime holds (llama.cpp runs a GGUF bundle's): no weights,
    only the empty embedding table whose device and dtype say where image embeddings are delivered."""

    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        self.config = hf_config(cfg)
        self.embed = torch.nn.Embedding(0, cfg.hidden_size)  # (0, D): fp32 on the CPU

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.embed

    def forward(self, *args, **kwargs):
        raise RuntimeError("this LLM runs in another runtime (llama.cpp); serve it through its model runner")
