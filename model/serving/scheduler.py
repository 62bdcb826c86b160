"""Continuous batching: every answer in progress advances together, one forward per step.

One thread owns decoding; it knows requests, the model runner and the session cache, nothing else.
Each step it (1) drops answers that were cancelled or whose consumer went away, (2) admits waiting
requests while fewer than `max_batch` are running, (3) prefills one chunk of at most
`prefill_chunk` positions for the oldest admitted request (so a long prompt never freezes the
answers already streaming for more than one chunk), and (4) runs one batched decode
step over every answer whose prefill is done. Prefill runs on the session's own state (B=1), so
a follow-up prefills only its new tail; the finished prefill's state joins the runner's batch, and
leaves it again when its answer ends. Every prompt opens the same way (BOS, the system text, the first
question's words before its photo: 66 of a first turn's 116 with the reference template); that opening is
computed once, when the engine is made, and a new consultation's state shares it.

Why our own batch and not transformers' `generate_batch` / `ContinuousBatchingManager`: those
take token ids only and keep their own paged cache per request, so images would need reserved ids
with a side table of embeddings, and a session's cache could not outlive its request (our
follow-ups reuse it across turns: 8x less prefill at turn 8 in the bench). Decode is weight-bound,
so the left padding a batch of different lengths carries costs attention over a few hundred
extra positions, measured as small next to reading the weights (see `bench --concurrency`).

`hold` is a test hook, None in service: a predicate asked before each batched decode step. While it
answers True, decoding waits (prefills, admissions, cancels and deadlines still run) and the batch
size it holds is logged, so a test can hang up, cancel or add a second answer while one is known to
be under way, on a machine of any speed (the app sets it from SKINGPT_TEST_DECODE_GATE).
"""

from __future__ import annotations

import atexit
import logging
import threading
import weakref
from collections import deque
from collections.abc import Callable

from model.serving.requests import Position, Request, inside_image
from model.serving.runner import ModelRunner
from model.serving.sessions import Session, SessionCache, reusable

log = logging.getLogger(__name__)
_RUNNING: weakref.WeakSet[Scheduler] = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    """Stop scheduler threads before the interpreter tears down: a daemon thread caught inside a
    torch call at exit aborts the process ('terminate called without an active exception')."""
    for scheduler in list(_RUNNING):
        scheduler.stop()


