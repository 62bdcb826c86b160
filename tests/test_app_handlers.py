"""The app's handlers with a stand-in engine: upload, ask, stream, stop, regenerate, new patient,
bad inputs, and failures that must leave the app working."""

from __future__ import annotations

import io
import os
import re
import threading

import pytest

from model.serving.requests import GenerationStats
from PIL import Image
from pypdf import PdfReader

from tools.fixtures import skin_photo

from model.serving.sampler import SamplingSettings
from app.web.handlers import QUICK_PROMPTS, Handlers, SessionStore
from model.prompt.conversation import ConversationError


class FakeGeneration:
    def __init__(self, words, cancel, fail=None, queued=0):
        self.words, self.cancel, self.fail, self.queued = words, cancel, fail, queued
        self.text, self.tokens, self.finish_reason, self.notices = "", [], None, []
        self.stats = GenerationStats(dropped_turns=FakeGeneration.dropped)
        self.closed = False

    dropped: tuple[int, ...] = ()  # turns the next answers leave out for room (the engine's note is English)

    def __iter__(self):
        for i, word in enumerate(self.words):
            if self.fail is not None and i == 1:
                raise self.fail
            self.tokens.append(i)
            self.text += word
            yield word
            if self.cancel is not None and self.cancel.is_set():
                self.finish_reason = "cancelled"
                return
        self.finish_reason = "eos"

    def events(self):
        for _ in range(self.queued):
            yield "queued", 1
        for piece in self:
            yield "text", piece

    def close(self):
        self.closed = True


class FakeEngine:
    def __init__(self):
        self.calls, self.forgotten, self.forgotten_images = [], [], []
        self.reply = ["It ", "looks ", "like ", "eczema."]
        self.fail = None
        self.last = None
        self.queued = 0  # "queued" events before the answer starts
        self.gate, self.started = None, threading.Event()  # report answers wait at the gate when one is set
        self.request_timeout_s = None

    def stream(self, conversation, session=None, cancel=None, **settings):
        self.calls.append((conversation, session, settings))
        fail, self.fail = self.fail, None
        self.last = FakeGeneration(self.reply, cancel, fail, self.queued)
        return self.last

    def answer(self, conversation, session=None, **settings):
        self.calls.append((conversation, session, settings))
        if self.gate is not None:
            self.started.set()
            self.gate.wait(10)
        return "It is most likely psoriasis. Red plaques with scale."

    def forget(self, session):
        self.forgotten.append(session)

    def forget_images(self, keys):
        self.forgotten_images += keys

    def rank(self, images):
        return None  # no differential head


class FakeOOM(RuntimeError):
    pass


@pytest.fixture
def app(tmp_path):
    engine = FakeEngine()
    return Handlers(engine, SessionStore(tmp_path), max_message_chars=200, out_of_memory=(FakeOOM,)), engine, tmp_path


def _upload(root, name="photo.jpg", fmt="JPEG", data=None, size=(320, 240), image=None):
    """A good photo of skin (no quality note), unless `data` or `image` says otherwise."""
    folder = root / "gradio-upload-abc"
    folder.mkdir(exist_ok=True)
    path = folder / name
    if data is None:
        buffer = io.BytesIO()
        (image or skin_photo(0, size=size)).save(buffer, fmt)
        data = buffer.getvalue()
    path.write_bytes(data)
    return str(path)


def _last(updates):
    updates = list(updates)
    return updates, updates[-1][0]


def test_photo_then_question_streams_and_keeps_history(app):
    handlers, engine, root = app
    upload = _upload(root)
    updates, history = _last(handlers.submit("s1", {"text": "What is this?", "files": [upload]},
                                                 SamplingSettings(max_new_tokens=9)))
    assert len(updates) >= 4  # streamed piece by piece
    assert [m["role"] for m in history] == ["user", "user", "assistant"]
    photo = history[0]["content"]["path"]
    folder = handlers.store.get("s1").folder
    assert photo.startswith(str(folder) + "/") and Image.open(photo).format == "JPEG"
    assert history[1]["content"] == "What is this?" and history[2]["content"] == "It looks like eczema."
    conversation, session, settings = engine.calls[-1]
    assert session == handlers.store.get("s1").id and settings == {"max_new_tokens": 9} and len(conversation.turns[0].images) == 1
    assert not (root / "gradio-upload-abc").exists()  # the original upload is deleted at once

    _, history = _last(handlers.submit("s1", {"text": "What causes it?", "files": []}))
    conversation = engine.calls[-1][0]
    assert [t.question for t in conversation.turns] == ["What is this?", "What causes it?"]
    assert conversation.turns[0].answer == "It looks like eczema." and len(conversation.images) == 1
    assert len(history) == 5


