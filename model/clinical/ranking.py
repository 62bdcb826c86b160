"""A calibrated ranked differential, typed, with one formatter per output (Markdown for the report
and its PDF, plain text for the terminal; the page draws its own HTML from the same objects, and
JSON is `model_dump`)."""

from __future__ import annotations

from model.i18n.catalog import text
from model.nn.differential import RankedCondition, Ranking

__all__ = ["RankedCondition", "Ranking", "ranking_markdown", "ranking_text"]


def ranking_markdown(conditions: list[RankedCondition], uncertain: bool, lang: str) -> list[str]:
    """Lines of the report's ranked section (also what the PDF prints)."""
    lines = [f"- {c.condition}: {100 * c.probability:.0f}%" for c in conditions]
    return lines + ([f"*{text(lang, 'report.uncertain')}*"] if uncertain else [])


def ranking_text(ranking: Ranking, lang: str) -> str:
    """The terminal's block: a heading, one aligned line per condition, the uncertainty note."""
    lines = [f"{text(lang, 'report.ranked')} (calibrated):"]
    lines += [f"  {c.condition:<28} {100 * c.probability:5.1f}%" for c in ranking.conditions]
    return "\n".join(lines + ([f"  {text(lang, 'report.uncertain')}"] if ranking.uncertain else []))
