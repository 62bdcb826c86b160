"""Token ids in, text out, one token at a time, never half a character.

A byte-fallback tokenizer (Llama's SentencePiece) spells a CJK character or an emoji as three or
four byte tokens; decoding after each of them shows U+FFFD until the character is complete, and a
decode of the whole answer can then shrink. So the decoder holds undecodable bytes back *by token*:
it decodes a short window (the tokens since the last complete piece, plus the few before them for
context such as SentencePiece's word-start spaces) and releases text only once the window decodes
to something that does not end in a replacement character. The cost per token is a decode of a few
tokens, not of the whole answer.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"


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
        return after[len(before):]

    def flush(self) -> str:
        """What is still held back at the end; bytes that never formed a character are dropped."""
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        self._prefix = self._read = len(self.ids)
        return after[len(before):].rstrip(REPLACEMENT)