def test_second_photo_in_the_same_consultation(app):
    handlers, engine, root = app
    list(handlers.submit("s", {"text": "Arm", "files": [_upload(root)]}))
    list(handlers.submit("s", {"text": "And the leg now", "files": [_upload(root, "leg.png", "PNG")]}))
    conversation = engine.calls[-1][0]
    assert [len(t.images) for t in conversation.turns] == [1, 1]
    assert sorted(p.name for p in handlers.store.get("s").folder.iterdir()) == ["photo-1.jpg", "photo-2.jpg"]


def test_gps_never_kept(app):
    handlers, _, root = app
    exif = Image.Exif()
    exif[0x8825] = {1: "N", 2: (51.0, 30.0, 0.0), 3: "W", 4: (0.0, 7.0, 0.0)}
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 120, 100)).save(buffer, "JPEG", exif=exif.tobytes())
    list(handlers.submit("g", {"text": "", "files": [_upload(root, data=buffer.getvalue())]}))
    kept = [p for p in root.rglob("*") if p.is_file()]
    assert kept and all(not Image.open(p).getexif() for p in kept)
    assert all(b"GPS" not in p.read_bytes() and b"Exif" not in p.read_bytes() for p in kept)


@pytest.mark.parametrize("data, message", [
    (b"not an image at all", "not a photo this app can read"),
    (b"", "is empty"),
])
def test_bad_files_get_a_message_in_the_chat(app, data, message):
    handlers, engine, root = app
    _, history = _last(handlers.submit("b", {"text": "What is it?", "files": [_upload(root, "x.jpg", data=data)]}))
    assert len(history) == 1 and history[0]["role"] == "assistant"  # one message, not a second "add a photo"
    assert message in history[0]["content"] and "Your question was not sent" in history[0]["content"]
    assert engine.calls == []


def test_empty_long_and_photo_less_messages(app):
    handlers, engine, root = app
    _, history = _last(handlers.submit("m", {"text": "   ", "files": []}))
    assert "Please type a question" in history[-1]["content"]
    _, history = _last(handlers.submit("m", {"text": "x" * 201, "files": []}))
    assert "201 characters" in history[-1]["content"] and "limit is 200" in history[-1]["content"]
    _, history = _last(handlers.submit("m", {"text": "Is it bad?", "files": []}))
    assert "add a photo of the skin first" in history[-1]["content"]
    assert engine.calls == []


def test_photo_alone_waits_for_a_question(app):
    handlers, engine, root = app
    _, history = _last(handlers.submit("p", {"text": "", "files": [_upload(root)]}))
    assert len(history) == 1 and engine.calls == []
    list(handlers.submit("p", "What is it?"))
    assert len(engine.calls[-1][0].turns[0].images) == 1


def test_stop_cancels_the_stream(app):
    handlers, engine, root = app
    stream = handlers.submit("c", {"text": "What is it?", "files": [_upload(root)]})
    next(stream)
    handlers.stop("c")
    _, history = _last(stream)
    assert engine.last.finish_reason == "cancelled" and history[-1]["content"].endswith("*(stopped)*")
    assert engine.last.closed
    _, history = _last(handlers.submit("c", "Next?"))  # and the consultation goes on
    assert history[-1]["content"] == "It looks like eczema."


