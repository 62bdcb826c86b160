"""The structured consultation: the paper's interactive flow, turned into a typed report.

The paper's clinicians asked four questions in order (describe the condition; further features;
likely cause; treatment and medication). We add a fifth (whether and when to see a doctor). The
wording is ours and lives here only; a caller may pass another flow.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from pydantic import BaseModel

from .conversation import Conversation, ImageInput
from .safety import DISCLAIMER, URGENT_ADVICE, red_flags


@dataclass(frozen=True)
class ConsultStep:
    key: str  # describe | features | causes | treatment | see_doctor, or any key of a custom flow
    question: str


DEFAULT_FLOW: tuple[ConsultStep, ...] = (
    ConsultStep("describe", "Please describe the skin condition in this photo and say what it most likely is."),
    ConsultStep("features", "What further features do you notice, such as colour, border, texture or distribution?"),
    ConsultStep("causes", "What is the likely cause of this condition?"),
    ConsultStep("treatment", "What treatment and medication would you suggest?"),
    ConsultStep("see_doctor", "Should this be seen by a doctor, and how soon?"),
)

DEFAULT_SEE_DOCTOR = ("See a doctor or dermatologist if the problem persists, spreads, changes, bleeds, or worries "
                      "you.")


class ConsultationReport(BaseModel):
    visible_features: list[str]
    diagnosis: str | None  # None when no answer named a condition
    differentials: list[str]
    causes: str
    treatment: str
    see_doctor: str
    red_flags: list[str]
    disclaimer: str = DISCLAIMER
    answers: dict[str, str]  # step key -> the model's full answer
    questions: dict[str, str]  # step key -> the question asked
    full_text: str

    def markdown(self) -> str:
        lines = ["# Skin consultation report", "", f"> {self.disclaimer}", ""]
        if self.red_flags:
            lines += [f"**Warning signs:** {', '.join(self.red_flags)}. {URGENT_ADVICE}", ""]
        lines += ["## Most likely condition", self.diagnosis or "No condition was named.", ""]
        if self.differentials:
            lines += ["## Other possibilities"] + [f"- {d}" for d in self.differentials] + [""]
        lines += ["## Visible features"] + [f"- {f}" for f in self.visible_features] + [""]
        lines += ["## Possible causes", self.causes, "", "## Treatment suggestions", self.treatment, "",
                  "## When to see a doctor", self.see_doctor, "", "## Full consultation"]
        for key, question in self.questions.items():
            lines += [f"**Q:** {question}", "", f"**A:** {self.answers[key]}", ""]
        return "\n".join(lines)


def consult(ask: Callable[[Conversation], str], image: ImageInput,
            flow: tuple[ConsultStep, ...] = DEFAULT_FLOW) -> ConsultationReport:
    """Walk the flow over one photo; `ask(conversation)` returns the answer to its pending question
    (an engine's `answer`, bound to a session so that each step reuses the cache)."""
    conversation = Conversation()
    answers: dict[str, str] = {}
    for n, step in enumerate(flow):
        conversation = conversation.ask(step.question, [image] if n == 0 else [])
        answers[step.key] = ask(conversation).strip()
        conversation = conversation.answer(answers[step.key])
    return build_report(answers, {s.key: s.question for s in flow})


# -- reading a report out of free text ------------------------------------------------------------

_NAMING = re.compile(
    r"\b(?:most likely|likely|probably|possibly|consistent with|suggestive of|suggests?|appears to be|looks like|"
    r"could be|may be|might be|diagnosis (?:is|of)|diagnosed as)\s+(?:an?\s+|the\s+)?([^.;:\n]+)", re.IGNORECASE)
_DIFFERENTIAL = re.compile(r"\bdifferentials?(?: diagnos[ie]s)?(?: include| are| is)?:?\s+([^.\n]+)", re.IGNORECASE)
_SPLIT = re.compile(r",\s*|\s+or\s+|\s+and\s+")


def _clean(phrase: str) -> str:
    phrase = re.split(r"\b(?:which|that|because|with|due to|caused by)\b", phrase, maxsplit=1)[0]
    return phrase.strip(" ,.-").strip()


def extract_diagnosis(text: str) -> tuple[str | None, list[str]]:
    """The first condition a text names, and the others it offers as alternatives."""
    names = [_clean(m.group(1)) for m in _NAMING.finditer(text)]
    names = [n for n in names if n and len(n) <= 80]
    differentials: list[str] = []
    for m in _DIFFERENTIAL.finditer(text):
        differentials += [_clean(p) for p in _SPLIT.split(m.group(1)) if _clean(p)]
    if not names and differentials:
        names = [differentials.pop(0)]
    diagnosis = names[0] if names else None
    if diagnosis and " or " in diagnosis:
        first, *rest = [p.strip() for p in diagnosis.split(" or ")]
        diagnosis, differentials = first, rest + differentials
    others = [n for n in names[1:] + differentials if n.lower() != (diagnosis or "").lower()]
    return diagnosis, list(dict.fromkeys(others))


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+|\n+", text) if len(s.strip()) > 2]


def build_report(answers: dict[str, str], questions: dict[str, str]) -> ConsultationReport:
    description = " ".join(answers.get(k, "") for k in ("describe", "features"))
    diagnosis, differentials = extract_diagnosis(answers.get("describe", "") or description)
    features = [s for s in _sentences(description) if not _NAMING.search(s)]
    full = "\n\n".join(f"Q: {questions[k]}\nA: {answers[k]}" for k in answers)
    return ConsultationReport(
        visible_features=features, diagnosis=diagnosis, differentials=differentials,
        causes=answers.get("causes", ""), treatment=answers.get("treatment", ""),
        see_doctor=answers.get("see_doctor") or DEFAULT_SEE_DOCTOR,
        red_flags=red_flags(*answers.values()), answers=answers, questions=questions, full_text=full)
