"""The differential head's figures: top-k and balanced accuracy, expected calibration error, and the
reliability plot (accuracy against confidence)."""

from __future__ import annotations

from pathlib import Path

import torch

from model import metrics
from model.nn.differential import DifferentialHead


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
