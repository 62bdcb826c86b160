"""Every closed list of choices a user names (quantisation modes, precisions, devices, presets), their
defaults, and one validator per value. Torch-free, so that `--help`, the settings and the load policy
all read these lists without importing a model; nothing else in the project writes them out.
"""

from __future__ import annotations

import re
from typing import Literal

from model.errors import UserFacingError

# How the LLM is held at load time: auto (on a CPU, the fastest mode that fits, see weights.policy),
# none, bitsandbytes' int8 / nf4 (GPUs), PyTorch's weight-only int8w / int4 (CPU kernels).
Quantize = Literal["auto", "none", "int8", "nf4", "int8w", "int4"]
QUANTIZE: tuple[str, ...] = Quantize.__args__
BITSANDBYTES = ("int8", "nf4")
WEIGHT_ONLY = ("int8w", "int4")
QUANTIZE_HELP = ("auto (the default: on a CPU, for an LLM over 2 GiB, the fastest mode that fits in memory) | none | "
                 "int8 | nf4 (bitsandbytes, GPUs) | int8w | int4 (PyTorch's CPU kernels); the LLM only")

# What `quantize` writes into a bundle: GGUF files for llama.cpp (with their llama.cpp file type), then
# the weight-only modes; and how the image encoder is stored (bf16 is the default).
GGUF_FILE_TYPES = {"q4_k_m": 15, "q4_0": 2, "q8_0": 7, "f16": 1, "f32": 0}
GGUF: tuple[str, ...] = tuple(GGUF_FILE_TYPES)
BUNDLE_QUANTIZE = GGUF + WEIGHT_ONLY
ENCODER_STORAGE = ("bf16", "int8")

Dtype = Literal["auto", "fp32", "fp16", "bf16"]
DTYPES: tuple[str, ...] = Dtype.__args__

# the architectures `--preset` names (model.nn.config.PRESETS holds one config for each, and says so)
PRESETS = ("skingpt4-vicuna7b", "skingpt4-vicuna13b", "skingpt4-llama2-13b", "small", "tiny", "demo")

DEFAULT_QUANTIZE: Quantize = "auto"
DEFAULT_DTYPE: Dtype = "auto"
DEFAULT_DEVICE = "auto"
DEVICE_FORM = re.compile(r"auto|cpu|cuda(:\d+)?")


class ChoiceError(UserFacingError, ValueError):
    """A value outside its list (or a device that is not auto, cpu, cuda or cuda:N)."""


def check_device(value: str) -> str:
    """auto | cpu | cuda | cuda:N (a GPU's number)."""
    if not isinstance(value, str) or not DEVICE_FORM.fullmatch(value):
        raise ChoiceError(f"device must be auto, cpu, cuda or cuda:N (a GPU's number), not {value!r}")
    return value


def check_choice(setting: str, value: str, allowed: tuple[str, ...]) -> str:
    """`value` when it is one of `allowed`; else an error naming the setting, the choices and the value."""
    if value not in allowed:
        raise ChoiceError(f"{setting} must be one of {', '.join(allowed)}, not {value!r}")
    return value
