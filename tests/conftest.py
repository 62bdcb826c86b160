"""Shared fixtures: tiny source files in the published formats and a bundle converted from them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

ROOT = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(config, items):
    import torch

    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    real = os.environ.get("SKINGPT_REAL_WEIGHTS")
    skip_real = pytest.mark.skip(reason="set SKINGPT_REAL_WEIGHTS=DIR (a converted full-size bundle) to run")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "real_weights" in item.keywords and not real:
            item.add_marker(skip_real)


@pytest.fixture(scope="session")
def sources(tmp_path_factory):
    from model.fixtures import write_sources

    return write_sources(tmp_path_factory.mktemp("sources"), "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_bundle(sources, tmp_path_factory) -> Path:
    from model.convert import Sources, convert

    out = tmp_path_factory.mktemp("bundles") / "tiny"
    convert(Sources(llm_dir=sources.llm, vit=sources.vit, blip2=sources.blip2, finetune=sources.finetune),
            out, preset_name="tiny", log=lambda _: None)
    return out
