"""JSONL files of pydantic records, read with a problem per bad line (file:line: what is wrong)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from model.clinical import fitzpatrick

Model = TypeVar("Model", bound=BaseModel)


class SkinTyped(BaseModel):
    """A record with an optional Fitzpatrick skin type, given as 1-6 or I-VI."""

    model_config = ConfigDict(extra="forbid")
    fitzpatrick: int | None = None

    _parse = field_validator("fitzpatrick", mode="before")(classmethod(lambda cls, v: fitzpatrick.parse(v)))
    _check = field_validator("fitzpatrick")(classmethod(lambda cls, v: fitzpatrick.check(v)))


def validation_message(err: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'record'}: {e['msg']}".replace("Value error, ", "")
                     for e in err.errors())


def read_jsonl(path: Path, schema: type[Model]) -> tuple[list[tuple[str, Model]], list[tuple[str, str]]]:
    """([(where, record)], [(where, problem)]) for every non-blank line; `where` is path:line."""
    records, problems = [], []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        where = f"{path}:{number}"
        if not line.strip():
            continue
        try:
            records.append((where, schema.model_validate(json.loads(line))))
        except json.JSONDecodeError as err:
            problems.append((where, f"not valid JSON ({err.msg}, column {err.colno})"))
        except ValidationError as err:
            problems.append((where, validation_message(err)))
    return records, problems
