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

from model.prompt.conversation import Conversation, ImageInput
from model.clinical.history import ClinicalHistory, with_history
from model.clinical.ranking import RankedCondition, Ranking, ranking_markdown
from model.images.quality import PhotoQuality
from model.i18n.catalog import text
from model.clinical.safety import DISCLAIMER, red_flag_advice, red_flags


@dataclass(frozen=True)
class ConsultStep:
    key: str  # describe | features | causes | treatment | see_doctor, or any key of a custom flow
    question: str


STEPS = ("describe", "features", "causes", "treatment", "see_doctor")


def ask_in(lang: str, question: str) -> str:
    """A question as the model is asked it: in Chinese, with the instruction to answer in Chinese
    appended (English questions stay exactly as the reference asks them)."""
    instruction = text(lang, "answer_instruction")
    return f"{question} {instruction}" if instruction else question


def flow(lang: str = "en", compare: bool = False) -> tuple[ConsultStep, ...]:
    """The consultation's questions in a language; a follow-up's (`compare`) first asks what changed
    since the last visit."""
    keys = (("compare",) if compare else ()) + STEPS
    return tuple(ConsultStep(key, ask_in(lang, text(lang, f"flow.{key}"))) for key in keys)


DEFAULT_FLOW: tuple[ConsultStep, ...] = flow("en")
DEFAULT_SEE_DOCTOR = text("en", "report.default_see_doctor")


class VisitDetails(BaseModel):
    """What a clinician files with a report: when, which visit, which photos, which model."""

    created: str  # local date and time, ISO 8601 to the minute, with its UTC offset
    visit: str  # a reference to quote (drawn per report; it names no patient)
    photos: list[str] = []  # the photo files written beside the report, in order
    photo_dates: list[str] = []  # when each was taken (ISO), given on a follow-up: the photos side by side, dated
    model: str  # the bundle's name and version


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
    lang: str = "en"  # of the headings, the disclaimer and the warning signs
    differential: list[RankedCondition] | None = None  # the bundle's calibrated ranking, when it has a head
    differential_uncertain: bool = False
    history: ClinicalHistory | None = None
    photo_quality: list[PhotoQuality] = []  # one per photo the consultation holds, in order
    details: VisitDetails | None = None

    def heading(self, key: str) -> str:
        return text(self.lang, f"report.{key}")

    def photo_caption(self, n: int) -> str:
        """"Photo 1", or on a follow-up "Photo 1, 6 October 2026" (the date it was taken)."""
        dates = self.details.photo_dates if self.details else []
        if n > len(dates):
            return self.heading("photo_caption").format(n=n)
        return self.heading("photo_dated").format(n=n, date=readable_date(dates[n - 1], self.lang))

    def differential_lines(self) -> list[str]:
        return ranking_markdown(self.differential or [], self.differential_uncertain, self.lang)

    def detail_lines(self) -> list[str]:
        d, h = self.details, self.heading
        if d is None:
            return []
        return [f"{h('created')}: {readable_time(d.created, self.lang)}", f"{h('visit')}: {d.visit}",
                f"{h('photos')}: {len(d.photos)}", f"{h('model')}: {d.model}"]

    def history_lines(self) -> list[str]:
        if self.history is None or self.history.is_empty():
            return [text(self.lang, "history.none")]
        return self.history.lines(self.lang)

    def quality_lines(self) -> list[str]:
        """One line per photo: fine, or what is wrong with it and how to retake it."""
        caption = lambda n: self.heading("photo_caption").format(n=n)  # noqa: E731
        return [f"{caption(n)}: " + (text(self.lang, "quality.ok") if q.ok else " ".join(q.tips(self.lang)))
                for n, q in enumerate(self.photo_quality, 1)]

    def markdown(self) -> str:
        h = self.heading
        lines = [f"# {h('title')}", "", f"> {self.disclaimer}", ""]
        if self.details is not None:
            lines += [f"## {h('details')}"] + [f"- {line}" for line in self.detail_lines()] + [""]
            lines += [" ".join(f"![{self.photo_caption(n)}]({name})" for n, name in enumerate(self.details.photos, 1))]
            lines += [""] if self.details.photos else []
        if self.red_flags:
            lines += [f"**{h('warning_signs')}:** {red_flag_advice(self.red_flags, self.lang)}", ""]
        lines += [f"## {h('most_likely')}", self.diagnosis or h("none_named"), ""]
        if self.differential:
            lines += [f"## {h('ranked')}"] + self.differential_lines() + [""]
        if self.differentials:
            lines += [f"## {h('other')}"] + [f"- {d}" for d in self.differentials] + [""]
        lines += [f"## {h('features')}"] + [f"- {f}" for f in self.visible_features] + [""]
        lines += [f"## {text(self.lang, 'history.title')}"] + [f"- {line}" for line in self.history_lines()] + [""]
        if self.photo_quality:
            lines += [f"## {text(self.lang, 'quality.title')}"] + [f"- {line}" for line in self.quality_lines()] + [""]
        lines += [f"## {h('causes')}", self.causes, "", f"## {h('treatment')}", self.treatment, "",
                  f"## {h('see_doctor')}", self.see_doctor, "", f"## {h('full')}"]
        for key, question in self.questions.items():
            lines += [f"**Q:** {question}", "", f"**A:** {self.answers[key]}", ""]
        return "\n".join(lines)


