"""One consultation's state and the changes to it, in one small object (no Gradio here): the handlers
read its fields and change them through its methods.

The client names its session (Gradio's `session_hash`), and the client is not trusted: that string
is only ever a dictionary key, hashed. Everything that touches the disk or the log uses the
consultation's own `id`, drawn by the server.

An answer can end in more ways than finishing: Stop, a cancelled request, a closed tab, a new
patient, or a consumer that simply never asks for the next piece. Each of those paths ends in
`finish` (the partial answer kept as the answer, marked stopped) or `fail` (the question dropped
for a retry); and a new question first `settle`s an answer that was left open, so a consultation
can never get stuck with a question that has no answer.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from model.clinical.consultation import ConsultationReport
from model.prompt.conversation import Conversation, ImageInput
from model.clinical.history import ClinicalHistory
from model.i18n.catalog import text
from model.images.intake import Intake
from model.clinical.safety import red_flags
from model.images.quality import PhotoQuality
from model.visits.followup import Earlier, more_signs, shown_to_model

from app.privacy import remove_upload, session_dir

Message = dict[str, Any]


class Wiped(RuntimeError):
    """The consultation was cleared (new patient, tab closed, idle) while a job still ran for it."""


@dataclass(eq=False)
class Answer:
    """One answer in progress: the chat message it streams into and the event that stops it."""

    reply: Message
    cancel: threading.Event = field(default_factory=threading.Event)


@dataclass(eq=False)
class Consultation:
    """Everything the server holds for one browser session; wiped as a whole."""

    root: Path
    id: str = field(default_factory=lambda: secrets.token_hex(16))  # the only name on disk and in logs
    conversation: Conversation = field(default_factory=Conversation)
    pending: list[ImageInput] = field(default_factory=list)  # photos not yet asked about
    messages: list[Message] = field(default_factory=list)  # what the chat shows
    flags: list[str] = field(default_factory=list)
    photos: int = 0
    photo_bytes: int = 0  # decoded pixels held in memory
    uploads: set[Path] = field(default_factory=set)  # attached in the browser, not sent yet
    answering: Answer | None = None
    stop_pending: bool = False  # Stop arrived before its answer began (still in Gradio's queue)
    closed: threading.Event = field(default_factory=threading.Event)
    last_seen: float = field(default_factory=time.monotonic)
    started: str = field(default_factory=lambda: datetime.now().astimezone().isoformat(timespec="minutes"))
    lock: threading.RLock = field(default_factory=threading.RLock)
    lang: str = "en"  # of the page: messages, notices, quick questions, answers, reports
    ranking: tuple | None = None  # (photo keys, the differential for them): computed once per set of photos
    history: ClinicalHistory | None = None  # the clinical history form, as last saved
    quality: list[PhotoQuality] = field(default_factory=list)  # one per accepted photo, in order
    unsent: str = ""  # a question that was refused (no photo yet, a bad file): the box gets it back
    earlier: Earlier | None = None  # a follow-up: the earlier visit's photo shown beside today's
    report: ConsultationReport | None = None  # the last Full report, kept with a saved visit
    saved_as: str | None = None  # the visit reference once this consultation is saved (--records)
    browser: str | None = None  # whose files these are (app.web.files); None: started without the cookie

    def t(self, key: str, **fields) -> str:
        """A message in this consultation's language."""
        return text(self.lang, key, **fields)

    @property
    def folder(self) -> Path:
        return self.root / "sessions" / self.id

    # -- answers ------------------------------------------------------------------------------
    def begin_answer(self) -> Answer:
        with self.lock:
            if self.closed.is_set():
                raise Wiped("the consultation was cleared")
            answer = Answer({"role": "assistant", "content": ""})
            if self.stop_pending:  # Stop was pressed while this answer waited to start: it stops at once
                answer.cancel.set()
                self.stop_pending = False
            self.messages.append(answer.reply)
            self.answering = answer
            return answer

    def add_piece(self, answer: Answer, piece: str) -> bool:
        """Append streamed text; False once the answer is no longer this consultation's open one."""
        with self.lock:
            if self.answering is not answer:
                return False
            answer.reply["content"] += piece
            return True

    def finish(self, answer: Answer, answer_text: str, stopped: bool = False,
               notices: tuple[str, ...] | list[str] = ()) -> None:
        """The answer ends (completely, or stopped with what it had): it becomes the turn's answer."""
        with self.lock:
            if self.answering is not answer:
                return
            self.answering = None
            answer_text = answer_text.strip()
            shown = answer_text or self.t("messages.no_text")
            answer.reply["content"] = shown + (f"\n\n*{self.t('messages.stopped')}*" if stopped else "")
            if self.conversation.pending is not None:
                self.conversation = self.conversation.answer(answer_text)
            for notice in notices:
                self.note(notice)
            self.refresh_flags()

    def refresh_flags(self) -> None:
        """The warning signs of every question, answer and the clinical history (and, on a follow-up,
        a change an answer reports since the last visit)."""
        with self.lock:
            answers = [t.answer or "" for t in self.conversation.turns]
            self.flags = red_flags(*(t.question for t in self.conversation.turns), *answers, lang=self.lang,
                                   also=more_signs(self.history, self.earlier, answers))

    def shown_to_model(self, conversation: Conversation | None = None) -> Conversation:
        """The conversation (or `conversation`) as the model reads it (`model.visits.followup.shown_to_model`)."""
        return shown_to_model(self.conversation if conversation is None else conversation, self.history,
                              self.earlier, self.started)

    def fail(self, answer: Answer, message: str) -> None:
        """The answer broke off: drop the open question (its photos wait for the retry) and say why."""
        with self.lock:
            if self.answering is not answer:
                return
            self.answering = None
            if self.messages and self.messages[-1] is answer.reply:
                self.messages.pop()
            if self.conversation.pending is not None:
                self.pending = list(self.conversation.pending.images) + self.pending
                self.conversation = self.conversation.drop_last()
            self.error(message)

    def settle(self) -> None:
        """An answer left open (its consumer went away without closing it) ends now, as stopped."""
        with self.lock:
            answer = self.answering
            if answer is not None:
                answer.cancel.set()
                self.finish(answer, answer.reply["content"], stopped=True)

    def stop(self) -> None:
        """Stop the answer being written; pressed before it began, it stops that answer as it begins."""
        with self.lock:
            if self.answering is not None:
                self.answering.cancel.set()
            else:
                self.stop_pending = True

    def answer_ended(self) -> None:
        """The page's answering event is over: a Stop that came too late for it stops nothing later."""
        with self.lock:
            self.stop_pending = False

    def error(self, message: str) -> list[Message]:
        return self.note(message, "titles.error")

    # -- the consultation's own changes (handlers call these; none is held across a yield) ---------------
    def ask(self, shown: str, question: str) -> None:
        """The question as typed joins the chat; the model is asked `question` about the pending photos."""
        with self.lock:
            self.unsent = ""
            self.messages.append({"role": "user", "content": shown})
            self.conversation = self.conversation.ask(question, self.pending)
            self.pending = []

    def add_photo(self, intake: Intake, private_copy: bytes) -> None:
        """An accepted photo: its private copy (the chat shows it), its pixels pending for the next
        question, its notes and quality said at once (before any answer; the patient may go on).
        Wiped: the consultation was cleared meanwhile, and nothing was kept."""
        with self.lock:
            clean = self.write_file(f"photo-{self.photos + 1}.jpg", private_copy)
            self.photos += 1
            self.photo_bytes += intake.pixel_bytes
            self.pending.append(ImageInput.of(intake.image))
            self.messages.append({"role": "user", "content": {"path": str(clean), "mime_type": "image/jpeg"}})
            for line in intake.notes:
                self.note(line)
            self.quality.append(intake.quality)
            if not intake.quality.ok:
                self.note(intake.quality.notice(self.lang), "quality.title")

    def take_back_answer(self):
        """For Regenerate: the last answered turn asked again (its answer and notes off the chat); the
        turn taken back, or None when nothing was answered yet."""
        with self.lock:
            turns = self.conversation.turns
            last = turns[-1] if turns and turns[-1].answer is not None else None
            if last is not None:
                self.conversation = self.conversation.drop_last().ask(last.question, last.images)
                while self.messages and self.messages[-1]["role"] == "assistant":
                    self.messages.pop()
            return last

    def compare_with(self, earlier: Earlier) -> None:
        """A follow-up: the earlier visit's photo joins the chat, both dates said (Wiped: cleared meanwhile)."""
        from model.clinical.consultation import readable_date

        with self.lock:
            shown = self.write_file("photo-earlier.jpg", earlier.jpeg)
            self.earlier = earlier
            self.messages.append({"role": "user", "content": {"path": str(shown), "mime_type": "image/jpeg"}})
            self.note(self.t("records.compared", earlier=readable_date(earlier.created, self.lang), visit=earlier.visit,
                             today=readable_date(self.started, self.lang)), "titles.follow_up")

    def set_history(self, history: ClinicalHistory) -> None:
        with self.lock:
            self.history = None if history.is_empty() else history
            self.refresh_flags()

    def note(self, message: str, title: str = "titles.note") -> list[Message]:
        """A message of the app's own beside the answers, under a title (a key of `titles.*`, `quality.title`)."""
        with self.lock:
            self.messages.append({"role": "assistant", "content": message, "metadata": {"title": self.t(title)}})
            return self.messages

    # -- files --------------------------------------------------------------------------------
    def write_file(self, name: str, data: bytes) -> Path:
        """Write into this consultation's private folder (mode 0600), never after it was wiped."""
        with self.lock:
            if self.closed.is_set():
                raise Wiped("the consultation was cleared")
            path = session_dir(self.root, self.id) / name
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            return path

    def close(self) -> None:
        """Stop every job of this consultation and delete everything of it on disk."""
        with self.lock:
            self.closed.set()
            if self.answering is not None:
                self.answering.cancel.set()
            uploads, self.uploads = self.uploads, set()
            shutil.rmtree(self.folder, ignore_errors=True)
        for path in uploads:
            remove_upload(path, self.root)


