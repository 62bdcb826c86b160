"""The one streaming decode path, and the object that owns serving's parts.

The app, the CLI, evaluation and benchmarks all decode through `Engine.stream`; a non-streaming
answer is a join of it. In the caller's thread `stream` builds the prompt (`prompt`), gets the image
embeddings (`image_cache`), claims a session (`sessions`) and hands a `Request` to the scheduler; the
`Generation` it returns streams, filling itself from that request's events (`requests`). The
scheduler thread decodes every answer in progress together through the model runner (`runner`).
`EngineOptions` and `open_engine` are the one way the app and the CLI build an engine.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol

import torch

from model.prompt.conversation import Conversation, ConversationError, ImageInput, Template, template
from model.nn.differential import Ranking
from model.images.preprocess import preprocess
from model.nn.config import GenerationConfig, SkinGPTConfig
from model.serving.image_cache import ImageCache
from model.serving.prompt import PromptBuilder, context_budget, dropped_notice
from model.serving.requests import Failed, Finished, GenerationStats, Queued, Request, Text
from model.serving.runner import ModelRunner, TorchRunner
from model.serving.sampler import Sampler
from model.serving.scheduler import Scheduler
from model.serving.sessions import SessionCache
from model.weights.bundle import LoadedBundle, load_bundle
from model.weights.policy import LoadPolicy, cpu_advice


class Answer(Protocol):
    """What a front-end reads of an answer being streamed: `Generation` here, and the remote engine's."""

    text: str
    tokens: list[int]  # generated token ids, once finished
    finish_reason: str | None  # stop | eos | length | cancelled | timeout, once finished
    notices: list[str]
    stats: GenerationStats

    def __iter__(self) -> Iterator[str]: ...

    def events(self) -> Iterator[tuple[str, object]]:
        """("queued", place) while waiting for a batch slot, then ("text", piece)s."""

    def close(self) -> None:
        """Stop early; safe from any thread."""


class AnswerEngine(Protocol):
    """What the app and the API ask of an engine: `Engine` here, `app.remote_engine.RemoteEngine`
    (a vLLM server) there, or a test's stand-in; each has every one of these."""

    config: SkinGPTConfig
    request_timeout_s: float | None

    @property
    def max_batch(self) -> int: ...

    def stream(self, conversation: Conversation, **kwargs) -> Answer: ...

    def answer(self, conversation: Conversation, **kwargs) -> str: ...

    def forget(self, session: str) -> None: ...

    def forget_images(self, keys: list[str] | None = None) -> None: ...

    def rank(self, images: list[ImageInput]) -> Ranking | None:
        """The bundle's calibrated differential, or None (no head, or no encoder here)."""


class Generation:
    """An answer being streamed: iterate it for text pieces (or `events()` for the queue position
    too); afterwards read `text`, `tokens`, `finish_reason` (stop | eos | length | cancelled |
    timeout), `stats` and `notices`. The consumer's thread fills it from the request's events;
    `close` may come from any thread (the API's disconnect watcher, a Stop)."""

    def __init__(self, request: Request, poke: Callable[[], None], notices: list[str]) -> None:
        self.finish_reason: str | None = None
        self._request, self._poke = request, poke  # poke: wake the scheduler (it ends a closed request)
        self.text = ""
        self.tokens: list[int] = []  # generated token ids (EOS excluded), once finished
        self.produced = 0  # tokens generated so far
        self.notices = notices
        self.stats = request.stats
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
        while True:
            event = self._request.out.get()
            if isinstance(event, Text):
                self.text += event.piece
                self.produced = event.tokens
                yield "text", event.piece
            elif isinstance(event, Queued):
                yield "queued", event.place
            elif isinstance(event, Finished):
                self.finish_reason, self.tokens, self.stats = event.reason, list(event.tokens), event.stats
                self.produced = len(self.tokens)
                return
            elif isinstance(event, Failed):
                raise event.error

    def close(self) -> None:
        """Stop early (the consumer went away); the session's cache stays valid. Safe from any
        thread, also while another thread waits for the next piece."""
        if self.finish_reason is None:
            self._request.closed.set()
            self._poke()
            self.finish_reason = "cancelled"  # the scheduler ends it so at its next step
        try:
            self._events.close()
        except ValueError:
            pass  # being iterated in another thread: it ends as soon as the scheduler lets go

    def __del__(self) -> None:  # a consumer that dropped the stream without closing it frees its slot
        if self.finish_reason is None:
            self._request.closed.set()


