"""Translations as data: one YAML file per language in `locales/`, the same keys in each.

`text("zh", "report.title")` looks a key up (dots go into sections), with `{name}` fields filled
from keyword arguments. English is the fallback only for a language this build does not have.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

LOCALES = Path(__file__).parent / "locales"
LANGUAGES = ("en", "zh")
DEFAULT = "en"


@lru_cache(maxsize=None)
def strings(lang: str) -> dict[str, Any]:
    return yaml.safe_load((LOCALES / f"{lang if lang in LANGUAGES else DEFAULT}.yaml").read_text(encoding="utf-8"))


def text(lang: str, key: str, **fields: Any) -> str:
    value: Any = strings(lang)
    for part in key.split("."):
        value = value[part]
    return value.format(**fields) if fields else value


def pick(*preferences: str | None) -> str:
    """The first supported language among preferences such as 'zh-CN', 'zh_TW.UTF-8', 'en-GB,en;q=0.9'."""
    for preference in preferences:
        for item in (preference or "").replace("_", "-").split(","):
            code = item.split(";")[0].strip().split("-")[0].lower()
            if code in LANGUAGES:
                return code
    return DEFAULT