def test_stop_before_the_answer_begins_stops_it_and_a_late_stop_stops_nothing(app):
    """Stop reached the server before the answer left Gradio's queue: it stops that answer as it
    begins. A Stop that arrives after its answer's event ended is forgotten with the event."""
    handlers, engine, root = app
    handlers.stop("q")  # pressed while the question still waited to start
    _, history = _last(handlers.submit("q", {"text": "What is it?", "files": [_upload(root)]}))
    assert engine.last.finish_reason == "cancelled" and history[-1]["content"].endswith("*(stopped)*")
    handlers.answer_ended("q")
    handlers.stop("q")  # too late: that answer is over
    handlers.answer_ended("q")  # its event ends
    _, history = _last(handlers.submit("q", "Next?"))
    assert history[-1]["content"] == "It looks like eczema."  # answered in full


def test_regenerate_replaces_the_last_answer(app):
    handlers, engine, root = app
    list(handlers.submit("r", {"text": "What is it?", "files": [_upload(root)]}))
    engine.reply = ["Maybe ", "psoriasis."]
    _, history = _last(handlers.regenerate("r"))
    assert [m["role"] for m in history] == ["user", "user", "assistant"]
    assert history[-1]["content"] == "Maybe psoriasis."
    assert len(engine.calls[-1][0].turns) == 1 and engine.calls[-1][0].pending is not None


def test_regenerate_that_gives_the_same_answer_says_why(app):
    """With varied answers off the model answers the same again: the page says so, and how to vary it."""
    handlers, engine, root = app
    list(handlers.submit("same", {"text": "What is it?", "files": [_upload(root)]}))
    _, history = _last(handlers.regenerate("same"))
    assert history[-2]["content"] == "It looks like eczema."
    assert "The same answer again" in history[-1]["content"] and "varied answers" in history[-1]["content"]
    engine.reply = ["Maybe ", "psoriasis."]
    _, history = _last(handlers.regenerate("same"))
    assert history[-1]["content"] == "Maybe psoriasis."  # a different answer needs no note


def test_the_chinese_page_says_its_notes_and_refusals_in_chinese(app, monkeypatch):
    """The context note and a history refusal in the page's language, not the engine's or pydantic's English."""
    handlers, engine, root = app
    handlers.set_language("zh", "zh")
    status, _ = handlers.set_history("zh", {"age": "old", "notes": "x"})
    assert status == "病史未保存：请检查：年龄（岁）" and "Input should" not in status
    monkeypatch.setattr(FakeGeneration, "dropped", (0, 1))
    _, history = _last(handlers.submit("zh", {"text": "这是什么？", "files": [_upload(root)]}))
    notes = [str(m["content"]) for m in history if (m.get("metadata") or {}).get("title")]
    assert any("最早 2 轮的文字" in n for n in notes) and not any("longer than" in n for n in notes), notes


def test_quick_prompts(app):
    handlers, engine, root = app
    list(handlers.submit("q", {"text": "", "files": [_upload(root)]}))
    list(handlers.ask_quick("q", "quick_doctor"))
    assert engine.calls[-1][0].turns[-1].question == "Should I see a doctor about this, and how soon?"
    assert "quick_doctor" in QUICK_PROMPTS


def test_red_flag_notice(app):
    handlers, engine, root = app
    engine.reply = ["It ", "may ", "bleed."]
    updates, _ = _last(handlers.submit("f", {"text": "My mole is changing", "files": [_upload(root)]}))
    notice = updates[-1][1]
    assert "mole or spot that is new or changing" in notice and "bleeding" in notice and "doctor" in notice


def test_new_patient_wipes_everything(app):
    handlers, engine, root = app
    list(handlers.submit("n", {"text": "What is it?", "files": [_upload(root)]}))
    handlers.report("n")
    state = handlers.store.get("n")
    assert any(state.folder.iterdir())
    history, notice = handlers.new_patient("n")
    assert history == [] and notice == ""
    assert not state.folder.exists()
    assert state.id in engine.forgotten and f"{state.id}:report" in engine.forgotten and len(engine.forgotten_images) == 1
    calls = len(engine.calls)
    _, history = _last(handlers.submit("n", "Hello?"))  # the old photo is gone with everything else
    assert "add a photo of the skin first" in history[-1]["content"] and len(engine.calls) == calls


