"""The page's kept visits (--records) through the handlers, with the stand-in engine: save, open a
patient, a follow-up with both photos dated, its report, the referral, delete; nothing left behind."""

from __future__ import annotations

import json
import re

import pytest

from test_app_handlers import FakeEngine, _upload
from test_visits import PASS, SIGNATURES, _everything_under

from app.web.handlers import Handlers, SessionStore
from app.web.visits import VisitDesk
from model.visits.store import VisitStore
from tools.fixtures import skin_photo

NOTES = "a scar from a burn in childhood"


@pytest.fixture
def clinic(tmp_path):
    engine = FakeEngine()
    store = SessionStore(tmp_path / "private")
    handlers = Handlers(engine, store, max_message_chars=2000)
    desk = VisitDesk(store, VisitStore(tmp_path / "rec", PASS), "demo 1")
    return handlers, desk, engine, tmp_path


def _first_visit(handlers, desk, root, session="a", patient="clinic-0042"):
    handlers.set_history(session, {"age": "47", "body_site": "back", "notes": NOTES})
    list(handlers.submit(session, {"text": "What is this?", "files": [_upload(root)]}))
    status, listing, choices = desk.save(session, patient)
    visit = choices[0][1]
    assert status == f"Visit {visit} saved for patient {patient}, encrypted."
    return visit


def test_a_saved_visit_is_listed_sealed_and_the_private_folder_is_emptied_after(clinic):
    handlers, desk, engine, root = clinic
    status, _, _ = desk.save("a", "clinic-0042")
    assert status == "Nothing to save yet: send a photo and a question first."
    assert desk.save("a", "not a reference")[0].startswith("Enter the patient reference first")
    visit = _first_visit(handlers, desk, root)
    assert desk.save("a", "clinic-0042")[0].startswith(f"This consultation is already saved as visit {visit}")
    folder = handlers.store.get("a").folder
    handlers.new_patient("a")
    assert not folder.exists()  # the consultation's own files go at New patient, kept or not
    raw = _everything_under(root / "rec")
    assert not any(s in raw for s in SIGNATURES + (NOTES.encode(), b"eczema", b"clinic-0042"))
    status, listing, choices = desk.open_patient("b", "clinic-0042")
    assert status == "1 saved visit(s) of patient clinic-0042, newest first:"
    assert "data:image/jpeg;base64," in listing and re.search(r"\d{1,2} [A-Z][a-z]+ \d{4}, back, 1 photo\(s\)", listing)
    assert choices[0][1] == visit and desk.open_patient("b", "clinic-0043")[0] == "No saved visits for patient clinic-0043."
    record, jpegs = desk.records.load(visit)
    assert [t.answer for t in record.turns] == ["It looks like eczema."] and record.history.notes == NOTES
    assert len(jpegs) == 1 and record.photos[0].quality is not None


@pytest.mark.parametrize("lang, dated", [("en", r"\d{1,2} [A-Z][a-z]+ \d{4}"), ("zh", r"\d{4}年\d{1,2}月\d{1,2}日")])
def test_a_follow_up_shows_both_photos_dated_asks_what_changed_and_flags_a_change(clinic, lang, dated):
    handlers, desk, engine, root = clinic
    visit = _first_visit(handlers, desk, root)
    handlers.new_patient("a")
    handlers.set_language("a", lang)
    list(handlers.submit("a", {"text": "", "files": [_upload(root, image=skin_photo(5, size=(320, 240)))]}))
    messages, compared = desk.compare("a", "clinic-0042", visit)
    assert compared == visit
    photos = [m for m in messages if m["role"] == "user" and isinstance(m["content"], dict)]
    assert [p["content"]["path"].rsplit("/", 1)[1] for p in photos] == ["photo-1.jpg", "photo-earlier.jpg"]
    note = messages[-1]["content"]
    assert len(re.findall(dated, note)) == 2 and visit in note  # both photos, each with its date
    engine.reply = ["The spot is larger ", "and darker than in photo 1."]
    list(handlers.ask_what_changed("a"))
    conversation = engine.calls[-1][0]
    state = handlers.store.get("a")
    # the model reads the earlier photo first, then today's, dated in one fixed English sentence
    from model.prompt.conversation import render, template

    prompt = render(template("skingpt4"), conversation)
    assert conversation.images == (state.earlier.image, state.conversation.images[0])
    assert re.search(r"###Human: <Img><ImageHere></Img> <Img><ImageHere></Img> Photo 1 is from the last visit on "
                     r"\d{1,2} [A-Z][a-z]+ \d{4}; photo 2 is from today, \d{1,2} [A-Z][a-z]+ \d{4}\. " +
                     re.escape(conversation.turns[0].question.split(". ", 1)[1][:20]), prompt)
    change = {"en": "a change since the last visit", "zh": "与上次就诊相比有变化"}[lang]
    assert change in handlers._notice(state)

    engine_answers = engine.answer
    engine.answer = lambda conversation, **kw: (engine.calls.append((conversation, None, kw)),
                                                "It has grown and the border is irregular.")[1]
    markdown, files = handlers.report("a")
    engine.answer = engine_answers
    caption = {"en": r"Photo (\d), " + dated, "zh": r"照片 (\d)，" + dated}[lang]
    line = next(l for l in markdown.splitlines() if l.startswith("!["))
    assert [m.group(1) for m in re.finditer(r"!\[" + caption + r"\]\(data:image/jpeg", line)] == ["1", "2"]  # side by side
    assert change in markdown
    assert [f.rsplit("/", 1)[1] for f in files][-2:] == ["skin-report-photo-1.jpg", "skin-report-photo-2.jpg"]

    status, _, choices = desk.save("a", "clinic-0042")
    follow = choices[0][1]
    record, jpegs = desk.records.load(follow)
    assert record.compared_with == visit and [p.from_visit for p in record.photos] == [visit, None]
    assert record.report is not None and change in record.red_flags and len(jpegs) == 2


def test_the_referral_is_written_privately_and_validates(clinic):
    from fhir.resources.R4B.bundle import Bundle

    handlers, desk, engine, root = clinic
    visit = _first_visit(handlers, desk, root)
    status, path = desk.referral("a", visit)
    assert path.startswith(str(handlers.store.get("a").folder)) and visit in status
    bundle = Bundle.model_validate_json(open(path).read())
    assert bundle.entry[-1].resource.status == "preliminary"
    assert json.loads(open(path).read())["entry"][0]["resource"]["identifier"][0]["value"] == "clinic-0042"


def test_delete_takes_only_the_patients_own_visit_and_then_the_patient(clinic):
    handlers, desk, engine, root = clinic
    mine = _first_visit(handlers, desk, root)
    theirs = _first_visit(handlers, desk, root, session="c", patient="clinic-0099")
    assert desk.delete_visit("a", "clinic-0042", theirs)[0].startswith("Choose one of the patient's visits")
    assert [s.visit for s in desk.records.summaries("clinic-0099")] == [theirs]
    status, listing, choices = desk.delete_visit("a", "clinic-0042", mine)
    assert status == f"Visit {mine} deleted for good." and choices == []
    assert desk.delete_patient("a", "clinic-0099")[0] == "1 visit(s) of patient clinic-0099 deleted for good."
    assert desk.records.summaries() == []
