"""Token ids in, text out, one token at a time, never half a character, never part of a stop string.

A byte-fallback tokenizer (Llama's SentencePiece) spells a CJK character or an emoji as three or
four byte tokens; decoding after each of them shows U+FFFD until the character is complete, and a
decode of the whole answer can then shrink. So the decoder holds undecodable bytes back *by token*:
it decodes a short window (the tokens since the last complete piece, plus the few before them for
context such as SentencePiece's word-start spaces) and releases text only once the window decodes
to something that does not end in a replacement character. The cost per token is a decode of a few
tokens, not of the whole answer.

Only printable text leaves: control characters (but newline and tab) and replacement characters for
bytes that formed no character are dropped, so none reaches the chat, JSON or a PDF.
"""

from __future__ import annotations

import re

REPLACEMENT = "\ufffd"
_HIDDEN = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ufffd]")


def printable(text: str) -> str:
    """`text` without control characters (newline and tab kept) or replacement characters."""
    return _HIDDEN.sub("", text)


class IncrementalDecoder:
    def __init__(self, tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # start of the context window
        self._read = 0  # tokens up to here have been released as text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens) if ids else ""

    def push(self, token: int) -> str:
        """Add one token; return the text it completes ('' while a character is still incomplete)."""
        self.ids.append(token)
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        if len(after) <= len(before) or after.endswith(REPLACEMENT):
            return ""  # an unfinished character: wait for its other bytes
        self._prefix, self._read = self._read, len(self.ids)
        return printable(after[len(before):])

    def flush(self) -> str:
        """What is still held back at the end; bytes that never formed a character are dropped."""
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        self._prefix = self._read = len(self.ids)
        return printable(after[len(before):])


def visible(text: str, stops: tuple[str, ...]) -> tuple[int, bool]:
    """How much of `text` may be shown: up to a stop string if one appeared (and then stop), else all
    but a tail that could still grow into a stop string. (Unfinished characters never reach here:
    the IncrementalDecoder holds them back.)"""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    if hits:
        return min(hits), True
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                hold = max(hold, k)
                break
    return len(text) - hold, False
