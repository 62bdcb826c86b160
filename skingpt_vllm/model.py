"""SkinGPT on vLLM: EVA ViT -> ln_vision -> Q-Former -> projection -> vLLM's Llama.

The network is vLLM's BLIP-2 in all but two places, both facts of the published model:
- the ViT's block norms and ln_vision have different epsilons (1e-6 and 1e-5), and ln_vision runs
  in fp32 whatever the rest runs in;
- the image sits in mid-prompt (`<Img><ImageHere></Img>`), once per photo and any number of photos
  per conversation, not once before the text.

Prompt ids must be the ones our own engine feeds (`model.nn.skingpt.tokenize_prompt`): it
tokenises the text around each placeholder as a separate piece, so every piece starts as a fresh
text would (SentencePiece's leading "▁"). vLLM tokenises the rendered chat as one string, in which
the text after the BOS and after each placeholder token starts mid-string; `_postprocess_prompt`
re-tokenises exactly those pieces.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from transformers import BatchFeature, Blip2Config

from vllm.config import VllmConfig
from vllm.config.multimodal import MultiModalDummyOptions
from vllm.inputs import MultiModalDataDict
from vllm.model_executor.models.blip import BlipVisionModel
from vllm.model_executor.models.blip2 import Blip2QFormerModel
from vllm.model_executor.models.interfaces import MultiModalEmbeddings, SupportsMultiModal, SupportsPP
from vllm.model_executor.models.utils import AutoWeightsLoader, WeightsMapper, init_vllm_registered_model, maybe_prefix
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import MultiModalDataItems
from vllm.multimodal.processing import (BaseDummyInputsBuilder, BaseMultiModalProcessor, BaseProcessingInfo,
                                        PromptReplacement, PromptUpdate)
from vllm.sequence import IntermediateTensors

from model.images.preprocess import preprocess
from model.nn.config import PreprocessConfig
from skingpt_vllm.pieces import retokenize_pieces


class SkinGPTProcessingInfo(BaseProcessingInfo):
    def get_hf_config(self) -> Blip2Config:
        return self.ctx.get_hf_config(Blip2Config)

    def skingpt(self) -> dict[str, Any]:
        """What export-vllm wrote of the bundle beside the BLIP-2 fields (config.json's "skingpt")."""
        return self.get_hf_config().skingpt

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": int(self.skingpt()["max_images"])}

    def get_num_image_tokens(self) -> int:
        return int(self.get_hf_config().num_query_tokens)

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        return {"image": self.get_num_image_tokens()}

    def placeholder_id(self) -> int:
        return int(self.get_tokenizer().convert_tokens_to_ids(self.skingpt()["placeholder"]))


class SkinGPTDummyInputsBuilder(BaseDummyInputsBuilder[SkinGPTProcessingInfo]):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return self.info.skingpt()["placeholder"] * mm_counts.get("image", 0)

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int],
                          mm_options: Mapping[str, MultiModalDummyOptions] | None = None) -> MultiModalDataDict:
        size = self.info.get_hf_config().vision_config.image_size
        return {"image": self._get_dummy_images(width=size, height=size, num_images=mm_counts.get("image", 0),
                                                overrides=(mm_options or {}).get("image"))}


class SkinGPTMultiModalProcessor(BaseMultiModalProcessor[SkinGPTProcessingInfo]):
    def _get_hf_mm_text(self, mm_counts: Mapping[str, int]) -> str | None:
        return None  # no HF processor: the photos alone are processed (below), the prompt is ids already

    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        """Each photo through the bundle's own preprocessing (`model.images.preprocess`, the engine's)."""
        cfg = PreprocessConfig(**{k: tuple(v) if isinstance(v, list) else v
                                  for k, v in self.info.skingpt()["preprocess"].items()})
        images = hf_data.get("images") or []
        return BatchFeature({"pixel_values": torch.stack([preprocess(image, cfg) for image in images])})

    def _get_mm_fields_config(self, hf_inputs: BatchFeature,
                              hf_processor_mm_kwargs: Mapping[str, object]) -> Mapping[str, MultiModalFieldConfig]:
        return {"pixel_values": MultiModalFieldConfig.batched("image")}

    def _get_prompt_updates(self, mm_items: MultiModalDataItems, hf_processor_mm_kwargs: Mapping[str, object],
                            out_mm_kwargs: MultiModalKwargsItems) -> Sequence[PromptUpdate]:
        """Each placeholder token becomes one run of query positions (their ids are never embedded)."""
        pad = int(self.info.skingpt()["image_pad_id"])
        return [PromptReplacement(modality="image", target=[self.info.placeholder_id()],
                                  replacement=[pad] * self.info.get_num_image_tokens())]

    def _postprocess_prompt(self, prompt: list[int]) -> list[int]:
        return retokenize_pieces(self.info.get_tokenizer(), prompt, self.info.placeholder_id())


