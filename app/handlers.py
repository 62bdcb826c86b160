"""What the buttons do, as plain functions over a session store and an engine (no Gradio here).

Each handler returns, or yields while streaming, the whole chat history as Gradio's message
dicts, plus the red-flag notice. The server keeps the consultation; the page only displays it.
Logs carry events and timings, never message text or image data.
"""

from __future__ import annotations

import io
import logging
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from model.conversation import Conversation, ImageInput
from model.errors import UserFacingError
from model.imageio import ImageError, open_image
from model.safety import URGENT_ADVICE, red_flags

from .privacy import remove_upload, session_dir

log = logging.getLogger("skingpt.app")

QUICK_PROMPTS = {
    "What is this?": "What is this skin condition most likely to be?",
    "Possible causes": "What are the possible causes of this condition?",
    "Treatment": "How is this condition usually treated?",
    "Should I see a doctor?": "Should I see a doctor about this, and how soon?",
}

Message = dict[str, Any]
Update = tuple[list[Message], str]  # (chat history, red-flag notice markdown)


@dataclass
class Consultation:
    """Everything the server holds for one browser session; wiped as a whole."""

    conversation: Conversation = field(default_factory=Conversation)
    pending: list[ImageInput] = field(default_factory=list)  # photos not yet asked about
    messages: list[Message] = field(default_factory=list)  # what the chat shows
    cancel: threading.Event = field(default_factory=threading.Event)
    photos: int = 0
    last_seen: float = field(default_factory=time.monotonic)
    flags: list[str] = field(default_factory=list)


class SessionStore:
    def __init__(self, root: Path, ttl_s: float = 4 * 3600) -> None:
        self.root = root
        self.ttl_s = ttl_s
        self._items: dict[str, Consultation] = {}
        self._lock = threading.Lock()

    def get(self, session: str) -> Consultation:
        with self._lock:
            item = self._items.setdefault(session, Consultation())
            item.last_seen = time.monotonic()
            return item

    def dir(self, session: str) -> Path:
        return session_dir(self.root, session)

    def wipe(self, session: str) -> None:
        with self._lock:
            item = self._items.pop(session, None)
        if item is not None:
            item.cancel.set()
        shutil.rmtree(self.root / "sessions" / session, ignore_errors=True)

    def expired(self) -> list[str]:
        now = time.monotonic()
        with self._lock:
            return [s for s, c in self._items.items() if now - c.last_seen > self.ttl_s]

    def __len__(self) -> int:
        return len(self._items)


