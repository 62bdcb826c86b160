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
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from model import metrics
from model.clinical.ranking import RankedCondition, Ranking
from model.errors import UserFacingError

HEAD_WEIGHTS = "differential.safetensors"
HEAD_META = "differential.json"
FEATURES = ("vit", "qformer", "both")
MAX_PHOTOS = 3  # photos of one case combined into one ranking


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
                                        f"`python launch.py train-differential`")
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
                                    f"{err}); train it again with `python launch.py train-differential`") from err
        if head.weight.shape[0] != len(classes) or head.bias.shape[0] != len(classes):
            raise DifferentialError(f"{meta} lists {len(classes)} conditions but {weights} has "
                                    f"{head.weight.shape[0]} outputs: the two files do not belong together; train "
                                    f"the head again")
        if head.feature not in FEATURES or head.mean.shape[0] != head.weight.shape[1]:
            raise DifferentialError(f"{meta} describes features its weights do not fit; train the head again")
        return head


# -- training ---------------------------------------------------------------------------------------

def fit(train_x: torch.Tensor, train_y: torch.Tensor, classes: tuple[str, ...], feature: str,
        steps: int = 400, lr: float = 0.05, weight_decay: float = 1e-3, seed: int = 0) -> DifferentialHead:
    """Class-balanced multinomial logistic regression on standardised features (full batch)."""
    generator = torch.Generator().manual_seed(seed)
    mean, std = train_x.mean(0), train_x.std(0).clamp(min=1e-6)
    x = (train_x - mean) / std
    k = len(classes)
    counts = torch.bincount(train_y, minlength=k).float()
    balance = (counts.sum() / (k * counts.clamp(min=1)))  # rare conditions weigh as much as common ones
    weight = (torch.randn(k, x.shape[1], generator=generator) * 0.01).requires_grad_()
    bias = torch.zeros(k, requires_grad=True)
    optimizer = torch.optim.AdamW([weight, bias], lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(x @ weight.T + bias, train_y, weight=balance).backward()
        optimizer.step()
    return DifferentialHead(classes, weight.detach(), bias.detach(), mean, std, feature)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature that minimises the negative log-likelihood on held-out logits."""
    log_t = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200)

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp().clamp(0.05, 20.0))


def threshold_for(probs: torch.Tensor, labels: torch.Tensor, target_precision: float) -> float:
    """The lowest top probability above which the top condition is right at least `target_precision`
    of the time on validation; 1.0 (always 'uncertain') when no threshold reaches it."""
    top, pred = probs.max(-1)
    for t in sorted(set(top.tolist())):
        kept = top >= t
        if kept.sum() >= 1 and (pred[kept] == labels[kept]).float().mean() >= target_precision:
            return float(t)
    return 1.0


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = 10) -> float:
    """ECE over equal-width confidence bins: the gap between confidence and accuracy, weighted."""
    confidence, correct = top_confidence(probs, labels)
    return metrics.calibration_error(confidence.tolist(), correct.tolist(), bins)


def _cases(probs: torch.Tensor, labels: torch.Tensor, k: int) -> list[metrics.Case]:
    """(N, C) probabilities and (N,) class indices as ranked cases (class indices as names)."""
    top = probs.topk(min(k, probs.shape[-1]), dim=-1).indices.tolist()
    return [metrics.Case(str(label), tuple(map(str, ranked))) for label, ranked in zip(labels.tolist(), top)]


def accuracy(probs: torch.Tensor, labels: torch.Tensor, k: int = 1) -> float:
    return metrics.top_k(_cases(probs, labels, k), k)


def balanced_accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    return metrics.balanced_accuracy(_cases(probs, labels, 1))


def reliability_plot(curves: dict[str, tuple[torch.Tensor, torch.Tensor]], path: Path, bins: int = 10) -> None:
    """Accuracy against confidence per bin, one curve per (confidence, correct) pair, ECE in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], color="#888", linestyle="--", linewidth=1, label="perfect")
    for name, (confidence, correct) in curves.items():
        xs, ys = [], []
        for i in range(bins):
            inside = (confidence > i / bins) & (confidence <= (i + 1) / bins)
            if inside.any():
                xs.append(confidence[inside].mean().item())
                ys.append(correct[inside].mean().item())
        ece = metrics.calibration_error(confidence.tolist(), correct.tolist(), bins)
        ax.plot(xs, ys, marker="o", label=f"{name} (ECE {ece:.3f})")
    ax.set(xlabel="confidence of the top condition", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1),
           title="Differential head reliability")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def top_confidence(probs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(confidence of the top condition, 1.0 where it is right) per case."""
    confidence, pred = probs.max(-1)
    return confidence, (pred == labels).float()


def evaluate(head: DifferentialHead, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    raw, calibrated = head.probabilities(x, calibrated=False), head.probabilities(x)
    return {"n": int(y.shape[0]), "top1": accuracy(calibrated, y), "top3": accuracy(calibrated, y, 3),
            "balanced_accuracy": balanced_accuracy(calibrated, y),
            "ece_before": expected_calibration_error(raw, y), "ece_after": expected_calibration_error(calibrated, y),
            "chance": 1 / len(head.classes)}


def train_differential(features: dict[str, dict[str, torch.Tensor]], labels: dict[str, torch.Tensor],
                       classes: tuple[str, ...], choice: str = "auto", target_precision: float = 0.9,
                       seed: int = 0) -> DifferentialHead:
    """features[kind][split] -> (N, F); labels[split] -> (N,). Fits a head per feature kind (or the one
    asked for), keeps the best on validation, calibrates it there and picks its threshold."""
    kinds = FEATURES if choice == "auto" else (choice,)
    trials = {}
    for kind in kinds:
        head = fit(features[kind]["train"], labels["train"], classes, kind, seed=seed)
        trials[kind] = (accuracy(head.probabilities(features[kind]["val"], calibrated=False), labels["val"]), head)
    kind = max(trials, key=lambda name: trials[name][0])
    head = trials[kind][1]
    val_x, val_y = features[kind]["val"], labels["val"]
    head.temperature = fit_temperature(head.logits(val_x), val_y)
    head.threshold = threshold_for(head.probabilities(val_x), val_y, target_precision)
    head.metrics = {"feature_choice": {name: round(acc, 4) for name, (acc, _) in trials.items()},
                    "target_precision": target_precision, "validation": evaluate(head, val_x, val_y)}
    if "test" in labels and labels["test"].numel():
        head.metrics["test"] = evaluate(head, features[kind]["test"], labels["test"])
    if not math.isfinite(head.temperature):
        raise DifferentialError("temperature scaling failed on the validation split; add validation images")
    return head
