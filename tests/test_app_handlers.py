"""The app's handlers with a stand-in engine: upload, ask, stream, stop, regenerate, new patient,
bad inputs, and failures that must leave the app working."""

from __future__ import annotations

import io
import threading

import numpy as np
import pytest
from PIL import Image

from app.handlers import QUICK_PROMPTS, Handlers, SessionStore
from model.conversation import ConversationError


class FakeGeneration:
    def __init__(self, words, cancel, fail=None):
        self.words, self.cancel, self.fail = words, cancel, fail
        self.text, self.tokens, self.finish_reason, self.notices = "", [], None, []
        self.closed = False

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

    def close(self):
        self.closed = True


class FakeEngine:
    def __init__(self):
        self.calls, self.forgotten, self.forgotten_images = [], [], []
        self.reply = ["It ", "looks ", "like ", "eczema."]
        self.fail = None
        self.last = None

    def stream(self, conversation, session=None, cancel=None, **settings):
        self.calls.append((conversation, session, settings))
        fail, self.fail = self.fail, None
        self.last = FakeGeneration(self.reply, cancel, fail)
        return self.last

    def answer(self, conversation, session=None, **settings):
        self.calls.append((conversation, session, settings))
        return "It is most likely psoriasis. Red plaques with scale."

    def forget(self, session):
        self.forgotten.append(session)

    def forget_images(self, keys):
        self.forgotten_images += keys


class FakeOOM(RuntimeError):
    pass


@pytest.fixture
def app(tmp_path):
    engine = FakeEngine()
    return Handlers(engine, SessionStore(tmp_path), max_message_chars=200, out_of_memory=(FakeOOM,)), engine, tmp_path


def _upload(root, name="photo.jpg", fmt="JPEG", data=None, size=(64, 48)):
    folder = root / "gradio-upload-abc"
    folder.mkdir(exist_ok=True)
    path = folder / name
    if data is None:
        buffer = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buffer, fmt)
        data = buffer.getvalue()
    path.write_bytes(data)
    return str(path)


def _last(updates):
    updates = list(updates)
    return updates, updates[-1][0]


def test_photo_then_question_streams_and_keeps_history(app):
    handlers, engine, root = app
    upload = _upload(root)
    updates, history = _last(handlers.submit("s1", {"text": "What is this?", "files": [upload]}, {"max_new_tokens": 9}))
    assert len(updates) >= 4  # streamed piece by piece
    assert [m["role"] for m in history] == ["user", "user", "assistant"]
    photo = history[0]["content"]["path"]
    assert photo.startswith(str(root / "sessions" / "s1")) and Image.open(photo).format == "JPEG"
    assert history[1]["content"] == "What is this?" and history[2]["content"] == "It looks like eczema."
    conversation, session, settings = engine.calls[-1]
    assert session == "s1" and settings == {"max_new_tokens": 9} and len(conversation.turns[0].images) == 1
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
    assert sorted(p.name for p in (root / "sessions" / "s").iterdir()) == ["photo-1.jpg", "photo-2.jpg"]


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
    assert message in history[0]["content"] and history[0]["role"] == "assistant"
    assert "add a photo" in history[-1]["content"]  # and the question waits for a photo
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
    assert engine.last.finish_reason == "cancelled" and "(stopped)" in history[-1]["content"]
    assert engine.last.closed


def test_regenerate_replaces_the_last_answer(app):
    handlers, engine, root = app
    list(handlers.submit("r", {"text": "What is it?", "files": [_upload(root)]}))
    engine.reply = ["Maybe ", "psoriasis."]
    _, history = _last(handlers.regenerate("r"))
    assert [m["role"] for m in history] == ["user", "user", "assistant"]
    assert history[-1]["content"] == "Maybe psoriasis."
    assert len(engine.calls[-1][0].turns) == 1 and engine.calls[-1][0].pending is not None


def test_quick_prompts(app):
    handlers, engine, root = app
    list(handlers.submit("q", {"text": "", "files": [_upload(root)]}))
    list(handlers.ask_quick("q", "Should I see a doctor?"))
    assert engine.calls[-1][0].turns[-1].question == QUICK_PROMPTS["Should I see a doctor?"]


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
    assert any((root / "sessions" / "n").iterdir())
    history, notice = handlers.new_patient("n")
    assert history == [] and notice == ""
    assert not (root / "sessions" / "n").exists()
    assert "n" in engine.forgotten and "n:report" in engine.forgotten and len(engine.forgotten_images) == 1
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
    from app.export import report_pdf

    handlers, engine, root = app
    markdown, files = handlers.report("x")
    assert "add a photo" in markdown and files == []
    list(handlers.submit("x", {"text": "", "files": [_upload(root)]}))
    steps = []
    markdown, files = handlers.report("x", render_pdf=report_pdf, on_step=lambda done, total: steps.append((done, total)))
    assert steps == [(0, 5), (1, 5), (2, 5), (3, 5), (4, 5)]
    assert "psoriasis" in markdown and "decision support" in markdown
    assert [f.rsplit("/", 1)[1] for f in files] == ["skin-report.md", "skin-report.pdf"]
    assert open(files[1], "rb").read(5) == b"%PDF-"
    assert all(s == "x:report" for _, s, _ in engine.calls)


def test_sessions_are_isolated_and_idle_ones_expire(app):
    handlers, engine, root = app
    list(handlers.submit("a", {"text": "A?", "files": [_upload(root)]}))
    list(handlers.submit("b", {"text": "B?", "files": [_upload(root, "b.jpg")]}))
    assert [t.question for t in handlers.store.get("a").conversation.turns] == ["A?"]
    handlers.store.ttl_s = 0
    assert handlers.sweep() == 2 and not (root / "sessions" / "a").exists()


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
        assert history[0]["content"]["path"].startswith(str(root / "sessions" / session))


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
