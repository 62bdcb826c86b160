"""`train-differential`: the frozen features of a bundle's encoder for every labelled image of a
manifest, a calibrated head on them, and a new bundle that carries it (the old one untouched)."""

from __future__ import annotations

import math
import os
import random
import shutil
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from model.weights.bundle import MANIFEST_FILE, load_bundle, read_manifest, write_manifest
from model.evaluation.differential import accuracy, evaluate, reliability_plot, top_confidence
from model.nn.differential import FEATURES, DifferentialError, DifferentialHead, image_features
from model.images.decode import read_image_file
from model.images.preprocess import preprocess
from model.weights.policy import LoadPolicy
from model.training.data import load_samples

VALIDATION = ("val", "valid", "validation")


def _split_of(split: str | None) -> str | None:
    if split is None:
        return None
    split = split.lower()
    return "val" if split in VALIDATION else split if split in ("train", "test") else None


def build(data: str | Path, weights: str | Path, out: str | Path, *, labels: str | Path | None = None,
          feature: str = "auto", val_fraction: float = 0.2, target_precision: float = 0.9, seed: int = 0,
          batch_size: int = 32, say: Callable[[str], None] = print) -> tuple[Path, DifferentialHead]:
    from tqdm.auto import tqdm

    if feature != "auto" and feature not in FEATURES:
        raise DifferentialError(f"--features must be auto or one of {', '.join(FEATURES)}")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise DifferentialError(f"{out} exists and is not empty; choose another --out")
    samples = [s for s in load_samples(data, None, skip_bad=False, say=say) if s.record.diagnosis]
    if not samples:
        raise DifferentialError(f"no record of {data} has a `diagnosis`; the head learns from those")
    names = _normalise([s.record.diagnosis for s in samples], labels)
    classes = tuple(sorted(set(names)))
    if len(classes) < 2:
        raise DifferentialError(f"{data} names only one condition ({classes[0]!r}); a differential needs two or more")
    splits = _assign_splits([_split_of(s.record.split) for s in samples], val_fraction, seed)

    loaded = load_bundle(weights, LoadPolicy(dtype="fp32"))
    model, config = loaded.model, loaded.config
    kinds = FEATURES if feature == "auto" else (feature,)
    feats: dict[str, list[torch.Tensor]] = {k: [] for k in kinds}
    for start in tqdm(range(0, len(samples), batch_size), desc="image features", unit="batch"):
        batch = samples[start:start + batch_size]
        pixels = []
        for sample in batch:
            pixels.append(preprocess(read_image_file(sample.image_path), config.preprocess))  # as serving sees it
        pixels = torch.stack(pixels).to(loaded.device)
        for kind in kinds:
            feats[kind].append(image_features(model, pixels, kind))
    features = {k: {s: torch.cat(v)[torch.tensor([x == s for x in splits])] for s in ("train", "val", "test")}
                for k, v in feats.items()}
    index = {name: i for i, name in enumerate(classes)}
    y = torch.tensor([index[n] for n in names])
    targets = {s: y[torch.tensor([x == s for x in splits])] for s in ("train", "val", "test")}
    if not targets["val"].numel():
        raise DifferentialError("no validation images: mark some records `\"split\": \"val\"` or use --val-fraction")
    say(f"training the head: {len(classes)} conditions, {targets['train'].numel()} training, "
        f"{targets['val'].numel()} validation, {targets['test'].numel()} test images")
    head = train_differential(features, targets, classes, feature, target_precision, seed)
    _copy_bundle(Path(weights), out)
    head.save(out)
    kind = head.feature
    plot_split = "test" if targets["test"].numel() else "val"
    x, t = features[kind][plot_split], targets[plot_split]
    reliability_plot({"before": top_confidence(head.probabilities(x, calibrated=False), t),
                      "after temperature scaling": top_confidence(head.probabilities(x), t)},
                     out / "differential-reliability.png")
    sources = read_manifest(Path(weights)).get("sources", {})
    write_manifest(out, {**sources, "differential": {"file": f"train-differential on {data}", "sha256": ""}})
    return out, head


def _normalise(diagnoses: list[str], labels: str | Path | None) -> list[str]:
    """Through the evaluation label map (synonyms to one name) when given; else trimmed, lower case."""
    if labels is None:
        return [" ".join(d.lower().split()) for d in diagnoses]
    from model.evaluation.labels import LabelSet

    label_set = LabelSet.from_yaml(labels)
    return [label_set.canonical(d) for d in diagnoses]


def _assign_splits(given: list[str | None], val_fraction: float, seed: int) -> list[str]:
    """Records keep their split; the rest are train, but for a held-out validation fraction when no
    record says `val`."""
    splits = [s or "train" for s in given]
    if "val" not in splits:
        free = [i for i, s in enumerate(given) if s is None]
        random.Random(seed).shuffle(free)
        for i in free[:max(1, round(val_fraction * len(free)))]:
            splits[i] = "val"
    return splits


def _copy_bundle(source: Path, out: Path) -> None:
    """The source bundle's files, hard-linked where the disk allows (a 13B bundle is 28 GB)."""
    def link_or_copy(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(source, out, copy_function=link_or_copy, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns(MANIFEST_FILE, "differential*"))


# -- fitting the head ------------------------------------------------------------------------------

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
