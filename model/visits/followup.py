"""A returning patient's follow-up: today's photo beside an earlier visit's, both dated in the prompt.

The two photos sit in the first turn as the reference template's two-image form (one placeholder per
photo, in order), the earlier one first, and one fixed English sentence after them dates each:

    ###Human: <Img><ImageHere></Img> <Img><ImageHere></Img> Photo 1 is from the last visit on
    6 October 2026; photo 2 is from today, 7 December 2026. <question>###Assistant:

A change the answer reports (grown, darker, a new feature) is a warning sign: a changing spot is the
strongest reason to have it seen (`changed_since_last_visit`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from typing import Iterable

from model.clinical.consultation import readable_date
from model.prompt.conversation import Conversation, ImageInput
from model.clinical.history import ClinicalHistory, with_history

RED_FLAG = "changed_since_last_visit"  # a key of the catalogue's red_flags
_CHANGE = re.compile(r"\b(larger|bigger|grown|grew|growing|increased?|enlarg\w*|darker|darkened|lighter|new|"
                     r"changed|change in|irregular|spread\w*|raised|bleed\w*)\b"
                     r"|变大|增大|长大|变黑|加深|变深|新出现|新的|不规则|扩大|扩散|改变|变化", re.IGNORECASE)
_NO_CHANGE = re.compile(r"\b(no|not|without|hasn't|has not|have not|did not|didn't|unchanged|stable|same)\b"
                        r"|没有|无明显|未见|不变|稳定|相同", re.IGNORECASE)


def dating(earlier: str, today: str) -> str:
    """The sentence that dates the two photos (English: the model reads one fixed form)."""
    return f"Photo 1 is from the last visit on {readable_date(earlier, 'en')}; photo 2 is from today, {readable_date(today, 'en')}."


def with_comparison(conversation: Conversation, earlier: ImageInput, earlier_date: str, today: str) -> Conversation:
    """The conversation with the earlier photo before the first turn's own, and the dating sentence."""
    if not conversation.turns:
        return conversation
    first = conversation.turns[0]
    lead = replace(first, images=(earlier,) + first.images, question=f"{dating(earlier_date, today)} {first.question}")
    return Conversation((lead,) + conversation.turns[1:])


def changed_since_last_visit(answer: str) -> bool:
    """Does an answer about the two photos report a change? A sentence naming one without a denial."""
    sentences = re.split(r"(?<=[.!?;])\s+|[。！？；\n]", answer)
    return any(_CHANGE.search(s) and not _NO_CHANGE.search(s) for s in sentences)


@dataclass(frozen=True)
class Earlier:
    """The earlier visit's photo a follow-up is compared with."""

    visit: str
    created: str
    jpeg: bytes = field(repr=False)
    image: ImageInput = field(repr=False)


def earlier_photo(store, patient: str, visit: str) -> Earlier:
    """The first photo of its own of one of this patient's earlier visits (RecordsError otherwise)."""
    from model.images.decode import decode_photo
    from model.visits.vault import RecordsError

    record, jpegs = store.load(visit)
    if record.patient != patient:
        raise RecordsError(f"visit {visit} is not one of patient {patient}'s; {{command:records list --patient "
                           f"{patient}}} shows theirs")
    own = [data for photo, data in zip(record.photos, jpegs) if photo.from_visit is None]
    if not own:
        raise RecordsError(f"visit {visit} holds no photo of its own to compare with")
    return Earlier(record.visit, record.created, own[0], ImageInput.of(decode_photo(own[0]).image))


def shown_to_model(conversation: Conversation, history: ClinicalHistory | None, earlier: Earlier | None,
                   today: str) -> Conversation:
    """A consultation as the model reads it: the earlier visit's photo first on a follow-up (both dated),
    and the clinical history in front of the first question."""
    if earlier is not None:
        conversation = with_comparison(conversation, earlier.image, earlier.created, today)
    return with_history(conversation, history)


def more_signs(history: ClinicalHistory | None, earlier: Earlier | None, answers: Iterable[str]) -> list[str]:
    """Warning-sign ids beyond what the texts themselves say (`red_flags`' `also`): the history's, and on a
    follow-up a change one of `answers` reports since the last visit."""
    keys = history.warning_signs() if history else []
    if earlier is not None and any(changed_since_last_visit(a) for a in answers):
        keys = keys + [RED_FLAG]
    return keys


def visit_record(*, reference: str, created: str, taken: str, patient: str, lang: str, model: str,
                 images: list[ImageInput], qualities: list, turns: list[tuple[str, str]],
                 history: ClinicalHistory | None = None, ranking=None, red_flags: list[str] = (), report=None,
                 earlier: Earlier | None = None, name: str = ""):
    """(the Visit, its JPEGs) to store, from any front-end's consultation: the earlier visit's photo first
    on a follow-up, then the consultation's own (`taken` then, each with its quality, None if unknown)."""
    from model.visits.visit import SavedPhoto, SavedTurn, Visit, jpeg

    known = list(qualities)[:len(images)]
    photos = [SavedPhoto(taken=taken, quality=q) for q in known + [None] * (len(images) - len(known))]
    jpegs = [jpeg(image.image) for image in images]
    if earlier is not None:
        photos.insert(0, SavedPhoto(taken=earlier.created, from_visit=earlier.visit))
        jpegs.insert(0, earlier.jpeg)
    visit = Visit(visit=reference, patient=patient, name=name, created=created, lang=lang, model=model,
                  history=history, photos=photos, turns=[SavedTurn(question=q, answer=a) for q, a in turns],
                  differential=ranking.conditions if ranking else None, red_flags=list(red_flags), report=report,
                  compared_with=earlier.visit if earlier else None)
    return visit, jpegs
