"""The SkinGPT library: a pure torch package (no gradio, no argparse, no environment reads, no network).

Layers, each a folder, imports pointing down this list only:
  nn/          the network: ViT, Q-Former, projection, LLM adapter, their typed configs and presets
  images/      photo decoding (the one decoder every reader uses) and preprocessing
  weights/     bundles on disk, converters from published formats, load policy, weight-only kernels
  i18n/        the product's words in each language (one YAML file per language)
  clinical/    conversation and prompt templates, the consultation, red flags, the differential head
  serving/     the streaming engine: requests, sampler, session cache, model runner, scheduler
  training/    two-step fine-tuning and fitting the differential head
  evaluation/  predictions over case manifests, metrics, reports, clinician review
"""
