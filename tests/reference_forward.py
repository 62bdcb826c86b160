"""An independent forward pass written from the published formats' own key names.

It reads the LAVIS tensors directly (EVA ViT, ln_vision, BERT Q-Former, projection) with plain
torch functions, so the tests can compare our assembled model against what the source weights give
without calling back into our modules.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _ln(x, w, b, eps):
    return F.layer_norm(x, (x.shape[-1],), w, b, eps)


def _heads(x, n):  # (B, T, C) -> (B, n, T, C/n)
    b, t, c = x.shape
    return x.view(b, t, n, c // n).transpose(1, 2)


def _attend(q, k, v, n):
    q, k, v = _heads(q, n), _heads(k, n), _heads(v, n)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    out = scores.softmax(-1) @ v  # (B, n, T, C/n)
    return out.transpose(1, 2).flatten(2)


def eva_vit(vit: dict, pixels: torch.Tensor, depth: int, heads: int, patch: int) -> torch.Tensor:
    """EVA ViT as LAVIS wrote it: pre-norm blocks, q/v bias, no final norm. -> (B, 1+N, C)."""
    x = F.conv2d(pixels, vit["patch_embed.proj.weight"], vit["patch_embed.proj.bias"], stride=patch)
    x = x.flatten(2).transpose(1, 2)  # (B, N, C)
    x = torch.cat([vit["cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + vit["pos_embed"]
    for i in range(depth):
        p = lambda name: vit[f"blocks.{i}.{name}"]  # noqa: E731
        h = _ln(x, p("norm1.weight"), p("norm1.bias"), 1e-6)
        bias = torch.cat([p("attn.q_bias"), torch.zeros_like(p("attn.v_bias")), p("attn.v_bias")])
        q, k, v = F.linear(h, p("attn.qkv.weight"), bias).chunk(3, dim=-1)
        x = x + F.linear(_attend(q, k, v, heads), p("attn.proj.weight"), p("attn.proj.bias"))
        h = _ln(x, p("norm2.weight"), p("norm2.bias"), 1e-6)
        x = x + F.linear(F.gelu(F.linear(h, p("mlp.fc1.weight"), p("mlp.fc1.bias"))), p("mlp.fc2.weight"), p("mlp.fc2.bias"))
    return x


def qformer(blip2: dict, image: torch.Tensor, layers: int, heads: int, cross_every: int) -> torch.Tensor:
    """BERT post-norm layers over the learned queries; cross-attention every `cross_every` layers."""
    g = lambda name: blip2[f"Qformer.bert.{name}"]  # noqa: E731
    lin = lambda x, name: F.linear(x, g(name + ".weight"), g(name + ".bias"))  # noqa: E731
    norm = lambda x, name: _ln(x, g(name + ".weight"), g(name + ".bias"), 1e-12)  # noqa: E731
    q = blip2["query_tokens"].expand(image.shape[0], -1, -1)
    q = norm(q, "embeddings.LayerNorm")
    for i in range(layers):
        pre = f"encoder.layer.{i}."
        a = _attend(lin(q, pre + "attention.self.query"), lin(q, pre + "attention.self.key"),
                    lin(q, pre + "attention.self.value"), heads)
        q = norm(lin(a, pre + "attention.output.dense") + q, pre + "attention.output.LayerNorm")
        if i % cross_every == 0:
            c = _attend(lin(q, pre + "crossattention.self.query"), lin(image, pre + "crossattention.self.key"),
                        lin(image, pre + "crossattention.self.value"), heads)
            q = norm(lin(c, pre + "crossattention.output.dense") + q, pre + "crossattention.output.LayerNorm")
        f = F.gelu(lin(q, pre + "intermediate_query.dense"))
        q = norm(lin(f, pre + "output_query.dense") + q, pre + "output_query.LayerNorm")
    return q


def image_embeddings(vit: dict, blip2: dict, proj: dict, pixels: torch.Tensor, cfg) -> torch.Tensor:
    """pixels -> (B, Q, D_llm) from the source tensors alone."""
    tokens = eva_vit(vit, pixels, cfg.vision.depth, cfg.vision.num_heads, cfg.vision.patch_size)
    tokens = _ln(tokens, blip2["ln_vision.weight"], blip2["ln_vision.bias"], 1e-5)
    q = qformer(blip2, tokens, cfg.qformer.num_layers, cfg.qformer.num_heads, cfg.qformer.cross_attention_frequency)
    return F.linear(q, proj["weight"], proj["bias"])
