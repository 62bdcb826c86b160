"""The one streaming decode path: image cache, KV cache reuse, batching, sampling, stop holdback, cancel.

The app, the CLI, evaluation and benchmarks all decode through `Engine.stream`; a non-streaming
answer is a join of it. Answers in progress are decoded together by one scheduler thread
(`scheduler.py`): a caller's `Generation` prepares its prompt and image embeddings in the caller's
thread, hands the request over, and streams the text pieces the scheduler produces.

Each session keeps the KV cache of what it has already fed the model, together with the
`slots` that describe it (a token id, or `image-key:j` for the j-th query embedding of an image).
A new prompt is compared slot by slot with what is cached; only the differing tail is prefilled.
Idle sessions' caches are kept within a byte budget, least recently used dropped first; a dropped
session simply prefills its whole prompt next time.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterator, Union

import torch

from model.weights.bundle import LoadedBundle
from model.nn.config import GenerationConfig
from model.clinical.conversation import Conversation, ConversationError, ImageInput, Template, render, template
from model.images.preprocess import preprocess
from model.nn.skingpt import IMAGE_TOKEN_ID, tokenize_prompt
from model.serving.kv_cache import KVCache, new_cache
from model.serving.scheduler import DONE, Request, Scheduler

Slot = Union[int, str]  # a token id, or "<image key>:<j>" for an image's j-th query position


@dataclass
class _Session:
    cache: KVCache | None  # the LLM's KV cache (None while the batch holds it)
    slots: list[Slot] = field(default_factory=list)  # exactly what `cache` holds
    busy: bool = False  # an answer is decoding into this cache (or was left open by its consumer)


@dataclass
class GenerationStats:
    prompt_tokens: int = 0  # positions in the prompt, image slots included
    reused_tokens: int = 0  # of those, already in the session's KV cache
    prefill_tokens: int = 0  # of those, run through the model now
    new_tokens: int = 0
    time_to_first_token_s: float = 0.0  # from the call, queueing and image encoding included
    decode_s: float = 0.0
    dropped_turns: tuple[int, ...] = ()
    token_times: list[float] = field(default_factory=list)  # perf_counter() as each token was sampled

    @property
    def decode_tokens_per_s(self) -> float:
        return (self.new_tokens - 1) / self.decode_s if self.new_tokens > 1 and self.decode_s > 0 else 0.0


class Generation:
    """An answer being streamed: iterate it for text pieces (or `events()` for the queue position
    too); afterwards read `text`, `finish_reason` (stop | eos | length | cancelled) and `notices`."""

    def __init__(self, engine: Engine, conversation: Conversation, session: str | None,
                 settings: GenerationConfig, seed: int | None, cancel: threading.Event | None,
                 fixed_length: bool = False, stop: tuple[str, ...] = (), prefix_cache: str | None = None) -> None:
        self.text = ""
        self.tokens: list[int] = []  # generated token ids (EOS excluded)
        self.finish_reason: str | None = None
        self.notices: list[str] = []
        self.stats = GenerationStats()
        self._args = (conversation, session, settings, seed, cancel, fixed_length, stop, prefix_cache)
        self._engine, self._request = engine, None
        self._events = self._run()
        self._texts = (value for kind, value in self._events if kind == "text")

    def __iter__(self) -> Iterator[str]:
        return self._texts

    def __next__(self) -> str:
        return next(self._texts)

    def events(self) -> Iterator[tuple[str, object]]:
        """("queued", place in the waiting line) while waiting for a batch slot, then ("text", piece)s."""
        return self._events

    def _run(self) -> Iterator[tuple[str, object]]:
        self._request = self._engine._submit(self, *self._args)
        while (item := self._request.out.get()) is not DONE:
            if isinstance(item, BaseException):
                raise item
            yield ("queued", item[1]) if isinstance(item, tuple) else ("text", item)

    def close(self) -> None:
        """Stop early (the consumer went away); the session's cache stays valid. Safe from any
        thread, also while another thread waits for the next piece."""
        if self._request is not None and self.finish_reason is None:
            self._request.closed.set()
            self._engine.scheduler.poke()
        try:
            self._events.close()
        except ValueError:
            pass  # being iterated in another thread: it ends as soon as the scheduler lets go

    def __del__(self) -> None:  # a consumer that dropped the stream without closing it frees its slot
        request = getattr(self, "_request", None)
        if request is not None and self.finish_reason is None:
            request.closed.set()


class Engine:
    def __init__(self, loaded: LoadedBundle, max_batch: int = 8, kv_cache_bytes: int | None = None,
                 prefill_chunk: int | None = None, max_images: int = 64) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.config = loaded.config
        self.template: Template = template(self.config.prompt_template)
        self.device = self.model.llm.get_input_embeddings().weight.device
        self.device_lock = threading.Lock()  # one forward at a time on the device
        self._sessions: OrderedDict[str, _Session] = OrderedDict()
        self._images: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._registry_lock = threading.Lock()
        self.max_images = max_images
        self.kv_cache_bytes = kv_cache_bytes if kv_cache_bytes is not None else default_kv_budget(self.device)
        # A prefill chunk is what a streaming answer may wait between two of its tokens: on a CPU 64
        # positions of the `small` preset take about 0.5 s; a GPU prefills 512 in milliseconds.
        chunk = prefill_chunk or (512 if self.device.type == "cuda" else 64)
        self.scheduler = Scheduler(self, max_batch, chunk)

    @property
    def max_batch(self) -> int:
        return self.scheduler.max_batch

    # -- public API ------------------------------------------------------------------------------
    def stream(self, conversation: Conversation, *, session: str | None = None, seed: int | None = None,
               cancel: threading.Event | None = None, fixed_length: bool = False, stop: tuple[str, ...] = (),
               prefix_cache: str | None = None, **overrides) -> Generation:
        """Stream the answer to the conversation's pending question. `session` names a KV cache to
        reuse across turns (None: a fresh one). Without a name, `prefix_cache` (a name prefix) picks
        the idle cache of that family sharing the longest prefix with this prompt, as a stateless API
        needs: a follow-up that repeats the history prefills only its new tail. `stop` adds stop
        strings to the template's; `overrides` replace generation defaults; `fixed_length`
        (benchmarks) ignores EOS and stop strings and always runs max_new_tokens."""
        try:
            settings = dataclasses.replace(self.config.generation, **overrides)
        except TypeError as err:
            raise ConversationError(f"unknown generation setting: {err}") from None
        return Generation(self, conversation, session, settings, seed, cancel, fixed_length, tuple(stop), prefix_cache)

    def answer(self, conversation: Conversation, **kwargs) -> str:
        return "".join(self.stream(conversation, **kwargs))

    def forget(self, session: str) -> None:
        """Drop a session's KV cache (a new patient, or the session ended)."""
        with self._registry_lock:
            self._sessions.pop(session, None)

    def forget_images(self, keys: list[str] | None = None) -> None:
        """Drop cached image embeddings: the given keys, or all."""
        with self._registry_lock:
            for key in list(self._images) if keys is None else keys:
                self._images.pop(key, None)

    def encode(self, image: ImageInput) -> torch.Tensor:
        """(Q, D) embeddings of one image, computed once and cached by its pixel key."""
        with self._registry_lock:
            if image.key in self._images:
                self._images.move_to_end(image.key)
                return self._images[image.key]
        pixels = preprocess(image.image, self.config.preprocess).unsqueeze(0)  # (1, 3, S, S)
        with self.device_lock:
            embeds = self.model.encode_image(pixels)[0]  # (Q, D)
        with self._registry_lock:
            self._images[image.key] = embeds
            while len(self._images) > self.max_images:
                self._images.popitem(last=False)
        return embeds

    def rank(self, images: list[ImageInput]):
        """The bundle's calibrated differential for 1-3 photos of one case, or None without a head."""
        head = self.loaded.differential
        if head is None:
            return None
        from model.clinical.differential import image_features

        pixels = torch.stack([preprocess(image.image, self.config.preprocess) for image in images])  # (N, 3, S, S)
        with self.device_lock:
            features = image_features(self.model, pixels.to(self.device), head.feature)  # (N, F)
        return head.rank(features)

    def cached_bytes(self) -> int:
        """Bytes of KV cache held for idle sessions."""
        with self._registry_lock:
            return sum(s.cache.nbytes() for s in self._sessions.values() if s.cache is not None and not s.busy)

    # -- prompt ------------------------------------------------------------------------------------
    def prompt_slots(self, conversation: Conversation, budget: int) -> tuple[list[Slot], list[ImageInput], tuple[int, ...]]:
        """Slots of the prompt that fits `budget`, dropping the text of the oldest turns first (never
        an image, never the pending question)."""
        dropped: list[int] = []
        droppable = [i for i, t in enumerate(conversation.turns[:-1])]
        while True:
            text = render(self.template, conversation, frozenset(dropped))
            ids = tokenize_prompt(self.tokenizer, text, self.config.image_placeholder,
                                  self.config.qformer.num_query_tokens)
            if len(ids) <= budget or not droppable:
                break
            dropped.append(droppable.pop(0))
        if len(ids) > budget:
            raise ConversationError(
                f"the question and images need {len(ids)} context positions but only {budget} are available "
                f"({self.config.generation.max_context} minus room for the answer); shorten the question, "
                f"or start a new consultation")
        images = list(conversation.images)
        slots, run = [], 0
        for pos, token in enumerate(ids):
            if token == IMAGE_TOKEN_ID:
                key = images[run // self.config.qformer.num_query_tokens].key
                slots.append(f"{key}:{run % self.config.qformer.num_query_tokens}")
                run += 1
            else:
                slots.append(token)
        return slots, images, tuple(dropped)

    @staticmethod
    def reusable(cached: list[Slot], slots: list[Slot]) -> int:
        """How many leading positions of `slots` the cache holding `cached` can keep."""
        reuse = min(_common_prefix(cached, slots), len(slots) - 1)  # the last position must run to give logits
        while reuse > 0 and isinstance(slots[reuse], str) and not slots[reuse].endswith(":0"):
            reuse -= 1  # never start inside an image's run
        return reuse

    # -- requests ----------------------------------------------------------------------------------
    def _submit(self, gen: Generation, conversation: Conversation, session_name: str | None,
                settings: GenerationConfig, seed: int | None, cancel: threading.Event | None,
                fixed_length: bool, stop: tuple[str, ...], prefix_cache: str | None) -> Request:
        """In the caller's thread: the prompt, the image embeddings, a cache; then the scheduler's turn."""
        start = time.perf_counter()
        if conversation.pending is None:
            raise ConversationError("the conversation has no question to answer")
        budget = min(settings.max_context, self.config.llm.max_position_embeddings) - settings.max_new_tokens
        slots, images, dropped = self.prompt_slots(conversation, budget)
        if dropped:
            gen.stats.dropped_turns = dropped
            gen.notices.append(f"The conversation is longer than the model's context: the text of the "
                               f"{len(dropped)} oldest turn(s) was left out of this answer (photos kept).")
        embeds = {img.key: self.encode(img) for img in images}
        sampler = _Sampler(settings, seed, self.device, [s for s in slots if isinstance(s, int)])
        stops, eos = ((), None) if fixed_length else (self.template.stop + stop, self.tokenizer.eos_token_id)
        if session_name is None and prefix_cache is not None:
            session_name = self._closest(prefix_cache, slots)
        request = Request(gen, self._claim(session_name), slots, embeds, sampler, stops, eos, settings.max_new_tokens,
                          cancel, self.tokenizer, start)
        self.scheduler.submit(request)
        return request

    def _claim(self, name: str | None) -> _Session:
        """The session's cache, marked busy for one answer. A cache still busy belongs to an answer
        whose consumer went away without closing it (a cancelled request, a closed tab): waiting for
        it could wait forever, so the session gets a fresh cache and re-prefills once."""
        if name is None:
            return _Session(new_cache(), busy=True)
        with self._registry_lock:
            session = self._sessions.get(name)
            if session is None or session.busy or session.cache is None:
                session = self._sessions[name] = _Session(new_cache())
            session.busy = True
            self._sessions.move_to_end(name)
            return session

    def _closest(self, family: str, slots: list[Slot]) -> str:
        """The idle session of `family` whose cache shares the most leading positions with `slots`,
        or a new name in the family when none shares any."""
        with self._registry_lock:
            best, name = 0, None
            for key, session in self._sessions.items():
                if key.startswith(family) and not session.busy and session.cache is not None:
                    shared = _common_prefix(session.slots, slots)
                    if shared > best:
                        best, name = shared, key
            return name or f"{family}{os.urandom(8).hex()}"

    def enforce_budget(self) -> None:
        """Drop idle sessions' caches, least recently used first, until they fit `kv_cache_bytes`."""
        with self._registry_lock:
            idle = [(name, s) for name, s in self._sessions.items() if not s.busy and s.cache is not None]
            total = sum(s.cache.nbytes() for _, s in idle)
            for name, session in idle:  # oldest first
                if total <= self.kv_cache_bytes:
                    break
                total -= session.cache.nbytes()
                del self._sessions[name]


def default_kv_budget(device: torch.device) -> int:
    """A third of the device memory free now (of available RAM on a CPU), at least 256 MiB."""
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            free = 2**32
    return max(free // 3, 256 * 2**20)


class _Sampler:
    """Greedy, or sampling through transformers' logits processors (repetition penalty, temperature,
    top-k, top-p), with a generator of its own: a seeded answer does not depend on anything else."""

    def __init__(self, settings: GenerationConfig, seed: int | None, device: torch.device, prompt_ids: list[int]):
        from transformers import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                  TopKLogitsWarper, TopPLogitsWarper)

        s = settings
        self.do_sample = s.do_sample
        self.processors = LogitsProcessorList()
        if s.repetition_penalty != 1.0:
            self.processors.append(RepetitionPenaltyLogitsProcessor(s.repetition_penalty))
        if s.do_sample:
            if s.temperature != 1.0:
                self.processors.append(TemperatureLogitsWarper(s.temperature))
            if s.top_k:
                self.processors.append(TopKLogitsWarper(s.top_k))
            if s.top_p < 1.0:
                self.processors.append(TopPLogitsWarper(s.top_p))
        self.seen = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # (1, L): what the penalty sees
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(7), "big"))

    def __call__(self, logits: torch.Tensor) -> int:
        scores = logits.float().unsqueeze(0)  # (1, V)
        if self.processors:
            scores = self.processors(self.seen, scores)
        if self.do_sample:
            token = int(torch.multinomial(scores.softmax(-1)[0], 1, generator=self.generator))
        else:
            token = int(scores[0].argmax())
        if self.processors:
            self.seen = torch.cat([self.seen, self.seen.new_tensor([[token]])], dim=1)
        return token


def _common_prefix(a: list[Slot], b: list[Slot]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
