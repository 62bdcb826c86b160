"""Warning signs that call for prompt medical attention, spotted in a question or an answer.

Kept small and explicit: each entry is a pattern and the plain-language reason shown to the user.
The app shows a red-flag notice when any of them appears; the report lists them.
"""

from __future__ import annotations

import re

RED_FLAGS: tuple[tuple[str, str], ...] = (
    (r"\b(changing|changed|new|evolving)\b.{0,30}\b(mole|nevus|naevus|spot|lesion)\b|\b(mole|nevus|naevus|spot|lesion)\b.{0,30}\b(chang\w*|evolv\w*)",
     "a mole or spot that is new or changing"),
    (r"\bbleed\w*|\bblood\w*", "bleeding"),
    (r"\b(rapid\w*|fast|quick\w*)\b.{0,20}\b(grow\w*|enlarg\w*|spread\w*)|\bgrowing (rapidly|fast|quickly)",
     "rapid growth or spread"),
    (r"\bmelanoma\b|\bcarcinoma\b|\bmalignan\w*|\bcancer\w*", "a possible skin cancer"),
    (r"\bulcer\w*|\bsore that (does not|doesn't|won't) heal|\bnon-?healing\b", "a sore or ulcer that does not heal"),
    (r"\bfever\w*|\bchills\b", "fever with a rash"),
    (r"\b(swollen|swelling)\b.{0,20}\b(face|lips?|tongue|throat)|\bdifficult\w* (breathing|swallowing)",
     "swelling of the face or throat, or trouble breathing"),
    (r"\b(blister\w*|peeling)\b.{0,30}\b(widespread|large areas?|mouth|eyes?)|\bskin (is )?peeling off\b",
     "widespread blistering or peeling"),
    (r"\b(red streak|spreading redness|hot,? (red|painful))", "spreading redness or warmth (possible infection)"),
    (r"\bsevere pain\b|\bvery painful\b", "severe pain"),
)

_COMPILED = tuple((re.compile(p, re.IGNORECASE), reason) for p, reason in RED_FLAGS)

URGENT_ADVICE = ("Please have this seen by a doctor promptly; if you have trouble breathing, facial swelling, a high "
                 "fever or rapidly spreading skin changes, seek emergency care.")

DISCLAIMER = ("SkinGPT gives decision support, not a diagnosis. Its answers can be wrong; a qualified clinician "
              "must examine the skin and decide.")


def red_flags(*texts: str) -> list[str]:
    """The reasons whose pattern appears in any of the texts, in table order, without repeats."""
    joined = "\n".join(texts)
    return [reason for pattern, reason in _COMPILED if pattern.search(joined)]
