"""EVA ViT image encoder (timm) and `ln_vision`: a photo becomes (B, 1+N, C_vis) image tokens."""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from timm.models.eva import Eva

from model.nn.config import VisionConfig


def build_vision(cfg: VisionConfig) -> Eva:
    """The EVA-CLIP ViT as BLIP-2 uses it: no classifier head, no pooling, no final norm."""
    vit = Eva(
        img_size=cfg.img_size,
        patch_size=cfg.patch_size,
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        mlp_ratio=cfg.mlp_ratio,
        qkv_bias=True,  # stored as q_bias and v_bias; the key bias is a zero buffer
        num_classes=0,
        global_pool="",
        norm_layer=partial(nn.LayerNorm, eps=cfg.norm_eps),
    )
    # timm ends forward_features with a LayerNorm the reference encoder does not have; its only
    # final norm is ln_vision. Leaving timm's in place shifts the embeddings by about 1e-4.
    vit.norm = nn.Identity()
    return vit


class LayerNormFP32(nn.LayerNorm):
    """ln_vision: normalise in fp32 whatever the encoder ran in, as the reference does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.layer_norm(
            x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps)


def encode_patches(vit: Eva, ln_vision: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) pixels -> (B, 1 + (H/p)*(W/p), C_vis) normalised fp32 image tokens."""
    weight = vit.patch_embed.proj.weight  # the dtype it computes in (see quantization.compute_in_fp32)
    tokens = vit.forward_features(pixels.to(device=weight.device, dtype=weight.dtype))  # (B, 1+N, C_vis)
    return ln_vision(tokens)
