"""What the buttons do, as plain functions over a session store and an engine (no Gradio here).

Each handler returns, or yields while streaming, the whole chat history as Gradio's message
dicts, plus the red-flag notice. The server keeps the consultation; the page only displays it.
Logs carry events and timings, never message text or image data.
"""

from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from pydantic import ValidationError

from model.prompt.conversation import Conversation
from model.errors import UserFacingError
from model.serving.sampler import SamplingSettings
from model.images.decode import ImageError
from model.images.intake import Intake, take_photo
from model.clinical.consultation import ask_in, extract_diagnosis
from model.clinical.history import ClinicalHistory
from model.clinical.records import validation_message
from model.clinical.safety import red_flag_notice
from model.i18n.catalog import LANGUAGES

from app.privacy import remove_upload, sweep_uploads
from app.settings import MAX_PHOTOS
from app.web.session import Consultation, Message, SessionStore, Wiped
from app.web.uploads import Uploads

if TYPE_CHECKING:
    from model.serving.engine import AnswerEngine

log = logging.getLogger("skingpt.app")

QUICK_PROMPTS = ("quick_what", "quick_causes", "quick_treatment", "quick_doctor")  # keys of ui.* and prompts.*

Update = tuple[list[Message], str]  # (chat history, red-flag notice markdown)


