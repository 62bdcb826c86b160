"""The SkinGPT library: a pure torch package (no gradio, no argparse, no environment reads, no network).

Layers, imports pointing up this list only (tests/test_layout.py holds it):
  errors.py    the one base class of errors meant for the person running SkinGPT
  choices.py   every closed list of choices (quantisation modes, precisions, devices, presets), torch-free
  metrics.py   top-k, balanced accuracy, calibration: plain Python over ranked cases
  i18n/        the product's words in each language (one YAML file per language)
  nn/          the network: ViT, Q-Former, projection, LLM adapter, the differential head, configs and presets
  images/      taking a photo in (decode, quality, `intake`), and preprocessing for the encoder
  prompt/      the prompt protocol: conversations, templates, placeholders, stop strings
  clinical/    the consultation: history, questions, red flags, the report and its PDF, the ranking's text
  visits/      kept visits: the encrypted store, follow-up comparison, FHIR referral
  weights/     bundles on disk, converters from published formats, load policy, quantisation
  serving/     the streaming engine: requests, sampler, session cache, model runners, scheduler
  evaluation/  predictions over case manifests, metrics, reports, the differential's figures, review
  training/    two-step fine-tuning and fitting the differential head
"""
