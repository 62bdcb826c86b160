"""Fitzpatrick skin types: parsing (1-6 or I-VI) and the groups results are broken down by."""

from __future__ import annotations

from typing import Any

_ROMAN = {"I": 1, "II": 2, "III": 3, "IV": 4, "V": 5, "VI": 6}
GROUPS = {"I-II": (1, 2), "III-IV": (3, 4), "V-VI": (5, 6)}


def parse(value: Any) -> Any:
    """'III' or ' iii ' -> 3; anything else is returned for the validator to judge (never a boolean,
    which Python would take as 0 or 1)."""
    if isinstance(value, bool):
        raise ValueError("Fitzpatrick skin type must be 1-6 (or I-VI), not true or false")
    if isinstance(value, str) and value.strip().upper() in _ROMAN:
        return _ROMAN[value.strip().upper()]
    return value


def check(value: int | None) -> int | None:
    if value is not None and not 1 <= value <= 6:
        raise ValueError("Fitzpatrick skin type must be 1-6 (or I-VI)")
    return value


def roman(value: int) -> str:
    """3 -> 'III'."""
    return next(name for name, number in _ROMAN.items() if number == value)


def group(value: int | None) -> str | None:
    return next((name for name, types in GROUPS.items() if value in types), None)