def test_out_of_memory_is_reported_and_the_next_question_works(app):
    handlers, engine, root = app
    engine.fail = FakeOOM("CUDA out of memory")
    _, history = _last(handlers.submit("o", {"text": "What is it?", "files": [_upload(root)]}))
    assert "ran out of memory" in history[-1]["content"]
    state = handlers.store.get("o")
    assert state.conversation.turns == () and len(state.pending) == 1  # the photo is kept for the retry
    _, history = _last(handlers.submit("o", "What is it?"))
    assert history[-1]["content"] == "It looks like eczema."
    assert len(engine.calls[-1][0].turns[0].images) == 1


def test_engine_errors_are_messages(app):
    handlers, engine, root = app
    engine.fail = ConversationError("the question and images need 3000 context positions")
    _, history = _last(handlers.submit("e", {"text": "Hi", "files": [_upload(root)]}))
    assert "3000 context positions" in history[-1]["content"]
    engine.fail = ZeroDivisionError("boom")
    _, history = _last(handlers.submit("e", "Hi again"))
    assert "Something went wrong" in history[-1]["content"] and "boom" not in history[-1]["content"]


def test_report_writes_markdown_and_pdf(app):
    from model.clinical.report_pdf import report_pdf

    handlers, engine, root = app
    markdown, files = handlers.report("x")
    assert "add a photo" in markdown and files == []
    list(handlers.submit("x", {"text": "", "files": [_upload(root)]}))
    steps = []
    markdown, files = handlers.report("x", render_pdf=report_pdf, on_step=lambda done, total: steps.append((done, total)))
    assert steps == [(0, 5), (1, 5), (2, 5), (3, 5), (4, 5)]
    assert "psoriasis" in markdown and "decision support" in markdown
    assert [f.rsplit("/", 1)[1] for f in files] == ["skin-report.md", "skin-report.pdf", "skin-report-photo-1.jpg"]
    assert open(files[1], "rb").read(5) == b"%PDF-"
    assert all(s == f"{handlers.store.get('x').id}:report" for _, s, _ in engine.calls)
    # what a clinician files: when, a visit reference, the photo (shown in the Markdown, embedded in the PDF), the model
    assert re.search(r"Date and time: \d{1,2} [A-Z][a-z]+ \d{4}, \d\d:\d\d \(UTC[+-]\d\d:\d\d\)", markdown)
    assert re.search(r"Visit reference: SG-\d{8}-[0-9A-F]{6}", markdown)
    # the page shows the photo inline; the downloaded .md links the photo file beside it
    assert "![Photo 1](data:image/jpeg;base64," in markdown and "Model: SkinGPT" in markdown
    assert "![Photo 1](skin-report-photo-1.jpg)" in open(files[0]).read()
    assert Image.open(files[2]).size == (320, 240)
    pdf = PdfReader(files[1])
    text = "".join(page.extract_text() for page in pdf.pages)
    assert "Visit reference" in text and "Clinical history" in text and "Photo quality" in text
    assert sum(len(page.images) for page in pdf.pages) == 1


def test_clinical_history_goes_into_the_prompt_report_and_warning_signs(app):
    """Saved from the form: first Human turn after the image, the report's section, the red flags;
    a malformed field is refused by name; New patient wipes it."""
    handlers, engine, root = app
    status, notice = handlers.set_history("h", {"age": 130, "sex": None})
    assert "not saved" in status and "Age (years)" in status and handlers.store.get("h").history is None
    status, notice = handlers.set_history("h", {"age": 62, "sex": "female", "body_site": "back", "duration": "weeks",
                                                "symptoms": ["itch", "bleeding"], "changes": ["size"],
                                                "treatments": "", "fitzpatrick": 5, "notes": None})
    assert "Saved" in status and "bleeding" in notice and "new or changing" in notice  # raised before any answer
    list(handlers.submit("h", {"text": "What is this?", "files": [_upload(root)]}))
    asked = engine.calls[-1][0]
    assert asked.turns[0].question == ("Patient details: age 62; sex female; body site back; for under a month; "
                                       "symptoms itch, bleeding; changed in size; Fitzpatrick skin type V. What is this?")
    assert handlers.store.get("h").conversation.turns[0].question == "What is this?"  # the chat keeps what was typed
    list(handlers.submit("h", {"text": "And now?", "files": []}))
    assert engine.calls[-1][0].turns[1].question == "And now?"  # only the first question carries it
    markdown, _ = handlers.report("h")
    assert "## Clinical history" in markdown and "- Age (years): 62" in markdown and "- Symptoms: itch, bleeding" in markdown
    assert engine.calls[-1][0].turns[0].question.startswith("Patient details: age 62;")
    handlers.new_patient("h")
    assert handlers.store.get("h").history is None and handlers.store.get("h").flags == []
    list(handlers.submit("h", {"text": "What is this?", "files": [_upload(root, "again.jpg")]}))
    assert engine.calls[-1][0].turns[0].question == "What is this?"  # no history: the prompt as before


