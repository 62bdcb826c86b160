"""Build a bundle from the files users actually have.

One explicit key map per source format; each returns (mapped, ignored): tensors under our module
names, and the source keys it deliberately dropped. Shapes are asserted against the model built on
`meta`, and a report says which parts each file supplied and which of its keys were ignored.

Pickled `.pth` files are opened once, here, with `weights_only=True`; the bundle holds safetensors.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model.weights.bundle import BundleError, check_state, save_bundle, sha256_file, shapes
from model.errors import UserFacingError
from model.nn.config import PRESETS, SkinGPTConfig, preset
from model.nn.llm import LLMLoadError, config_from_dir, load_tokenizer
from model.nn.skingpt import build_skingpt

Tensors = dict[str, torch.Tensor]


class ConvertError(UserFacingError, RuntimeError):
    """A source file that is missing, unreadable, or does not fit the others."""


# -- key maps, one per source format ------------------------------------------------------------

def map_lavis_vit(state: Mapping[str, torch.Tensor], depth: int) -> tuple[Tensors, list[str]]:
    """`eva_vit_g.pth` (LAVIS): timm's own names; blocks past `depth` (BLIP-2 drops the 40th) unused."""
    vit_keys = re.compile(r"^(cls_token|pos_embed|patch_embed\.proj\.(weight|bias)|blocks\.(\d+)\.("
                          r"norm[12]\.(weight|bias)|attn\.(q_bias|v_bias|qkv\.weight|proj\.(weight|bias))|"
                          r"mlp\.fc[12]\.(weight|bias)))$")
    mapped, ignored = {}, []
    for key, value in state.items():
        match = vit_keys.match(key)
        if match and (match.group(3) is None or int(match.group(3)) < depth):
            mapped[f"vision.{key}"] = value
        else:
            ignored.append(key)
    return mapped, ignored


def _lavis_qformer_name(key: str) -> str | None:
    """`Qformer.bert.X` (LAVIS BERT names) -> `qformer.X` (transformers Blip2QFormerModel names)."""
    rest = key.removeprefix("Qformer.bert.")
    if rest == "embeddings.LayerNorm.weight" or rest == "embeddings.LayerNorm.bias":
        return "qformer.layernorm." + rest.rsplit(".", 1)[1]
    if not rest.startswith("encoder.layer."):
        return None  # word / position embeddings, position_ids: the queries need none of them
    rest = rest.replace(".crossattention.self.", ".crossattention.attention.")
    rest = rest.replace(".attention.self.", ".attention.attention.")
    return "qformer." + rest


def map_lavis_blip2(state: Mapping[str, torch.Tensor], targets: Iterable[str]) -> tuple[Tensors, list[str]]:
    """`blip2_pretrained_*.pth` `model` entry, and the same names inside MiniGPT-4 / SkinGPT files."""
    targets = set(targets)
    mapped, ignored = {}, []
    for key, value in state.items():
        if key == "query_tokens" or key.startswith("ln_vision."):
            name = key
        elif key.startswith("Qformer.bert."):
            name = _lavis_qformer_name(key)
        else:
            name = None
        if name is not None and name in targets:  # the text FFN and the like have no target
            mapped[name] = value
        else:
            ignored.append(key)
    return mapped, ignored


_HF_VISION = [  # transformers BLIP-2 vision names -> timm EVA names
    (r"^vision_model\.embeddings\.class_embedding$", "vision.cls_token"),
    (r"^vision_model\.embeddings\.position_embedding$", "vision.pos_embed"),
    (r"^vision_model\.embeddings\.patch_embedding\.(weight|bias)$", r"vision.patch_embed.proj.\1"),
    (r"^vision_model\.encoder\.layers\.(\d+)\.layer_norm1\.(weight|bias)$", r"vision.blocks.\1.norm1.\2"),
    (r"^vision_model\.encoder\.layers\.(\d+)\.layer_norm2\.(weight|bias)$", r"vision.blocks.\1.norm2.\2"),
    (r"^vision_model\.encoder\.layers\.(\d+)\.self_attn\.qkv\.weight$", r"vision.blocks.\1.attn.qkv.weight"),
    (r"^vision_model\.encoder\.layers\.(\d+)\.self_attn\.(q_bias|v_bias)$", r"vision.blocks.\1.attn.\2"),
    (r"^vision_model\.encoder\.layers\.(\d+)\.self_attn\.projection\.(weight|bias)$", r"vision.blocks.\1.attn.proj.\2"),
    (r"^vision_model\.encoder\.layers\.(\d+)\.mlp\.(fc[12])\.(weight|bias)$", r"vision.blocks.\1.mlp.\2.\3"),
    (r"^vision_model\.post_layernorm\.(weight|bias)$", r"ln_vision.\1"),  # plays the part of ln_vision
    (r"^qformer\.(.+)$", r"qformer.\1"),
    (r"^query_tokens$", "query_tokens"),
]


