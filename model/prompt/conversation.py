"""Immutable conversations and prompt templates as plain data.

A bundle names its template (`prompt_template` in skingpt.yaml); nothing here looks at model
names. Stop strings are matched on decoded text, because `###` has more than one tokenisation.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field, replace

from PIL import Image

from model.errors import UserFacingError


class ConversationError(UserFacingError, ValueError):
    """A conversation that cannot be rendered (unknown template, nothing to answer)."""


@dataclass(frozen=True)
class Template:
    """How turns become prompt text. `{image}` marks where a turn's images go."""

    name: str
    system: str  # written once, before the first turn
    human: str  # a question: format with text=...
    assistant: str  # an answered turn: format with text=...
    prompt_end: str  # what the prompt ends with, for the model to continue
    image: str  # one image: the placeholder inside its markers
    stop: tuple[str, ...]  # stop strings, matched on decoded text
    first_human: str | None = None  # the first question, where the system text sits inside it


# The reference demo's system sentence, exactly: the released SkinGPT-4 / MiniGPT-4 weights were trained
# and demoed with it, so converted weights must see it word for word (`<Img>ImageContent</Img>` is text,
# not a placeholder).
REFERENCE_SYSTEM = ("Give the following image: <Img>ImageContent</Img>. You will be able to see the image once I "
                    "provide it to you. Please answer my questions.")

# Our own wording, for bundles a clinic trains with it (template "assistant", and Llama-2-chat).
SYSTEM = ("You are a dermatology assistant. You will see a photo of skin once it is given. Describe what "
          "you see and answer the questions; your answers support, and never replace, a clinician.")

# The `###Human` / `###Assistant` format the released SkinGPT-4 and MiniGPT-4 weights were trained with.
_HASH_ROLES = Template(
    name="skingpt4", system=REFERENCE_SYSTEM,
    human="###Human: {text}", assistant="###Assistant: {text}", prompt_end="###Assistant:",
    image="<Img><ImageHere></Img>", stop=("###",))

TEMPLATES: dict[str, Template] = {
    "skingpt4": _HASH_ROLES,
    # The same format with our own system sentence, for bundles trained with it.
    "assistant": replace(_HASH_ROLES, name="assistant", system=SYSTEM),
    # Another SkinGPT-4 config: `### Instruction:` / `### Response:`, the same `###` stop.
    "instruction": Template(
        name="instruction", system="",
        human="### Instruction: {text} ", assistant="### Response: {text} ", prompt_end="### Response: ",
        image="<Img><ImageHere></Img>", stop=("###",)),
    # Llama-2-chat, for bundles trained with it.
    "llama2": Template(
        name="llama2", system="",
        human="[INST] {text} [/INST]", assistant=" {text} </s><s>", prompt_end="",
        image="<Img><ImageHere></Img>", stop=("[INST]",),
        first_human="[INST] <<SYS>>\n" + SYSTEM + "\n<</SYS>>\n\n{text} [/INST]"),
}


# What any template uses to mark a turn, a role, the system text or an image (and the stop strings):
# text a user typed must not carry them (`neutralise_markers`; a test holds this to TEMPLATES).
_MARKER = re.compile(r"#{2,}|\[/?INST\]|<</?SYS>>|</?s>|</?Img>|<ImageHere>", re.IGNORECASE)


def neutralise_markers(text: str) -> str:
    """Text that cannot pose as a turn: every template's markers (`###`, `[INST]`, `<<SYS>>`, `</s>`,
    `<Img>`, the image placeholder) taken out, until none is left (removing one can join another)."""
    before = None
    while before != text:
        before, text = text, _MARKER.sub(" ", text)
    return text


def template(name: str) -> Template:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ConversationError(f"unknown prompt template {name!r} in the bundle; known: "
                                f"{', '.join(TEMPLATES)}") from None


