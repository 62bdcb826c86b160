"""BLIP-2 Q-Former: learned queries cross-attend to the image tokens -> (B, Q, C_q)."""

from __future__ import annotations

import torch
from transformers import Blip2QFormerConfig, Blip2QFormerModel

from model.nn.config import QFormerConfig


def build_qformer(cfg: QFormerConfig, encoder_width: int) -> Blip2QFormerModel:
    """transformers' Blip2QFormerModel is the LAVIS Q-Former without its text branch."""
    hf_config = Blip2QFormerConfig(
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        hidden_act="gelu",
        layer_norm_eps=cfg.layer_norm_eps,
        cross_attention_frequency=cfg.cross_attention_frequency,
        encoder_hidden_size=encoder_width,
        max_position_embeddings=cfg.max_position_embeddings,
        use_qformer_text_input=False,
    )
    return Blip2QFormerModel(hf_config)


def query_image(qformer: Blip2QFormerModel, query_tokens: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
    """(1, Q, C_q) learned queries and (B, T_img, C_vis) image tokens -> (B, Q, C_q)."""
    param = next(qformer.parameters())
    image_tokens = image_tokens.to(param.dtype)
    batch = image_tokens.shape[0]
    queries = query_tokens.to(param.dtype).expand(batch, -1, -1)  # (B, Q, C_q)
    image_mask = torch.ones(image_tokens.shape[:2], dtype=torch.long, device=image_tokens.device)
    out = qformer(query_embeds=queries, encoder_hidden_states=image_tokens, encoder_attention_mask=image_mask)
    return out.last_hidden_state  # (B, Q, C_q)