@dataclass
class Handlers:
    engine: AnswerEngine  # model.serving.engine.Engine, the remote engine, or a test's stand-in
    store: SessionStore
    max_message_chars: int = 2000
    out_of_memory: tuple[type[BaseException], ...] = ()
    upload_ttl_s: float = 15 * 60
    uploads: Uploads | None = None  # uploads cleaned by our upload route (None: files are read as they are)
    model_label: str = "SkinGPT"  # the model as reports name it (`LoadedBundle.label`)

    # -- submitting a message (photos and/or text) --------------------------------------------------
    def submit(self, session: str, message: dict | str | None,
               settings: SamplingSettings | None = None) -> Iterator[Update]:
        state = self.store.get(session)
        state.settle()
        text, files = _split_message(message)
        state.unsent = text  # given back to the box unless the question is asked
        read: dict[str, Intake | ImageError] = {}  # a photo attached twice is read once, and kept twice
        for path in files:
            if path not in read:
                read[path] = self._read_photo(state, Path(path))
        refusals = [why for why in (self._accept_photo(state, read[path]) for path in files) if why]
        if refusals:  # one message per refused photo, and the question waits for a usable one
            if text.strip():
                refusals[-1] = _sentence(refusals[-1]) + " " + state.t("messages.not_sent")
            for why in refusals:
                state.error(why)
            yield state.messages, self._notice(state)
            return
        if not text.strip():
            if files:
                yield state.messages, self._notice(state)
                return
            yield state.error(state.t("messages.type_question")), self._notice(state)
            return
        if len(text) > self.max_message_chars:
            yield state.error(state.t("messages.too_long", length=len(text), limit=self.max_message_chars)), \
                self._notice(state)
            return
        if not state.conversation.images and not state.pending:
            yield state.error(state.t("messages.photo_first")), self._notice(state)
            return
        state.ask(text.strip(), ask_in(state.lang, text.strip()))  # shown as typed; asked in the page's language
        yield from self._answer(state, settings or SamplingSettings())

    def attached(self, session: str, message: dict | None) -> str:
        """Photos attached in the browser but not sent yet (deleted with the consultation if never
        sent); the notice to show now: the warning signs, and what is wrong with an attached photo,
        so that the patient can retake it before asking."""
        state = self.store.get(session)
        _, files = _split_message(message)
        with state.lock:
            state.uploads.update(Path(f) for f in files)
        measured = [self.uploads.quality(f) for f in files] if self.uploads is not None else []
        poor = [q for q in measured if q is not None and not q.ok]
        lines = [f"**{state.t('quality.title')}:** {q.notice(state.lang)}" for q in poor[:1]]
        return "\n\n".join(filter(None, [self._notice(state), *lines]))

    def _read_photo(self, state: Consultation, path: Path) -> Intake | ImageError:
        """An attached file as a clean photo, or why it is not one; the uploaded file is deleted."""
        with state.lock:
            state.uploads.discard(path)
        if self.uploads is not None and self.uploads.known(path):
            try:
                return self.uploads.take(path)  # cleaned when it was uploaded
            except ImageError as err:
                return err
        try:
            data = path.read_bytes()
        except OSError:
            data = b""
        finally:
            remove_upload(path, self.store.root)  # the original may carry GPS tags: gone at once
        try:
            return take_photo(data, name="That file")
        except ImageError as err:
            return err

    def _accept_photo(self, state: Consultation, photo: Intake | ImageError) -> str | None:
        """Keep one photo in the consultation; the reason when it is refused."""
        started = time.perf_counter()
        try:
            if isinstance(photo, ImageError):
                raise photo
            self._check_room(state, photo)
        except ImageError as err:
            log.info("photo rejected session=%s reason=%s", state.id[:8], type(err).__name__)
            return str(err)
        try:  # the private copy re-encoded from pixels alone: no EXIF, GPS or ICC
            state.add_photo(photo, _jpeg(photo.image))
        except Wiped:
            return "This consultation was cleared; please attach the photo again."
        log.info("photo accepted session=%s size=%dx%d quality=%s ms=%.0f", state.id[:8], *photo.image.size,
                 ",".join(photo.quality.problems) or "ok", (time.perf_counter() - started) * 1000)
        return None

    def _check_room(self, state: Consultation, photo: Intake) -> None:
        """Decoded photos are held in memory: bounded per consultation and for the whole server."""
        if len(state.conversation.images) + len(state.pending) >= MAX_PHOTOS:
            raise ImageError(f"This consultation already has {MAX_PHOTOS} photos, the most one consultation holds. "
                             f"Ask about the photos you sent, or press New patient to start again.")
        if self.store.photo_bytes() + photo.pixel_bytes > self.store.max_photo_bytes:
            raise ImageError(f"The server is holding as many photos as it can right now "
                             f"({self.store.max_photo_bytes // 2**20} MB for all consultations). Please try again "
                             f"in a few minutes, or send a smaller photo.")

    # -- answering ----------------------------------------------------------------------------------
    def _answer(self, state: Consultation, settings: SamplingSettings) -> Iterator[Update]:
        answer = state.begin_answer()
        started = time.perf_counter()
        generation = None
        try:
            generation = self.engine.stream(state.shown_to_model(), session=state.id,
                                            cancel=answer.cancel, **settings.overrides())
            for kind, value in generation.events():
                if kind == "queued":  # every batch slot is busy: say where this answer stands (shown, not kept)
                    yield state.messages + [_waiting(state, value)], self._notice(state)
                    continue
                if not state.add_piece(answer, value):
                    break  # settled meanwhile (a newer question, a wipe): this stream is no longer shown
                yield state.messages, self._notice(state)
            notices = list(generation.notices)
            if generation.stats.dropped_turns:  # the engine's note is English: the page says it in its language
                notices = [state.t("messages.context_dropped", turns=len(generation.stats.dropped_turns))]
            if generation.finish_reason == "timeout":
                notices.append(state.t("messages.timed_out", seconds=f"{self.engine.request_timeout_s:.0f}"))
            state.finish(answer, answer.reply["content"], stopped=generation.finish_reason in ("cancelled", "timeout"),
                         notices=notices)
        except self.out_of_memory:
            state.fail(answer, state.t("messages.out_of_memory"))
            log.warning("answer failed session=%s reason=out-of-memory", state.id[:8])
            yield state.messages, self._notice(state)
            return
        except UserFacingError as err:
            state.fail(answer, str(err))
            yield state.messages, self._notice(state)
            return
        except Exception as err:  # keep the app alive; the log names the type, never the content
            state.fail(answer, state.t("messages.went_wrong"))
            log.exception("answer failed session=%s reason=%s", state.id[:8], type(err).__name__)
            yield state.messages, self._notice(state)
            return
        finally:
            if generation is not None:
                generation.close()
            # closed by its consumer (Stop, a cancelled request, a closed tab): keep what was said, as stopped
            state.finish(answer, answer.reply["content"], stopped=True)
        log.info("answer session=%s tokens=%d seconds=%.2f finish=%s", state.id[:8],
                 len(generation.tokens), time.perf_counter() - started, generation.finish_reason)
        yield state.messages, self._notice(state)

    def stop(self, session: str) -> None:
        self.store.get(session).stop()

    def answer_ended(self, session: str) -> None:
        self.store.get(session).answer_ended()

    def regenerate(self, session: str, settings: SamplingSettings | None = None) -> Iterator[Update]:
        state = self.store.get(session)
        state.settle()
        last = state.take_back_answer()
        if last is None:
            yield state.error(state.t("messages.no_answer_yet")), self._notice(state)
            return
        yield from self._answer(state, settings or SamplingSettings())
        again = state.conversation.turns[-1].answer if state.conversation.turns else None
        if again is not None and again.strip() == last.answer.strip():  # greedy: the most likely answer again
            yield state.note(state.t("messages.same_answer")), self._notice(state)

    def ask_quick(self, session: str, key: str, settings: SamplingSettings | None = None) -> Iterator[Update]:
        """One of the quick questions (a key of QUICK_PROMPTS), in the consultation's language."""
        state = self.store.get(session)
        yield from self.submit(session, {"text": state.t(f"prompts.{key}"), "files": []}, settings)

    def ask_what_changed(self, session: str, settings: SamplingSettings | None = None) -> Iterator[Update]:
        """A follow-up's question: what changed since the last visit, in the consultation's language."""
        state = self.store.get(session)
        yield from self.submit(session, {"text": state.t("flow.compare"), "files": []}, settings)

    def set_history(self, session: str, fields: dict[str, Any]) -> tuple[str, str]:
        """Save the clinical history form (blank fields dropped): (what the form should say, the
        warning-sign notice). A malformed value is refused with the field named; nothing changes."""
        state = self.store.get(session)
        fields = {k: v.strip() if isinstance(v, str) else v for k, v in fields.items()}
        given = {k: v for k, v in fields.items() if v not in (None, "", [])}
        try:
            history = ClinicalHistory.model_validate(given)
        except ValidationError as err:
            fields = [str(e["loc"][0]) for e in err.errors() if e["loc"]]
            known = [f for f in dict.fromkeys(fields) if f in ClinicalHistory.model_fields]
            problem = (state.t("history.check_fields", fields="; ".join(state.t(f"history.{f}") for f in known))
                       if known else validation_message(err))  # the form's own labels, in the page's language
            return state.t("history.invalid", problem=problem), self._notice(state)
        state.set_history(history)
        log.info("history saved session=%s fields=%d", state.id[:8], len(given))  # which fields: never their values
        return (state.t("history.saved") if state.history else ""), self._notice(state)

    def set_language(self, session: str, lang: str) -> None:
        self.store.get(session).lang = lang if lang in LANGUAGES else "en"

    # -- new patient, session end, report -------------------------------------------------------------
    def new_patient(self, session: str) -> Update:
        wiped = self.store.wipe(session)
        self._forget(wiped)
        if wiped is not None:
            self.store.get(session).lang = wiped.lang  # the page keeps its language
        return [], ""

    def end_session(self, session: str) -> None:
        self.new_patient(session)
        self.store.unbind(session)

    def _forget(self, state: Consultation | None) -> None:
        if state is None:
            return
        self.engine.forget(state.id)
        self.engine.forget(f"{state.id}:report")
        self.engine.forget_images([img.key for img in state.conversation.images] + [img.key for img in state.pending])
        log.info("session wiped session=%s", state.id[:8])

    def sweep(self) -> int:
        """Wipe consultations idle for longer than the store's time to live, and delete photos that
        were attached but never sent."""
        expired = self.store.expired()
        for key in expired:
            self._forget(self.store.remove(key, page_gone=True))
        if self.uploads is not None:
            self.uploads.sweep(self.upload_ttl_s)
        sweep_uploads(self.store.root, self.upload_ttl_s)
        return len(expired)

    def report(self, session: str, settings: SamplingSettings | None = None,
               render_pdf: Callable[[Any], bytes] | None = None,
               on_step: Callable[[int, int], None] | None = None) -> tuple[str, list[str]]:
        """The structured consultation over the consultation's first photo: Markdown + files.
        `on_step(done, total)` is told before each question (a progress bar). New patient (or the
        tab closing) stops it, and nothing is written into a wiped consultation."""
        from model.clinical.consultation import consult, flow, new_visit
        from model.clinical.safety import red_flags
        from model.visits.followup import more_signs

        state = self.store.get(session)
        steps = flow(state.lang, compare=state.earlier is not None)
        images = list(state.conversation.images) + state.pending
        if not images:
            return state.t("messages.report_needs_photo"), []
        name = f"{state.id}:report"
        self.engine.forget(name)

        def ask(conversation: Conversation) -> str:
            if state.closed.is_set():
                raise Wiped("the consultation was cleared")
            if on_step is not None:
                on_step(len(conversation.turns) - 1, len(steps))
            return self.engine.answer(conversation, session=name, cancel=state.closed,
                                      **(settings or SamplingSettings()).overrides())

        try:
            report = consult(ask, images[0], steps=steps, lang=state.lang,
                             ranking=self.engine.rank(images[-3:]), quality=state.quality,
                             frame=state.shown_to_model)  # (the history goes in with the frame)
            shown = ([state.earlier.image] if state.earlier else []) + images  # a follow-up: the earlier photo first
            photos = [state.write_file(f"skin-report-photo-{n}.jpg", _jpeg(image.image))
                      for n, image in enumerate(shown, 1)]
            report.details = new_visit(self.model_label, [p.name for p in photos])
            if state.earlier is not None:  # side by side, each with its date
                report.details.photo_dates = [state.earlier.created] + [state.started] * len(images)
            report.history = state.history
            with state.lock:
                report.red_flags = red_flags(*report.answers.values(), lang=state.lang,
                                             also=more_signs(state.history, state.earlier,
                                                             [report.answers.get("compare", "")]))
                state.report = report
            markdown = report.markdown()
            files = [str(state.write_file("skin-report.md", markdown.encode()))]
            if render_pdf is not None:
                try:
                    files.append(str(state.write_file("skin-report.pdf",
                                                      render_pdf(report, [image.image for image in shown]))))
                except UserFacingError as err:  # no font for it: the Markdown still stands
                    markdown += f"\n\n*PDF: {err}*"
        except Wiped:
            self.engine.forget(name)
            return state.t("messages.report_cleared"), []
        except self.out_of_memory:
            return state.t("messages.out_of_memory"), []
        except UserFacingError as err:
            return str(err), []
        log.info("report session=%s", state.id[:8])
        return _with_thumbnails(markdown, photos, shown), files + [str(p) for p in photos]

    def differential(self, session: str) -> str:
        """The bundle's calibrated ranking for the consultation's last (up to 3) photos, as HTML with
        bars, and a warning when the chat's named condition is not in its top 3. '' without a head."""
        state = self.store.get(session)
        photos = (list(state.conversation.images) + state.pending)[-3:]
        if not photos:
            return ""
        keys = tuple(p.key for p in photos)
        if state.ranking is None or state.ranking[0] != keys:
            state.ranking = (keys, self.engine.rank(photos))
        ranking = state.ranking[1]
        if ranking is None:
            return ""
        answers = [t.answer for t in state.conversation.turns if t.answer]
        named = extract_diagnosis(answers[-1])[0] if answers else None
        return _ranking_html(state, ranking, named)

    # -- helpers ------------------------------------------------------------------------------------
    @staticmethod
    def _notice(state: Consultation) -> str:
        if not state.flags:
            return ""
        return red_flag_notice(state.flags, state.lang)


