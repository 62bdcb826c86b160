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

from model.clinical.consultation import readable_date
from model.clinical.conversation import Conversation, ImageInput

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
        raise RecordsError(f"visit {visit} is not one of patient {patient}'s; `launch.py records list --patient "
                           f"{patient}` shows theirs")
    own = [data for photo, data in zip(record.photos, jpegs) if photo.from_visit is None]
    if not own:
        raise RecordsError(f"visit {visit} holds no photo of its own to compare with")
    return Earlier(record.visit, record.created, own[0], ImageInput.of(decode_photo(own[0]).image))