@dataclass(frozen=True)
class ImageInput:
    """A decoded image and a key derived from its pixels (the engine caches embeddings by key)."""

    image: Image.Image = field(compare=False, repr=False)
    key: str

    @classmethod
    def of(cls, image: Image.Image) -> ImageInput:
        digest = hashlib.sha256(image.mode.encode() + str(image.size).encode() + image.tobytes()).hexdigest()
        return cls(image=image, key=digest[:32])


@dataclass(frozen=True)
class Turn:
    question: str
    images: tuple[ImageInput, ...] = ()
    answer: str | None = None  # None: the turn awaiting an answer


@dataclass(frozen=True)
class Conversation:
    """A consultation: turns in order, each with its question, images, and answer once given."""

    turns: tuple[Turn, ...] = ()

    def ask(self, question: str, images: tuple[ImageInput, ...] | list[ImageInput] = ()) -> Conversation:
        if self.turns and self.turns[-1].answer is None:
            raise ConversationError("the last question has no answer yet; answer it (or drop it) first")
        return Conversation(self.turns + (Turn(question, tuple(images)),))

    def answer(self, text: str) -> Conversation:
        if not self.turns or self.turns[-1].answer is not None:
            raise ConversationError("there is no open question to answer")
        return Conversation(self.turns[:-1] + (replace(self.turns[-1], answer=text),))

    def drop_last(self) -> Conversation:
        """The conversation without its last turn (to regenerate an answer)."""
        return Conversation(self.turns[:-1])

    @property
    def images(self) -> tuple[ImageInput, ...]:
        return tuple(img for turn in self.turns for img in turn.images)

    @property
    def pending(self) -> Turn | None:
        return self.turns[-1] if self.turns and self.turns[-1].answer is None else None


def render_turn(tpl: Template, turn: Turn, keep_text: bool = True, first: bool = False) -> str:
    """One turn as prompt text. Without `keep_text` only its images remain (context budget)."""
    human = tpl.first_human if first and tpl.first_human else tpl.human
    images = " ".join(tpl.image for _ in turn.images)
    if not keep_text:
        return human.format(text=images)
    question = f"{images} {turn.question}" if images else turn.question
    text = human.format(text=question)
    if turn.answer is not None:
        text += tpl.assistant.format(text=turn.answer)
    return text


def render(tpl: Template, conversation: Conversation, dropped: frozenset[int] = frozenset()) -> str:
    """The prompt for the pending turn; turns whose index is in `dropped` keep only their images."""
    if conversation.pending is None:
        raise ConversationError("the conversation has no question to answer")
    kept = [(i, t) for i, t in enumerate(conversation.turns) if i not in dropped or t.images]
    body = "".join(render_turn(tpl, t, keep_text=i not in dropped, first=n == 0) for n, (i, t) in enumerate(kept))
    return tpl.system + body + tpl.prompt_end


def training_segments(tpl: Template, conversation: Conversation) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, is_target) pieces whose concatenation is exactly
    what `render` shows the model at inference, each answer followed by the stop string.

    Targets are the answers and the stop string after each (so the model learns to stop); the
    system text, questions, images and role markers are context only.
    """
    if not conversation.turns or any(t.answer is None for t in conversation.turns):
        raise ConversationError("a training conversation needs an answer for every question")
    stop = tpl.stop[0]
    pieces: list[tuple[str, bool]] = []
    carry = tpl.system
    for n, turn in enumerate(conversation.turns):
        human = render_turn(tpl, replace(turn, answer=None), first=n == 0)
        if n and human.startswith(stop):
            human = human[len(stop):]  # the previous answer's target already ended with it
        answered = tpl.assistant.format(text=turn.answer)
        if not answered.startswith(tpl.prompt_end):
            raise ConversationError(f"template {tpl.name!r}: the answer must follow its prompt_end")
        pieces.append((carry + human + tpl.prompt_end, False))
        pieces.append((answered[len(tpl.prompt_end):] + stop, True))
        carry = ""
    return pieces