@dataclass
class Handlers:
    engine: Any  # model.engine.Engine, or a stand-in with the same stream/answer/forget methods
    store: SessionStore
    max_message_chars: int = 2000
    out_of_memory: tuple[type[BaseException], ...] = ()

    # -- submitting a message (photos and/or text) --------------------------------------------------
    def submit(self, session: str, message: dict | str | None, settings: dict | None = None) -> Iterator[Update]:
        state = self.store.get(session)
        text, files = _split_message(message)
        for path in files:
            self._accept_photo(session, state, Path(path))
        if not text.strip():
            if files:
                yield state.messages, self._notice(state)
                return
            yield self._error(state, "Please type a question, or attach a photo of the skin."), self._notice(state)
            return
        if len(text) > self.max_message_chars:
            yield self._error(state, f"That message is {len(text)} characters long; the limit is "
                                     f"{self.max_message_chars}. Please shorten it."), self._notice(state)
            return
        if not state.conversation.images and not state.pending:
            yield self._error(state, "Please add a photo of the skin first (attach it with the paperclip, "
                                     "drag it in, or take one with your phone's camera)."), self._notice(state)
            return
        state.messages.append({"role": "user", "content": text.strip()})
        state.conversation = state.conversation.ask(text.strip(), state.pending)
        state.pending = []
        yield from self._answer(session, state, settings or {})

    def _accept_photo(self, session: str, state: Consultation, path: Path) -> None:
        started = time.perf_counter()
        try:
            data = path.read_bytes()
        except OSError:
            data = b""
        finally:
            remove_upload(path, self.store.root)  # the original may carry GPS tags: gone at once
        try:
            image = open_image(data, name="That file")
        except ImageError as err:
            self._error(state, str(err))
            log.info("photo rejected session=%s reason=%s", _short(session), type(err).__name__)
            return
        state.photos += 1
        clean = self.store.dir(session) / f"photo-{state.photos}.jpg"
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=92)  # re-encoded from pixels alone: no EXIF, GPS or ICC
        clean.write_bytes(buffer.getvalue())
        clean.chmod(0o600)
        state.pending.append(ImageInput.of(image))
        state.messages.append({"role": "user", "content": {"path": str(clean), "mime_type": "image/jpeg"}})
        log.info("photo accepted session=%s size=%dx%d ms=%.0f", _short(session), *image.size,
                 (time.perf_counter() - started) * 1000)

    # -- answering ----------------------------------------------------------------------------------
    def _answer(self, session: str, state: Consultation, settings: dict) -> Iterator[Update]:
        state.cancel = threading.Event()
        reply: Message = {"role": "assistant", "content": ""}
        state.messages.append(reply)
        started = time.perf_counter()
        generation = None
        try:
            generation = self.engine.stream(state.conversation, session=session, cancel=state.cancel, **settings)
            for piece in generation:
                reply["content"] += piece
                yield state.messages, self._notice(state)
        except self.out_of_memory:
            self._failed(state, "The device ran out of memory while answering. Your conversation is kept: "
                                "try again, ask a shorter question, or start a new patient.")
            log.warning("answer failed session=%s reason=out-of-memory", _short(session))
            yield state.messages, self._notice(state)
            return
        except UserFacingError as err:
            self._failed(state, str(err))
            yield state.messages, self._notice(state)
            return
        except Exception as err:  # keep the app alive; the log names the type, never the content
            self._failed(state, "Something went wrong while answering. Your conversation is kept; please try again.")
            log.exception("answer failed session=%s reason=%s", _short(session), type(err).__name__)
            yield state.messages, self._notice(state)
            return
        finally:
            if generation is not None and hasattr(generation, "close"):
                generation.close()
        answer = reply["content"].strip()
        reply["content"] = answer or "(no answer)"
        if generation.finish_reason == "cancelled":
            reply["content"] += "\n\n*(stopped)*"
        state.conversation = state.conversation.answer(answer)
        for notice in generation.notices:
            state.messages.append({"role": "assistant", "content": notice, "metadata": {"title": "Note"}})
        state.flags = red_flags(*(t.question for t in state.conversation.turns),
                                *(t.answer or "" for t in state.conversation.turns))
        log.info("answer session=%s tokens=%d seconds=%.2f finish=%s", _short(session),
                 len(getattr(generation, "tokens", [])), time.perf_counter() - started, generation.finish_reason)
        yield state.messages, self._notice(state)

    def stop(self, session: str) -> None:
        self.store.get(session).cancel.set()

    def regenerate(self, session: str, settings: dict | None = None) -> Iterator[Update]:
        state = self.store.get(session)
        turns = state.conversation.turns
        if not turns or turns[-1].answer is None:
            yield self._error(state, "There is no answer to regenerate yet."), self._notice(state)
            return
        last = turns[-1]
        state.conversation = state.conversation.drop_last().ask(last.question, last.images)
        while state.messages and state.messages[-1]["role"] == "assistant":
            state.messages.pop()  # the old answer and its notes
        yield from self._answer(session, state, settings or {})

    def ask_quick(self, session: str, label: str, settings: dict | None = None) -> Iterator[Update]:
        yield from self.submit(session, {"text": QUICK_PROMPTS[label], "files": []}, settings)

    # -- new patient, session end, report -------------------------------------------------------------
    def new_patient(self, session: str) -> Update:
        state = self.store.get(session)
        keys = [img.key for img in state.conversation.images] + [img.key for img in state.pending]
        self.store.wipe(session)
        self.engine.forget(session)
        self.engine.forget(f"{session}:report")
        if hasattr(self.engine, "forget_images"):
            self.engine.forget_images(keys)
        log.info("session wiped session=%s", _short(session))
        return [], ""

    def end_session(self, session: str) -> None:
        self.new_patient(session)

    def sweep(self) -> int:
        """Wipe consultations idle for longer than the store's time to live."""
        expired = self.store.expired()
        for session in expired:
            self.new_patient(session)
        return len(expired)

    def report(self, session: str, settings: dict | None = None, render_pdf: Callable[[Any], bytes] | None = None,
               on_step: Callable[[int, int], None] | None = None) -> tuple[str, list[str]]:
        """The structured consultation over the consultation's first photo: Markdown + files.
        `on_step(done, total)` is told before each question (a progress bar)."""
        from model.consultation import DEFAULT_FLOW, consult

        state = self.store.get(session)
        images = list(state.conversation.images) + state.pending
        if not images:
            return "Please add a photo of the skin first; the report is built from it.", []
        self.engine.forget(f"{session}:report")
        def ask(conversation: Conversation) -> str:
            if on_step is not None:
                on_step(len(conversation.turns) - 1, len(DEFAULT_FLOW))
            return self.engine.answer(conversation, session=f"{session}:report", **(settings or {}))

        try:
            report = consult(ask, images[0])
        except self.out_of_memory:
            return "The device ran out of memory while writing the report. Please try again.", []
        except UserFacingError as err:
            return str(err), []
        folder = self.store.dir(session)
        markdown = report.markdown()
        (folder / "skin-report.md").write_text(markdown)
        files = [str(folder / "skin-report.md")]
        if render_pdf is not None:
            (folder / "skin-report.pdf").write_bytes(render_pdf(report))
            files.append(str(folder / "skin-report.pdf"))
        log.info("report session=%s", _short(session))
        return markdown, files

    # -- helpers ------------------------------------------------------------------------------------
    def _error(self, state: Consultation, text: str) -> list[Message]:
        state.messages.append({"role": "assistant", "content": text, "metadata": {"title": "Cannot do that"}})
        return state.messages

    def _failed(self, state: Consultation, text: str) -> None:
        """An answer that broke off: drop the open question (it can be asked again) and say why."""
        if state.messages and state.messages[-1]["role"] == "assistant" and not state.messages[-1].get("metadata"):
            state.messages.pop()
        if state.conversation.pending is not None:
            state.pending = list(state.conversation.pending.images) + state.pending
            state.conversation = state.conversation.drop_last()
        self._error(state, text)

    @staticmethod
    def _notice(state: Consultation) -> str:
        if not state.flags:
            return ""
        return f"**Warning signs mentioned: {', '.join(state.flags)}.** {URGENT_ADVICE}"


def _split_message(message: dict | str | None) -> tuple[str, list[str]]:
    if message is None:
        return "", []
    if isinstance(message, str):
        return message, []
    files = [f if isinstance(f, str) else f.get("path", "") for f in message.get("files") or []]
    return message.get("text") or "", [f for f in files if f]


def _short(session: str) -> str:
    """Enough of a session id to follow one in the log, not enough to join it."""
    return session[:6]
