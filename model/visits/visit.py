"""What a saved visit holds, as typed records (the store seals them; the FHIR export reads them)."""

from __future__ import annotations

import io
import re
import time

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, field_validator

from model.clinical.consultation import ConsultationReport
from model.clinical.history import ClinicalHistory
from model.clinical.ranking import RankedCondition
from model.images.quality import PhotoQuality

MAX_REFERENCE = 64
_REFERENCE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]*")
THUMBNAIL_SIDE = 160  # pixels, the long side of a visit's thumbnail in the patient's list


def check_reference(value: str, what: str = "patient reference") -> str:
    """A clinic's own reference (e.g. clinic-0042): letters, digits and . _ : / -, at most 64."""
    value = value.strip()
    if not value or len(value) > MAX_REFERENCE or not _REFERENCE.fullmatch(value):
        raise ValueError(f"a {what} is 1 to {MAX_REFERENCE} letters, digits or . _ : / - (e.g. clinic-0042), "
                         f"not {value[:MAX_REFERENCE]!r}")
    return value


class SavedPhoto(BaseModel):
    """One photo of a visit (its JPEG is stored apart): when it was taken and how good it is."""

    model_config = ConfigDict(extra="forbid")
    taken: str  # ISO 8601, local, to the minute: the visit's time, or the earlier visit's for a comparison photo
    quality: PhotoQuality | None = None
    from_visit: str | None = None  # a photo shown for comparison: the earlier visit it belongs to


class SavedTurn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    question: str
    answer: str


class Visit(BaseModel):
    """A consultation as the clinic keeps it. `patient` is the clinic's own reference; `name` is optional."""

    model_config = ConfigDict(extra="forbid")
    visit: str  # the visit reference the report quotes (SG-YYYYMMDD-XXXXXX)
    patient: str
    name: str = Field("", max_length=200)
    created: str  # ISO 8601 local time, to the minute, with its UTC offset
    lang: str = "en"
    model: str = ""
    history: ClinicalHistory | None = None
    photos: list[SavedPhoto] = []
    turns: list[SavedTurn] = []
    differential: list[RankedCondition] | None = None
    red_flags: list[str] = []  # in the visit's language
    report: ConsultationReport | None = None
    compared_with: str | None = None  # the earlier visit whose photo this one was compared with

    _patient = field_validator("patient")(classmethod(lambda cls, v: check_reference(v)))


class VisitSummary(BaseModel):
    """What the patient's list shows without opening the visit: date, site, warning signs, a thumbnail."""

    model_config = ConfigDict(extra="forbid", ser_json_bytes="base64", val_json_bytes="base64")
    visit: str
    patient: str
    created: str
    saved: float = 0.0  # when it was stored (seconds since the epoch): orders visits made in the same minute
    body_site: str | None = None
    red_flags: list[str] = []
    photos: int = 0
    thumbnail: bytes = b""  # a small JPEG of the visit's first photo of its own

    @classmethod
    def of(cls, visit: Visit, jpegs: list[bytes]) -> VisitSummary:
        own = [jpeg for photo, jpeg in zip(visit.photos, jpegs) if photo.from_visit is None]
        return cls(visit=visit.visit, patient=visit.patient, created=visit.created, saved=time.time(),
                   body_site=visit.history.body_site if visit.history else None, red_flags=visit.red_flags,
                   photos=len(jpegs), thumbnail=thumbnail(own[0]) if own else b"")


def jpeg(image: Image.Image, quality: int = 90) -> bytes:
    """A photo as it is stored: RGB JPEG, no EXIF or other metadata (PIL writes none unless asked)."""
    out = io.BytesIO()
    image.convert("RGB").save(out, "JPEG", quality=quality)
    return out.getvalue()


def thumbnail(data: bytes) -> bytes:
    with Image.open(io.BytesIO(data)) as image:
        image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
        return jpeg(image, quality=80)