def consult(ask: Callable[[Conversation], str], image: ImageInput, steps: tuple[ConsultStep, ...] | None = None,
            lang: str = "en", ranking: Ranking | None = None, history: ClinicalHistory | None = None,
            quality: list[PhotoQuality] | None = None, details: VisitDetails | None = None,
            frame: Callable[[Conversation], Conversation] | None = None) -> ConsultationReport:
    """Walk the flow (by default the language's) over one photo; `ask(conversation)` returns the
    answer to its pending question (an engine's `answer`, bound to a session so that each step
    reuses the cache). A calibrated `ranking` (the bundle's differential head) joins the report; the
    clinical `history` goes into the prompt (see `model.clinical.history`), the warning signs and
    the report, with the photos' `quality` and the visit's `details`. `frame` reshapes each prompt's
    conversation before the history goes in (a follow-up's earlier photo, `model.visits.followup`)."""
    conversation = Conversation()
    answers: dict[str, str] = {}
    steps = steps or flow(lang)
    for n, step in enumerate(steps):
        conversation = conversation.ask(step.question, [image] if n == 0 else [])
        answers[step.key] = ask(with_history(frame(conversation) if frame else conversation, history)).strip()
        conversation = conversation.answer(answers[step.key])
    report = build_report(answers, {s.key: s.question for s in steps}, lang, history)
    report.photo_quality, report.details = list(quality or []), details
    if ranking is not None:
        report.differential, report.differential_uncertain = ranking.conditions, ranking.uncertain
    return report


# -- reading a report out of free text ------------------------------------------------------------

_NAMING = re.compile(
    r"\b(?:most likely|likely|probably|possibly|consistent with|suggestive of|suggests?|appears to be|looks like|"
    r"could be|may be|might be|diagnosis (?:is|of)|diagnosed as)\s+(?:an?\s+|the\s+)?([^.;:\n]+)"
    r"|(?:最可能是|很可能是|可能是|考虑为|考虑是|诊断为|诊断是|符合|提示为|疑似|看起来像|像是)\s*([^。；;：:，,\n]+)",
    re.IGNORECASE)
_DIFFERENTIAL = re.compile(r"\bdifferentials?(?: diagnos[ie]s)?(?: include| are| is)?:?\s+([^.\n]+)"
                           r"|鉴别诊断(?:包括|有|为)?[:：]?\s*([^。\n]+)", re.IGNORECASE)
