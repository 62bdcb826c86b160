"""Clinician review as the paper ran it: a packet per run, a sheet per reviewer, and the table.

Reviewers rate seven statements per case on a 5-point scale. `review_score` turns filled sheets
into the paper's table: % strongly agree, % agree, their sum (with a bootstrap 95% CI over
cases), and Fleiss' kappa across reviewers for each statement.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from model.errors import UserFacingError
from model.i18n.catalog import LANGUAGES, text
from model.metrics import bootstrap_ci, fleiss_kappa
from model.evaluation.predict import read_predictions

STATEMENTS = text("en", "review.statements")  # key -> statement; the sheets' columns are the keys
SCALE = ("strongly agree", "agree", "neutral", "disagree", "strongly disagree")
# a rating may be written as a number, or as the scale's words in any language the packets come in
_BY_NUMBER = {str(5 - i): word for i, word in enumerate(SCALE)}
_BY_WORD = {text(lang, f"review.scale.{n}").lower(): word for lang in LANGUAGES for n, word in _BY_NUMBER.items()}


class ReviewError(UserFacingError, ValueError):
    """A review sheet that cannot be scored."""


def _thumbnail(path: Path, size: int = 320) -> str:
    """The case photo as an inline JPEG data URI, so the packet is one self-contained file."""
    from model.images.decode import read_image_file

    image = read_image_file(path)
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def review_packet(run: str | Path, out: str | Path, reviewers: int = 5, manifest_dir: str | Path | None = None,
                  lang: str = "en") -> Path:
    """packet.html (every case: photo, questions, answers), in `lang`, and sheets/reviewer-N.csv to fill in."""
    t = lambda key: html.escape(text(lang, f"review.{key}"))  # noqa: E731
    run, out = Path(run), Path(out)
    rows = [r for r in read_predictions(run) if not r.get("error")]
    base = Path(manifest_dir) if manifest_dir else Path(json.loads((run / "run.json").read_text())["manifest"]).parent
    out.mkdir(mode=0o700, parents=True, exist_ok=True)  # the packet holds patient photos: owner only
    parts = [f"<!doctype html><html lang='{'zh-CN' if lang == 'zh' else lang}'><meta charset='utf-8'>"
             f"<title>{t('title')}</title>",
             "<style>body{font-family:system-ui,sans-serif;max-width:60em;margin:auto;padding:1em}"
             ".case{border-top:2px solid #999;padding:1em 0}img{max-width:320px;border-radius:6px}"
             "dt{font-weight:600;margin-top:.6em}</style>",
             f"<h1>{t('title')}</h1><p>{t('instructions')}</p><ol>"]
    parts += [f"<li>{t(f'statements.{key}')}</li>" for key in STATEMENTS]
    parts.append("</ol>")
    for row in rows:
        parts.append(f"<section class='case' id='{html.escape(row['id'])}'><h2>{t('case')} {html.escape(row['id'])}</h2>")
        parts.append(f"<img alt='{t('photo')}' src='{_thumbnail(base / row['image'])}'><dl>")
        report = row.get("report") or {}
        qa = [(report.get("questions", {}).get(k, k), a) for k, a in report.get("answers", {}).items()] or \
             [(text(lang, "review.answer"), row.get("answer", ""))]
        for question, answer in qa:
            parts.append(f"<dt>{html.escape(question)}</dt><dd>{html.escape(answer)}</dd>")
        parts.append("</dl></section>")
    (out / "packet.html").write_text("\n".join(parts))
    (out / "packet.html").chmod(0o600)
    sheets = out / "sheets"
    sheets.mkdir(exist_ok=True)
    for n in range(1, reviewers + 1):
        with open(sheets / f"reviewer-{n}.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["case_id", *STATEMENTS])
            writer.writerows([row["id"], *[""] * len(STATEMENTS)] for row in rows)
    return out


def _rating(value: str, where: str) -> str:
    value = value.strip().lower()
    if value in _BY_NUMBER:
        return _BY_NUMBER[value]
    if value in _BY_WORD:
        return _BY_WORD[value]
    if value in SCALE:
        return value
    raise ReviewError(f"{where}: {value!r} is not a rating; use strongly agree, agree, neutral, disagree, "
                      f"strongly disagree (or 5 to 1)")


def read_sheets(paths: list[str | Path]) -> dict[str, dict[str, list[str]]]:
    """statement -> case id -> the reviewers' ratings. Every sheet must rate every case."""
    ratings: dict[str, dict[str, list[str]]] = {s: {} for s in STATEMENTS}
    case_sets = []
    for path in map(Path, paths):
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            missing = [s for s in ["case_id", *STATEMENTS] if s not in (reader.fieldnames or [])]
            if missing:
                raise ReviewError(f"{path}: missing column(s) {', '.join(missing)}")
            cases = set()
            for number, row in enumerate(reader, start=2):
                cases.add(row["case_id"])
                for statement in STATEMENTS:
                    where = f"{path}:{number} ({statement})"
                    if not (row[statement] or "").strip():
                        raise ReviewError(f"{where}: no rating given")
                    ratings[statement].setdefault(row["case_id"], []).append(_rating(row[statement], where))
            case_sets.append((path, cases))
    first_path, first = case_sets[0]
    for path, cases in case_sets[1:]:
        if cases != first:
            raise ReviewError(f"{path} and {first_path} rate different cases: every reviewer must rate every case")
    return ratings


def review_score(paths: list[str | Path], n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    ratings = read_sheets(paths)
    table = {}
    for statement, by_case in ratings.items():
        per_case = list(by_case.values())  # each: the reviewers' ratings of one case
        flat = [r for case in per_case for r in case]

        def share(cases, which):
            all_ratings = [r for case in cases for r in case]
            return sum(r in which for r in all_ratings) / len(all_ratings)

        counts = np.array([[case.count(level) for level in SCALE] for case in per_case])
        table[statement] = {
            "statement": STATEMENTS[statement], "ratings": len(flat),
            "strongly_agree": share(per_case, {"strongly agree"}), "agree": share(per_case, {"agree"}),
            "agree_total": share(per_case, {"strongly agree", "agree"}),
            "agree_total_ci95": bootstrap_ci(per_case, lambda c: share(c, {"strongly agree", "agree"}), n_boot, seed),
            "fleiss_kappa": fleiss_kappa(counts) if counts.sum(axis=1).min() >= 2 else None,
        }
    return {"reviewers": len(paths), "cases": len(next(iter(ratings.values()))), "statements": table}


def review_markdown(result: dict) -> str:
    lines = [f"# Clinician review: {result['reviewers']} reviewers, {result['cases']} cases", "",
             "| statement | strongly agree | agree | total (95% CI) | Fleiss' kappa |", "|---|---|---|---|---|"]
    for row in result["statements"].values():
        low, high = row["agree_total_ci95"]
        kappa = "n/a" if row["fleiss_kappa"] is None else f"{row['fleiss_kappa']:.2f}"
        lines.append(f"| {row['statement']} | {100 * row['strongly_agree']:.2f}% | {100 * row['agree']:.2f}% | "
                     f"{100 * row['agree_total']:.2f}% ({100 * low:.1f}-{100 * high:.1f}%) | {kappa} |")
    return "\n".join(lines) + "\n"
