"""A ranked differential with calibrated likelihoods: a classifier head on a bundle's frozen image
features, beside the chat (each a check on the other).

Features. Two frozen views of a photo are at hand: the ViT's class token after `ln_vision`
(C_vis wide) and the mean of the Q-Former's query outputs (C_q wide). Which one separates a
clinic's conditions best is a property of the weights and the data, so training measures it:
`train-differential --features auto` fits a head on each (and on both together) and keeps the one
with the best held-out accuracy, recording the three figures in the head's metadata. On the tiny
test bundle's random weights the ViT token won (its colour information survives one random
projection better than the Q-Former's); on real EVA-CLIP features expect the choice to differ.

The head is multinomial logistic regression on standardised features, trained with class-balanced
cross-entropy; a temperature fitted on the validation split calibrates it, and a threshold chosen on
validation for a target precision says when the top condition is too unsure to show as such.
Several photos of one case are combined by averaging their logits. It is stored in the bundle as
`differential.safetensors` (weights, standardisation) and `differential.json` (labels, temperature,
threshold, feature kind, metrics), hashed in the manifest like every other part.

Here: the head, its features and its file format, and the ranking it gives. Fitting it is
`model.training.fit_differential`; its metrics and reliability plot, `model.evaluation.differential`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pydantic import BaseModel, ConfigDict

from model.errors import UserFacingError

HEAD_WEIGHTS = "differential.safetensors"
HEAD_META = "differential.json"
FEATURES = ("vit", "qformer", "both")
MAX_PHOTOS = 3  # photos of one case combined into one ranking


class RankedCondition(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    condition: str
    probability: float  # calibrated, 0..1


class Ranking(BaseModel):
    model_config = ConfigDict(extra="forbid")

    conditions: list[RankedCondition]  # best first
    uncertain: bool  # the top probability is below the threshold chosen for the target precision
    photos: int
    raw_confidence: float = 0.0  # the top probability before temperature scaling (for calibration reports)

    def top(self, k: int = 3) -> list[str]:
        return [c.condition for c in self.conditions[:k]]


class DifferentialError(UserFacingError, ValueError):
    """A differential head or its training data that cannot be used."""


@torch.no_grad()
def image_features(model, pixels: torch.Tensor, kind: str) -> torch.Tensor:
    """(B, 3, S, S) preprocessed pixels -> (B, F) frozen features of the chosen kind, fp32 on the CPU."""
    from model.nn.qformer import query_image
    from model.nn.vision import encode_patches

    tokens = encode_patches(model.vision, model.ln_vision, pixels)  # (B, 1+N, C_vis)
    parts = []
    if kind in ("vit", "both"):
        parts.append(tokens[:, 0].float())  # the class token: (B, C_vis)
    if kind in ("qformer", "both"):
        parts.append(query_image(model.qformer, model.query_tokens, tokens).float().mean(1))  # (B, C_q)
    return torch.cat(parts, dim=-1).cpu()


@dataclass
class DifferentialHead:
    classes: tuple[str, ...]
    weight: torch.Tensor  # (K, F)
    bias: torch.Tensor  # (K,)
    mean: torch.Tensor  # (F,) feature standardisation, from the training split
    std: torch.Tensor  # (F,)
    feature: str  # vit | qformer | both
    temperature: float = 1.0
    threshold: float = 0.0
    metrics: dict[str, Any] = field(default_factory=dict)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """(N, F) -> (N, K), before calibration."""
        return ((features - self.mean) / self.std) @ self.weight.T + self.bias

    def probabilities(self, features: torch.Tensor, calibrated: bool = True) -> torch.Tensor:
        return (self.logits(features) / (self.temperature if calibrated else 1.0)).softmax(-1)

    def rank(self, features: torch.Tensor, top: int = 5) -> Ranking:
        """Photos of one case (N, F) -> one calibrated ranking (their logits averaged)."""
        if not 1 <= features.shape[0] <= MAX_PHOTOS:
            raise DifferentialError(f"a ranking combines 1 to {MAX_PHOTOS} photos of one case, not {features.shape[0]}")
        logits = self.logits(features).mean(0)
        probs = (logits / self.temperature).softmax(-1)
        order = probs.argsort(descending=True)[:top]
        conditions = [RankedCondition(condition=self.classes[i], probability=round(float(probs[i]), 4)) for i in order]
        return Ranking(conditions=conditions, uncertain=float(probs[order[0]]) < self.threshold,
                       photos=features.shape[0], raw_confidence=round(float(logits.softmax(-1).max()), 4))

    # -- files ---------------------------------------------------------------------------------
    def save(self, bundle: Path) -> None:
        from safetensors.torch import save_file

        save_file({"weight": self.weight.contiguous(), "bias": self.bias.contiguous(), "mean": self.mean.contiguous(),
                   "std": self.std.contiguous()}, str(bundle / HEAD_WEIGHTS))
        meta = {"classes": list(self.classes), "feature": self.feature, "temperature": self.temperature,
                "threshold": self.threshold, "metrics": self.metrics}
        (bundle / HEAD_META).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, bundle: Path) -> DifferentialHead | None:
        """The bundle's head, or None when it has none; a half-present, corrupt or inconsistent head
        is an error that says which file."""
        weights, meta = bundle / HEAD_WEIGHTS, bundle / HEAD_META
        if not weights.exists() and not meta.exists():
            return None
        for path in (weights, meta):
            if not path.is_file():
                raise DifferentialError(f"{bundle} has {HEAD_META if path is weights else HEAD_WEIGHTS} but not "
                                        f"{path.name}: copy the whole bundle again, or train the head anew with "
                                        f"{{command:train-differential}}")
        try:
            from safetensors import safe_open

            with safe_open(str(weights), framework="pt", device="cpu") as handle:
                tensors = {k: handle.get_tensor(k) for k in handle.keys()}
            info = json.loads(meta.read_text())
            classes = tuple(info["classes"])
            head = cls(classes, tensors["weight"].float(), tensors["bias"].float(), tensors["mean"].float(),
                       tensors["std"].float(), info["feature"], float(info["temperature"]), float(info["threshold"]),
                       info.get("metrics", {}))
        except Exception as err:  # noqa: BLE001 - safetensors, JSON and shape errors all mean the same to a user
            raise DifferentialError(f"the differential head in {bundle} cannot be read ({type(err).__name__}: "
                                    f"{err}); train it again with {{command:train-differential}}") from err
        if head.weight.shape[0] != len(classes) or head.bias.shape[0] != len(classes):
            raise DifferentialError(f"{meta} lists {len(classes)} conditions but {weights} has "
                                    f"{head.weight.shape[0]} outputs: the two files do not belong together; train "
                                    f"the head again")
        if head.feature not in FEATURES or head.mean.shape[0] != head.weight.shape[1]:
            raise DifferentialError(f"{meta} describes features its weights do not fit; train the head again")
        return head
