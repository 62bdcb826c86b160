"""The network: EVA ViT-g (timm), BLIP-2 Q-Former (transformers), the projection and the Llama-family
LLM, assembled in `skingpt`; `config` holds the typed configuration of every part and the presets."""