def map_hf_blip2(state: Mapping[str, torch.Tensor], targets: Iterable[str]) -> tuple[Tensors, list[str]]:
    """A transformers BLIP-2 directory (`vision_model.*`, `qformer.*`, `query_tokens`)."""
    targets = set(targets)
    mapped, ignored = {}, []
    for key, value in state.items():
        name = next((re.sub(pat, rep, key) for pat, rep in _HF_VISION if re.match(pat, key)), None)
        if name is not None and name in targets:  # language_model.*, language_projection.*: not ours
            mapped[name] = value
        else:
            ignored.append(key)
    return mapped, ignored


def map_finetune(state: Mapping[str, torch.Tensor], targets: Iterable[str]) -> tuple[Tensors, list[str]]:
    """`skinGPT_v1.pth` / MiniGPT-4 checkpoint `model` entry: the projection (`llama_proj` or
    `llm_proj`), and possibly Q-Former and query tokens in LAVIS names."""
    proj = {f"proj.{k.split('.', 1)[1]}": v for k, v in state.items()
            if k.split(".", 1)[0] in ("llama_proj", "llm_proj")}
    rest = {k: v for k, v in state.items() if k.split(".", 1)[0] not in ("llama_proj", "llm_proj")}
    mapped, ignored = map_lavis_blip2(rest, targets)
    return {**proj, **mapped}, ignored


# -- reading source files -----------------------------------------------------------------------

def read_pickle(path: Path, entry: str | None) -> Tensors:
    """Open a `.pth` safely (weights_only) and return its state dict (or its `entry` sub-dict)."""
    if not path.is_file():
        raise ConvertError(f"{path} does not exist")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # torch raises many types here; all mean "not a safe weight pickle"
        raise ConvertError(f"{path} could not be read as a weights-only PyTorch file ({err}). Only plain "
                           f"tensor checkpoints are accepted; code inside a pickle is never run.") from err
    if entry is not None and isinstance(data, dict) and entry in data:
        data = data[entry]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ConvertError(f"{path} does not hold a state dict of tensors"
                           + (f" (looked in its {entry!r} entry)" if entry else ""))
    return data


def read_safetensors_dir(path: Path) -> Tensors:
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    if not files or not files[0].is_file():
        raise ConvertError(f"{path} holds no .safetensors files")
    tensors: Tensors = {}
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            tensors.update({k: handle.get_tensor(k) for k in handle.keys()})
    return tensors


# -- the report ---------------------------------------------------------------------------------

@dataclass
class SourceReport:
    role: str
    path: str
    sha256: str
    supplied: dict[str, int] = field(default_factory=dict)  # part -> tensors taken
    overridden: dict[str, int] = field(default_factory=dict)  # part -> tensors replacing an earlier file's
    ignored: dict[str, int] = field(default_factory=dict)  # key pattern -> count

    def lines(self) -> list[str]:
        parts = ", ".join(f"{p} ({n} tensors)" for p, n in self.supplied.items()) or "nothing"
        out = [f"{self.role}: {self.path}", f"  sha256 {self.sha256}", f"  supplied: {parts}"]
        if self.overridden:
            out.append("  replaced earlier weights of: " + ", ".join(f"{p} ({n})" for p, n in self.overridden.items()))
        if self.ignored:
            out.append(f"  ignored {sum(self.ignored.values())} keys:")
            out += [f"    {pattern} x{n}" for pattern, n in sorted(self.ignored.items())]
        return out


@dataclass
class ConvertReport:
    sources: list[SourceReport]
    notes: list[str]
    bundle: Path | None = None

    def text(self) -> str:
        lines = [line for source in self.sources for line in source.lines()] + self.notes
        if self.bundle is not None:
            lines.append(f"bundle written to {self.bundle}")
        return "\n".join(lines)


def _pattern_counts(keys: Iterable[str]) -> dict[str, int]:
    return dict(Counter(re.sub(r"\.\d+\.", ".*.", k) for k in keys))


def _part(name: str) -> str:
    return name.split(".", 1)[0]


# -- the converter ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sources:
    llm_dir: Path
    vit: Path | None = None  # eva_vit_g.pth
    blip2: Path | None = None  # blip2_pretrained_flant5xxl.pth
    hf_blip2: Path | None = None  # a transformers BLIP-2 directory or .safetensors file
    finetune: Path | None = None  # skinGPT_v1.pth or a MiniGPT-4 checkpoint