def client_key(session: str | None) -> str:
    """A client-chosen session name as a bounded dictionary key (it is never a path)."""
    return hashlib.sha256(str(session).encode("utf-8", "surrogatepass")).hexdigest()


class SessionStore:
    def __init__(self, root: Path, ttl_s: float = 4 * 3600, max_photo_bytes: int = 2**30) -> None:
        self.root = root
        self.ttl_s = ttl_s
        self.max_photo_bytes = max_photo_bytes
        self._items: dict[str, Consultation] = {}
        self._browsers: dict[str, str] = {}  # client key -> the browser its page was opened in
        self._lock = threading.Lock()

    def get(self, session: str | None) -> Consultation:
        key = client_key(session)
        with self._lock:
            item = self._items.get(key)
            if item is None:
                item = self._items[key] = Consultation(self.root, browser=self._browsers.get(key))
            item.last_seen = time.monotonic()
            return item

    def bind(self, session: str | None, browser: str | None) -> None:
        """The page of `session` was opened in `browser` (its cookie): its consultations' files are
        that browser's alone. The first binding holds."""
        if browser is None:
            return
        key = client_key(session)
        with self._lock:
            browser = self._browsers.setdefault(key, browser)
            item = self._items.get(key)
            if item is not None and item.browser is None:
                item.browser = browser

    def unbind(self, session: str | None) -> None:
        """The page is gone (its tab closed)."""
        with self._lock:
            self._browsers.pop(client_key(session), None)

    def owner(self, folder: str) -> tuple[bool, str | None]:
        """Whether a consultation's folder name is a live consultation's, and its browser."""
        with self._lock:
            item = next((c for c in self._items.values() if c.id == folder), None)
        return (False, None) if item is None else (True, item.browser)

    def wipe(self, session: str | None) -> Consultation | None:
        return self.remove(client_key(session))

    def remove(self, key: str, page_gone: bool = False) -> Consultation | None:
        with self._lock:
            item = self._items.pop(key, None)
            if page_gone:
                self._browsers.pop(key, None)
        if item is not None:
            item.close()
        return item

    def expired(self) -> list[str]:
        """Keys of consultations idle for longer than the time to live."""
        now = time.monotonic()
        with self._lock:
            return [key for key, c in self._items.items() if now - c.last_seen > self.ttl_s]

    def photo_bytes(self) -> int:
        with self._lock:
            return sum(c.photo_bytes for c in self._items.values())

    def __len__(self) -> int:
        return len(self._items)
