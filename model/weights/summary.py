"""Parameter counts, shapes and memory estimates per part, built on `meta` (no memory used)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from model.nn.config import SkinGPTConfig
from model.choices import QUANTIZE
from model.weights.policy import estimate_llm_bytes, quantized_linear_params
from model.nn.skingpt import ENCODER_PARTS, SkinGPT, build_skingpt, count_parameters

PART_NAMES = {"vision": "ViT", "ln_vision": "ln_vision", "qformer": "Q-Former", "query_tokens": "query tokens",
              "proj": "projection", "llm": "LLM"}


def describe(config: SkinGPTConfig) -> dict[str, Any]:
    """Counts, shapes and per-mode weight memory for a config, without allocating its weights."""
    with torch.device("meta"):
        model = build_skingpt(config)
    counts = {part: count_parameters(getattr(model, part)) for part in (*ENCODER_PARTS, "llm")}
    encoder = sum(counts[p] for p in ENCODER_PARTS)
    linear = quantized_linear_params(model.llm)
    memory = {mode: {"encoder_half": encoder * 2, "llm": estimate_llm_bytes(counts["llm"], linear, mode),
                     "total": encoder * 2 + estimate_llm_bytes(counts["llm"], linear, mode)}
              for mode in QUANTIZE if mode != "auto"}
    return {"name": config.name, "parameters": counts, "total_parameters": sum(counts.values()),
            "shapes": _shapes(model), "memory_bytes": memory, "prompt_template": config.prompt_template}


def _shapes(model: SkinGPT) -> dict[str, list]:
    cfg = model.config
    size = cfg.vision.img_size
    with torch.device("meta"):
        image_tokens = model.vision.forward_features(torch.empty(1, 3, size, size, device="meta"))
    q, d = cfg.qformer, cfg.llm.hidden_size
    return {"pixels": [1, 3, size, size],
            "image_tokens": list(image_tokens.shape),  # (B, 1+N, C_vis)
            "qformer_out": [1, q.num_query_tokens, q.hidden_size],
            "query_tokens": list(model.query_tokens.shape),
            "proj_weight": list(model.proj.weight.shape),
            "image_embeds": [1, q.num_query_tokens, d],
            "llm_embed": list(model.llm.get_input_embeddings().weight.shape),
            "lm_head": list(model.llm.get_output_embeddings().weight.shape)}


def describe_bundle(path: str | Path, record: Path | None = None) -> dict[str, Any]:
    """`describe` for a bundle's config, after verifying every file's sha256 (those unchanged since
    `record` was written are not read again; without it, all)."""
    from model.weights.bundle import load_config, verify_bundle

    manifest = verify_bundle(path, record)
    info = describe(load_config(Path(path)))
    info["bundle"] = {"path": str(path), "files": len(manifest["files"]), "sha256_verified": True,
                      "bytes": sum(e["bytes"] for e in manifest["files"].values()),
                      "sources": manifest.get("sources", {}),
                      "quantization": _quantization(Path(path), manifest),
                      "encoder": manifest.get("sources", {}).get("quantized_from", {}).get("encoder", "as converted")}
    return info


def _quantization(bundle: Path, manifest: dict[str, Any]) -> str | None:
    from model.weights.bundle import LLM_DIR, quantized_mode
    from model.weights.gguf_llm import GGUF_FILE
    from model.weights.weight_only import read_quantization

    if (bundle / LLM_DIR / GGUF_FILE).is_file():
        return f"{quantized_mode(manifest) or 'gguf'} (one GGUF file, run by llama.cpp)"
    return (read_quantization(bundle / LLM_DIR) or {}).get("mode")


def format_text(info: dict[str, Any]) -> str:
    lines = [f"{info['name']}  (prompt template: {info['prompt_template']})", "", "part            parameters"]
    for part, n in info["parameters"].items():
        lines.append(f"  {PART_NAMES[part]:<14}{_millions(n):>12}")
    lines.append(f"  {'total':<14}{_millions(info['total_parameters']):>12}")
    lines += ["", "shapes"] + [f"  {k:<14}{tuple(v)}" for k, v in info["shapes"].items()]
    lines += ["", "weight memory (encoder in fp16/bf16; LLM by mode)"]
    for mode, m in info["memory_bytes"].items():
        lines.append(f"  {mode:<6} LLM {format_bytes(m['llm']):>9}   encoder {format_bytes(m['encoder_half']):>9}   "
                     f"total {format_bytes(m['total']):>9}")
    if "bundle" in info:
        b = info["bundle"]
        lines += ["", f"bundle {b['path']}: {b['files']} files, {format_bytes(b['bytes'])}, sha256 verified"]
        if b.get("quantization"):
            lines.append(f"  the LLM is stored quantised to {b['quantization']}")
        if b.get("encoder") == "int8":
            lines.append("  the image encoder's ViT linears are stored in int8 (opt-in; see weights/README.md)")
        lines += [f"  {role}: {_source(src)}" for role, src in b["sources"].items()]
    return "\n".join(lines)


def _source(src: Any) -> str:
    if not isinstance(src, dict):
        return str(src)
    if "file" in src:
        return f"{src['file']} sha256 {src.get('sha256', '')[:16]}..."
    return ", ".join(f"{k} {str(v)[:64]}" for k, v in src.items())


def _millions(n: int) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e9 else f"{n / 1e6:.1f} M" if n >= 1e5 else f"{n:,}"


def format_bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**27 else f"{n / 2**20:.2f} MiB"
