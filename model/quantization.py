"""Load-time policies: device, precision, and the LLM's quantisation: none | int8 | nf4 (bitsandbytes,
for GPUs) | int8w | int4 (PyTorch's own weight-only kernels, fast on a CPU).

The ViT and Q-Former are never quantised: they run in the policy's float dtype (half precision on a
GPU by default), `ln_vision` in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import UserFacingError

QUANT_MODES = ("none", "int8", "nf4", "int8w", "int4")
WEIGHT_ONLY = ("int8w", "int4")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class PolicyError(UserFacingError, ValueError):
    """A device / precision / quantisation request that cannot be honoured here."""


@dataclass(frozen=True)
class LoadPolicy:
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto | fp32 | fp16 | bf16
    quantize: str = "none"  # none | int8 | nf4

    def __post_init__(self) -> None:
        if self.quantize not in QUANT_MODES:
            raise PolicyError(f"quantize must be one of {', '.join(QUANT_MODES)}, not {self.quantize!r}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise PolicyError(f"dtype must be auto or one of {', '.join(DTYPES)}, not {self.dtype!r}")
        if not (self.device in ("auto", "cpu") or self.device.startswith("cuda")):
            raise PolicyError(f"device must be auto, cpu or cuda[:N], not {self.device!r}")

    def resolve_device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise PolicyError("device 'cuda' was asked for but no CUDA GPU is visible; use --device cpu "
                              "(slow but works; add --quantize nf4 to save memory)")
        return self.device

    def resolve_dtype(self) -> torch.dtype:
        """auto: bf16 on a GPU that has it, else fp16 on GPU; fp32 on CPU; bf16 with the weight-only
        modes (their kernels take bf16 activations)."""
        if self.quantize in WEIGHT_ONLY:
            return torch.bfloat16
        if self.dtype != "auto":
            return DTYPES[self.dtype]
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


def quantized_linear_params(llm: nn.Module) -> int:
    """Parameters bitsandbytes would quantise: every Linear of the decoder, not the LM head."""
    return sum(m.weight.numel() for name, m in llm.named_modules()
               if isinstance(m, nn.Linear) and not name.endswith("lm_head"))


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
    if policy.resolve_device() != "cpu":
        return None
    speed = CPU_DECODE_TOKENS_PER_S
    if policy.quantize in ("int8", "nf4"):
        return (f"bitsandbytes {policy.quantize} decodes {speed['bf16'] / speed[policy.quantize]:.1f}x slower than "
                f"bf16 on a CPU (measured); use --quantize int8w (the fastest here, 1 byte a weight) or int4 "
                f"(half a byte), or --dtype bf16")
    if policy.resolve_dtype() == torch.float32:
        return (f"fp32 on a CPU: --quantize int8w decodes {speed['int8w'] / speed['fp32']:.1f}x faster for one "
                f"patient in a quarter of the memory, --dtype bf16 {speed['bf16'] / speed['fp32']:.1f}x in half "
                f"(fp32 is faster only with many patients answered at once)")
    return None


# -- weight-only int8 / int4 with PyTorch's own kernels ---------------------------------------------------

class WeightOnlyLinear(nn.Module):
    """A Linear whose weight is int8 (one scale per output row) or int4 (asymmetric, one scale and zero
    per group of input columns), multiplied by PyTorch's weight-only kernels with bf16 activations.
    Measured on one 4096x11008 matmul at batch 1 here: bf16 5.2 ms, int8 3.2 ms, int4 3.6 ms;
    relative error 0.009 (int8) and 0.10 (int4, as expected of 4-bit round-to-nearest)."""

    def __init__(self, linear: nn.Linear, mode: str) -> None:
        super().__init__()
        weight = linear.weight.detach().float()  # (N, K)
        self.mode, self.out_features, self.in_features = mode, weight.shape[0], weight.shape[1]
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().bfloat16(), requires_grad=False)
        if mode == "int8w":
            scale = (weight.abs().amax(1) / 127).clamp(min=1e-8)  # (N,)
            self.register_buffer("qweight", torch.round(weight / scale[:, None]).clamp(-128, 127).to(torch.int8))
            self.register_buffer("scales", scale.bfloat16())
        else:
            group = next(g for g in (128, 64, 32) if self.in_features % g == 0)
            grouped = weight.reshape(self.out_features, self.in_features // group, group)
            low, high = grouped.amin(-1), grouped.amax(-1)
            scale = ((high - low) / 15).clamp(min=1e-8)  # (N, K/G)
            q = torch.round((grouped - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32)
            self.group = group
            self.register_buffer("qweight", torch._convert_weight_to_int4pack_for_cpu(
                q.reshape(self.out_features, self.in_features), 1))
            zero = low + 8 * scale  # the kernel computes (q - 8) * scale + zero
            self.register_buffer("scales", torch.stack([scale, zero], -1).transpose(0, 1).contiguous().bfloat16())

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


def quantize_weight_only(llm: nn.Module, mode: str, device: str) -> nn.Module:
    """Replace the decoder's Linear layers (not the embeddings, not the LM head) in place, one at a
    time, so that the bf16 copy of each goes as soon as its quantised twin exists."""
    if device != "cpu" or not hasattr(torch, "_weight_int4pack_mm_for_cpu") or not hasattr(torch, "_weight_int8pack_mm"):
        raise PolicyError(f"--quantize {mode} uses PyTorch's CPU weight-only kernels, which this device ({device}) or "
                          f"torch build lacks; on a GPU use --quantize int8 or nf4 (bitsandbytes)")
    targets = [(name, module) for name, module in llm.named_modules()
               if isinstance(module, nn.Linear) and not name.endswith("lm_head")]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(llm.get_submodule(parent_name), child, WeightOnlyLinear(linear, mode))
    return llm
