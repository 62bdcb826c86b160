"""The SkinGPT assembly: image -> ViT -> ln_vision -> Q-Former -> projection -> LLM input slots.

A prompt carries its images as runs of `IMAGE_TOKEN_ID`, one run of `num_query_tokens` positions
per image; `embed_inputs` scatters the projected query embeddings into those runs, in order.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from model.nn.config import SkinGPTConfig
from model.errors import UserFacingError
from model.nn.qformer import build_qformer, query_image
from model.nn.vision import LayerNormFP32, build_vision, encode_patches

# Never a real token id: marks the positions that image embeddings fill (LLaVA uses the same idea).
IMAGE_TOKEN_ID = -200

# The parts stored in the bundle's encoder file, in their module names. The LLM is stored apart.
ENCODER_PARTS = ("vision", "ln_vision", "qformer", "query_tokens", "proj")


class PlaceholderError(UserFacingError, ValueError):
    """Image placeholders in the prompt and images given do not match."""


class SkinGPT(nn.Module):
    def __init__(self, config: SkinGPTConfig, llm: nn.Module) -> None:
        super().__init__()
        vis, qf = config.vision, config.qformer
        self.config = config
        self.vision = build_vision(vis)
        self.ln_vision = LayerNormFP32(vis.embed_dim, eps=vis.ln_vision_eps)
        self.qformer = build_qformer(qf, encoder_width=vis.embed_dim)
        self.query_tokens = nn.Parameter(torch.randn(1, qf.num_query_tokens, qf.hidden_size) * 0.02)
        self.proj = nn.Linear(qf.hidden_size, config.llm.hidden_size)
        self.llm = llm

    @property
    def num_query_tokens(self) -> int:
        return self.config.qformer.num_query_tokens

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything but the LLM, under the names the bundle's encoder file uses."""
        return {k: v for k, v in self.state_dict().items() if k.split(".", 1)[0] in ENCODER_PARTS}

    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) preprocessed pixels -> (B, Q, D_llm) embeddings in the LLM's dtype and device."""
        return self._encode(pixels)

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        # 1. ViT + ln_vision: (B, 3, S, S) -> (B, 1+N, C_vis), fp32 after the norm
        image_tokens = encode_patches(self.vision, self.ln_vision, pixels)
        # 2. Q-Former: the learned queries read the image -> (B, Q, C_q)
        queries = query_image(self.qformer, self.query_tokens, image_tokens)
        # 3. projection into the LLM's embedding space -> (B, Q, D_llm)
        embeds = self.proj(queries.to(self.proj.weight.dtype))
        table = self.llm.get_input_embeddings().weight
        return embeds.to(device=table.device, dtype=table.dtype)

    def embed_inputs(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None) -> torch.Tensor:
        """(B, T) ids with image runs + (N_img, Q, D) embeddings in prompt order -> (B, T, D)."""
        slots = input_ids == IMAGE_TOKEN_ID  # (B, T)
        n_slots = int(slots.sum())
        n_images = 0 if image_embeds is None else image_embeds.shape[0]
        if n_slots != n_images * self.num_query_tokens:
            raise PlaceholderError(
                f"the prompt has {n_slots / self.num_query_tokens:g} image placeholder(s) but "
                f"{n_images} image(s) were given; each image needs exactly one placeholder")
        table = self.llm.get_input_embeddings()
        embeds = table(input_ids.masked_fill(slots, 0).to(table.weight.device))  # (B, T, D)
        if n_images:
            flat = image_embeds.reshape(-1, image_embeds.shape[-1]).to(embeds.dtype)  # (N_img*Q, D)
            embeds = embeds.masked_scatter(slots.to(embeds.device).unsqueeze(-1), flat)
        return embeds

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                pixels: torch.Tensor | None = None, labels: torch.Tensor | None = None):
        """Training and scoring forward: returns the LM output (loss when labels are given)."""
        image_embeds = self._encode(pixels) if pixels is not None else None
        embeds = self.embed_inputs(input_ids, image_embeds)
        return self.llm(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels)


def build_skingpt(config: SkinGPTConfig, llm: nn.Module | None = None) -> SkinGPT:
    """Random weights (or the given LLM) under whatever default device is active, `meta` included."""
    from model.nn.llm import build_llm

    return SkinGPT(config, llm if llm is not None else build_llm(config.llm))


def tokenize_prompt(tokenizer, text: str, placeholder: str, num_query_tokens: int,
                    add_bos: bool = True) -> list[int]:
    """Tokenise text around each placeholder separately (as the reference does) and put a run of
    `num_query_tokens` IMAGE_TOKEN_IDs where each placeholder stood."""
    ids: list[int] = [tokenizer.bos_token_id] if add_bos else []
    for i, segment in enumerate(text.split(placeholder)):
        if i:
            ids.extend([IMAGE_TOKEN_ID] * num_query_tokens)
        if segment:
            ids.extend(tokenizer(segment, add_special_tokens=False).input_ids)
    return ids


def count_parameters(modules: Sequence[nn.Module] | nn.Module | nn.Parameter) -> int:
    if isinstance(modules, nn.Parameter):
        return modules.numel()
    if isinstance(modules, nn.Module):
        modules = [modules]
    return sum(p.numel() for m in modules for p in m.parameters())