class Engine:
    def __init__(self, loaded: LoadedBundle, max_batch: int = 8, kv_cache_bytes: int | None = None,
                 prefill_chunk: int | None = None, max_images: int = 64, runner: ModelRunner | None = None,
                 request_timeout_s: float | None = None, hold: Callable[[], bool] | None = None) -> None:
        self.loaded = loaded
        self.request_timeout_s = request_timeout_s  # an answer, queue wait included, ends "timeout" after this
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.config = loaded.config
        self.template: Template = template(self.config.prompt_template)
        self.device_lock = threading.Lock()  # one forward at a time on the device
        self.runner = runner or make_runner(loaded, self.device_lock, max_batch, kv_cache_bytes)
        self.device = self.runner.device
        self.prompt = PromptBuilder(self.template, self.tokenizer, self.config.image_placeholder,
                                    self.config.qformer.num_query_tokens, self.config.generation.max_context)
        self.images = ImageCache(self._encode, max_images)
        budget = self.runner.kv_bytes  # a fixed pool (llama.cpp) is its own budget
        if budget is None:
            budget = kv_cache_bytes if kv_cache_bytes is not None else default_kv_budget(
                self.device, self._full_cache_bytes(max_batch))
        self.sessions = SessionCache(self.runner.new_state, budget, self.runner.free)
        chunk = prefill_chunk or self.runner.prefill_chunk  # what an answer may wait between two tokens
        self.scheduler = Scheduler(self.runner, self.sessions, max_batch, chunk, hold)  # hold: a test hook
        self.scheduler.keep_opening(self.prompt.opening())

    def _full_cache_bytes(self, max_batch: int) -> int:
        """What the consultations the pool is for can use at most: as many as llama.cpp's pool keeps,
        each at the model's whole context, in its own dtype."""
        from model.serving.llama_runner import kept_sequences, kv_bytes_per_position

        dtype = next((p.dtype for p in self.model.parameters() if p.is_floating_point()), torch.float16)
        element = {torch.float32: "f32"}.get(dtype, "f16")  # bf16 and fp16 caches are 2 bytes; int8 LLMs keep float caches
        return kept_sequences(max_batch) * self.config.context * kv_bytes_per_position(self.config.llm, element)

    @property
    def max_batch(self) -> int:
        return self.scheduler.max_batch

    @property
    def kv_cache_bytes(self) -> int:
        return self.sessions.budget_bytes

    # -- public API ------------------------------------------------------------------------------
    def stream(self, conversation: Conversation, *, session: str | None = None, seed: int | None = None,
               cancel: threading.Event | None = None, fixed_length: bool = False, stop: tuple[str, ...] = (),
               prefix_cache: str | None = None, **overrides) -> Generation:
        """Stream the answer to the conversation's pending question. `session` names a KV cache to
        reuse across turns (None: a fresh one). Without a name, `prefix_cache` (a name prefix) picks
        the idle cache of that family sharing the longest prefix with this prompt, as a stateless API
        needs: a follow-up that repeats the history prefills only its new tail. `stop` adds stop
        strings to the template's; `overrides` replace generation defaults (`SamplingSettings.
        overrides()` makes them from a user's choice); `fixed_length` (benchmarks) ignores EOS and
        stop strings and always runs max_new_tokens."""
        try:
            settings = dataclasses.replace(self.config.generation, **overrides)
        except TypeError as err:
            raise ConversationError(f"unknown generation setting: {err}") from None
        notices: list[str] = []
        request = self._request(conversation, session, settings, seed, cancel, fixed_length, tuple(stop),
                                prefix_cache, notices)
        self.scheduler.submit(request)
        return Generation(request, self.scheduler.poke, notices)

    def answer(self, conversation: Conversation, **kwargs) -> str:
        return "".join(self.stream(conversation, **kwargs))

    def forget(self, session: str) -> None:
        """Drop a session's KV cache (a new patient, or the session ended)."""
        self.sessions.forget(session)

    def forget_images(self, keys: list[str] | None = None) -> None:
        """Drop cached image embeddings: the given keys, or all."""
        self.images.forget(keys)

    def encode(self, image: ImageInput) -> torch.Tensor:
        """(Q, D) embeddings of one image, computed once and cached by its pixel key."""
        return self.images.get(image)

    def _encode(self, image: ImageInput) -> torch.Tensor:
        pixels = preprocess(image.image, self.config.preprocess).unsqueeze(0)  # (1, 3, S, S)
        with self.device_lock:
            return self.model.encode_image(pixels)[0]  # (Q, D)

    def rank(self, images: list[ImageInput]) -> Ranking | None:
        """The bundle's calibrated differential for 1-3 photos of one case, or None without a head."""
        head = self.loaded.differential
        if head is None:
            return None
        from model.nn.differential import image_features

        pixels = torch.stack([preprocess(image.image, self.config.preprocess) for image in images])  # (N, 3, S, S)
        with self.device_lock:
            features = image_features(self.model, pixels.to(self.device), head.feature)  # (N, F)
        return head.rank(features)

    def cached_bytes(self) -> int:
        """Bytes of KV cache held for idle sessions."""
        return self.sessions.idle_bytes()

    def close(self) -> None:
        """Stop the scheduler's thread and free the runner (what llama.cpp holds)."""
        self.scheduler.stop()
        self.runner.close()

    # -- requests ----------------------------------------------------------------------------------
    def _request(self, conversation: Conversation, session_name: str | None, settings: GenerationConfig,
                 seed: int | None, cancel: threading.Event | None, fixed_length: bool, stop: tuple[str, ...],
                 prefix_cache: str | None, notices: list[str]) -> Request:
        """In the caller's thread: the prompt, the image embeddings, a session, as one ready request."""
        start = time.perf_counter()
        if conversation.pending is None:
            raise ConversationError("the conversation has no question to answer")
        budget = context_budget(settings.max_context, self.config.llm.max_position_embeddings, settings.max_new_tokens)
        positions, images, dropped = self.prompt.positions(conversation, budget)
        stats = GenerationStats(dropped_turns=dropped)
        if dropped:
            notices.append(dropped_notice(len(dropped)))
        embeds = {img.key: self.encode(img) for img in images}
        sampler = Sampler(settings, seed, self.device, [s for s in positions if isinstance(s, int)])
        stops, eos = ((), None) if fixed_length else (self.template.stop + stop, self.tokenizer.eos_token_id)
        if session_name is None and prefix_cache is not None:
            session_name = self.sessions.closest(prefix_cache, positions)
        deadline = start + self.request_timeout_s if self.request_timeout_s is not None else None
        return Request(self.sessions.claim(session_name), positions, embeds, sampler, stops, eos,
                       settings.max_new_tokens, cancel, self.tokenizer, start, stats, deadline)