class Scheduler:
    def __init__(self, runner: ModelRunner, sessions: SessionCache, max_batch: int, prefill_chunk: int,
                 hold: Callable[[], bool] | None = None) -> None:
        self.runner, self.sessions = runner, sessions
        self.hold, self._held = hold, 0  # _held: the batch size last logged as held (0: not held)
        self.max_batch, self.prefill_chunk = max_batch, prefill_chunk
        self.waiting: deque[Request] = deque()
        self.prefilling: list[Request] = []
        self.decoding: list[Request] = []  # row i of the runner's batch is decoding[i]
        self.wake = threading.Condition()
        self.steps = 0  # batched decode steps run (for tests and stats)
        self.largest_batch = 0
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.opening: Session | None = None  # what every prompt opens with, and its state (see `keep_opening`)

    def keep_opening(self, positions: list[Position]) -> None:
        """Compute the positions every prompt opens with once, into a state of its own that is never
        dropped: a new consultation's state then shares them (`ModelRunner.share`) instead of computing
        them again. Called before the first request, so every caller finds it there."""
        if len(positions) < 2:
            return  # BOS alone: nothing worth keeping
        state = self.runner.new_state()
        self.runner.prefill(state, positions, {})
        self.opening = Session(state, list(positions), busy=True)  # busy: never an idle session to drop

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
            if self.decoding and not self._holding():
                self._decode_step()

    def _holding(self) -> bool:
        """The test hook holds decoding: say so once per batch size, and wait a moment for a poke."""
        if self.hold is None or not self.hold():
            self._held = 0
            return False
        if self._held != len(self.decoding):
            self._held = len(self.decoding)
            log.info("decode held by the test gate batch=%d", self._held)
        with self.wake:
            self.wake.wait(0.02)
        return True

    def _tell_positions(self) -> None:
        for place, request in enumerate(self.waiting, start=1):
            request.tell_place(place)

    def _drop_stopped_waiting(self) -> None:
        for request in [r for r in self.waiting if r.stopped]:
            self.waiting.remove(request)
            request.finish(request.stop_reason or "cancelled")
            self._complete(request)

    def _leave_stopped(self) -> None:
        for request in [r for r in self.prefilling if r.stopped]:
            self.prefilling.remove(request)
            request.finish(request.stop_reason or "cancelled")
            self._complete(request)
        for row in reversed(range(len(self.decoding))):
            request = self.decoding[row]
            if request.stopped:
                request.finish(request.stop_reason or "cancelled")
                self._leave(row)

    def _prefill_chunk(self, request: Request) -> None:
        """Feed the next chunk of the prompt the session's state lacks; at its end, the first token."""
        session, positions = request.session, request.positions
        try:
            if request.fed is None:
                self._start(request)
            end = min(len(positions), request.fed + self.prefill_chunk)
            while end < len(positions) and inside_image(positions[end]):
                end += 1  # an image's run is never split between chunks
            new = positions[request.fed:end]
            logits = self.runner.prefill(session.state, new, request.embeds, self.sessions.drop_oldest_idle)
            session.positions.extend(new)
            request.fed = end
        except BaseException as err:  # noqa: BLE001 - delivered to the consumer, which raises it
            self.prefilling.remove(request)
            self._fail(request, err)
            return
        if end < len(positions):
            return
        self.prefilling.remove(request)
        if request.accept(request.sampler(logits)):
            self._complete(request)
            return
        self.runner.join(session.state)
        session.state = None  # the batch holds it until the answer leaves
        self.decoding.append(request)
        self.largest_batch = max(self.largest_batch, len(self.decoding))

    def _start(self, request: Request) -> None:
        """Keep what the session's state shares with the prompt, or, where the opening every prompt
        starts with covers more, take that instead; the rest is prefilled."""
        session, positions, stats = request.session, request.positions, request.stats
        reuse = reusable(session.positions, positions)
        shared = reusable(self.opening.positions, positions) if self.opening is not None else 0
        if shared > reuse:
            self.runner.share(self.opening.state, session.state, shared, self.sessions.drop_oldest_idle)
            session.positions, reuse = positions[:shared], 0
        else:
            self.runner.trim(session.state, reuse)
            session.positions, shared = session.positions[:reuse], 0
        request.fed = reuse + shared
        stats.prompt_tokens, stats.reused_tokens, stats.shared_tokens = len(positions), reuse, shared
        stats.prefill_tokens = len(positions) - request.fed

    def _decode_step(self) -> None:
        tokens = [r.next_token for r in self.decoding]
        try:
            logits = self.runner.decode(tokens, self.sessions.drop_oldest_idle)  # (B, V)
        except BaseException as err:  # noqa: BLE001 - every row gets it; their states are dropped
            failed, self.decoding = self.decoding, []
            self.runner.drop_batch()
            for request in failed:
                self._fail(request, err)
            return
        self.steps += 1
        finished = []
        for row, request in enumerate(self.decoding):
            request.session.positions.append(tokens[row])
            if request.accept(request.sampler(logits[row])):
                finished.append(row)
        for row in reversed(finished):
            self._leave(row)

    def _leave(self, row: int) -> None:
        request = self.decoding.pop(row)
        request.session.state = self.runner.leave(row)
        self._complete(request)

    def _complete(self, request: Request) -> None:
        """The session is free for the next turn before the consumer hears that the answer ended."""
        self.sessions.release(request.session)
        request.tell_finished()

    def _fail(self, request: Request, err: BaseException) -> None:
        self.sessions.reset(request.session)  # a half-updated state is never reused
        self.sessions.release(request.session)
        request.fail(err)
