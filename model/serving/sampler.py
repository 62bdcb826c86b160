"""Choosing each next token, and the sampling settings a caller may change.

`SamplingSettings` is the one form in which the page, the CLI and the API pass what a user chose;
its rule that temperature 0 means greedy (as OpenAI's API has it) lives here only. `Sampler` turns
one answer's settings into tokens: greedy, or sampled through transformers' logits processors
(repetition penalty, temperature, top-k, top-p) with a generator of its own, so that a seeded answer
depends on nothing else.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from model.nn.config import GenerationConfig


@dataclass(frozen=True)
class SamplingSettings:
    """What a user may choose about one answer; None keeps the bundle's default."""

    max_new_tokens: int | None = None
    temperature: float | None = None  # 0: greedy
    top_p: float | None = None
    greedy: bool | None = None  # True: greedy, False: sample, None: the bundle's default (unless temperature is 0)
    seed: int | None = None

    def overrides(self) -> dict[str, Any]:
        """The `GenerationConfig` fields (and seed) to change, as `Engine.stream` takes them."""
        out: dict[str, Any] = {}
        if self.max_new_tokens is not None:
            out["max_new_tokens"] = int(self.max_new_tokens)
        if self.top_p is not None:
            out["top_p"] = float(self.top_p)
        greedy = self.greedy
        if self.temperature is not None:
            if self.temperature == 0:
                greedy = True
            else:
                out["temperature"] = float(self.temperature)
                if greedy is None:
                    greedy = False  # a temperature asks for sampling
        if greedy is not None:
            out["do_sample"] = not greedy
        if self.seed is not None:
            out["seed"] = int(self.seed)
        return out


class Sampler:
    def __init__(self, settings: GenerationConfig, seed: int | None, device: torch.device, prompt_ids: list[int]):
        from transformers import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                  TopKLogitsWarper, TopPLogitsWarper)

        s = settings
        self.do_sample = s.do_sample
        self.processors = LogitsProcessorList()
        if s.repetition_penalty != 1.0:
            self.processors.append(RepetitionPenaltyLogitsProcessor(s.repetition_penalty))
        if s.do_sample:
            if s.temperature != 1.0:
                self.processors.append(TemperatureLogitsWarper(s.temperature))
            if s.top_k:
                self.processors.append(TopKLogitsWarper(s.top_k))
            if s.top_p < 1.0:
                self.processors.append(TopPLogitsWarper(s.top_p))
        self.seen = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # (1, L): what the penalty sees
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(7), "big"))

    def __call__(self, logits: torch.Tensor) -> int:
        """(V,) logits of the next position -> the chosen token id."""
        scores = logits.float().unsqueeze(0)  # (1, V)
        if self.processors:
            scores = self.processors(self.seen, scores)
        if self.do_sample:
            token = int(torch.multinomial(scores.softmax(-1)[0], 1, generator=self.generator))
        else:
            token = int(scores[0].argmax())
        if self.processors:
            self.seen = torch.cat([self.seen, self.seen.new_tensor([[token]])], dim=1)
        return token