def convert(sources: Sources, out: str | Path, *, preset_name: str | None = None, template: str = "skingpt4",
            link: bool = False, log: Callable[[str], None] = print) -> ConvertReport:
    """Map every source onto our names, check the result strictly, and write a bundle to `out`."""
    if sources.blip2 is None and sources.hf_blip2 is None:
        raise ConvertError("the Q-Former is needed: pass --blip2 blip2_pretrained_flant5xxl.pth or "
                           "--hf-blip2 DIR (a Hugging Face BLIP-2 directory)")
    if sources.vit is None and sources.hf_blip2 is None:
        raise ConvertError("the image encoder is needed: pass --vit eva_vit_g.pth or --hf-blip2 DIR")
    try:
        llm_cfg = config_from_dir(sources.llm_dir)
    except LLMLoadError as err:
        raise ConvertError(str(err)) from err
    finetune = read_pickle(sources.finetune, "model") if sources.finetune else None
    config, notes = _choose_config(preset_name, finetune, llm_cfg, template)
    with torch.device("meta"):
        expected = shapes(build_skingpt(config).encoder_state_dict())
    merged, reports = _gather(sources, finetune, config.vision.depth, expected)
    _check_complete(merged, expected, sources)
    log("\n".join(line for r in reports for line in r.lines()))

    def write_llm(llm_dir: Path) -> None:
        _copy_llm(sources.llm_dir, llm_dir, link=link, log=log)

    provenance = {r.role: {"file": Path(r.path).name, "sha256": r.sha256} for r in reports}
    bundle = save_bundle(out, config, merged, write_llm, sources=provenance)
    return ConvertReport(reports, notes, bundle)


def _choose_config(preset_name: str | None, finetune: Tensors | None, llm_cfg, template: str
                   ) -> tuple[SkinGPTConfig, list[str]]:
    """The preset gives vision/Q-Former/preprocessing; the LLM directory gives the LLM's shape."""
    notes = [f"LLM directory: hidden size {llm_cfg.hidden_size}, {llm_cfg.num_layers} layers, "
             f"vocabulary {llm_cfg.vocab_size}"]
    width = None
    if finetune is not None:
        proj = finetune.get("llama_proj.weight", finetune.get("llm_proj.weight"))
        if proj is None:
            raise ConvertError("the fine-tuned checkpoint has no projection (llama_proj.weight or "
                               "llm_proj.weight in its 'model' entry); is it a SkinGPT-4 / MiniGPT-4 file?")
        width = proj.shape[0]
        notes.append(f"projection in the fine-tuned checkpoint: {proj.shape[1]} -> {width} "
                     f"({ {4096: '7B-class', 5120: '13B-class'}.get(width, 'custom') } LLM)")
        if width != llm_cfg.hidden_size:
            raise ConvertError(f"the fine-tuned checkpoint projects to width {width} but the LLM directory has "
                               f"hidden size {llm_cfg.hidden_size}: it was trained for a different LLM. Use the "
                               f"{ {4096: 'Vicuna-7B', 5120: 'Vicuna-13B'}.get(width, 'matching') } directory.")
    if preset_name is None:
        by_width = {4096: "skingpt4-vicuna7b", 5120: "skingpt4-vicuna13b"}
        preset_name = by_width.get(width or llm_cfg.hidden_size)
        if preset_name is None:
            raise ConvertError(f"no preset fits LLM width {llm_cfg.hidden_size}; pass --preset "
                               f"(one of {', '.join(PRESETS)})")
        notes.append(f"preset chosen by width: {preset_name}")
    base = preset(preset_name)
    config = replace(base, llm=llm_cfg, prompt_template=template,
                     generation=replace(base.generation,
                                        max_context=min(base.generation.max_context, llm_cfg.max_position_embeddings)))
    return config, notes


def _gather(sources: Sources, finetune: Tensors | None, depth: int, expected: Mapping[str, tuple]
            ) -> tuple[Tensors, list[SourceReport]]:
    """Apply each source's key map in order; later sources override earlier ones (the fine-tune last)."""
    targets = expected.keys()
    steps: list[tuple[str, Path, Callable[[], tuple[Tensors, list[str]]]]] = []
    if sources.vit is not None:
        steps.append(("vit", sources.vit, lambda: map_lavis_vit(read_pickle(sources.vit, None), depth)))
    if sources.hf_blip2 is not None:
        steps.append(("hf_blip2", sources.hf_blip2, lambda: map_hf_blip2(read_safetensors_dir(sources.hf_blip2), targets)))
    if sources.blip2 is not None:
        steps.append(("blip2", sources.blip2, lambda: map_lavis_blip2(read_pickle(sources.blip2, "model"), targets)))
    if finetune is not None:
        steps.append(("finetune", sources.finetune, lambda: map_finetune(finetune, targets)))
    merged: Tensors = {}
    reports = []
    for role, path, read in steps:
        mapped, ignored = read()
        for name, tensor in mapped.items():
            if tuple(tensor.shape) != tuple(expected[name]):
                raise ConvertError(f"{path}: {name} has shape {tuple(tensor.shape)}, the model expects "
                                   f"{tuple(expected[name])}; is this file for the same model size?")
        report = SourceReport(role, str(path), _hash_source(path),
                              supplied=dict(Counter(_part(k) for k in mapped)),
                              overridden=dict(Counter(_part(k) for k in mapped if k in merged)),
                              ignored=_pattern_counts(ignored))
        merged.update(mapped)
        reports.append(report)
    return merged, reports