_SPLIT = re.compile(r",\s*|\s+or\s+|\s+and\s+|[、，]|或者?|以及|和")


def _clean(phrase: str) -> str:
    phrase = re.split(r"\b(?:which|that|because|with|due to|caused by)\b|因为|由于|伴有", phrase, maxsplit=1)[0]
    return phrase.strip(" ,.-，。").strip()


def extract_diagnosis(text: str) -> tuple[str | None, list[str]]:
    """The first condition a text names, and the others it offers as alternatives."""
    names = [_clean(m.group(1) or m.group(2)) for m in _NAMING.finditer(text)]
    names = [n for n in names if n and len(n) <= 80]
    differentials: list[str] = []
    for m in _DIFFERENTIAL.finditer(text):
        differentials += [_clean(p) for p in _SPLIT.split(m.group(1) or m.group(2)) if _clean(p)]
    if not names and differentials:
        names = [differentials.pop(0)]
    diagnosis = names[0] if names else None
    if diagnosis and " or " in diagnosis:
        first, *rest = [_clean(p) for p in diagnosis.split(" or ")]
        diagnosis, differentials = first, rest + differentials
    others = [n for n in names[1:] + differentials if n.lower() != (diagnosis or "").lower()]
    return diagnosis, list(dict.fromkeys(others))


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+|(?<=[。！？])|\n+", text) if len(s.strip()) > 2]


def build_report(answers: dict[str, str], questions: dict[str, str], lang: str = "en",
                 history: ClinicalHistory | None = None) -> ConsultationReport:
    description = " ".join(answers.get(k, "") for k in ("describe", "features"))
    diagnosis, differentials = extract_diagnosis(answers.get("describe", "") or description)
    features = [s for s in _sentences(description) if not _NAMING.search(s)]
    full = "\n\n".join(f"Q: {questions[k]}\nA: {answers[k]}" for k in answers)
    return ConsultationReport(
        visible_features=features, diagnosis=diagnosis, differentials=differentials,
        causes=answers.get("causes", ""), treatment=answers.get("treatment", ""),
        see_doctor=answers.get("see_doctor") or text(lang, "report.default_see_doctor"),
        red_flags=red_flags(*answers.values(), lang=lang, also=history.warning_signs() if history else ()),
        answers=answers, questions=questions, full_text=full, disclaimer=text(lang, "disclaimer"), lang=lang,
        history=history)


def readable_time(created: str, lang: str) -> str:
    """ISO 8601 local time as a reader writes it: "6 December 2026, 13:51 (UTC+01:00)" or
    "2026年12月6日 13:51（UTC+01:00）"; a value that is not ISO is shown as it is."""
    from datetime import datetime

    try:
        when = datetime.fromisoformat(created)
    except ValueError:
        return created
    offset = when.strftime("%z")
    zone = f"UTC{offset[:3]}:{offset[3:]}" if offset else ""
    if lang == "zh":
        return f"{when.year}年{when.month}月{when.day}日 {when:%H:%M}" + (f"（{zone}）" if zone else "")
    months = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
              "November", "December")
    return f"{when.day} {months[when.month - 1]} {when.year}, {when:%H:%M}" + (f" ({zone})" if zone else "")


def readable_date(created: str, lang: str) -> str:
    """The date alone of an ISO 8601 time: "6 October 2026" or "2026年10月6日"."""
    from datetime import datetime

    when = datetime.fromisoformat(created)
    if lang == "zh":
        return f"{when.year}年{when.month}月{when.day}日"
    return readable_time(created, "en").split(",")[0]


def new_visit(model: str, photos: list[str] | None = None) -> VisitDetails:
    """The details of a report written now: local time, a fresh visit reference, the photo files."""
    import secrets
    from datetime import datetime

    now = datetime.now().astimezone()
    return VisitDetails(created=now.isoformat(timespec="minutes"),
                        visit=f"SG-{now:%Y%m%d}-{secrets.token_hex(3).upper()}", photos=photos or [], model=model)