def test_a_poor_photo_is_told_before_the_answer_and_the_patient_may_go_on(app):
    from PIL import ImageFilter

    handlers, engine, root = app
    blurred = skin_photo(0, size=(320, 240)).filter(ImageFilter.GaussianBlur(3))
    history = list(handlers.submit("q", {"text": "What is this?", "files": [_upload(root, image=blurred)]}))[-1][0]
    note = [m for m in history if (m.get("metadata") or {}).get("title") == "Photo quality"]
    assert len(note) == 1 and "blurred" in note[0]["content"] and "Hold the phone still" in note[0]["content"]
    assert history.index(note[0]) < len(history) - 1 and history[-1]["content"].startswith("It looks like eczema")
    assert handlers.store.get("q").quality[0].problems == ["blurry"]
    handlers.set_language("z", "zh")
    list(handlers.submit("z", {"text": "", "files": [_upload(root, "tiny.png", "PNG", image=skin_photo(0, size=(120, 90)))]}))
    notes = [m["content"] for m in handlers.store.get("z").messages if (m.get("metadata") or {}).get("title") == "照片质量"]
    assert notes and "照片太小" in notes[0]
    markdown, _ = handlers.report("q")
    assert "## Photo quality" in markdown and "Photo 1: It looks blurred." in markdown


def test_a_refused_question_is_kept_for_the_box(app):
    handlers, engine, root = app
    list(handlers.submit("u", {"text": "What is this rash?", "files": []}))
    assert handlers.store.get("u").unsent == "What is this rash?"  # no photo yet: the box gets it back
    bad = _upload(root, "bad.jpg", data=b"not an image")
    history = list(handlers.submit("u", {"text": "And this?", "files": [bad]}))[-1][0]
    assert handlers.store.get("u").unsent == "And this?"
    assert ". Your question was not sent" in history[-1]["content"]  # a full stop between the two sentences
    list(handlers.submit("u", {"text": "What is this?", "files": [_upload(root)]}))
    assert handlers.store.get("u").unsent == ""


def test_an_empty_answer_says_what_to_try(app):
    handlers, engine, root = app
    engine.reply = []
    history = list(handlers.submit("e", {"text": "What is this?", "files": [_upload(root)]}))[-1][0]
    assert "Regenerate" in history[-1]["content"] and "(no answer)" not in history[-1]["content"]


def test_sessions_are_isolated_and_idle_ones_expire(app):
    handlers, engine, root = app
    list(handlers.submit("a", {"text": "A?", "files": [_upload(root)]}))
    list(handlers.submit("b", {"text": "B?", "files": [_upload(root, "b.jpg")]}))
    assert [t.question for t in handlers.store.get("a").conversation.turns] == ["A?"]
    folder = handlers.store.get("a").folder
    handlers.store.ttl_s = 0
    assert handlers.sweep() == 2 and not folder.exists()


def test_concurrent_sessions_do_not_mix(app):
    handlers, engine, root = app
    uploads = {s: _upload(root, f"{s}.jpg") for s in ("t1", "t2")}
    results = {}

    def run(session):
        results[session] = list(handlers.submit(session, {"text": f"question {session}", "files": [uploads[session]]}))

    threads = [threading.Thread(target=run, args=(s,)) for s in uploads]
    [t.start() for t in threads]
    [t.join() for t in threads]
    for session in uploads:
        history = results[session][-1][0]
        assert history[1]["content"] == f"question {session}"
        assert history[0]["content"]["path"].startswith(str(handlers.store.get(session).folder) + "/")


