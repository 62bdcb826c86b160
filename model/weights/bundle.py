"""Weight bundles: self-describing directories that serving loads strictly and verifies.

    BUNDLE/
      skingpt.yaml            architecture, prompt template, preprocessing, generation defaults
      encoder.safetensors     vision + ln_vision + Q-Former + query tokens + projection
      llm/                    the LLM as a Hugging Face directory (safetensors, tokenizer), or its
                              config.json and tokenizer beside one GGUF file (model.gguf) that llama.cpp runs
      manifest.json           sha256 and size of every file above, and where the weights came from

Serving reads safetensors only; pickles are converted once by `model.weights.convert`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from model.choices import BUNDLE_QUANTIZE, ENCODER_STORAGE, GGUF, WEIGHT_ONLY, ChoiceError, check_choice
from model.nn.config import ConfigError, SkinGPTConfig
from model.errors import UserFacingError
from model.nn.llm import ExternalLLM, LLMLoadError, config_from_dir, load_llm, load_tokenizer
from model.weights.policy import (LoadPolicy, Sizing, bnb_config, choose_policy, fast_cpu_encoder,
                           module_bytes, quantized_linear_params)
from model.nn.skingpt import ENCODER_PARTS, SkinGPT
from model.weights.encoder_int8 import (install_int8_linears, int8_note, int8_scales,
                                        quantise_encoder, stored_int8)
from model.weights.gguf_llm import GGUF_FILE, require_llama_cpp
from model.weights.weight_only import (entries, from_float_files, kernel_speeds, load_quantized_llm, read_quantization,
                          require_kernels, write_quantized, TensorFiles)

CONFIG_FILE = "skingpt.yaml"
ENCODER_FILE = "encoder.safetensors"
LLM_DIR = "llm"
MANIFEST_FILE = "manifest.json"
BUNDLE_FORMAT = "skingpt-bundle/1"
HOW_TO_GET = ("build one with {command:convert} from the published weight files "
              "(see weights/README.md), or use a bundle written by {command:train}")


class BundleError(UserFacingError, RuntimeError):
    """A bundle that is missing, incomplete, corrupted, or does not match its own config."""


# -- hashing and the manifest -----------------------------------------------------------------

def sha256_file(path: Path, progress: Any = None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(8 << 20):
            digest.update(chunk)
            if progress is not None:
                progress.update(len(chunk))
    return digest.hexdigest()


def bundle_files(bundle: Path) -> list[Path]:
    """Every file of a bundle except the manifest itself, as paths relative to the bundle."""
    return sorted(p.relative_to(bundle) for p in bundle.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)


def write_manifest(bundle: Path, sources: Mapping[str, Any] | None = None) -> dict[str, Any]:
    from tqdm.auto import tqdm

    files = bundle_files(bundle)
    total = sum((bundle / f).stat().st_size for f in files)
    entries = {}
    with tqdm(total=total, unit="B", unit_scale=True, desc="hashing bundle", leave=False) as bar:
        for rel in files:
            entries[rel.as_posix()] = {"sha256": sha256_file(bundle / rel, bar), "bytes": (bundle / rel).stat().st_size}
    manifest = {"format": BUNDLE_FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "files": entries, "sources": dict(sources or {})}
    (bundle / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_manifest(bundle: Path) -> dict[str, Any]:
    path = bundle / MANIFEST_FILE
    if not bundle.is_dir():
        raise BundleError(f"no SkinGPT bundle at {bundle}: {HOW_TO_GET}")
    if not path.is_file():
        raise BundleError(f"{bundle} has no {MANIFEST_FILE}, so it is not a SkinGPT bundle: {HOW_TO_GET}")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise BundleError(f"{path} is not valid JSON ({err}); re-create the bundle") from err
    if manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{path} has format {manifest.get('format')!r}; this version reads {BUNDLE_FORMAT}")
    return manifest


def verify_bundle(bundle: str | Path, record: Path | None = None) -> dict[str, Any]:
    """Check that every file the manifest lists exists with its recorded size and sha256.

    With `record` (a JSON file, see `verification_record`), a file whose size, mtime, ctime, inode
    and manifest hash are what they were when it last passed is not hashed again: a 13B bundle is
    28 GB to read. Any change to a file (a copy, an edit, a touch) or to the manifest hashes it
    again. Without `record`, every file is hashed.
    """
    from tqdm.auto import tqdm

    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    entries = manifest["files"]
    for required in (CONFIG_FILE, ENCODER_FILE, f"{LLM_DIR}/config.json"):
        if required not in entries:
            raise BundleError(f"{bundle}/{MANIFEST_FILE} does not list {required}; the bundle is incomplete: "
                              f"{HOW_TO_GET}")
    for rel, entry in entries.items():
        path = bundle / rel
        if not path.is_file():
            raise BundleError(f"{bundle} lacks {rel}, which its manifest lists; copy the whole bundle "
                              f"directory again or {HOW_TO_GET}")
        if path.stat().st_size != entry["bytes"]:
            raise BundleError(f"{bundle}/{rel} is {path.stat().st_size:,} bytes but its manifest says "
                              f"{entry['bytes']:,}: the file is incomplete or was changed; copy it again")
    known = _read_record(record)
    todo = {rel: e for rel, e in entries.items() if known.get(rel) != _fingerprint(bundle / rel, e["sha256"])}
    with tqdm(total=sum(e["bytes"] for e in todo.values()), unit="B", unit_scale=True, desc="verifying sha256",
              leave=False) as bar:
        for rel, entry in todo.items():
            actual = sha256_file(bundle / rel, bar)
            if actual != entry["sha256"]:
                raise BundleError(f"{bundle}/{rel} fails its sha256 check (expected {entry['sha256'][:16]}..., "
                                  f"got {actual[:16]}...): the file is corrupted or was changed; copy it again")
    if record is not None and todo:
        _write_record(record, {rel: _fingerprint(bundle / rel, e["sha256"]) for rel, e in entries.items()})
    return manifest


def verification_record(cache_dir: Path, bundle: str | Path) -> Path:
    """Where the verification record of `bundle` lives under a per-user cache directory."""
    name = hashlib.sha256(str(Path(bundle).resolve()).encode()).hexdigest()[:32]
    return Path(cache_dir) / "verified" / f"{name}.json"


def _fingerprint(path: Path, sha256: str) -> dict[str, Any]:
    st = path.stat()
    return {"sha256": sha256, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns,
            "inode": st.st_ino, "device": st.st_dev}


def _read_record(record: Path | None) -> dict[str, Any]:
    if record is None or not record.is_file():
        return {}
    try:
        files = json.loads(record.read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        return {}  # unreadable: verify everything, then write it anew
    return files if isinstance(files, dict) else {}


def _write_record(record: Path, files: dict[str, Any]) -> None:
    try:
        record.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = record.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"files": files}, indent=1))
        os.replace(tmp, record)
    except OSError:
        pass  # a read-only cache only costs a full check next time


# -- strict key checking ------------------------------------------------------------------------

def check_state(expected: Mapping[str, tuple[int, ...]], given: Mapping[str, tuple[int, ...]], where: str) -> None:
    """Raise naming every missing, unexpected or wrongly shaped key (the first few of each)."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    wrong = sorted(k for k in set(expected) & set(given) if tuple(expected[k]) != tuple(given[k]))
    if not (missing or unexpected or wrong):
        return
    lines = [f"{where} does not match the model:"]
    lines += [f"  missing key {k} (expected shape {tuple(expected[k])})" for k in missing[:8]]
    lines += [f"  unexpected key {k} (shape {tuple(given[k])})" for k in unexpected[:8]]
    lines += [f"  key {k}: file has shape {tuple(given[k])}, model expects {tuple(expected[k])}" for k in wrong[:8]]
    hidden = len(missing) + len(unexpected) + len(wrong) - (len(lines) - 1)
    if hidden:
        lines.append(f"  ... and {hidden} more")
    raise BundleError("\n".join(lines))


