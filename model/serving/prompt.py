"""A conversation as the prompt the model is fed: positions that fit the context, oldest text dropped first.

Building a prompt costs time linear in what it keeps, never in what the caller sent: turns are
weighed newest first, each tokenised once and alone, and the weighing stops at the first turn that
no longer fits (every older turn keeps only its photos, untokenised text and all). A text longer
than the budget times the tokenizer's longest piece cannot fit, so it is never tokenised at all.
The kept prompt is then rendered and tokenised once; where joining turns moved a token boundary
past the budget, the oldest kept turn goes too.
"""

from __future__ import annotations

from dataclasses import replace

from PIL import Image

from model.prompt.conversation import Conversation, ConversationError, ImageInput, Template, Turn, render, render_turn
from model.nn.skingpt import IMAGE_TOKEN_ID, tokenize_prompt
from model.serving.requests import ImagePosition, Position
from model.serving.sessions import common_prefix


def context_budget(max_context: int, max_positions: int, max_new_tokens: int) -> int:
    """Prompt positions an answer leaves room for: the context (at most the LLM's), less the answer."""
    return min(max_context, max_positions) - max_new_tokens


def dropped_notice(turns: int) -> str:
    """What the caller is told when the oldest turns' text was left out for room."""
    return (f"The conversation is longer than the model's context: the text of the {turns} oldest turn(s) was "
            f"left out of this answer (photos kept).")


class PromptBuilder:
    def __init__(self, template: Template, tokenizer, placeholder: str, queries: int, max_context: int) -> None:
        self.template, self.tokenizer = template, tokenizer
        self.placeholder, self.queries, self.max_context = placeholder, queries, max_context
        pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        self.longest_piece = max(len(p) for p in pieces if p)  # characters one token can cover, at most
        self.base = len(self._ids(template.system + template.prompt_end))  # BOS, system text, the end marker

    def positions(self, conversation: Conversation, budget: int) -> tuple[list[Position], list[ImageInput], tuple[int, ...]]:
        """Positions of the prompt that fits `budget`, dropping the text of the oldest turns first (never
        an image, never the pending question); the images in order, and the dropped turns."""
        turns = tuple(self.plain(t) for t in conversation.turns)
        conversation = Conversation(turns)
        last = len(turns) - 1
        photos_only = [self._cost(render_turn(self.template, t, keep_text=False)) if t.images else 0 for t in turns]
        older_photos = [0] * len(turns)  # positions the photos of turns before i take, text dropped
        for i in range(1, len(turns)):
            older_photos[i] = older_photos[i - 1] + photos_only[i - 1]
        question = self._cost(render_turn(self.template, turns[last], first=last == 0), budget)
        if question >= budget:
            raise self._too_long(f"at least {question + 1}", budget)
        used, keep_from = self.base + question, last
        while keep_from > 0:
            turn = turns[keep_from - 1]
            cost = self._cost(render_turn(self.template, turn, first=keep_from == 1), budget - used)
            if used + cost + older_photos[keep_from - 1] > budget:
                break
            used += cost
            keep_from -= 1
        # Turns weighed alone may take a position more or less than joined: settle on the exact count.
        kept, ids = keep_from, self._rendered(conversation, keep_from)
        if len(ids) > budget:
            while len(ids) > budget and kept < last:
                kept += 1
                ids = self._rendered(conversation, kept)
        else:
            while kept > 0 and len(more := self._rendered(conversation, kept - 1)) <= budget:
                kept, ids = kept - 1, more
        dropped = list(range(kept))
        if len(ids) > budget:
            raise self._too_long(str(len(ids)), budget)
        images = list(conversation.images)
        positions: list[Position] = []
        run = 0
        for token in ids:
            if token == IMAGE_TOKEN_ID:
                positions.append(ImagePosition(images[run // self.queries].key, run % self.queries))
                run += 1
            else:
                positions.append(token)
        return positions, images, tuple(dropped)

    def opening(self) -> list[Position]:
        """The positions every consultation's prompt opens with, whatever is asked: BOS, the system text
        and the first question's words before its photo (what two first turns with a photo share)."""
        photo = ImageInput(Image.new("RGB", (1, 1)), key="opening")
        first, second = (self.positions(Conversation().ask(question, [photo]), self.max_context)[0]
                         for question in ("a", "b"))
        shared = first[:common_prefix(first, second)]
        photo_at = next((i for i, p in enumerate(shared) if isinstance(p, ImagePosition)), len(shared))
        return shared[:photo_at]

    def _too_long(self, needed: str, budget: int) -> ConversationError:
        return ConversationError(
            f"the question and images need {needed} context positions but only {budget} are available "
            f"({self.max_context} minus room for the answer); shorten the question, or start a new consultation")

    def _rendered(self, conversation: Conversation, dropped: int) -> list[int]:
        """The prompt's ids with the text of the `dropped` oldest turns left out."""
        return self._ids(render(self.template, conversation, frozenset(range(dropped))))

    def _ids(self, text: str) -> list[int]:
        return tokenize_prompt(self.tokenizer, text, self.placeholder, self.queries)

    def _cost(self, text: str, room: int | None = None) -> int:
        """Positions `text` takes on its own; past `room`, any number over it, without tokenising
        a text that could not fit anyway."""
        placeholders = len(self.placeholder) * text.count(self.placeholder)
        if room is not None and len(text) - placeholders > (room + 1) * self.longest_piece:
            return room + 1
        return len(self._ids(text)) - 1  # without BOS

    def plain(self, turn: Turn) -> Turn:
        """A turn whose text cannot pose as an image: the placeholder typed by a user is only text."""
        token = self.placeholder
        if token not in turn.question and token not in (turn.answer or ""):
            return turn
        mute = token.strip("<>")
        return replace(turn, question=turn.question.replace(token, mute),
                       answer=None if turn.answer is None else turn.answer.replace(token, mute))