def _split_message(message: dict | str | None) -> tuple[str, list[str]]:
    if message is None:
        return "", []
    if isinstance(message, str):
        return message, []
    files = [f if isinstance(f, str) else f.get("path", "") for f in message.get("files") or []]
    return message.get("text") or "", [f for f in files if f]


def _ranking_html(state: Consultation, ranking, named: str | None) -> str:
    import html

    rows = "".join(
        f"<li><span class='name'>{html.escape(c.condition)}</span>"
        f"<span class='bar' role='presentation'><span style='width:{100 * c.probability:.0f}%'></span></span>"
        f"<span class='pct'>{100 * c.probability:.0f}%</span></li>" for c in ranking.conditions)
    notes = []
    if ranking.uncertain:
        notes.append(f"<p class='uncertain'>{html.escape(state.t('report.uncertain'))}</p>")
    top = [c.lower() for c in ranking.top(3)]
    if named and not any(c in named.lower() or named.lower() in c for c in top):
        notes.append(f"<p class='disagree' role='alert'>{html.escape(state.t('messages.disagree'))}</p>")
    return (f"<section id='differential' aria-label='{html.escape(state.t('report.ranked'))}'>"
            f"<h2>{html.escape(state.t('report.ranked'))}</h2><ol>{rows}</ol>{''.join(notes)}</section>")


def _waiting(state: Consultation, place: int) -> Message:
    ahead = place - 1
    text = state.t("messages.queue_next") if ahead == 0 else state.t("messages.queue_ahead", ahead=ahead)
    return {"role": "assistant", "content": text, "metadata": {"title": state.t("titles.queue")}}


def _sentence(message: str) -> str:
    """A message ending as a sentence does, so that another can follow it."""
    return message if message.rstrip().endswith((".", "!", "?", "。", "！", "？")) else message.rstrip() + "."


def _with_thumbnails(markdown: str, photos: list[Path], images: list) -> str:
    """The report as the page shows it: its photo links (file names beside the downloaded .md) as
    small inline thumbnails, since the page serves no file from the private folder to show."""
    import base64

    for path, image in zip(photos, images):
        thumb = image.image.copy()
        thumb.thumbnail((320, 320))
        url = "data:image/jpeg;base64," + base64.b64encode(_jpeg(thumb)).decode("ascii")
        markdown = markdown.replace(f"]({path.name})", f"]({url})")
    return markdown


def _jpeg(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=92)
    return buffer.getvalue()

