"""What the scheduler works on: prompt positions, one answer's request, and the events it emits.

A prompt is a list of positions: a token id, or an `ImagePosition` (the j-th query embedding of an image).
(Not "slots": in llama.cpp's server a slot is a sequence being served, which here is a `Request`.)
A `Request` holds one answer's decoding state; the scheduler thread alone changes it. Its consumer
reads events from `out`, a thread-safe queue: `Queued` while it waits for a batch place, `Text` as
pieces become visible, and then exactly one `Finished` or `Failed`.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import NamedTuple, Union

import torch

from model.serving.detokenize import IncrementalDecoder, visible
from model.serving.sampler import Sampler

log = logging.getLogger("skingpt.engine")


class ImagePosition(NamedTuple):
    key: str  # the image's pixel key
    index: int  # which of its query embeddings (0 .. Q-1)


Position = Union[int, ImagePosition]


def starts_image(position: Position) -> bool:
    return isinstance(position, ImagePosition) and position.index == 0


def inside_image(position: Position) -> bool:
    """A position that may not start a chunk or a reused prefix: the middle of an image's run."""
    return isinstance(position, ImagePosition) and position.index != 0


@dataclass
class GenerationStats:
    prompt_tokens: int = 0  # positions in the prompt, image positions included
    reused_tokens: int = 0  # of those, already in the session's cache
    shared_tokens: int = 0  # of those, the opening every prompt starts with, computed once for all
    prefill_tokens: int = 0  # of those, run through the model now
    new_tokens: int = 0
    time_to_first_token_s: float = 0.0  # from the call, queueing and image encoding included
    decode_s: float = 0.0
    dropped_turns: tuple[int, ...] = ()
    token_times: list[float] = field(default_factory=list)  # perf_counter() as each token was sampled

    @property
    def decode_tokens_per_s(self) -> float:
        return (self.new_tokens - 1) / self.decode_s if self.new_tokens > 1 and self.decode_s > 0 else 0.0


@dataclass(frozen=True)
class Queued:
    place: int  # 1: next to be admitted


@dataclass(frozen=True)
class Text:
    piece: str
    tokens: int  # generated so far


@dataclass(frozen=True)
class Finished:
    reason: str  # stop | eos | length | cancelled | timeout
    tokens: tuple[int, ...]  # generated ids, EOS excluded
    stats: GenerationStats


@dataclass(frozen=True)
class Failed:
    error: BaseException


Event = Union[Queued, Text, Finished, Failed]


class Request:
    """One answer's decoding state. The scheduler thread alone touches it, except `out` (the queue
    the consumer reads) and the two events, which any thread may set."""

    def __init__(self, session, positions: list[Position], embeds: dict[str, torch.Tensor], sampler: Sampler,
                 stops: tuple[str, ...], eos: int | None, max_new_tokens: int, cancel: threading.Event | None,
                 tokenizer, start: float, stats: GenerationStats, deadline: float | None = None) -> None:
        self.session, self.positions, self.embeds = session, positions, embeds
        self.sampler, self.stops, self.eos, self.max_new_tokens = sampler, stops, eos, max_new_tokens
        self.cancel, self.closed = cancel, threading.Event()
        self.deadline = deadline  # time.perf_counter() past which the answer stops ("timeout")
        self.decoder = IncrementalDecoder(tokenizer)
        self.out: queue.Queue[Event] = queue.Queue()
        self.start, self.decode_start = start, None
        self.stats = stats
        self.tokens: list[int] = []
        self.fed: int | None = None  # prompt positions in the session's cache (None: prefill not begun)
        self.next_token: int | None = None  # sampled, not yet fed
        self.text, self.emitted = "", 0
        self.position = 0  # place in the waiting queue, as last told
        self.reason: str | None = None  # why it finished

    @property
    def stopped(self) -> bool:
        return self.stop_reason is not None

    @property
    def stop_reason(self) -> str | None:
        """Why the answer must end now: "cancelled" (its consumer or a cancel event), "timeout"
        (past its deadline), or None."""
        if self.closed.is_set() or (self.cancel is not None and self.cancel.is_set()):
            return "cancelled"
        if self.deadline is not None and time.perf_counter() > self.deadline:
            return "timeout"
        return None

    def tell_place(self, place: int) -> None:
        if self.position != place:
            self.position = place
            self.out.put(Queued(place))

    def accept(self, token: int) -> bool:
        """Take a sampled token: stream its text; True when the answer is complete."""
        now = time.perf_counter()
        self.stats.token_times.append(now)
        if self.decode_start is None:
            self.decode_start = now
            self.stats.time_to_first_token_s = now - self.start
        if token == self.eos:
            return self.finish("eos")
        self.tokens.append(token)
        self.stats.new_tokens = len(self.tokens)
        self.text += self.decoder.push(token)
        shown, stopped = visible(self.text, self.stops)
        self._emit(shown)
        if stopped:
            return self.finish("stop")
        if len(self.tokens) >= self.max_new_tokens:
            return self.finish("length")
        if self.stopped:
            return self.finish(self.stop_reason)
        self.next_token = token
        return False

    def finish(self, reason: str) -> bool:
        """The answer is complete: what was held back for a stop string is text after all, unless a
        stop string ended it. Returns True. (`tell_finished` tells the consumer, once its session is
        free for the next turn.)"""
        if reason == "cancelled":
            log.info("answer cancelled after %d tokens", len(self.tokens))
        if reason != "stop":
            self.text += self.decoder.flush()
            self._emit(len(self.text))
        self.stats.decode_s = time.perf_counter() - (self.decode_start or self.start)
        self.reason = reason
        return True

    def tell_finished(self) -> None:
        self.out.put(Finished(self.reason, tuple(self.tokens), self.stats))

    def fail(self, err: BaseException) -> None:
        self.out.put(Failed(err))

    def _emit(self, upto: int) -> None:
        if upto > self.emitted:
            self.out.put(Text(self.text[self.emitted:upto], len(self.tokens)))
            self.emitted = upto