def test_uploads_sharing_a_folder_are_removed_safely_in_parallel(tmp_path):
    """Two uploads in one upload folder, removed at once: no request fails, the folder goes."""
    from app.privacy import remove_upload

    for attempt in range(30):
        folder = tmp_path / f"shared-{attempt}"
        folder.mkdir()
        paths = [folder / f"{i}.jpg" for i in range(4)]
        for path in paths:
            path.write_bytes(b"x")
        barrier = threading.Barrier(len(paths))
        errors = []

        def remove(path):
            barrier.wait()
            try:
                remove_upload(path, tmp_path)
            except Exception as err:  # the point of the test: nothing may escape
                errors.append(err)

        threads = [threading.Thread(target=remove, args=(p,)) for p in paths]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert errors == [] and not folder.exists()


# -- defects found by review (issue 10) ---------------------------------------------------------------

def test_a_stream_closed_by_its_consumer_keeps_the_partial_answer_and_the_next_question_works(app):
    """Gradio closes the answer generator on Stop, a cancelled job or a closed tab: GeneratorExit."""
    handlers, engine, root = app
    stream = handlers.submit("g", {"text": "What is it?", "files": [_upload(root)]})
    next(stream), next(stream)
    stream.close()
    state = handlers.store.get("g")
    assert state.conversation.turns[-1].answer == "It looks"  # what had been shown is the answer
    assert state.messages[-1]["content"] == "It looks\n\n*(stopped)*"
    _, history = _last(handlers.submit("g", "And now?"))
    assert history[-1]["content"] == "It looks like eczema."
    _, history = _last(handlers.regenerate("g"))
    assert history[-2]["content"] == "It looks like eczema." and state.answering is None  # (then: the same again)


def test_a_stream_abandoned_without_close_is_settled_by_the_next_question(app):
    handlers, engine, root = app
    abandoned = handlers.submit("a", {"text": "What is it?", "files": [_upload(root)]})
    next(abandoned), next(abandoned)  # never resumed, never closed (kept alive here on purpose)
    first = engine.last
    _, history = _last(handlers.submit("a", "Hello again?"))
    assert [m["content"] for m in history if m["role"] == "assistant"] == ["It looks\n\n*(stopped)*", "It looks like eczema."]
    assert first.cancel.is_set()  # the abandoned answer was told to stop
    late = list(abandoned)  # resumed late, it adds nothing and changes nothing
    assert all(update[0][-1]["content"] == "It looks like eczema." for update in late)
    assert [m["content"] for m in handlers.store.get("a").messages if m["role"] == "assistant"] == [
        "It looks\n\n*(stopped)*", "It looks like eczema."]
    assert handlers.store.get("a").conversation.turns[0].answer == "It looks"


@pytest.mark.parametrize("hostile", ["/tmp/outside", "../../escape", "..", "a/../../b", "x" * 5000, "\x00nul",
                                     "C:\\Windows", "%2e%2e%2f", "sessions"])
def test_client_chosen_session_names_never_reach_the_file_system(app, tmp_path_factory, hostile):
    handlers, engine, root = app
    victim = tmp_path_factory.mktemp("victim")
    (victim / "keep.txt").write_text("precious")
    name = hostile.replace("/tmp/outside", str(victim))
    list(handlers.submit(name, {"text": "What is it?", "files": [_upload(root)]}))
    handlers.report(name)
    folder = handlers.store.get(name).folder
    assert folder.parent == root / "sessions" and len(folder.name) == 32 and folder.is_dir()
    handlers.new_patient(name)
    assert (victim / "keep.txt").read_text() == "precious"
    assert not folder.exists() and root.exists()
    assert [p.name for p in (root / "sessions").iterdir()] == []


