"""Load-time policies: device, precision, and the LLM's quantisation: none | int8 | nf4 (bitsandbytes,
for GPUs) | int8w | int4 (PyTorch's own weight-only kernels, fast on a CPU, see `weight_only`) | auto
(on a CPU, the fastest of those that fits in memory, for an LLM too big to run well in full precision).

The ViT and Q-Former are never quantised: they run in the policy's float dtype (half precision on a
GPU by default), `ln_vision` in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Literal, get_args

import torch
from torch import nn

from model.choices import (BITSANDBYTES, DEFAULT_DEVICE, DEFAULT_DTYPE, DEFAULT_QUANTIZE, DTYPES, QUANTIZE, WEIGHT_ONLY, ChoiceError,
                           Dtype, Quantize, check_choice, check_device)
from model.errors import UserFacingError

EncoderCompute = Literal["auto", "stored"]  # stored: the encoder computes in the dtype it is stored in

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class PolicyError(UserFacingError, ValueError):
    """A device / precision / quantisation request that cannot be honoured here."""


@dataclass(frozen=True)
class LoadPolicy:
    device: str = DEFAULT_DEVICE  # auto | cpu | cuda | cuda:N
    dtype: Dtype = DEFAULT_DTYPE
    quantize: Quantize = DEFAULT_QUANTIZE
    encoder_compute: EncoderCompute = "auto"  # auto: on a CPU, a half-precision encoder computes in fp32 where faster

    def __post_init__(self) -> None:
        """Built from flags and settings, not from a file: each value is checked by model.choices'
        validator, the refusal naming the value and what it takes."""
        try:
            check_choice("quantize", self.quantize, QUANTIZE)
            check_choice("dtype", self.dtype, DTYPES)
            check_choice("encoder_compute", self.encoder_compute, get_args(EncoderCompute))
            check_device(self.device)
        except ChoiceError as err:
            raise PolicyError(str(err)) from None

    def resolve_device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise PolicyError("device 'cuda' was asked for but no CUDA GPU is visible; set {setting:device} to cpu (on a CPU, "
                              "a GGUF bundle answers fastest: {command:quantize --mode q4_k_m}, see the "
                              "README's 'A clinic PC without a GPU')")
        return self.device

    def resolve_dtype(self) -> torch.dtype:
        """auto: bf16 on a GPU that has it, else fp16 on GPU; fp32 on CPU; bf16 with the weight-only
        modes (their kernels take bf16 activations)."""
        if self.quantize in WEIGHT_ONLY:
            return torch.bfloat16
        if self.dtype != "auto":
            return TORCH_DTYPES[self.dtype]
        if self.resolve_device() == "cpu":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def bnb_config(mode: str, compute_dtype: torch.dtype):
    """transformers' BitsAndBytesConfig for the LLM, or None (full precision, or a weight-only mode
    applied after loading by `quantize_weight_only`)."""
    if mode == "none" or mode in WEIGHT_ONLY:
        return None
    from transformers import BitsAndBytesConfig

    if mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_compute_dtype=compute_dtype)


def module_bytes(module: nn.Module | nn.Parameter) -> int:
    """Bytes held by parameters and buffers as stored (packed 4/8-bit weights count as stored)."""
    if isinstance(module, nn.Parameter):
        return module.numel() * module.element_size()
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def quantized_names(llm: nn.Module) -> list[str]:
    """The decoder's linear layers, which every quantised mode shrinks: every nn.Linear but the LM head."""
    return [name for name, m in llm.named_modules() if isinstance(m, nn.Linear) and not name.endswith("lm_head")]


def quantized_linear_params(llm: nn.Module) -> int:
    """Parameters of those layers."""
    return sum(llm.get_submodule(name).weight.numel() for name in quantized_names(llm))


def estimate_llm_bytes(total_params: int, linear_params: int, mode: str, dtype_bytes: int = 2) -> int:
    """Weight memory of the LLM in a mode: int8 / int8w store 1 byte per linear weight (+ a scale a row,
    ignored here), nf4 half a byte plus an fp32 absmax per 64-value block, int4 half a byte plus a bf16
    scale and zero per group of 128."""
    other = total_params - linear_params
    per_linear = {"none": dtype_bytes, "int8": 1.0, "nf4": 0.5 + 4 / 64, "int8w": 1.0, "int4": 0.5 + 4 / 128}[mode]
    return int(linear_params * per_linear + other * dtype_bytes)