class LayerNormFP32(nn.LayerNorm):
    """ln_vision: normalise in fp32 whatever the encoder ran in, as the reference does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.layer_norm(x.float(), self.normalized_shape, self.weight.float(),
                                        self.bias.float(), self.eps)


@MULTIMODAL_REGISTRY.register_processor(SkinGPTMultiModalProcessor, info=SkinGPTProcessingInfo,
                                        dummy_inputs=SkinGPTDummyInputsBuilder)
class SkinGPTForConditionalGeneration(nn.Module, SupportsMultiModal, SupportsPP):
    # export-vllm keeps the LLM's shards as they are (HF names); the encoder file uses ours below
    hf_to_vllm_mapper = WeightsMapper(orig_to_new_prefix={"model.": "language_model.model.",
                                                          "lm_head.": "language_model.lm_head."})

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("image"):
            return None  # the chat template writes each photo's markers where the message puts it
        raise ValueError("SkinGPT takes images only")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        quant_config = vllm_config.quant_config
        self.config = config
        vision, qformer = config.vision_config, config.qformer_config
        with self._mark_tower_model(vllm_config, "image"):
            # 1. the EVA ViT (vLLM's BLIP vision tower: the same pre-norm blocks), ln_vision as its final norm
            self.vision_model = BlipVisionModel(vision, quant_config, prefix=maybe_prefix(prefix, "vision_model"))
            self.vision_model.post_layernorm = LayerNormFP32(vision.hidden_size, eps=config.skingpt["ln_vision_eps"])
            # 2. the Q-Former and its learned queries, 3. the projection into the LLM
            self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, qformer.hidden_size))
            self.qformer = Blip2QFormerModel(qformer, cache_config=vllm_config.cache_config, quant_config=quant_config,
                                             prefix=maybe_prefix(prefix, "qformer"))
            self.language_projection = nn.Linear(qformer.hidden_size, config.text_config.hidden_size, bias=True)
        with self._mark_language_model(vllm_config):
            self.language_model = init_vllm_registered_model(
                vllm_config=vllm_config, hf_config=config.text_config, prefix=maybe_prefix(prefix, "language_model"))
        self.make_empty_intermediate_tensors = self.language_model.make_empty_intermediate_tensors

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        """(N, 3, S, S) photos -> (N, Q, D_llm), in prompt order."""
        pixels = kwargs.get("pixel_values")
        if pixels is None:
            return []
        if isinstance(pixels, (list, tuple)):
            pixels = torch.stack(list(pixels))
        weight = self.vision_model.embeddings.patch_embedding.weight
        image_tokens = self.vision_model(pixels.to(device=weight.device, dtype=weight.dtype))  # (N, 1+P, C_vis) fp32
        queries = self.query_tokens.expand(image_tokens.shape[0], -1, -1)  # (N, Q, C_q)
        out = self.qformer(query_embeds=queries, encoder_hidden_states=image_tokens.to(queries.dtype))
        return self.language_projection(out.to(self.language_projection.weight.dtype))  # (N, Q, D_llm)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None, inputs_embeds: torch.Tensor | None = None,
                **kwargs: object) -> torch.Tensor | IntermediateTensors:
        if intermediate_tensors is not None:
            inputs_embeds = None
        return self.language_model.model(input_ids, positions, intermediate_tensors, inputs_embeds=inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.language_model.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return AutoWeightsLoader(self).load_weights(weights, mapper=self.hf_to_vllm_mapper)