def test_session_folders_are_named_only_by_server_ids(tmp_path):
    from app.privacy import session_dir

    for bad in ("../x", "/abs", "abc", "0" * 31, "g" * 32):
        with pytest.raises(ValueError):
            session_dir(tmp_path, bad)


def test_new_patient_stops_a_running_report_and_nothing_is_written_after(app):
    handlers, engine, root = app
    list(handlers.submit("r", {"text": "", "files": [_upload(root)]}))
    wiped = handlers.store.get("r")
    engine.gate = threading.Event()
    result = {}
    worker = threading.Thread(target=lambda: result.setdefault("report", handlers.report("r")))
    worker.start()
    assert engine.started.wait(10)
    handlers.new_patient("r")
    assert engine.calls[-1][2]["cancel"].is_set()  # the answer in flight was told to stop
    engine.gate.set()
    worker.join(10)
    markdown, files = result["report"]
    assert "cleared" in markdown and files == []
    assert not wiped.folder.exists() and list((root / "sessions").iterdir()) == []


def test_report_files_are_private_to_the_server_user(app):
    handlers, engine, root = app
    list(handlers.submit("p", {"text": "", "files": [_upload(root)]}))
    _, files = handlers.report("p")
    assert files and all((os.stat(f).st_mode & 0o777) == 0o600 for f in files)
    assert all((os.stat(p).st_mode & 0o777) == 0o600 for p in handlers.store.get("p").folder.iterdir())


def test_attached_but_unsent_photos_go_with_the_consultation_and_after_a_while(app):
    handlers, engine, root = app
    unsent = _upload(root, "gps.jpg")
    handlers.attached("u", {"text": "", "files": [{"path": unsent}]})
    handlers.new_patient("u")
    assert not os.path.exists(unsent)

    forgotten = _upload(root, "forgotten.jpg")  # attached in a tab that never said so (an API upload)
    handlers.sweep()
    assert os.path.exists(forgotten)  # younger than the upload time to live
    os.utime(forgotten, (0, 0))
    handlers.sweep()
    assert not os.path.exists(forgotten)


def test_a_hostile_attached_path_outside_the_uploads_is_never_deleted(app, tmp_path_factory):
    handlers, engine, root = app
    outside = tmp_path_factory.mktemp("outside") / "keep.txt"
    outside.write_text("x")
    list(handlers.submit("h", {"text": "", "files": [_upload(root)]}))
    inside = next(handlers.store.get("h").folder.iterdir())
    handlers.attached("h2", {"text": "", "files": [{"path": str(outside)}, {"path": str(inside)}]})
    handlers.new_patient("h2")
    assert outside.exists() and inside.exists()


def test_photos_per_consultation_and_in_memory_are_bounded(app):
    from app.settings import MAX_PHOTOS

    handlers, engine, root = app
    for i in range(MAX_PHOTOS):
        list(handlers.submit("m", {"text": "", "files": [_upload(root, f"{i}.jpg")]}))
    _, history = _last(handlers.submit("m", {"text": "", "files": [_upload(root, "one-more.jpg")]}))
    assert f"already has {MAX_PHOTOS} photos" in history[-1]["content"]
    handlers.store.max_photo_bytes = handlers.store.photo_bytes() + 100
    _, history = _last(handlers.submit("other", {"text": "", "files": [_upload(root, "late.jpg")]}))
    assert "as many photos as it can right now" in history[-1]["content"]
    handlers.new_patient("m")  # wiping a consultation frees its share
    _, history = _last(handlers.submit("other", {"text": "", "files": [_upload(root, "later.jpg")]}))
    assert history[-1]["content"]["path"].endswith("photo-1.jpg")