# Measured with `bench --preset small --random-init` on a 2-core CPU (decode tokens/s, one patient):
# weight-only int8w 14.0 and int4 12.3, bf16 10.9, fp32 8.1, bitsandbytes nf4 3.4 and int8 3.2. With 8
# patients at once fp32 steps faster than bf16 (246 vs 348 ms a step): this CPU's bf16 matrix
# products only pay off one row at a time.
CPU_DECODE_TOKENS_PER_S = {"int8w": 14.0, "int4": 12.3, "bf16": 10.9, "fp32": 8.1, "nf4": 3.4, "int8": 3.2}


def cpu_advice(policy: LoadPolicy) -> str | None:
    """A warning for a mode that is slow on a CPU, when the policy puts the model on one."""
    if (policy.quantize == "auto" and policy.dtype == "auto") or policy.resolve_device() != "cpu":
        return None  # auto says what it chose, and why, as it loads (with a dtype asked for, it quantises nothing)
    speed = CPU_DECODE_TOKENS_PER_S
    if policy.quantize in BITSANDBYTES:
        return (f"bitsandbytes {policy.quantize} decodes {speed['bf16'] / speed[policy.quantize]:.1f}x slower than "
                f"bf16 on a CPU (measured); use --quantize int8w (the fastest here, 1 byte a weight) or int4 "
                f"(half a byte), or --dtype bf16")
    if policy.resolve_dtype() == torch.float32:
        return (f"fp32 on a CPU: --quantize int8w decodes {speed['int8w'] / speed['fp32']:.1f}x faster for one "
                f"patient in a quarter of the memory, --dtype bf16 {speed['bf16'] / speed['fp32']:.1f}x in half "
                f"(fp32 is faster only with many patients answered at once)")
    return None




# -- auto: the fastest mode that fits ----------------------------------------------------------------------

AUTO_FULL_PRECISION_BYTES = 2 << 30  # an LLM under 2 GiB in bf16 (about 1B parameters) is not worth quantising
HEADROOM_BYTES = 1 << 30  # activations, KV caches and the process itself, beside the weights
NEAR_TIE = 0.10  # speeds within 10% of the fastest count as equal, and the closer-to-float mode wins
CLOSEST_TO_FLOAT = ("bf16", "int8w", "int4")


@dataclass(frozen=True)
class Sizing:
    """Parameter counts the choice rests on (from the config, on `meta`: no weights are read)."""
    llm_params: int
    linear_params: int  # the LLM's decoder linears: what int8w / int4 shrink
    encoder_params: int


def choose_policy(policy: LoadPolicy, sizing: Sizing, available_bytes: int,
                  speeds_ms: Callable[[], dict[str, float]]) -> tuple[LoadPolicy, str]:
    """Resolve quantize=auto into a concrete policy, with one line saying which and why. `speeds_ms()`
    times one matrix product per CPU mode (it is only called when the choice needs it)."""
    if policy.quantize != "auto":
        return policy, ""
    device = policy.resolve_device()
    if device != "cpu":
        full = replace(policy, quantize="none")
        return full, f"auto on a GPU: the LLM in {_name(full.resolve_dtype())} ({{setting:quantize}} nf4 or int8 saves GPU memory)"
    if policy.dtype != "auto":
        return replace(policy, quantize="none"), f"{policy.dtype} asked for ({{setting:dtype}}): the LLM is not quantised"
    bf16 = estimate_llm_bytes(sizing.llm_params, sizing.linear_params, "none")
    if bf16 < AUTO_FULL_PRECISION_BYTES:
        return replace(policy, quantize="none"), f"auto: the LLM is small ({bf16 / 2**30:.1f} GiB in bf16), so full precision"
    speeds = speeds_ms()
    need = {mode: estimate_llm_bytes(sizing.llm_params, sizing.linear_params, "none" if mode == "bf16" else mode)
            + 2 * sizing.encoder_params + HEADROOM_BYTES for mode in CLOSEST_TO_FLOAT}
    fits = [mode for mode in CLOSEST_TO_FLOAT if need[mode] <= available_bytes]
    timing = ", ".join(f"{mode} {speeds[mode]:.2f} ms" for mode in sorted(speeds, key=speeds.get))
    if not fits:
        chosen, why = "int4", (f"the smallest; it needs about {need['int4'] / 2**30:.1f} GiB and "
                               f"{available_bytes / 2**30:.1f} GiB is free, so it may not fit: close other programs")
    else:
        fastest = min(speeds[mode] for mode in fits)
        chosen = next(mode for mode in fits if speeds[mode] <= fastest * (1 + NEAR_TIE))
        why = (f"the fastest that fits (within {NEAR_TIE:.0%}, the closest to full precision): about "
               f"{need[chosen] / 2**30:.1f} GiB of {available_bytes / 2**30:.1f} GiB free")
    concrete = replace(policy, device="cpu", dtype="bf16", quantize="none" if chosen == "bf16" else chosen)
    flag = "--dtype bf16" if chosen == "bf16" else f"--quantize {chosen}"
    return concrete, f"auto on this CPU: {flag}, {why} (one 4096x4096 product: {timing})"


