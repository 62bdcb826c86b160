"""Prompt ids as our engine makes them, from ids vLLM made of the whole rendered chat (no vLLM import:
the app's tests check it against `model.nn.skingpt.tokenize_prompt` in the app's own environment).

Our engine tokenises the text around each image placeholder as a piece of its own, so every piece
starts as a fresh text does (SentencePiece's leading "▁"); vLLM tokenises the rendered chat as one
string, in which the text after the BOS and after each placeholder starts mid-string.
"""

from __future__ import annotations

from typing import Any


def retokenize_pieces(tokenizer: Any, ids: list[int], placeholder: int) -> list[int]:
    """The ids tokenising each piece of text apart would give: the piece after a leading BOS and
    each piece after a placeholder, up to the next placeholder, decoded and tokenised afresh."""
    head = ids[:1] if ids and ids[0] == tokenizer.bos_token_id else []
    out = list(head)
    piece: list[int] = []
    for token in ids[len(head):] + [None]:
        if token is None or token == placeholder:
            if piece:
                text = tokenizer.decode(piece, skip_special_tokens=False, clean_up_tokenization_spaces=False)
                out += tokenizer(text, add_special_tokens=False).input_ids
            piece = []
            if token is not None:
                out.append(token)
        else:
            piece.append(token)
    return out
