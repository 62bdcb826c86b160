"""Run the engine over a case manifest: one JSON line per case, resumable, with provenance.

cases.jsonl, one case a line (image paths relative to the manifest):
    {"image": "cases/0001.jpg", "diagnosis": "psoriasis", "fitzpatrick": "V", "id": "0001",
     "history": {"age": 34, "body_site": "arm", "symptoms": ["itch"]}}
`history` (optional) is the clinical history form's fields (`model.clinical.history`). A run with
`context="on"` gives it to the model, one with `"off"` does not; both may share a run directory (each
row records its context), and `eval score` then sets them side by side.
Images are read where they are; nothing about a case is copied, only its path is recorded.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from model.clinical.consultation import DEFAULT_FLOW, consult
from model.prompt.conversation import Conversation, ImageInput
from model.clinical.history import ClinicalHistory, with_history
from model.errors import UserFacingError
from model.images.decode import ImageError, read_image_file
from model.clinical.records import SkinTyped, read_jsonl
from model.evaluation.labels import LabelError, LabelSet

PREDICTIONS = "predictions.jsonl"


class EvalError(UserFacingError, ValueError):
    """A case manifest or run directory that cannot be used."""


class EvalCase(SkinTyped):
    image: str
    diagnosis: str | None = None
    id: str | None = None
    history: ClinicalHistory | None = None


CONTEXTS = ("on", "off")  # the clinical history given to the model, or withheld


def context_of(row: dict) -> str:
    """A prediction's context (rows written before contexts existed: off)."""
    return row.get("context", "off")


def run_key(row: dict) -> str:
    """A prediction's place in a run: its case and context."""
    return f"{row['id']}@{context_of(row)}"


def read_cases(manifest: str | Path, labels: LabelSet | None = None) -> list[tuple[EvalCase, Path]]:
    """Every case, validated (JSON, fields, image present and readable, label known), or an error
    listing each bad line."""
    manifest = Path(manifest)
    if not manifest.is_file():
        raise EvalError(f"no case manifest at {manifest}")
    records, bad = read_jsonl(manifest, EvalCase)
    cases, problems = [], [f"{where}: {message}" for where, message in bad]
    for where, case in records:
        path = (manifest.parent / case.image).resolve()
        if not path.is_file():
            problems.append(f"{where}: image {case.image} not found ({path})")
            continue
        if labels is not None and case.diagnosis is not None:
            try:
                case = case.model_copy(update={"diagnosis": labels.canonical(case.diagnosis)})
            except LabelError as err:
                problems.append(f"{where}: {err}")
                continue
        cases.append((case.model_copy(update={"id": case.id or f"line-{where.rsplit(':', 1)[1]}"}), path))
    duplicates = [i for i, n in Counter(c.id for c, _ in cases).items() if n > 1]
    if duplicates:
        problems.append(f"{manifest}: case ids must be unique; repeated: {', '.join(duplicates[:5])}")
    if problems:
        raise EvalError(f"{len(problems)} problem(s) in {manifest}:\n" + "\n".join(f"  {p}" for p in problems[:30]))
    if not cases:
        raise EvalError(f"{manifest} holds no cases")
    return cases


def done_ids(out: Path) -> set[str]:
    """`run_key`s already in the run."""
    path = out / PREDICTIONS
    if not path.is_file():
        return set()
    ids = set()
    for line in path.read_text().splitlines():
        try:
            ids.add(run_key(json.loads(line)))
        except (json.JSONDecodeError, KeyError):
            continue  # a line cut off by an interruption is redone
    return ids


