"""Warning signs that call for prompt medical attention, spotted in a question or an answer.

Kept small and explicit: each entry is a pattern and the plain-language reason shown to the user.
The app shows a red-flag notice when any of them appears; the report lists them.
"""

from __future__ import annotations

import re

from model.i18n.catalog import text

# (reason id, English pattern, Chinese pattern): both are always looked for, whatever the page's
# language, so a Chinese answer on an English page still raises the notice.
RED_FLAGS: tuple[tuple[str, str, str], ...] = (
    ("changing_mole",
     r"\b(changing|changed|new|evolving)\b.{0,30}\b(mole|nevus|naevus|spot|lesion)\b|\b(mole|nevus|naevus|spot|lesion)\b.{0,30}\b(chang\w*|evolv\w*)",
     r"(痣|斑点|色斑|皮损).{0,8}(变|新长|新出现)|(新长|新出现|变化|改变|变大|变黑).{0,8}(痣|斑点|色斑)"),
    ("bleeding", r"\bbleed\w*|\bblood\w*", r"出血|流血|渗血"),
    ("rapid_growth",
     r"\b(rapid\w*|fast|quick\w*)\b.{0,20}\b(grow\w*|enlarg\w*|spread\w*)|\bgrowing (rapidly|fast|quickly)",
     r"(迅速|快速|很快|突然).{0,4}(增大|长大|生长|扩散|蔓延)|长得(很|太)?快"),
    ("cancer", r"\bmelanoma\b|\bcarcinoma\b|\bmalignan\w*|\bcancer\w*", r"黑色素瘤|癌|恶性"),
    ("ulcer", r"\bulcer\w*|\bsore that (does not|doesn't|won't) heal|\bnon-?healing\b", r"溃疡|不愈合|长期不好|久治不愈"),
    ("fever", r"\bfever\w*|\bchills\b", r"发烧|发热|高烧|寒战"),
    ("swelling",
     r"\b(swollen|swelling)\b.{0,20}\b(face|lips?|tongue|throat)|\bdifficult\w* (breathing|swallowing)",
     r"(脸|面部|嘴唇|舌头|喉咙|咽喉).{0,6}肿|呼吸困难|吞咽困难|喘不过气"),
    ("blistering",
     r"\b(blister\w*|peeling)\b.{0,30}\b(widespread|large areas?|mouth|eyes?)|\bskin (is )?peeling off\b",
     r"(大面积|广泛|全身).{0,6}(水疱|水泡|起疱|脱皮)|皮肤(大片)?脱落"),
    ("infection", r"\b(red streak|spreading redness|hot,? (red|painful))", r"红线|红肿热痛|发红.{0,4}(扩散|蔓延)"),
    ("pain", r"\bsevere pain\b|\bvery painful\b", r"剧痛|剧烈疼痛|非常疼|疼得厉害"),
)

# raised only through `also`, never by a pattern: a change since the last visit, which a follow-up's
# answer reports (model.visits.followup decides; the words alone would also match the question)
RAISED_BY_CALLER = ("changed_since_last_visit",)

_COMPILED = tuple((key, re.compile(f"{en}|{zh}", re.IGNORECASE)) for key, en, zh in RED_FLAGS)

URGENT_ADVICE = text("en", "urgent_advice")
DISCLAIMER = text("en", "disclaimer")


def red_flags(*texts: str, lang: str = "en", also: tuple[str, ...] | list[str] = ()) -> list[str]:
    """The reasons (in `lang`) whose pattern appears in any of the texts, or whose id is in `also`
    (what a clinical history raises), in table order, without repeats."""
    joined = "\n".join(texts)
    found = [key for key, pattern in _COMPILED if key in also or pattern.search(joined)]
    return [text(lang, f"red_flags.{key}") for key in found + [k for k in RAISED_BY_CALLER if k in also]]


# how each language lists, ends a sentence and introduces (Chinese: the enumeration comma, full stop, colon)
_PUNCTUATION = {"zh": ("、", "。", "："), "en": (", ", ". ", ": ")}


def red_flag_advice(flags: list[str], lang: str = "en") -> str:
    """The signs found and what to do about them, in one wording everywhere (page, report, PDF, CLI)."""
    comma, stop, _ = _PUNCTUATION.get(lang, _PUNCTUATION["en"])
    return f"{comma.join(flags)}{stop}{text(lang, 'urgent_advice')}"


def red_flag_notice(flags: list[str], lang: str = "en", markdown: bool = True) -> str:
    """The warning-sign notice: its label, then `red_flag_advice`."""
    label, colon = text(lang, "messages.warning_signs"), _PUNCTUATION.get(lang, _PUNCTUATION["en"])[2]
    if markdown:  # bold closed before the colon: CommonMark's flanking rule beside full-width punctuation
        return f"**{label}**{colon}{red_flag_advice(flags, lang)}"
    return f"{label}{colon}{red_flag_advice(flags, lang)}"
