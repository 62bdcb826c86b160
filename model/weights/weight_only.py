"""Weight-only int8 / int4 for the LLM on a CPU, with PyTorch's own kernels, built one layer at a time.

Two forms of a quantised linear:
- on disk (portable, what a quantised bundle stores, independent of the torch build):
    int8w  qweight int8 (N, K), scales bf16 (N,)                 w = q * scale
    int4   qweight uint8 (N, K/2), the low nibble the even column; scales, zeros bf16 (N, K/G)
                                                                 w = (q - 8) * scale + zero
- in memory (what `torch._weight_int8pack_mm` / `torch._weight_int4pack_mm_for_cpu` read): int8
  as on disk; int4 repacked by `torch._convert_weight_to_int4pack_for_cpu`, whose layout is the
  build's own business, so it is never written.

The decoder's linear layers are quantised; the embeddings, norms and LM head stay bf16. Every path
(quantising a float bundle as it loads, loading a quantised bundle, random weights for the bench)
visits one tensor at a time, so the full-precision model never exists in memory.
"""

from __future__ import annotations

import ctypes
import json
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from model.nn.config import LLMConfig
from model.nn.llm import LLMLoadError, hf_config
from model.weights.policy import PolicyError, quantized_names

QUANT_FILE = "quantization.json"
QUANT_FORMAT = "skingpt-weight-only/1"
# Shards of about 256 MiB: a writer holds one in memory, and the pages a reader has mapped of the shard
# it is reading count towards its resident memory until it moves to the next.
SHARD_BYTES = 256 << 20
GROUPS = (128, 64, 32)  # int4 group size: the largest that divides the input width

Portable = dict[str, torch.Tensor]  # one quantised linear as stored: qweight, scales, zeros?, bias?


def require_kernels(mode: str, device: str) -> None:
    """PyTorch's weight-only kernels exist for CPUs in this build, or a clear error."""
    if device != "cpu" or not hasattr(torch, "_weight_int4pack_mm_for_cpu") or not hasattr(torch, "_weight_int8pack_mm"):
        raise PolicyError(f"--quantize {mode} uses PyTorch's CPU weight-only kernels, which this device ({device}) or "
                          f"torch build ({torch.__version__}) lacks; on a GPU use --quantize int8 or nf4 "
                          f"(bitsandbytes) with the float bundle")


# -- one linear ---------------------------------------------------------------------------------

