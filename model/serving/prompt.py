"""A conversation as the prompt the model is fed: slots that fit the context, oldest text dropped first."""

from __future__ import annotations

from model.clinical.conversation import Conversation, ConversationError, ImageInput, Template, render
from model.nn.skingpt import IMAGE_TOKEN_ID, tokenize_prompt
from model.serving.requests import ImageSlot, Slot


class PromptBuilder:
    def __init__(self, template: Template, tokenizer, placeholder: str, queries: int, max_context: int) -> None:
        self.template, self.tokenizer = template, tokenizer
        self.placeholder, self.queries, self.max_context = placeholder, queries, max_context

    def slots(self, conversation: Conversation, budget: int) -> tuple[list[Slot], list[ImageInput], tuple[int, ...]]:
        """Slots of the prompt that fits `budget`, dropping the text of the oldest turns first (never
        an image, never the pending question); the images in order, and the dropped turns."""
        dropped: list[int] = []
        droppable = list(range(len(conversation.turns) - 1))
        while True:
            text = render(self.template, conversation, frozenset(dropped))
            ids = tokenize_prompt(self.tokenizer, text, self.placeholder, self.queries)
            if len(ids) <= budget or not droppable:
                break
            dropped.append(droppable.pop(0))
        if len(ids) > budget:
            raise ConversationError(
                f"the question and images need {len(ids)} context positions but only {budget} are available "
                f"({self.max_context} minus room for the answer); shorten the question, or start a new consultation")
        images = list(conversation.images)
        slots: list[Slot] = []
        run = 0
        for token in ids:
            if token == IMAGE_TOKEN_ID:
                slots.append(ImageSlot(images[run // self.queries].key, run % self.queries))
                run += 1
            else:
                slots.append(token)
        return slots, images, tuple(dropped)