def test_an_animated_photo_is_used_with_a_note(app):
    handlers, engine, root = app
    frames = [Image.new("RGB", (32, 32), (80 * i, 100, 40)) for i in range(3)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
    _, history = _last(handlers.submit("gif", {"text": "What is it?", "files": [_upload(root, "a.gif", data=buffer.getvalue())]}))
    assert "only the first one is used" in history[1]["content"] and history[-1]["content"] == "It looks like eczema."


def test_private_folders_of_dead_processes_are_removed_at_start(tmp_path):
    import subprocess
    import sys

    from app.privacy import OWNER_FILE, PREFIX, remove_orphans

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    left = tmp_path / f"{PREFIX}crashed"
    (left / "sessions" / "abc").mkdir(parents=True)
    (left / "gradio-upload" ).mkdir()
    (left / "gradio-upload" / "gps.jpg").write_bytes(b"x")
    (left / OWNER_FILE).write_text(str(dead.pid))
    alive = tmp_path / f"{PREFIX}running"
    alive.mkdir()
    (alive / OWNER_FILE).write_text(f"{os.getppid()}")  # a live process (pytest's parent)
    unowned = tmp_path / f"{PREFIX}unknown"
    unowned.mkdir()
    assert remove_orphans(tmp_path) == [left]
    assert not left.exists() and alive.exists() and unowned.exists()


def test_a_queued_answer_shows_its_place_and_the_place_is_not_kept(app):
    handlers, engine, root = app
    engine.queued = 2
    updates, history = _last(handlers.submit("q", {"text": "What is it?", "files": [_upload(root)]}))
    waiting = [u[0][-1] for u in updates if (u[0][-1].get("metadata") or {}).get("title") == "In the queue"]
    assert len(waiting) == 2 and "as soon as the one being written now is done" in waiting[0]["content"]
    assert history[-1]["content"] == "It looks like eczema."
    assert not any((m.get("metadata") or {}).get("title") == "In the queue" for m in history)


def test_a_cleaned_upload_keeps_its_pixels_on_disk_not_in_memory(tmp_path):
    """Until it is sent, an upload is its private PNG and what was measured on arrival: no decoded
    image is held for it (a 40-megapixel photo would hold 120 MB), and sending it reads the PNG back."""
    from app.web.uploads import Uploads
    from model.images.intake import Kept

    uploads = Uploads(tmp_path)
    folder = uploads.new_folder()
    original = folder / "jane_doe_mole.jpg"
    skin_photo(1, size=(640, 480)).save(original, "JPEG")
    clean = uploads.clean(original)
    entry = uploads._items[clean]
    assert isinstance(entry.kept, Kept) and not any(isinstance(v, Image.Image) for v in vars(entry.kept).values())
    assert uploads.quality(clean) is entry.kept.quality and not original.exists()
    photo = uploads.take(clean)
    assert photo.image.size == (640, 480) and photo.quality is entry.kept.quality and not os.path.exists(clean)


def test_a_long_consultation_leaves_no_components_behind(app, tmp_path):
    """Gradio files a new instance of a component in the session after each property update (the
    question box is locked and opened on every answer): ~200 more a minute, with their configs, under
    the 30-minute soak, for as long as a tab stays open. The server's sweeper drops them; on a real
    in-process server, after 20 more answers and one sweep the session holds no more than after the
    first few, and the consultation goes on answering."""
    import gc
    import socket

    import gradio as gr
    from gradio_client import Client, handle_file

    from app.web.ui import build, drop_replaced_components

    handlers, _, _ = app
    blocks = build(handlers, demo_mode=True, model_name="demo")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    blocks.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=False)
        photo = tmp_path / "arm.jpg"
        skin_photo(3, size=(320, 240)).save(photo)
        settings = (24, False, 1.0, 0.9)

        def ask(questions: int) -> None:
            for _ in range(questions):
                client.predict({"text": "What is it?", "files": [handle_file(str(photo))]}, *settings, api_name="/ask")
                client.predict({"text": "What could cause it?", "files": []}, *settings, api_name="/ask")

        def components() -> int:
            gc.collect()
            return sum(isinstance(o, gr.components.Component) for o in gc.get_objects())

        ask(2)
        drop_replaced_components(blocks)
        settled = components()
        ask(10)
        dropped = drop_replaced_components(blocks)
        assert components() <= settled, f"components pile up with each answer ({dropped} dropped)"
        history = client.predict({"text": "Is it serious?", "files": []}, *settings, api_name="/ask")[0]
        assert "Is it serious?" in str(history) and "eczema" in str(history)  # the session still answers
    finally:
        blocks.close()
