"""Continuous batching: every answer in progress advances together, one forward per step.

One thread owns decoding. Each step it (1) drops answers that were cancelled or whose consumer
went away, (2) admits waiting requests while fewer than `max_batch` are running, (3) prefills one
chunk of at most `prefill_chunk` positions for the oldest admitted request (so a long prompt never
freezes the answers already streaming for more than one chunk), and (4) runs one batched decode
step over every answer whose prefill is done. Prefill runs on the session's own cache (B=1), so
a follow-up prefills only its new tail; the finished prefill's cache joins the batch, and leaves
it again, unpadded, when its answer ends.

Why our own batch and not transformers' `generate_batch` / `ContinuousBatchingManager`: those
take token ids only and keep their own paged cache per request, so images would need reserved ids
with a side table of embeddings, and a session's cache could not outlive its request (our
follow-ups reuse it across turns: 8x less prefill at turn 8 in the bench). Decode is weight-bound,
so the left padding a batch of different lengths carries costs attention over a few hundred
extra positions, measured as small next to reading the weights (see `bench --concurrency`).
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
import time
import weakref
from collections import deque
from typing import TYPE_CHECKING

import torch

from model.nn.skingpt import IMAGE_TOKEN_ID
from model.serving.detokenize import IncrementalDecoder
from model.serving.kv_cache import Batch, new_cache, trim_cache

if TYPE_CHECKING:
    from model.serving.engine import Engine, Generation, Slot, _Sampler, _Session

log = logging.getLogger("skingpt.engine")
DONE = object()  # the last item of a request's output queue
_RUNNING: weakref.WeakSet[Scheduler] = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    """Stop scheduler threads before the interpreter tears down: a daemon thread caught inside a
    torch call at exit aborts the process ('terminate called without an active exception')."""
    for scheduler in list(_RUNNING):
        scheduler.stop()


class Request:
    """One answer's decoding state; everything here is touched by the scheduler thread only, except
    `out` (a thread-safe queue the consumer reads) and the two events."""

    def __init__(self, gen: Generation, session: _Session, slots: list[Slot], embeds: dict[str, torch.Tensor],
                 sampler: _Sampler, stops: tuple[str, ...], eos: int | None, max_new_tokens: int,
                 cancel: threading.Event | None, tokenizer, start: float) -> None:
        self.gen, self.session, self.slots, self.embeds = gen, session, slots, embeds
        self.sampler, self.stops, self.eos, self.max_new_tokens = sampler, stops, eos, max_new_tokens
        self.cancel, self.closed = cancel, threading.Event()
        self.decoder = IncrementalDecoder(tokenizer)
        self.out: queue.Queue = queue.Queue()
        self.start, self.decode_start = start, None
        self.fed: int | None = None  # prompt positions in the session's cache (None: prefill not begun)
        self.next_token: int | None = None  # sampled, not yet fed
        self.text, self.emitted = "", 0
        self.position = 0  # place in the waiting queue, as last told

    @property
    def stopped(self) -> bool:
        return self.closed.is_set() or (self.cancel is not None and self.cancel.is_set())

    def accept(self, token: int) -> bool:
        """Take a sampled token: stream its text; True when the answer is complete."""
        gen, now = self.gen, time.perf_counter()
        gen.stats.token_times.append(now)
        if self.decode_start is None:
            self.decode_start = now
            gen.stats.time_to_first_token_s = now - self.start
        if token == self.eos:
            return self.finish("eos")
        gen.tokens.append(token)
        gen.stats.new_tokens = len(gen.tokens)
        self.text += self.decoder.push(token)
        visible, stopped = _visible(self.text, self.stops)
        if visible > self.emitted:
            self._emit(self.text[self.emitted:visible])
            self.emitted = visible
        if stopped:
            return self.finish("stop")
        if len(gen.tokens) >= self.max_new_tokens:
            return self.finish("length")
        if self.stopped:
            return self.finish("cancelled")
        self.next_token = token
        return False

    def finish(self, reason: str) -> bool:
        self.gen.finish_reason = reason
        if reason == "cancelled":
            log.info("answer cancelled after %d tokens", len(self.gen.tokens))
        if reason in ("eos", "length", "cancelled"):  # what was held back for a stop string is text after all
            self.text += self.decoder.flush()
            if len(self.text) > self.emitted:
                self._emit(self.text[self.emitted:])
                self.emitted = len(self.text)
        self.gen.stats.decode_s = time.perf_counter() - (self.decode_start or self.start)
        return True

    def _emit(self, piece: str) -> None:
        self.gen.text += piece
        self.out.put(piece)


class Scheduler:
    def __init__(self, engine: Engine, max_batch: int, prefill_chunk: int) -> None:
        self.engine, self.max_batch, self.prefill_chunk = engine, max_batch, prefill_chunk
        self.waiting: deque[Request] = deque()
        self.prefilling: list[Request] = []
        self.decoding: list[Request] = []  # row i of `batch` is decoding[i]
        self.batch = Batch()
        self.wake = threading.Condition()
        self.steps = 0  # batched decode steps run (for tests and stats)
        self.largest_batch = 0
        self._thread: threading.Thread | None = None
        self._stopping = False

    # -- called from consumer threads ----------------------------------------------------------
    def submit(self, request: Request) -> None:
        with self.wake:
            self.waiting.append(request)
            self._tell_positions()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="skingpt-scheduler", daemon=True)
                self._thread.start()
                _RUNNING.add(self)
            self.wake.notify()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the step in flight, then end the thread (requests still open are not answered)."""
        with self.wake:
            self._stopping = True
            self.wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def poke(self) -> None:
        """A request was cancelled or closed: look at it now rather than at the next step."""
        with self.wake:
            self.wake.notify()

    @property
    def queued(self) -> int:
        return len(self.waiting)

    # -- the scheduler thread ---------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self.wake:
                while not (self.waiting or self.prefilling or self.decoding or self._stopping):
                    self.wake.wait()
                if self._stopping:
                    return
                self._drop_stopped_waiting()
                while self.waiting and len(self.prefilling) + len(self.decoding) < self.max_batch:
                    self.prefilling.append(self.waiting.popleft())
                self._tell_positions()
            self._leave_stopped()
            if self.prefilling:
                self._prefill_chunk(self.prefilling[0])
            if self.decoding:
                self._decode_step()

    def _tell_positions(self) -> None:
        for place, request in enumerate(self.waiting, start=1):
            if request.position != place:
                request.position = place
                request.out.put(("queued", place))

    def _drop_stopped_waiting(self) -> None:
        for request in [r for r in self.waiting if r.stopped]:
            self.waiting.remove(request)
            request.finish("cancelled")
            self._release(request)

    def _leave_stopped(self) -> None:
        for request in [r for r in self.prefilling if r.stopped]:
            self.prefilling.remove(request)
            request.finish("cancelled")
            self._release(request)
        for row in reversed(range(len(self.decoding))):
            request = self.decoding[row]
            if request.stopped:
                request.finish("cancelled")
                self._leave(row)

    def _prefill_chunk(self, request: Request) -> None:
        """Feed the next chunk of the prompt the session's cache lacks; at its end, the first token."""
        engine, session, slots = self.engine, request.session, request.slots
        try:
            with engine.device_lock, torch.no_grad():
                if request.fed is None:
                    reuse = engine.reusable(session.slots, slots)
                    trim_cache(session.cache, reuse)
                    session.slots = session.slots[:reuse]
                    request.fed = reuse
                    stats = request.gen.stats
                    stats.prompt_tokens, stats.reused_tokens, stats.prefill_tokens = len(slots), reuse, len(slots) - reuse
                end = min(len(slots), request.fed + self.prefill_chunk)
                while end < len(slots) and isinstance(slots[end], str) and not slots[end].endswith(":0"):
                    end += 1  # an image's run is never split between chunks
                new = slots[request.fed:end]
                ids = torch.tensor([[s if isinstance(s, int) else IMAGE_TOKEN_ID for s in new]], device=engine.device)
                keys = [s.rsplit(":", 1)[0] for s in new if isinstance(s, str) and s.endswith(":0")]
                images = torch.stack([request.embeds[k] for k in keys]) if keys else None  # (N_img, Q, D)
                inputs = engine.model.embed_inputs(ids, images)  # (1, T_chunk, D)
                out = engine.model.llm(inputs_embeds=inputs, past_key_values=session.cache, use_cache=True,
                                       logits_to_keep=1)
                session.slots.extend(new)
                request.fed = end
        except BaseException as err:  # noqa: BLE001 - delivered to the consumer, which raises it
            self.prefilling.remove(request)
            self._fail(request, err)
            return
        if end < len(slots):
            return
        self.prefilling.remove(request)
        if request.accept(request.sampler(out.logits[0, -1])):
            self._release(request)
            return
        self.batch.add(session.cache)
        session.cache = None  # the batch holds it until the answer leaves
        self.decoding.append(request)
        self.largest_batch = max(self.largest_batch, len(self.decoding))

    def _decode_step(self) -> None:
        engine = self.engine
        tokens = [r.next_token for r in self.decoding]
        try:
            with engine.device_lock, torch.no_grad():
                positions, mask = self.batch.step_inputs()
                out = engine.model.llm(input_ids=torch.tensor(tokens, device=engine.device).unsqueeze(1),
                                       position_ids=positions, attention_mask=mask, past_key_values=self.batch.cache,
                                       use_cache=True)
                self.batch.advance()
                logits = out.logits[:, -1]  # (B, V)
        except BaseException as err:  # noqa: BLE001 - every row gets it; their caches are dropped
            failed, self.decoding, self.batch = self.decoding, [], Batch()
            for request in failed:
                self._fail(request, err)
            return
        self.steps += 1
        finished = []
        for row, request in enumerate(self.decoding):
            request.session.slots.append(tokens[row])
            if request.accept(request.sampler(logits[row])):
                finished.append(row)
        for row in reversed(finished):
            self._leave(row)

    def _leave(self, row: int) -> None:
        request = self.decoding.pop(row)
        request.session.cache = self.batch.remove(row)
        self._release(request)

    def _release(self, request: Request) -> None:
        request.session.busy = False
        request.out.put(DONE)
        self.engine.enforce_budget()

    def _fail(self, request: Request, err: BaseException) -> None:
        request.session.cache, request.session.slots = new_cache(), []  # a half-updated cache is never reused
        request.session.busy = False
        request.out.put(err)
        request.out.put(DONE)


def _visible(text: str, stops: tuple[str, ...]) -> tuple[int, bool]:
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