def quantize_tensor(weight: torch.Tensor, mode: str) -> Portable:
    """Round-to-nearest quantisation of one (N, K) weight into its portable form."""
    weight = weight.detach().float()
    n, k = weight.shape
    if mode == "int8w":
        scale = (weight.abs().amax(1) / 127).clamp(min=1e-8)  # (N,)
        return {"qweight": torch.round(weight / scale[:, None]).clamp(-128, 127).to(torch.int8),
                "scales": scale.bfloat16()}
    group = next((g for g in GROUPS if k % g == 0), None)
    if group is None:
        raise PolicyError(f"int4 needs input widths divisible by 32; this model has a linear of width {k}")
    grouped = weight.reshape(n, k // group, group)  # (N, K/G, G)
    low, high = grouped.amin(-1), grouped.amax(-1)
    scale = ((high - low) / 15).clamp(min=1e-8)  # (N, K/G)
    q = torch.round((grouped - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8).reshape(n, k)
    return {"qweight": q[:, 0::2] | (q[:, 1::2] << 4),  # (N, K/2)
            "scales": scale.bfloat16(), "zeros": (low + 8 * scale).bfloat16()}


def dequantize(portable: Portable, mode: str) -> torch.Tensor:
    """The float weight a portable form stands for (tests and checks; serving never builds it)."""
    scales = portable["scales"].float()
    if mode == "int8w":
        return portable["qweight"].float() * scales[:, None]
    q = _unpack_nibbles(portable["qweight"]).float()  # (N, K)
    group = q.shape[1] // scales.shape[1]
    per_column = scales.repeat_interleave(group, 1), portable["zeros"].float().repeat_interleave(group, 1)
    return (q - 8) * per_column[0] + per_column[1]


def _unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """(N, K/2) uint8 -> (N, K) int32 with values 0..15, even columns from the low nibbles."""
    both = torch.empty(*packed.shape, 2, dtype=torch.uint8)
    both[..., 0], both[..., 1] = packed & 0x0F, packed >> 4
    return both.reshape(packed.shape[0], -1).to(torch.int32)


class WeightOnlyLinear(nn.Module):
    """A Linear whose weight is int8 (a scale per output row) or int4 (a scale and zero per group of
    input columns), multiplied by PyTorch's weight-only kernels with bf16 activations."""

    def __init__(self, portable: Portable, mode: str) -> None:
        super().__init__()
        qweight, scales = portable["qweight"], portable["scales"]
        self.mode, self.out_features = mode, qweight.shape[0]
        self.in_features = qweight.shape[1] * (1 if mode == "int8w" else 2)
        bias = portable.get("bias")
        self.bias = None if bias is None else nn.Parameter(bias.bfloat16(), requires_grad=False)
        if mode == "int8w":
            _expect(qweight, torch.int8, (self.out_features, self.in_features), "qweight")
            _expect(scales, torch.bfloat16, (self.out_features,), "scales")
            self.register_buffer("qweight", qweight)
            self.register_buffer("scales", scales)
            return
        groups = scales.shape[-1] if scales.dim() == 2 else 0
        if groups == 0 or self.in_features % groups or (self.in_features // groups) not in GROUPS:
            raise LLMLoadError(f"int4 scales of shape {tuple(scales.shape)} do not fit a weight of width {self.in_features}")
        self.group = self.in_features // groups
        _expect(qweight, torch.uint8, (self.out_features, self.in_features // 2), "qweight")
        for name in ("scales", "zeros"):
            _expect(portable[name], torch.bfloat16, (self.out_features, groups), name)
        self.register_buffer("qweight", torch._convert_weight_to_int4pack_for_cpu(_unpack_nibbles(qweight), 1))
        # the kernel takes (K/G, N, 2): scale and zero side by side
        self.register_buffer("scales", torch.stack([scales, portable["zeros"]], -1).transpose(0, 1).contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)  # (M, K)
        if self.mode == "int8w":
            out = torch._weight_int8pack_mm(flat, self.qweight, self.scales)
        else:
            out = torch._weight_int4pack_mm_for_cpu(flat, self.qweight, self.group, self.scales)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*shape[:-1], self.out_features)


def _expect(t: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...], what: str) -> None:
    if t.dtype != dtype or tuple(t.shape) != shape:
        raise LLMLoadError(f"quantised {what} is {t.dtype} {tuple(t.shape)}; expected {dtype} {shape}")


# -- a whole LLM, one tensor at a time ----------------------------------------------------------------

def empty_llm(cfg: LLMConfig) -> nn.Module:
    """The Llama skeleton with its parameters on `meta` (nothing allocated); buffers such as the
    rotary frequencies are real, since they are computed, not loaded."""
    from accelerate import init_empty_weights
    from transformers import LlamaForCausalLM

    config = hf_config(cfg)
    config.dtype = torch.bfloat16
    with init_empty_weights(include_buffers=False):
        return LlamaForCausalLM(config)


FetchLinear = Callable[[str], Portable]  # module name -> its portable form
FetchParam = Callable[[str], torch.Tensor]  # parameter name -> its bf16 value


def entries(cfg: LLMConfig, fetch_linear: FetchLinear, fetch_param: FetchParam) -> Iterator[tuple[str, Portable]]:
    """Every tensor group of the quantised LLM in module order: (linear name, portable form) or
    (parameter name, {"": tensor})."""
    skeleton = empty_llm(cfg)
    linears = quantized_names(skeleton)
    linear_of = {f"{name}.weight": name for name in linears}
    inside_a_linear = tuple(f"{name}." for name in linears)  # (a bias goes with its weight)
    for name, param in skeleton.named_parameters():
        if name in linear_of:
            yield linear_of[name], fetch_linear(linear_of[name])
        elif not name.startswith(inside_a_linear):
            value = fetch_param(name)
            if tuple(value.shape) != tuple(param.shape):
                raise LLMLoadError(f"{name}: the weights have shape {tuple(value.shape)}, the model {tuple(param.shape)}")
            yield name, {"": value}


def assemble(cfg: LLMConfig, mode: str, groups: Iterable[tuple[str, Portable]]) -> nn.Module:
    """Fill an empty skeleton from `entries`, freeing each input as soon as it is placed."""
    llm = empty_llm(cfg)
    linears = set(quantized_names(llm))
    for count, (name, portable) in enumerate(groups, start=1):
        if count % 8 == 0:
            release_freed_memory()
        parent_name, _, child = name.rpartition(".")
        parent = llm.get_submodule(parent_name)
        if name in linears:
            try:
                before, after = getattr(parent, child), WeightOnlyLinear(portable, mode)
            except LLMLoadError as err:
                raise LLMLoadError(f"{name}: {err}") from err
            if (after.out_features, after.in_features) != (before.out_features, before.in_features):
                raise LLMLoadError(f"{name}: the weights are {after.out_features}x{after.in_features}, the model "
                                   f"{before.out_features}x{before.in_features}")
            setattr(parent, child, after)
        else:
            parent._parameters[child] = nn.Parameter(portable[""].bfloat16(), requires_grad=False)
    release_freed_memory()
    left = [name for name, p in llm.named_parameters() if p.is_meta]
    if left:
        raise LLMLoadError(f"the quantised LLM lacks {len(left)} tensors, e.g. {left[:3]}")
    return llm.eval()


def release_freed_memory() -> None:
    """Hand memory freed inside the C heap back to the system. Quantising frees a few transient
    buffers per layer between the ones it keeps; glibc keeps those holes, and a 7B int4 load peaked
    at 6.0 GiB for 3.7 GiB of weights (4.8 with this every 8 tensors). Elsewhere a no-op."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# -- sources ----------------------------------------------------------------------------------------

class TensorFiles:
    """Random access by name to tensors spread over a directory's safetensors files, one file open
    at a time."""

    def __init__(self, directory: Path) -> None:
        self.files = sorted(Path(directory).glob("*.safetensors"))
        if not self.files:
            raise LLMLoadError(f"{directory} holds no .safetensors weights; serving never unpickles .bin files. "
                               f"Build a bundle with {{command:convert}}, which converts them once.")
        self.where: dict[str, Path] = {}
        for path in self.files:
            with safe_open(str(path), framework="pt") as handle:
                self.where.update(dict.fromkeys(handle.keys(), path))
        self.used: set[str] = set()
        self._open: tuple[Path, object] | None = None

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def get(self, key: str) -> torch.Tensor:
        if key not in self.where:
            raise LLMLoadError(f"the LLM weights lack {key}")
        path = self.where[key]
        if self._open is None or self._open[0] != path:
            self.close()
            self._open = (path, safe_open(str(path), framework="pt").__enter__())
        self.used.add(key)
        # a copy: a tensor still backed by the file would keep the whole file mapped, and every page
        # of it that was read counted in the process's memory (a 7B int4 load: 8.2 GiB, not 4.9)
        return self._open[1].get_tensor(key).clone()

    def close(self) -> None:
        if self._open is not None:
            self._open[1].__exit__(None, None, None)
            self._open = None

    def check_all_used(self, directory: Path) -> None:
        unused = sorted(set(self.where) - self.used)
        if unused:
            raise LLMLoadError(f"LLM weights in {directory} hold tensors the model does not have: {unused[:5]}")


def from_float_files(files: TensorFiles, mode: str) -> tuple[FetchLinear, FetchParam]:
    """Quantise a float checkpoint (any dtype) layer by layer as it is read."""
    def linear(name: str) -> Portable:
        portable = quantize_tensor(files.get(f"{name}.weight"), mode)
        if f"{name}.bias" in files:
            portable["bias"] = files.get(f"{name}.bias").bfloat16()
        return portable

    return linear, lambda name: files.get(name).bfloat16()


def from_quantized_files(files: TensorFiles, mode: str) -> tuple[FetchLinear, FetchParam]:
    required = ("qweight", "scales") + (("zeros",) if mode == "int4" else ())

    def linear(name: str) -> Portable:
        portable = {part: files.get(f"{name}.{part}") for part in required}
        if f"{name}.bias" in files:
            portable["bias"] = files.get(f"{name}.bias")
        return portable

    return linear, files.get


def random_tensors(cfg: LLMConfig, seed: int = 0) -> Callable[[str], torch.Tensor]:
    """Random weights drawn like a fresh Llama's (normal, std 0.02; norms at one), one tensor a call."""
    generator = torch.Generator().manual_seed(seed)
    skeleton = empty_llm(cfg)
    shapes = {name: tuple(p.shape) for name, p in skeleton.named_parameters()}
    std = skeleton.config.initializer_range

    def draw(name: str) -> torch.Tensor:
        if name.endswith("norm.weight"):
            return torch.ones(shapes[name], dtype=torch.bfloat16)
        return torch.empty(shapes[name]).normal_(0.0, std, generator=generator)

    return draw


def from_random(cfg: LLMConfig, mode: str, seed: int = 0) -> tuple[FetchLinear, FetchParam]:
    """Random weights, quantised one layer at a time."""
    draw = random_tensors(cfg, seed)
    return (lambda name: quantize_tensor(draw(f"{name}.weight"), mode)), (lambda name: draw(name).bfloat16())


# -- the quantised LLM directory ---------------------------------------------------------------------

def read_quantization(llm_dir: Path) -> dict | None:
    """The recorded quantisation of an LLM directory, or None for float weights."""
    path = Path(llm_dir) / QUANT_FILE
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
    except ValueError as err:
        raise LLMLoadError(f"{path} is not valid JSON ({err}); quantise the bundle again") from err
    if info.get("format") != QUANT_FORMAT or info.get("mode") not in ("int8w", "int4"):
        raise LLMLoadError(f"{path} describes {info.get('format')!r} / {info.get('mode')!r}; this version reads "
                           f"{QUANT_FORMAT} with mode int8w or int4")
    return info


def load_quantized_llm(llm_dir: Path, cfg: LLMConfig, mode: str, stored: dict | None, device: str) -> nn.Module:
    """A weight-only LLM from a directory of float weights (quantised as read) or of quantised ones."""
    require_kernels(mode, device)
    files = TensorFiles(llm_dir)
    try:
        fetch = from_quantized_files(files, mode) if stored else from_float_files(files, mode)
        llm = assemble(cfg, mode, entries(cfg, *fetch))
        files.check_all_used(llm_dir)
        return llm
    finally:
        files.close()


def write_quantized(llm_dir: Path, mode: str, groups: Iterable[tuple[str, Portable]],
                    shard_bytes: int = SHARD_BYTES) -> Iterator[tuple[str, Portable]]:
    """Pass `groups` through while writing them as safetensors shards (each group whole in one shard)
    and the quantisation record beside them."""
    pending: dict[str, torch.Tensor] = {}
    size, shard = 0, 0

    def flush() -> None:
        nonlocal pending, size, shard
        if pending:
            shard += 1
            save_file(pending, str(Path(llm_dir) / f"quantized-{shard:05d}.safetensors"), metadata={"format": QUANT_FORMAT})
            pending, size = {}, 0

    for name, portable in groups:
        for part, tensor in portable.items():
            pending[f"{name}.{part}" if part else name] = tensor.contiguous()
            size += tensor.numel() * tensor.element_size()
        yield name, portable
        if size >= shard_bytes:
            flush()
    flush()
    (Path(llm_dir) / QUANT_FILE).write_text(json.dumps({
        "format": QUANT_FORMAT, "mode": mode, "kept_bf16": ["embeddings", "norms", "lm_head"],
        "int8w": "qweight int8 (N, K), scales bf16 (N,): w = q * scale",
        "int4": "qweight uint8 (N, K/2), even column in the low nibble; scales, zeros bf16 (N, K/G): "
                "w = (q - 8) * scale + zero"}, indent=2) + "\n")


def kernel_speeds(width: int = 4096, layers: int = 8, reps: int = 5) -> dict[str, float]:
    """Milliseconds per (1, width) x (width, width) product in bf16, int8w and int4 on this CPU, over
    `layers` different weights in turn so that they come from memory, as a decoder's do, not from a
    cache. Which mode is fastest depends on the CPU (on a 2-core AVX2 EPYC int8w and int4 were within
    5% of each other and bf16 1.6x slower; on the AVX-512 machine issue 15 was filed from, int4 was
    1.9x faster than int8w)."""
    import time

    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(width, width, generator=generator) * 0.02 for _ in range(layers)]
    x = torch.randn(1, width, dtype=torch.bfloat16)
    dense = [w.bfloat16() for w in weights]
    products: dict[str, list[Callable[[torch.Tensor], torch.Tensor]]] = {
        "bf16": [lambda v, w=w: torch.nn.functional.linear(v, w) for w in dense],
        **{mode: [WeightOnlyLinear(quantize_tensor(w, mode), mode) for w in weights] for mode in ("int8w", "int4")}}
    speeds = {}
    for mode, stack in products.items():
        stack[0](x)  # the first call allocates and picks kernels
        sweeps = []
        for _ in range(reps):
            start = time.perf_counter()
            for product in stack:
                product(x)
            sweeps.append(time.perf_counter() - start)
        speeds[mode] = min(sweeps) / layers * 1000  # the best sweep: other programs only ever slow one down
    return speeds
