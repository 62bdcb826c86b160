"""A label vocabulary with synonyms, and the ranked diagnoses a free-text answer names.

labels.yaml:
    classes:
      atopic dermatitis: [eczema, atopic eczema]
      psoriasis: [plaque psoriasis, psoriatic plaque]
      melanoma: [malignant melanoma]
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from model.clinical.consultation import extract_diagnosis
from model.errors import UserFacingError


class LabelError(UserFacingError, ValueError):
    """A label file or label that cannot be used."""


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


@dataclass(frozen=True)
class LabelSet:
    classes: tuple[str, ...]
    synonyms: dict[str, str]  # normalised name or synonym -> class

    @classmethod
    def from_yaml(cls, path: str | Path) -> LabelSet:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise LabelError(f"cannot read the label file {path}: {err}") from err
        raw = data.get("classes") if isinstance(data, dict) else None
        if isinstance(raw, list):
            raw = {name: [] for name in raw}
        if not isinstance(raw, dict) or not raw:
            raise LabelError(f"{path} must hold `classes:`, a mapping of class name to a list of synonyms")
        return cls.of(raw, where=str(path))

    @classmethod
    def of(cls, raw: dict[str, list[str] | None], where: str = "labels") -> LabelSet:
        synonyms: dict[str, str] = {}
        for name, words in raw.items():
            for word in [name, *(words or [])]:
                key = _norm(str(word))
                if key in synonyms and synonyms[key] != name:
                    raise LabelError(f"{where}: {word!r} is listed under both {synonyms[key]!r} and {name!r}")
                synonyms[key] = name
        return cls(tuple(raw), synonyms)

    def canonical(self, label: str) -> str:
        """A label as written in a manifest -> its class; unknown labels are an error."""
        try:
            return self.synonyms[_norm(label)]
        except KeyError:
            raise LabelError(f"unknown label {label!r}; known classes: {', '.join(self.classes)}") from None

    def mentions(self, text: str) -> list[str]:
        """Classes named in `text`, in order of first mention; the longest synonym wins an overlap
        ('seborrheic dermatitis' is not also 'dermatitis')."""
        norm = f" {_norm(text)} "
        found = []
        for key, cls in self.synonyms.items():
            for match in re.finditer(rf"(?<= ){re.escape(key)}(?= )", norm):
                found.append((match.start(), -len(key), match.end(), cls))
        taken, end = [], -1
        for start, _, stop, cls in sorted(found):
            if start >= end:
                taken.append(cls)
                end = stop
        return list(dict.fromkeys(taken))

    def ranked(self, answer: str) -> tuple[str, ...]:
        """Best first: classes in the stated diagnosis, then its differentials, then any other mention."""
        diagnosis, differentials = extract_diagnosis(answer)
        order = self.mentions(diagnosis or "")
        for phrase in differentials:
            order += self.mentions(phrase)
        order += self.mentions(answer)
        return tuple(dict.fromkeys(order))