def _hash_source(path: Path) -> str:
    from tqdm.auto import tqdm

    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    total = sum(f.stat().st_size for f in files)
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"reading {path.name}", leave=False) as bar:
        digests = [sha256_file(f, bar) for f in files]
    # a sharded directory is named by the digest of its shards' digests
    return digests[0] if len(digests) == 1 else hashlib.sha256("".join(digests).encode()).hexdigest()


def _check_complete(merged: Tensors, expected: Mapping[str, tuple], sources: Sources) -> None:
    missing_parts = sorted({_part(k) for k in expected} - {_part(k) for k in merged})
    advice = {"proj": "pass --finetune skinGPT_v1.pth (or a MiniGPT-4 checkpoint) for the projection",
              "vision": "pass --vit eva_vit_g.pth or --hf-blip2 DIR",
              "ln_vision": "pass --blip2 blip2_pretrained_flant5xxl.pth or --hf-blip2 DIR",
              "qformer": "pass --blip2 blip2_pretrained_flant5xxl.pth or --hf-blip2 DIR",
              "query_tokens": "pass --blip2 blip2_pretrained_flant5xxl.pth or --hf-blip2 DIR"}
    if missing_parts:
        raise ConvertError("no source supplied " + "; ".join(f"{p}: {advice[p]}" for p in missing_parts))
    try:
        check_state(expected, shapes(merged), "the converted weights")
    except BundleError as err:
        raise ConvertError(str(err)) from err


# -- the LLM directory --------------------------------------------------------------------------

_LLM_SIDE_FILES = ("config.json", "generation_config.json")


def _copy_llm(src: Path, dst: Path, *, link: bool, log: Callable[[str], None]) -> None:
    """Copy (or hard-link) safetensors shards; convert .bin shards once; re-save the tokenizer."""
    from tqdm.auto import tqdm

    for name in _LLM_SIDE_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    shards = sorted(src.glob("*.safetensors"))
    if shards:
        total = sum(s.stat().st_size for s in shards)
        with tqdm(total=total, unit="B", unit_scale=True, desc="copying LLM weights", leave=False) as bar:
            for shard in shards:
                _place(shard, dst / shard.name, link)
                bar.update(shard.stat().st_size)
        if (src / "model.safetensors.index.json").is_file():
            shutil.copy2(src / "model.safetensors.index.json", dst / "model.safetensors.index.json")
    else:
        _convert_bin_shards(src, dst, log)
    try:
        tokenizer = load_tokenizer(src)
    except Exception as err:  # tokenizer loaders raise assorted types for missing or broken files
        raise ConvertError(f"cannot read the tokenizer in {src} ({err}); the directory needs tokenizer.model "
                           f"or tokenizer.json") from err
    tokenizer.save_pretrained(dst)


def _place(src: Path, dst: Path, link: bool) -> None:
    if link:
        try:
            os.link(src, dst)
            return
        except OSError:
            pass  # another filesystem: fall back to a copy
    shutil.copyfile(src, dst)


def _convert_bin_shards(src: Path, dst: Path, log: Callable[[str], None]) -> None:
    """`pytorch_model*.bin` -> `model*.safetensors` (weights_only), with a matching index."""
    from tqdm.auto import tqdm

    bins = sorted(src.glob("pytorch_model*.bin"))
    if not bins:
        raise ConvertError(f"{src} holds neither .safetensors nor pytorch_model*.bin weights")
    log(f"converting {len(bins)} .bin shard(s) of {src} to safetensors (weights_only)")
    weight_map = {}
    for shard in tqdm(bins, desc="converting LLM shards", leave=False):
        state = read_pickle(shard, None)
        name = shard.name.replace("pytorch_model", "model").replace(".bin", ".safetensors")
        save_file({k: v.contiguous() for k, v in state.items()}, str(dst / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in state})
    if len(bins) > 1:
        index = {"metadata": {}, "weight_map": weight_map}
        (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