def predict(engine, manifest: str | Path, out: str | Path, *, labels: LabelSet | None = None, seed: int = 0,
            report: bool = True, settings: dict[str, Any] | None = None, say: Callable[[str], None] = print,
            context: str = "on") -> Path:
    """Answer every case not yet in out/predictions.jsonl in this `context` (on: each case's clinical
    history goes with its first question); return that file's path."""
    if context not in CONTEXTS:
        raise EvalError(f"context must be on or off, not {context!r}")
    from tqdm.auto import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cases = read_cases(manifest, labels)
    settings = {"do_sample": False, **(settings or {})}
    provenance = {"bundle_sha256": engine.loaded.bundle_hash, "bundle": str(engine.loaded.path),
                  "model": engine.config.name, "template": engine.config.prompt_template, "seed": seed,
                  "settings": settings, "flow": [s.question for s in DEFAULT_FLOW] if report else None,
                  "context": context}
    (out / "run.json").write_text(json.dumps({"manifest": str(Path(manifest).resolve()), **provenance}, indent=2))
    finished = done_ids(out)
    todo = [(c, p) for c, p in cases if run_key({"id": c.id, "context": context}) not in finished]
    if finished:
        say(f"resuming: {len(finished)} case(s) already done, {len(todo)} to go")
    with open(out / PREDICTIONS, "a") as sink:
        for case, path in tqdm(todo, desc="cases", unit="case"):
            history = case.history if context == "on" else None
            row = _one(engine, case, path, seed, report, settings, provenance, history)
            sink.write(json.dumps({**row, "context": context}) + "\n")
            sink.flush()
    return out / PREDICTIONS


def _one(engine, case: EvalCase, path: Path, seed: int, report: bool, settings: dict, provenance: dict,
         history: ClinicalHistory | None = None) -> dict:
    row = {"id": case.id, "image": case.image, "label": case.diagnosis, "fitzpatrick": case.fitzpatrick}
    try:
        image = ImageInput.of(read_image_file(path))
    except ImageError as err:
        return {**row, "error": str(err), "answer": "", "report": None, "provenance": provenance}
    session = f"eval:{case.id}"
    ranking = engine.rank([image]) if getattr(engine, "rank", None) else None  # the bundle's head, if any
    if report:
        result = consult(lambda conv: engine.answer(conv, session=session, seed=seed, **settings), image,
                         ranking=ranking, history=history)
        answer, report_dict = result.answers["describe"], result.model_dump()
    else:
        conversation = with_history(Conversation().ask(DEFAULT_FLOW[0].question, [image]), history)
        answer, report_dict = engine.answer(conversation, session=session, seed=seed, **settings), None
    engine.forget(session)
    engine.forget_images([image.key])
    head = {"differential": [c.model_dump() for c in ranking.conditions],
            "differential_raw_confidence": ranking.raw_confidence} \
        if ranking is not None else {}
    return {**row, "answer": answer.strip(), "report": report_dict, **head, "provenance": provenance}


def read_predictions(run: str | Path) -> list[dict]:
    path = Path(run) / PREDICTIONS
    if not path.is_file():
        raise EvalError(f"{run} has no {PREDICTIONS}; run {{command:eval predict}} first")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            raise EvalError(f"{path}:{number} is not valid JSON (an interrupted run? re-run predict to redo it)") from None
    return rows


def consistency(ask: Callable[[ImageInput, int], str], cases: list[tuple[EvalCase, Path]], labels: LabelSet,
                runs: int = 10, seed: int = 0) -> dict[str, Any]:
    """Ask each case `runs` times (different seeds); how often does the extracted diagnosis agree
    with that case's majority? The paper: 45 cases x 10 runs, 93.7% consistent."""
    from tqdm.auto import tqdm

    per_case = []
    for case, path in tqdm(cases, desc="cases", unit="case"):
        image = ImageInput.of(read_image_file(path))
        found = [(labels.ranked(ask(image, seed + i)) or (None,))[0] for i in range(runs)]
        majority, count = Counter(found).most_common(1)[0]
        per_case.append({"id": case.id, "label": case.diagnosis, "majority": majority, "agreement": count / runs,
                         "diagnoses": found})
    by_class: dict[str, list[float]] = {}
    for row in per_case:
        by_class.setdefault(row["label"] or "unlabelled", []).append(row["agreement"])
    return {"runs": runs, "cases": len(per_case),
            "consistency": sum(r["agreement"] for r in per_case) / len(per_case),
            "by_class": {k: sum(v) / len(v) for k, v in sorted(by_class.items())}, "per_case": per_case}
