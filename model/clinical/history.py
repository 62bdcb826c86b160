"""The clinical history a dermatologist asks for first: age, sex, body site, duration, symptoms,
change, treatments tried, skin type and notes. Every field is optional.

One typed record everywhere (page form, API extension field, `--history FILE`, evaluation manifests),
validated by pydantic. It reaches the model in one fixed English form (`prompt_text`), put in front
of the first question, so that for the `skingpt4` template it sits in the first Human turn right
after the image:

    ###Human: <Img><ImageHere></Img> Patient details: age 54; sex female; body site back;
    for under a month; symptoms itch, bleeding; changed in size, colour; treatments tried: an
    emollient; Fitzpatrick skin type III; notes: it catches on clothing. <question>###Assistant:

Without a history (or with an empty one) the prompt is exactly the reference's.
"""

from __future__ import annotations

import re
from typing import Any, Literal, get_args

from pydantic import Field, field_validator

from model.clinical import fitzpatrick
from model.prompt.conversation import Conversation, Turn, neutralise_markers
from model.clinical.records import SkinTyped
from model.i18n.catalog import text

Sex = Literal["female", "male", "other"]
BodySite = Literal["scalp", "face", "ear", "mouth", "neck", "chest", "abdomen", "back", "arm", "hand", "groin",
                   "buttock", "leg", "foot", "nail", "other"]
Duration = Literal["days", "weeks", "months", "years"]
DURATION_WORDS = {"days": "under a week", "weeks": "under a month", "months": "under a year", "years": "a year or more"}
Symptom = Literal["itch", "pain", "bleeding", "oozing", "spreading", "fever"]
Change = Literal["size", "colour", "shape"]

SEXES, BODY_SITES, DURATIONS = get_args(Sex), get_args(BodySite), get_args(Duration)
SYMPTOMS, CHANGES = get_args(Symptom), get_args(Change)
MAX_FREE_TEXT = 300  # treatments tried, notes: each
CHANGE_AGE = 40  # from this age a changing spot raises the warning-sign notice
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f]+")
# zero-width, joiners, bidirectional embeddings, overrides and isolates, the BOM: nothing a reader sees
_INVISIBLE = re.compile(r"[\u00ad\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u2069\ufeff]")


class ClinicalHistory(SkinTyped):
    """Unknown fields are refused (a typo must not vanish silently); `fitzpatrick` takes 1-6 or I-VI."""

    age: int | None = Field(None, ge=0, le=120)
    sex: Sex | None = None
    body_site: BodySite | None = None
    duration: Duration | None = None
    symptoms: list[Symptom] = Field(default_factory=list, max_length=len(SYMPTOMS))
    changes: list[Change] = Field(default_factory=list, max_length=len(CHANGES))
    treatments: str = Field("", max_length=MAX_FREE_TEXT)
    notes: str = Field("", max_length=MAX_FREE_TEXT)

    @field_validator("age", mode="before")
    @classmethod
    def _whole_years(cls, value: Any) -> Any:
        """A number of years: an int, a whole float (the page's number box) or digits ("54"); never a
        boolean, which Python would take as 0 or 1."""
        if isinstance(value, bool):
            raise ValueError("age must be a number of years, not true or false")
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and value.strip().isdigit():
            return int(value.strip())
        return value

    @field_validator("treatments", "notes")
    @classmethod
    def _one_line(cls, value: str) -> str:
        """One line of plain text: no control, zero-width or direction-override characters, and none
        of any template's role markers or the image placeholder (the text cannot pose as a turn)."""
        return " ".join(neutralise_markers(_UNPRINTABLE.sub(" ", _INVISIBLE.sub("", value))).split())

    @field_validator("symptoms", "changes")
    @classmethod
    def _once_each(cls, values: list[str]) -> list[str]:
        return list(dict.fromkeys(values))

    def is_empty(self) -> bool:
        return self == ClinicalHistory()

    def prompt_text(self) -> str:
        """The fixed English form the model reads ('' when empty); see the module's note."""
        fields = (("age {}", self.age), ("sex {}", self.sex), ("body site {}", self.body_site),
                  ("for {}", DURATION_WORDS.get(self.duration or "")), ("symptoms {}", ", ".join(self.symptoms)),
                  ("changed in {}", ", ".join(self.changes)), ("treatments tried: {}", self.treatments),
                  ("Fitzpatrick skin type {}", self.fitzpatrick and fitzpatrick.roman(self.fitzpatrick)), ("notes: {}", self.notes))
        parts = [form.format(value) for form, value in fields if value not in (None, "")]
        return f"Patient details: {'; '.join(parts)}." if parts else ""

    def lines(self, lang: str = "en") -> list[str]:
        """'label: value' lines in a language, for the report."""
        t = lambda key: text(lang, f"history.{key}")  # noqa: E731
        rows = [("age", None if self.age is None else str(self.age)),
                ("sex", self.sex and t(f"sexes.{self.sex}")),
                ("body_site", self.body_site and t(f"sites.{self.body_site}")),
                ("duration", self.duration and t(f"durations.{self.duration}")),
                ("symptoms", ", ".join(t(f"symptom_names.{s}") for s in self.symptoms)),
                ("changes", ", ".join(t(f"change_names.{c}") for c in self.changes)),
                ("treatments", self.treatments), ("fitzpatrick", self.fitzpatrick and fitzpatrick.roman(self.fitzpatrick)),
                ("notes", self.notes)]
        return [f"{t(key)}: {value}" for key, value in rows if value]

    def warning_signs(self) -> list[str]:
        """Red-flag reason ids (`model.clinical.safety.RED_FLAGS`) the history itself raises: bleeding,
        fever, a spot that changed at 40 or over, and spreading within days."""
        keys = []
        if "bleeding" in self.symptoms:
            keys.append("bleeding")
        if "fever" in self.symptoms:
            keys.append("fever")
        if self.changes and self.age is not None and self.age >= CHANGE_AGE:
            keys.append("changing_mole")
        if "spreading" in self.symptoms and self.duration == "days":
            keys.append("rapid_growth")
        return keys



def with_history(conversation: Conversation, history: ClinicalHistory | None) -> Conversation:
    """The conversation the model is shown: the history's `prompt_text` in front of the first
    question (after that turn's image). Unchanged without a history."""
    if history is None or history.is_empty() or not conversation.turns:
        return conversation
    first = conversation.turns[0]
    lead = Turn(f"{history.prompt_text()} {first.question}", first.images, first.answer)
    return Conversation((lead,) + conversation.turns[1:])