# -- half-precision weights, fp32 arithmetic: the image encoder on CPUs without native bf16 ------------

class _ReadAsFP32(nn.Module):
    """A parametrization: the stored half-precision tensor, read as an fp32 copy that lives only
    while the layer runs."""

    def forward(self, stored: torch.Tensor) -> torch.Tensor:
        return stored.float()


def compute_in_fp32(module: nn.Module) -> None:
    """Keep `module`'s weights in half precision (the memory) but run it in fp32 (the speed): on a
    CPU without native bf16 arithmetic (AVX2), bf16 matrix products are emulated. Measured on a
    2-core AVX2 EPYC: the ViT-g encodes a photo in 25.8 s in bf16 and in 6.8 s this way."""
    from torch.nn.utils import parametrize

    from model.weights.encoder_int8 import set_compute_dtype

    set_compute_dtype(module, torch.float32)  # an int8 ViT's linears dequantise to fp32
    for sub in list(module.modules()):
        for name, _ in list(sub.named_parameters(recurse=False)):
            parametrize.register_parametrization(sub, name, _ReadAsFP32(), unsafe=True)
        for name, buffer in list(sub.named_buffers(recurse=False)):
            if buffer.is_floating_point():
                setattr(sub, name, buffer.float())


def half_is_slower_than_fp32(dtype: torch.dtype, reps: int = 2) -> tuple[bool, float]:
    """Times one ViT-g-sized product (257 tokens x 1408 -> 1536) in `dtype` and in fp32 on this
    CPU; True and the ratio when the half-precision one is over 1.5x slower."""
    import time

    x, w = torch.randn(257, 1408), torch.randn(1536, 1408)
    took = {}
    for kind in (dtype, torch.float32):
        a, b = x.to(kind), w.to(kind)
        torch.nn.functional.linear(a, b)
        start = time.perf_counter()
        for _ in range(reps):
            torch.nn.functional.linear(a, b)
        took[kind] = time.perf_counter() - start
    ratio = took[dtype] / took[torch.float32]
    return ratio > 1.5, ratio


def fast_cpu_encoder(policy: LoadPolicy, vision: nn.Module) -> str:
    """Apply `compute_in_fp32` to the ViT when the policy allows it and it is faster here; a note."""
    dtype = next(vision.parameters()).dtype
    if policy.encoder_compute != "auto" or policy.resolve_device() != "cpu" or dtype == torch.float32:
        return ""
    slow, ratio = half_is_slower_than_fp32(dtype)
    if not slow:
        return ""
    compute_in_fp32(vision)
    return f"the image encoder keeps {_name(dtype)} weights but computes in fp32 ({_name(dtype)} products are {ratio:.1f}x slower on this CPU)"


def _name(dtype: torch.dtype) -> str:
    return {v: k for k, v in TORCH_DTYPES.items()}[dtype]