@dataclass(frozen=True)
class EngineOptions:
    """Everything that builds an engine, from the CLI's flags or the app's settings alike."""

    bundle: Path
    policy: LoadPolicy
    record: Path | None = None  # which bundle files already passed their sha256 check (None: check all)
    max_batch: int = 8  # answers decoded together
    kv_cache_bytes: int | None = None  # idle sessions' KV caches (None: `default_kv_budget`)
    request_timeout_s: float | None = None  # one answer, queue wait included
    hold: Callable[[], bool] | None = None  # a test hook: decoding waits while it returns True


def open_engine(options: EngineOptions, say: Callable[[str], None] = print) -> Engine:
    """Load a bundle under its load policy and put an engine in front of it, saying (through `say`)
    what the user should know: a slow mode on this machine, what `auto` chose and why."""
    if advice := cpu_advice(options.policy):
        say(f"warning: {advice}")
    loaded = load_bundle(options.bundle, options.policy, record=options.record)
    if loaded.note:
        say(loaded.note)
    return Engine(loaded, max_batch=options.max_batch, kv_cache_bytes=options.kv_cache_bytes,
                  request_timeout_s=options.request_timeout_s, hold=options.hold)


def make_runner(loaded: LoadedBundle, device_lock: threading.Lock, max_batch: int,
                kv_cache_bytes: int | None) -> ModelRunner:
    """torch for a bundle of torch weights; llama.cpp for a GGUF bundle (the runner sizes its own pool)."""
    if loaded.runtime == "torch":
        return TorchRunner(loaded.model, device_lock)
    from model.serving.llama_runner import LlamaRunner

    return LlamaRunner.for_bundle(loaded, device_lock, max_batch, kv_cache_bytes)


def default_kv_budget(device: torch.device, most_useful: int | None = None) -> int:
    """The idle consultations' KV budget: what they can use at most (`most_useful`), but no more than a
    third of the device memory free now (of available RAM on a CPU), and at least 64 MiB. A small model
    on a big machine no longer reserves gigabytes it can never fill (issue 33: 4.8 GiB on 24 GB)."""
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            free = 2**32
    cap = free // 3 if most_useful is None else min(free // 3, most_useful)
    return max(cap, 64 * 2**20)
