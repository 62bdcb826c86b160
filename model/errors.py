"""The one base class for errors whose message is meant for the person running SkinGPT, and how such a
message names a setting or a command.

The library does not know which front-end it runs under (the terminal, the web app, the API, a
Python caller), so its messages name a setting as `{setting:max_batch}` and a command as
`{command:quantize --mode q4_k_m}`. `str(err)` reads them as a library caller would ("the max_batch
setting", "SkinGPT's `quantize --mode q4_k_m` command"); the CLI spells them as its flags and
variables ("--max-batch / SKINGPT_MAX_BATCH", "`python launch.py quantize --mode q4_k_m`").
"""

from __future__ import annotations

import re

_MARK = re.compile(r"\{(setting|command):([^{}]+)\}")


def spell(message: str, cli: bool = False) -> str:
    """A library message with its settings and commands named for the reader (`cli`: the terminal)."""
    def one(match: re.Match) -> str:
        kind, name = match.groups()
        if kind == "setting":
            return f"--{name.replace('_', '-')} / SKINGPT_{name.upper()}" if cli else f"the {name} setting"
        return f"`python launch.py {name}`" if cli else f"SkinGPT's `{name}` command"

    return _MARK.sub(one, message)


class UserFacingError(Exception):
    """Says what happened and what to do; the CLI prints it without a traceback (exit status 2), the
    API answers it with `http_status` (400: the request cannot be answered as it stands)."""

    http_status = 400

    def __str__(self) -> str:
        return spell(super().__str__())

    def for_cli(self) -> str:
        return spell(super().__str__(), cli=True)
