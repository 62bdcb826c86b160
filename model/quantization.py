"""Load-time policies: device, precision, and none | int8 | nf4 for the LLM (bitsandbytes).

The ViT and Q-Former are never quantised: they run in the policy's float dtype (half precision on a
GPU by default), `ln_vision` in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import UserFacingError

QUANT_MODES = ("none", "int8", "nf4")
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
        """auto: bf16 on a GPU that has it, else fp16 on GPU; fp32 on CPU."""
        if self.dtype != "auto":
            return DTYPES[self.dtype]
        if self.resolve_device() == "cpu":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def bnb_config(mode: str, compute_dtype: torch.dtype):
    """transformers' BitsAndBytesConfig for the LLM, or None for full precision."""
    if mode == "none":
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
    """Weight memory of the LLM in a mode: int8 stores 1 byte per linear weight (+ an fp32 scale a row,
    ignored here), nf4 half a byte plus an fp32 absmax per 64-value block."""
    other = total_params - linear_params
    per_linear = {"none": dtype_bytes, "int8": 1.0, "nf4": 0.5 + 4 / 64}[mode]
    return int(linear_params * per_linear + other * dtype_bytes)


# Measured with `bench --preset small --random-init` on a 2-core CPU (decode tokens/s, one patient):
# bf16 10.9, fp32 8.1, bitsandbytes nf4 3.4, int8 3.2. With 8 patients at once fp32 steps faster than
# bf16 (246 vs 348 ms a step): this CPU's bf16 matrix products only pay off one row at a time.
CPU_DECODE_TOKENS_PER_S = {"bf16": 10.9, "fp32": 8.1, "nf4": 3.4, "int8": 3.2}


def cpu_advice(policy: LoadPolicy) -> str | None:
    """A warning for a mode that is slow on a CPU, when the policy puts the model on one."""
    if policy.resolve_device() != "cpu":
        return None
    speed = CPU_DECODE_TOKENS_PER_S
    if policy.quantize in ("int8", "nf4"):
        return (f"bitsandbytes {policy.quantize} decodes {speed['bf16'] / speed[policy.quantize]:.1f}x slower than "
                f"bf16 on a CPU (measured); use --dtype bf16 with --quantize none unless the model does not fit "
                f"in memory that way (2 bytes a parameter: 13.5 GB for 7B)")
    if policy.resolve_dtype() == torch.float32:
        return (f"fp32 on a CPU: --dtype bf16 decodes {speed['bf16'] / speed['fp32']:.1f}x faster for one patient "
                f"and needs half the memory (fp32 is faster only with many patients answered at once)")
    return None
