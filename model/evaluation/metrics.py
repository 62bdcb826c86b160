"""The evaluation's headline summary: every metric (`model.metrics`) with its 95% CI, overall, per
class and by skin-tone group."""

from __future__ import annotations

from typing import Sequence

from model.clinical.fitzpatrick import GROUPS as SKIN_TONE_GROUPS
from model.clinical.fitzpatrick import group as skin_tone_group
from model.metrics import Case, accuracy, balanced_accuracy, bootstrap_ci, confusion, per_class, top_k


def summary(cases: Sequence[Case], classes: Sequence[str], n_boot: int = 1000, seed: int = 0) -> dict:
    """Every headline metric with its 95% CI, overall and by skin-tone group."""
    def block(subset: Sequence[Case]) -> dict:
        out = {"n": len(subset)}
        for name, fn in (("top1", accuracy), ("top3", lambda c: top_k(c, 3)), ("balanced", balanced_accuracy)):
            out[name] = {"value": fn(subset), "ci95": bootstrap_ci(subset, fn, n_boot, seed)}
        out["no_diagnosis"] = sum(c.top1 is None for c in subset)
        return out

    groups = {name: [c for c in cases if skin_tone_group(c.fitzpatrick) == name] for name in SKIN_TONE_GROUPS}
    unknown = [c for c in cases if skin_tone_group(c.fitzpatrick) is None]
    columns, matrix = confusion(cases, classes)
    return {"overall": block(cases), "per_class": per_class(cases, classes),
            "by_skin_tone": {name: block(sub) for name, sub in groups.items()} | ({"unknown": block(unknown)} if unknown else {}),
            "confusion": {"rows": list(classes), "columns": columns, "matrix": matrix}}
