"""The image encoder's ViT with int8 weights: half the memory of bf16 for an opt-in loss of precision.

A 7B q4 bundle on a CPU holds about 7.8 GB at its peak, 2.2 GB of it the encoder in bf16. Its ViT
blocks' four linear layers (qkv, proj, fc1, fc2: 984M weights, 99.8% of the ViT-g, 90% of the
encoder) stored as int8 with one fp32 scale per output row (symmetric, absmax) take 1.0 GB less. Everything else (patch
embedding, norms, biases, Q-Former, projection) keeps its stored dtype.

    on disk   <linear>.qweight int8 (N, K), <linear>.scale fp32 (N,)        w = qweight * scale
    in memory the same two tensors (mapped from the file); the float weight exists only while the
              layer runs, in the encoder's compute dtype

It is opt-in (`quantize --encoder int8`) because nothing here can measure what it does to a trained
encoder: on random ViT-g weights the 32 query embeddings moved by 12% (relative L2, cosine 0.993),
which says little about diagnoses. Check a bundle so made with `eval` on your own labelled photos
against the bf16 one before using it.
"""

from __future__ import annotations

import re
from typing import Mapping

import torch
from torch import nn
from torch.nn import functional as F

# the ViT blocks' linear weights (timm EVA names), the only tensors stored as int8
_QUANTISED = re.compile(r"^vision\.blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.weight$")


class Int8Linear(nn.Module):
    """A linear layer over an int8 weight and per-row scales. `weight` is the dequantised float
    weight, made on each read in `compute_dtype` (timm's EVA attention reads `qkv.weight` itself)."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 compute_dtype: torch.dtype) -> None:
        super().__init__()
        self.register_buffer("qweight", qweight)  # (N, K) int8
        self.register_buffer("scale", scale)  # (N,) fp32
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.compute_dtype = compute_dtype
        self.in_features, self.out_features = qweight.shape[1], qweight.shape[0]

    @property
    def weight(self) -> torch.Tensor:
        return (self.qweight.to(torch.float32) * self.scale[:, None]).to(self.compute_dtype)  # (N, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)


def is_quantised_name(key: str) -> bool:
    """True for an encoder tensor `quantize --encoder int8` stores as int8 (by its float name)."""
    return _QUANTISED.match(key) is not None


def quantise_tensor(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> (N, K) int8 and (N,) fp32 scales: symmetric per row, absmax maps to 127."""
    w = weight.float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)  # (N,)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def quantise_encoder(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An encoder file's tensors with the ViT blocks' linear weights as `.qweight` + `.scale`."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if is_quantised_name(key):
            stem = key[: -len(".weight")]
            out[stem + ".qweight"], out[stem + ".scale"] = quantise_tensor(tensor)
        else:
            out[key] = tensor
    return out


def int8_scales(keys) -> set[str]:
    """The names of an encoder file's fp32 row scales (beside its `.qweight` keys): kept in fp32."""
    return {k[: -len(".qweight")] + ".scale" for k in keys if k.endswith(".qweight")}


def stored_int8(keys) -> list[str]:
    """The float weight names an encoder file stores as int8 (from its `.qweight` keys)."""
    return sorted(k[: -len(".qweight")] + ".weight" for k in keys if k.endswith(".qweight"))


def install_int8_linears(vision: nn.Module, tensors: Mapping[str, torch.Tensor], compute_dtype: torch.dtype) -> None:
    """Swap each linear of `vision` whose weight the file stores as int8 (keys relative to `vision`)
    for an `Int8Linear` over the file's tensors; loading the state dict then fills nothing new."""
    for key in [k for k in tensors if k.endswith(".qweight")]:
        stem = key[: -len(".qweight")]
        parent_name, _, child = stem.rpartition(".")
        parent = vision.get_submodule(parent_name)
        old = getattr(parent, child)
        if not isinstance(old, nn.Linear) or tuple(old.weight.shape) != tuple(tensors[key].shape):
            raise ValueError(f"vision.{stem}: the file's int8 weight {tuple(tensors[key].shape)} does not fit "
                             f"the model's {type(old).__name__}")
        setattr(parent, child, Int8Linear(tensors[key], tensors[stem + ".scale"], tensors.get(stem + ".bias"),
                                          compute_dtype))


def set_compute_dtype(module: nn.Module, dtype: torch.dtype) -> None:
    """Every `Int8Linear` under `module` dequantises to `dtype` from now on."""
    for sub in module.modules():
        if isinstance(sub, Int8Linear):
            sub.compute_dtype = dtype


def int8_note(vision: nn.Module) -> str:
    """What start-up says of an int8 ViT ('' for a float one)."""
    if not any(isinstance(sub, Int8Linear) for sub in vision.modules()):
        return ""
    return ("the image encoder's ViT weights are int8 (opt-in, 1 GB less for a ViT-g; check answers with "
            "`eval` against the bf16 bundle it was made from)")
