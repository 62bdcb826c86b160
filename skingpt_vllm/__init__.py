"""SkinGPT as a vLLM model: the plugin vLLM loads through its `vllm.general_plugins` entry point.

`launch.py export-vllm` writes a directory `vllm serve` loads with this plugin: a BLIP-2-shaped
config.json naming `SkinGPTForConditionalGeneration`, the encoder's weights in vLLM's module names
beside the LLM's shards, the tokenizer with the image placeholder as one added token, and the
bundle's prompt template as its chat template. vLLM's own Llama, its parallel linear layers and its
BLIP vision tower and Q-Former run the model (`skingpt_vllm.model`).

This package imports vLLM, torch and, of this project, only what needs neither timm nor
torchvision (the preprocessing and its config): vLLM's environment has no working torchvision.
"""

ARCHITECTURE = "SkinGPTForConditionalGeneration"


def register() -> None:
    """Called by vLLM in every process it starts (the entry point in pyproject.toml)."""
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "skingpt_vllm.model:SkinGPTForConditionalGeneration")
