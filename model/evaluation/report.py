"""Score a prediction run against a label vocabulary: JSON, a Markdown report and PNG plots."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from model.evaluation.labels import LabelSet, _norm
from model.evaluation.metrics import summary
from model.metrics import Case, calibration_error
from model.evaluation.predict import CONTEXTS, EvalError, context_of, read_predictions


def cases_from_run(rows: list[dict], labels: LabelSet) -> tuple[list[Case], dict[str, int]]:
    """Labelled predictions -> Cases (ranked classes extracted from each answer)."""
    cases, skipped = [], {"unlabelled": 0, "errors": 0}
    for row in rows:
        if row.get("error"):
            skipped["errors"] += 1
            continue
        if row.get("label") is None:
            skipped["unlabelled"] += 1
            continue
        report = row.get("report") or {}
        text = " ".join(filter(None, [row.get("answer", ""), report.get("answers", {}).get("features", "")]))
        cases.append(Case(labels.canonical(row["label"]), labels.ranked(text), row.get("fitzpatrick")))
    return cases, skipped


def score(run: str | Path, labels: LabelSet, n_boot: int = 1000, seed: int = 0, plots: bool = True) -> dict[str, Any]:
    """The run's metrics (of its context-on rows when it holds both contexts), and with both, the
    two side by side (`context`)."""
    run = Path(run)
    every = read_predictions(run)
    by_context = {c: [r for r in every if context_of(r) == c] for c in CONTEXTS}
    both = all(by_context.values())
    rows = by_context["on"] if both else every
    cases, skipped = cases_from_run(rows, labels)
    if not cases:
        raise EvalError(f"{run} has no labelled predictions to score (give cases a \"diagnosis\")")
    scored = summary(cases, labels.classes, n_boot, seed)
    result = {"run": str(run), "classes": list(labels.classes), "skipped": skipped, **scored}
    head = differential_score(rows, labels, n_boot, seed, run if plots else None)
    if head is not None:
        result["differential"] = head
    if both:
        without = cases_from_run(by_context["off"], labels)[0]
        result["context"] = {"off": summary(without, labels.classes, n_boot, seed), "on": scored}
    (run / "score.json").write_text(json.dumps(result, indent=2))
    (run / "report.md").write_text(markdown(result))
    if plots:
        write_plots(result, run)
    return result


def differential_score(rows: list[dict], labels: LabelSet, n_boot: int, seed: int, plot_dir: Path | None
                       ) -> dict[str, Any] | None:
    """The bundle's differential head beside the chat: the same metrics on its ranking, and its
    calibration (ECE before and after temperature scaling, a reliability plot)."""
    import torch

    from model.evaluation.differential import reliability_plot

    scored = [r for r in rows if r.get("differential") and r.get("label") is not None and not r.get("error")]
    if not scored:
        return None
    cases, confidence, raw, correct = [], [], [], []
    for row in scored:
        truth = labels.canonical(row["label"])
        ranked = tuple(dict.fromkeys(c for c in (labels.synonyms.get(_norm(x["condition"])) for x in row["differential"])
                                     if c))
        cases.append(Case(truth, ranked, row.get("fitzpatrick")))
        confidence.append(row["differential"][0]["probability"])
        raw.append(row.get("differential_raw_confidence", confidence[-1]))
        correct.append(float(bool(ranked) and ranked[0] == truth))
    block = summary(cases, labels.classes, n_boot, seed)
    correct_t = torch.tensor(correct)
    block["ece_before"] = calibration_error(raw, correct)
    block["ece_after"] = calibration_error(confidence, correct)
    if plot_dir is not None:
        reliability_plot({"before": (torch.tensor(raw), correct_t),
                          "after temperature scaling": (torch.tensor(confidence), correct_t)},
                         plot_dir / "differential-reliability.png")
    return block


def _pct(value: float) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}%"


def _with_ci(block: dict) -> str:
    low, high = block["ci95"]
    return f"{_pct(block['value'])} ({_pct(low)} to {_pct(high)})"


def markdown(result: dict) -> str:
    o = result["overall"]
    lines = ["# Diagnostic accuracy", "",
             f"{o['n']} labelled cases from `{result['run']}`; {o['no_diagnosis']} answer(s) named no known class. "
             f"95% confidence intervals by bootstrap over cases.", "",
             "| group | n | top-1 | top-3 | balanced accuracy |", "|---|---|---|---|---|",
             f"| all | {o['n']} | {_with_ci(o['top1'])} | {_with_ci(o['top3'])} | {_with_ci(o['balanced'])} |"]
    for name, block in result["by_skin_tone"].items():
        label = f"Fitzpatrick {name}" if name != "unknown" else "skin type unknown"
        if block["n"]:
            lines.append(f"| {label} | {block['n']} | {_with_ci(block['top1'])} | {_with_ci(block['top3'])} | "
                         f"{_with_ci(block['balanced'])} |")
        else:
            lines.append(f"| {label} | 0 | n/a | n/a | n/a |")
    if "context" in result:
        lines += context_table(result["context"])
    lines += ["", "## Per class", "", "| class | support | precision | recall |", "|---|---|---|---|"]
    for cls, m in result["per_class"].items():
        lines.append(f"| {cls} | {m['support']} | {_pct(m['precision'])} | {_pct(m['recall'])} |")
    conf = result["confusion"]
    lines += ["", "## Confusion matrix (rows: true class, columns: predicted)", "",
              "| | " + " | ".join(conf["columns"]) + " |", "|---" * (len(conf["columns"]) + 1) + "|"]
    lines += [f"| {row} | " + " | ".join(map(str, counts)) + " |" for row, counts in zip(conf["rows"], conf["matrix"])]
    lines += ["", "Plots: confusion.png, per_class.png, skin_tone.png.", ""]
    head = result.get("differential")
    if head:
        o = head["overall"]
        lines += ["## Differential head (beside the chat)", "",
                  f"Its calibrated ranking, scored the same way. Expected calibration error "
                  f"{head['ece_before']:.3f} before temperature scaling, {head['ece_after']:.3f} after "
                  f"(differential-reliability.png).", "",
                  "| group | n | top-1 | top-3 | balanced accuracy |", "|---|---|---|---|---|",
                  f"| all | {o['n']} | {_with_ci(o['top1'])} | {_with_ci(o['top3'])} | {_with_ci(o['balanced'])} |"]
        for name, b in head["by_skin_tone"].items():
            if b["n"]:
                lines.append(f"| Fitzpatrick {name} | {b['n']} | {_with_ci(b['top1'])} | {_with_ci(b['top3'])} | "
                             f"{_with_ci(b['balanced'])} |")
        lines += ["", "| class | support | precision | recall |", "|---|---|---|---|"]
        lines += [f"| {c} | {m['support']} | {_pct(m['precision'])} | {_pct(m['recall'])} |"
                  for c, m in head["per_class"].items()]
        lines.append("")
    return "\n".join(lines)


def context_table(blocks: dict[str, dict]) -> list[str]:
    """Top-1 and top-3 without and with the clinical history, overall and per Fitzpatrick group."""
    off, on = blocks["off"], blocks["on"]
    lines = ["", "## Image alone against image with clinical history", "",
             "| group | n | top-1 without | top-1 with | top-3 without | top-3 with |", "|---|---|---|---|---|---|"]
    groups = [("all", off["overall"], on["overall"])]
    groups += [(f"Fitzpatrick {name}" if name != "unknown" else "skin type unknown", off["by_skin_tone"][name],
                on["by_skin_tone"][name]) for name in off["by_skin_tone"] if off["by_skin_tone"][name]["n"]]
    for label, a, b in groups:
        lines.append(f"| {label} | {a['n']} | {_with_ci(a['top1'])} | {_with_ci(b['top1'])} | {_with_ci(a['top3'])} | "
                     f"{_with_ci(b['top3'])} |")
    return lines


def write_plots(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    conf = result["confusion"]
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * len(conf["columns"]), 1.0 + 0.5 * len(conf["rows"])))
    ax.imshow(conf["matrix"], cmap="Blues")
    ax.set_xticks(range(len(conf["columns"])), conf["columns"], rotation=45, ha="right")
    ax.set_yticks(range(len(conf["rows"])), conf["rows"])
    for i, row in enumerate(conf["matrix"]):
        for j, count in enumerate(row):
            ax.text(j, i, str(count), ha="center", va="center", fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.tight_layout()
    fig.savefig(out / "confusion.png", dpi=120)
    plt.close(fig)

    classes = list(result["per_class"])
    fig, ax = plt.subplots(figsize=(max(4, 0.8 * len(classes)), 3.2))
    for offset, key in ((-0.2, "precision"), (0.2, "recall")):
        values = [0 if math.isnan(result["per_class"][c][key]) else result["per_class"][c][key] for c in classes]
        ax.bar([i + offset for i in range(len(classes))], values, width=0.4, label=key)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "per_class.png", dpi=120)
    plt.close(fig)

    groups = [g for g, b in result["by_skin_tone"].items() if b["n"]]
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    values = [result["by_skin_tone"][g]["top1"]["value"] for g in groups]
    errors = [[v - result["by_skin_tone"][g]["top1"]["ci95"][0] for g, v in zip(groups, values)],
              [result["by_skin_tone"][g]["top1"]["ci95"][1] - v for g, v in zip(groups, values)]]
    ax.bar(groups, values, yerr=errors, capsize=4, color="#0f766e")
    ax.set_ylim(0, 1)
    ax.set_ylabel("top-1 accuracy (95% CI)")
    ax.set_xlabel("Fitzpatrick skin type")
    fig.tight_layout()
    fig.savefig(out / "skin_tone.png", dpi=120)
    plt.close(fig)
