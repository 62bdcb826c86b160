"""Serving, one way down: requests and events -> sampler, detokeniser, KV cache, session cache and model
runner -> scheduler (one thread decoding every answer together) -> engine (owns them all and fills each
caller's `Generation` from its request's events)."""