def shapes(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in tensors.items()}


# -- save ---------------------------------------------------------------------------------------

def save_bundle(out: str | Path, config: SkinGPTConfig, encoder: Mapping[str, torch.Tensor],
                write_llm: Any, sources: Mapping[str, Any] | None = None) -> Path:
    """Write a bundle. `write_llm(llm_dir)` fills the LLM directory (save_pretrained, or a copy)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config.to_yaml(out / CONFIG_FILE)
    save_file({k: v.detach().contiguous().cpu() for k, v in encoder.items()}, str(out / ENCODER_FILE),
              metadata={"format": BUNDLE_FORMAT})
    (out / LLM_DIR).mkdir(exist_ok=True)
    write_llm(out / LLM_DIR)
    write_manifest(out, sources)
    return out


def save_model_bundle(out: str | Path, model: SkinGPT, tokenizer: Any,
                      sources: Mapping[str, Any] | None = None) -> Path:
    """Write a bundle from a model in memory (training's final output, tests)."""
    def write_llm(llm_dir: Path) -> None:
        model.llm.save_pretrained(llm_dir)
        tokenizer.save_pretrained(llm_dir)

    return save_bundle(out, model.config, model.encoder_state_dict(), write_llm, sources)


def quantize_bundle(source: str | Path, out: str | Path, mode: str | None, encoder: str = "bf16") -> Path:
    """Write a copy of a bundle with its LLM and/or its encoder quantised, reading and writing one LLM
    tensor at a time.

    `mode` quantises a float bundle's LLM: int8w / int4 (PyTorch's weight-only kernels), or one GGUF
    file for llama.cpp (f32, f16, or q8_0 / q4_0 / q4_k_m by llama.cpp's own quantiser). None keeps the
    LLM as it is (an already quantised bundle: only its encoder changes). The encoder is stored in bf16
    (as it was for f32), or with `encoder="int8"` its ViT linears in int8 (see `encoder_int8`). The
    quantisation is recorded, every file hashed."""
    source, out = Path(source), Path(out)
    try:
        check_choice("the encoder's storage", encoder, ENCODER_STORAGE)
        if mode is not None:
            check_choice("the bundle's quantisation mode", mode, BUNDLE_QUANTIZE)
    except ChoiceError as err:
        raise BundleError(str(err)) from None
    manifest = verify_bundle(source)
    config = load_config(source)
    quantised = read_quantization(source / LLM_DIR) is not None or (source / LLM_DIR / GGUF_FILE).is_file()
    origin = dict(manifest.get("sources", {}).get("quantized_from", {}))
    if mode is None and not quantised and encoder == "bf16":
        raise BundleError("say what to quantise: --mode for the LLM, --encoder int8 for the image encoder")
    if mode is not None and quantised:
        raise BundleError(f"{source}'s LLM is already quantised; quantise the float bundle it was made from, "
                          f"or leave out --mode to change only its encoder")
    with safe_open(str(source / ENCODER_FILE), framework="pt") as handle:
        if stored_int8(handle.keys()):
            raise BundleError(f"{source}'s encoder is int8 already; quantise the bundle it was made from")
    if mode in GGUF and mode not in ("f32", "f16"):
        require_llama_cpp()  # before anything is written
    (out / LLM_DIR).mkdir(parents=True, exist_ok=True)
    for rel in bundle_files(source):
        keep_llm = rel.parts[0] == LLM_DIR and (mode is None or not rel.name.endswith((".safetensors",
                                                                                      ".safetensors.index.json")))
        if (rel.parts[0] != LLM_DIR and rel.as_posix() != ENCODER_FILE) or keep_llm:
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            copy = _link_or_copy if rel.name == GGUF_FILE else shutil.copyfile  # the config, a head, the tokenizer
            copy(source / rel, out / rel)
    with safe_open(str(source / ENCODER_FILE), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    if encoder == "int8":
        tensors = quantise_encoder(tensors)  # from the stored values, before any other rounding
    if mode not in (None, "f32"):
        scales = int8_scales(tensors)
        tensors = {k: v if k in scales else _half(k, v) for k, v in tensors.items()}
    save_file(tensors, str(out / ENCODER_FILE), metadata={"format": BUNDLE_FORMAT})
    del tensors
    if mode is not None:
        origin = {"bundle": str(source.resolve()), "bundle_hash": manifest_hash(manifest), "mode": mode,
                  **_write_llm(source, out, config, mode)}
    else:
        origin["encoder_from"] = {"bundle": str(source.resolve()), "bundle_hash": manifest_hash(manifest)}
    if encoder != "bf16":
        origin["encoder"] = encoder
    write_manifest(out, {**manifest.get("sources", {}), "quantized_from": origin})
    return out


def _write_llm(source: Path, out: Path, config: SkinGPTConfig, mode: str) -> dict[str, str]:
    files = TensorFiles(source / LLM_DIR)
    try:
        if mode in GGUF:
            made = write_gguf_llm(out / LLM_DIR, config.llm, load_tokenizer(source / LLM_DIR), files.get, mode)
        else:
            made = {}
            for _ in write_quantized(out / LLM_DIR, mode, entries(config.llm, *from_float_files(files, mode))):
                pass
        files.check_all_used(source / LLM_DIR)
    finally:
        files.close()
    return made


def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link where the disk allows (a GGUF LLM is gigabytes, and never written in place), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def write_gguf_llm(llm_dir: Path, cfg: Any, tokenizer: Any, fetch: Any, mode: str) -> dict[str, str]:
    """`llm_dir/model.gguf` in `mode` from float tensors fetched by name, one at a time (quantised
    modes through a temporary f16 file); returns what made it, for the manifest."""
    from importlib.metadata import version

    from model.weights.gguf_llm import llama_cpp_version, quantize_gguf, write_gguf
    from model.weights.weight_only import empty_llm

    params = [(name, tuple(p.shape)) for name, p in empty_llm(cfg).named_parameters()]
    final = llm_dir / GGUF_FILE
    written = final if mode in ("f32", "f16") else llm_dir / "model-f16.gguf.tmp"
    try:
        write_gguf(written, cfg, tokenizer, params, fetch, "f32" if mode == "f32" else "f16")
        made = {"runtime": "llama.cpp", "gguf_writer": f"gguf {version('gguf')}"}
        if written != final:
            quantize_gguf(written, final, mode)
            made["quantizer"] = f"llama-cpp-python {llama_cpp_version()}"
    finally:
        if written != final:
            written.unlink(missing_ok=True)
    return made


def _half(key: str, tensor: torch.Tensor) -> torch.Tensor:
    """Encoder tensors in bf16 (the weight-only modes run the encoder in bf16), ln_vision as it was."""
    return tensor if key.startswith("ln_vision.") or not tensor.is_floating_point() else tensor.bfloat16()


def quantized_mode(manifest: Mapping[str, Any]) -> str | None:
    """The mode a quantised bundle's LLM was written in (its manifest's provenance), or None."""
    return manifest.get("sources", {}).get("quantized_from", {}).get("mode")


def manifest_hash(manifest: Mapping[str, Any]) -> str:
    """One digest over a manifest's file hashes: names this exact set of weights."""
    joined = "".join(f"{k}:{v['sha256']}" for k, v in sorted(manifest["files"].items()))
    return hashlib.sha256(joined.encode()).hexdigest()


# -- load ---------------------------------------------------------------------------------------

@dataclass
class LoadedBundle:
    model: SkinGPT
    tokenizer: Any
    config: SkinGPTConfig
    path: Path
    manifest: dict[str, Any]
    device: str
    footprint: dict[str, int] = field(default_factory=dict)  # bytes per part as loaded
    differential: Any = None  # model.differential.DifferentialHead, when the bundle carries one
    policy: LoadPolicy | None = None  # the concrete policy it was loaded under (auto resolved)
    note: str = ""  # what auto chose and why, or what the bundle's own quantisation fixed
    gguf: Path | None = None  # the LLM as one GGUF file, run by llama.cpp (model.llm is then a stand-in)

    @property
    def runtime(self) -> str:
        """What runs the LLM: llama.cpp (a GGUF bundle) or torch."""
        return "llama.cpp" if self.gguf is not None else "torch"

    @property
    def bundle_hash(self) -> str:
        """One digest over the manifest's file hashes: names this exact set of weights."""
        return manifest_hash(self.manifest)

    @property
    def label(self) -> str:
        """The model as a report names it: preset, bundle folder, when the bundle was written, and the
        start of `bundle_hash` (its version: any change to any file changes it)."""
        written = str(self.manifest.get("created", ""))[:10]
        folder = self.path.name if self.path.name != self.config.name else ""
        return " · ".join(p for p in (self.config.name, folder, written, self.bundle_hash[:12]) if p)


def load_config(bundle: Path) -> SkinGPTConfig:
    try:
        return SkinGPTConfig.from_yaml(bundle / CONFIG_FILE)
    except ConfigError as err:  # already names the file
        raise BundleError(str(err)) from err


def load_bundle(path: str | Path, policy: LoadPolicy = LoadPolicy(), verify: bool = True,
                record: Path | None = None) -> LoadedBundle:
    """Verify hashes (files unchanged since `record` was written are not read again), then load the
    LLM and the encoder parts strictly, under `policy` (auto resolved against this bundle and machine)."""
    bundle = Path(path)
    manifest = verify_bundle(bundle, record) if verify else read_manifest(bundle)
    config = load_config(bundle)
    llm_dir = bundle / LLM_DIR
    try:
        on_disk = config_from_dir(llm_dir)
        stored = read_quantization(llm_dir)
    except LLMLoadError as err:
        raise BundleError(str(err)) from err
    if on_disk != config.llm:
        raise BundleError(f"{llm_dir}/config.json does not match the llm section of {bundle / CONFIG_FILE}:\n"
                          f"  config.json: {on_disk}\n  {CONFIG_FILE}: {config.llm}")
    if (llm_dir / GGUF_FILE).is_file():
        return _load_gguf(bundle, config, manifest, policy)
    policy, note = settle_policy(policy, bundle, config, stored)
    device, dtype = policy.resolve_device(), policy.resolve_dtype()
    try:
        if policy.quantize in WEIGHT_ONLY:
            llm = load_quantized_llm(llm_dir, config.llm, policy.quantize, stored, device)
        else:
            llm = load_llm(llm_dir, dtype=dtype, device=device, quantization_config=bnb_config(policy.quantize, dtype))
    except LLMLoadError as err:
        raise BundleError(str(err)) from err
    with torch.device("meta"):
        model = SkinGPT(config, llm)  # encoder parts allocate nothing until their weights arrive
    load_encoder(model, bundle / ENCODER_FILE, device=device, dtype=dtype)
    footprint = {part: module_bytes(getattr(model, part)) for part in (*ENCODER_PARTS, "llm")}
    note = "; ".join(n for n in (note, fast_cpu_encoder(policy, model.vision), int8_note(model.vision)) if n)
    from model.nn.differential import DifferentialHead

    return LoadedBundle(model.eval(), load_tokenizer(llm_dir), config, bundle, manifest, device, footprint,
                        DifferentialHead.load(bundle), policy, note)


def _load_gguf(bundle: Path, config: SkinGPTConfig, manifest: dict[str, Any], policy: LoadPolicy) -> LoadedBundle:
    """A GGUF bundle: llama.cpp runs the LLM on the CPU (see `model.serving.llama_runner`); here only the
    encoder loads, in the dtype it was stored in, and the LLM is a stand-in."""
    require_llama_cpp()
    if policy.quantize not in ("auto", "none"):
        raise BundleError(f"{bundle} holds its LLM as a GGUF file, which llama.cpp runs as it was written "
                          f"(--quantize auto); for {policy.quantize}, load the float bundle it was made from")
    if policy.device.startswith("cuda"):
        raise BundleError(f"{bundle} holds its LLM as a GGUF file, which runs on the CPU through llama.cpp; "
                          f"for a GPU, load the float bundle it was made from")
    with safe_open(str(bundle / ENCODER_FILE), framework="pt") as handle:
        kinds = {"F32": "fp32", "BF16": "bf16", "F16": "fp16"}  # the first float tensor's (not an int8 weight's)
        scales = int8_scales(handle.keys())
        dtype = next(kinds[d] for k in handle.keys() if not k.startswith("ln_vision.") and k not in scales
                     and (d := handle.get_slice(k).get_dtype()) in kinds)
    concrete = LoadPolicy(device="cpu", dtype=dtype, quantize="none", encoder_compute=policy.encoder_compute)
    llm = ExternalLLM(config.llm)  # its empty table on the CPU: where image embeddings go
    with torch.device("meta"):
        model = SkinGPT(config, llm)
    load_encoder(model, bundle / ENCODER_FILE, device="cpu", dtype=concrete.resolve_dtype())
    gguf = bundle / LLM_DIR / GGUF_FILE
    footprint = {part: module_bytes(getattr(model, part)) for part in ENCODER_PARTS}
    footprint["llm"] = gguf.stat().st_size
    mode = quantized_mode(manifest) or "gguf"
    note = "; ".join(n for n in (f"llama.cpp runs the bundle's LLM ({mode} GGUF) on the CPU",
                                 fast_cpu_encoder(concrete, model.vision), int8_note(model.vision)) if n)
    from model.nn.differential import DifferentialHead

    return LoadedBundle(model.eval(), load_tokenizer(bundle / LLM_DIR), config, bundle, manifest, "cpu", footprint,
                        DifferentialHead.load(bundle), concrete, note, gguf)


def settle_policy(policy: LoadPolicy, bundle: Path, config: SkinGPTConfig,
                  stored: dict[str, Any] | None) -> tuple[LoadPolicy, str]:
    """A quantised bundle loads as it was quantised; otherwise auto picks (see `choose_policy`)."""
    if stored is not None:
        mode = stored["mode"]
        if policy.quantize not in ("auto", "none", mode):
            raise BundleError(f"{bundle} holds an LLM quantised to {mode}, which loads only as it is (--quantize auto "
                              f"or {mode}); for {policy.quantize}, load the float bundle it was made from")
        concrete = LoadPolicy(device=policy.device, dtype="bf16", quantize=mode)
        require_kernels(mode, concrete.resolve_device())
        return concrete, f"the bundle's LLM is quantised to {mode} (PyTorch's CPU weight-only kernels)"
    return auto_policy(policy, config)


def auto_policy(policy: LoadPolicy, config: SkinGPTConfig) -> tuple[LoadPolicy, str]:
    """Resolve quantize=auto for this config against this machine's free memory and kernel speeds."""
    if policy.quantize != "auto":
        return policy, ""
    import psutil

    sizing = config_sizing(config)
    concrete, note = choose_policy(policy, sizing, psutil.virtual_memory().available, kernel_speeds)
    if concrete.resolve_device() == "cpu" and concrete.quantize in WEIGHT_ONLY:
        note += ("; llama.cpp answers faster on a CPU: write a GGUF bundle once with {command:quantize "
                 "--weights BUNDLE --mode q4_k_m --out NEW} and serve that")
    return concrete, note


def config_sizing(config: SkinGPTConfig) -> Sizing:
    """Parameter counts of a config, from a skeleton on `meta`: nothing is allocated or read."""
    from model.nn.skingpt import build_skingpt

    with torch.device("meta"):
        model = build_skingpt(config)
    llm = sum(p.numel() for p in model.llm.parameters())
    return Sizing(llm, quantized_linear_params(model.llm), sum(p.numel() for p in model.parameters()) - llm)


def load_encoder(model: SkinGPT, path: Path, *, device: str, dtype: torch.dtype) -> None:
    """Strictly load the encoder file into a model whose encoder parts may still be on `meta`."""
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    check_state(int8_shapes(shapes(model.encoder_state_dict()), tensors), shapes(tensors), str(path))
    scales = int8_scales(tensors)
    as_stored = {k for k, v in tensors.items() if k in scales or not v.is_floating_point()}  # int8 weights, fp32 scales
    for part in ENCODER_PARTS:
        part_dtype = torch.float32 if part == "ln_vision" else dtype  # ln_vision always runs in fp32
        sub = {k.split(".", 1)[1]: v.to(device=device, dtype=v.dtype if k in as_stored else part_dtype)
               for k, v in tensors.items() if k.split(".", 1)[0] == part and "." in k}
        if part == "vision":
            install_int8_linears(model.vision, sub, dtype)
        if part == "query_tokens":
            model.query_tokens = nn.Parameter(tensors["query_tokens"].to(device=device, dtype=dtype),
                                              requires_grad=False)
        else:
            getattr(model, part).load_state_dict(sub, strict=True, assign=True)
    _materialise_key_bias(model.vision)
    for name, param in model.named_parameters():
        param.requires_grad_(False)  # serving freezes everything; training opts parts back in
        if param.is_meta and not name.startswith("llm."):  # the LLM is its loader's
            raise BundleError(f"internal error: {name} was not loaded from {path}")


def int8_shapes(expected: Mapping[str, tuple[int, ...]], tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple]:
    """The float encoder's shapes as an encoder file with int8 ViT linears stores them (see `encoder_int8`)."""
    out = dict(expected)
    for name in stored_int8(tensors):
        if name in out:
            shape = out.pop(name)
            stem = name[: -len(".weight")]
            out[stem + ".qweight"], out[stem + ".scale"] = shape, shape[:1]
    return out


def _materialise_key_bias(vit: nn.Module) -> None:
    """timm's EVA attention keeps a zero key bias as a non-persistent buffer, absent from files."""
    for block in vit.blocks:
        attn = block.attn
        if getattr(attn, "k_bias", None) is not None and attn.k_bias.is_meta:
            attn.k_bias = torch.zeros_like(attn.v_bias, device=attn.v_bias.device)
