"""Kept visits (`--records`): sealed at rest, whole or absent, deleted for good, exported as FHIR."""

from __future__ import annotations

import base64
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from conftest import ROOT
from model.prompt.conversation import Conversation, ImageInput, render, template
from model.clinical.history import ClinicalHistory
from model.visits.followup import changed_since_last_visit, with_comparison
from model.visits.store import VisitStore
from model.visits.vault import RecordsError
from model.visits.visit import SavedPhoto, SavedTurn, Visit, jpeg
from tools.fixtures import skin_photo

PASS = "correct horse battery staple"
NOTES = "it catches on the bra strap"
ANSWER = "A pigmented papule with an irregular border"
# A stored photo's plaintext would show one of these. (Not the bare 3-byte JPEG start FF D8 FF: sealed
# bytes are random, and a 200 KB random file holds those three bytes about once in 80 tries. Every JPEG
# the app writes is Pillow's and starts with the 10-byte JFIF header below, which random bytes never show.)
SIGNATURES = (b"\xff\xd8\xff\xe0\x00\x10JFIF", b"\x89PNG", b"JFIF", b"Exif")


def _visit(n: int = 0, patient: str = "clinic-0042", created: str = "2026-12-07T10:15+01:00", photos: int = 1):
    history = ClinicalHistory(age=54, sex="female", body_site="back", symptoms=["itch", "bleeding"], notes=NOTES)
    visit = Visit(visit=f"SG-20261207-{n:06X}", patient=patient, created=created, history=history,
                  photos=[SavedPhoto(taken=created) for _ in range(photos)], model="demo 1",
                  turns=[SavedTurn(question="What is this?", answer=ANSWER)], red_flags=["bleeding"])
    return visit, [jpeg(skin_photo(seed=n + k, size=(320, 240))) for k in range(photos)]


def _everything_under(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in folder.rglob("*") if p.is_file())


def test_nothing_under_the_folder_is_plaintext_and_a_visit_comes_back_whole(tmp_path):
    store = VisitStore(tmp_path / "rec", PASS)
    visit, jpegs = _visit(photos=2)
    store.save(visit, jpegs)
    raw = _everything_under(tmp_path / "rec")
    for secret in SIGNATURES + (NOTES.encode(), ANSWER.encode(), b"clinic-0042", visit.visit.encode(), b"back"):
        assert secret not in raw, secret
    again = VisitStore(tmp_path / "rec", PASS)
    loaded, photos = again.load(visit.visit)
    assert loaded == visit and photos == jpegs
    [summary] = again.summaries("clinic-0042")
    assert (summary.body_site, summary.photos, summary.red_flags) == ("back", 2, ["bleeding"])
    assert summary.thumbnail.startswith(b"\xff\xd8\xff") and again.summaries("clinic-0043") == []
    assert oct((tmp_path / "rec").stat().st_mode & 0o777) == "0o700"
    assert oct((tmp_path / "rec" / "visits.db").stat().st_mode & 0o777) == "0o600"


def test_a_stored_photo_has_no_exif(tmp_path):
    import io

    from PIL import Image

    exif = Image.Exif()
    exif[0x010F], exif[0x0132] = "PhoneCam", "2026:12:07 10:15:00"  # camera maker, date taken
    skin_photo(seed=3, size=(320, 240)).save(tmp_path / "phone.jpg", exif=exif.tobytes())
    with Image.open(tmp_path / "phone.jpg") as phone:
        assert phone.getexif() and "exif" in phone.info
        data = jpeg(phone)
    assert b"Exif" not in data and b"PhoneCam" not in data and not Image.open(io.BytesIO(data)).getexif()


def test_a_wrong_passphrase_opens_and_changes_nothing(tmp_path):
    store = VisitStore(tmp_path / "rec", PASS)
    store.save(*_visit())
    before = _everything_under(tmp_path / "rec")
    with pytest.raises(RecordsError, match="wrong passphrase"):
        VisitStore(tmp_path / "rec", PASS + "!")
    assert _everything_under(tmp_path / "rec") == before
    with pytest.raises(RecordsError, match="at least 8"):
        VisitStore(tmp_path / "new", "short")


def test_a_tampered_value_is_refused_not_shown(tmp_path):
    store = VisitStore(tmp_path / "rec", PASS)
    visit, jpegs = _visit()
    store.save(visit, jpegs)
    with sqlite3.connect(tmp_path / "rec" / "visits.db") as db:
        (body,) = db.execute("SELECT body FROM visits").fetchone()
        db.execute("UPDATE visits SET body = ?", (body[:-1] + bytes([body[-1] ^ 1]),))
    with pytest.raises(RecordsError, match="integrity check"):
        store.load(visit.visit)


def test_a_deleted_visit_is_gone_from_the_file_not_only_the_index(tmp_path):
    store = VisitStore(tmp_path / "rec", PASS)
    keep, gone = _visit(1), _visit(2, patient="clinic-0007", photos=3)
    store.save(*keep)
    store.save(*gone)
    with sqlite3.connect(tmp_path / "rec" / "visits.db") as db:
        sealed = [row[0] for row in db.execute("SELECT jpeg FROM photos")] + \
                 [row[0] for row in db.execute("SELECT body FROM visits")]
    size = (tmp_path / "rec" / "visits.db").stat().st_size
    assert store.delete(gone[0].visit) and not store.delete(gone[0].visit)
    raw = _everything_under(tmp_path / "rec")
    present = [blob[:64] in raw for blob in sealed]
    assert present.count(True) == 2  # the kept visit's photo and body; all four of the other's are overwritten
    assert (tmp_path / "rec" / "visits.db").stat().st_size < size  # and the file compacted
    assert [s.visit for s in store.summaries()] == [keep[0].visit]
    store.save(*_visit(3, patient="clinic-0007"))
    assert store.delete_patient("clinic-0007") == 1 and store.delete_patient("clinic-0007") == 0
    assert store.load(keep[0].visit)[0] == keep[0]


def test_retention_removes_only_the_visits_past_it(tmp_path):
    store = VisitStore(tmp_path / "rec", PASS)
    now = datetime.fromisoformat("2026-12-07T12:00+01:00")
    for n, days in enumerate((1, 29, 31, 400)):
        store.save(*_visit(n, created=(now - timedelta(days=days)).isoformat(timespec="minutes")))
    assert store.purge(30, now=now) == 2
    assert [s.created[:10] for s in store.summaries()] == ["2026-12-06", "2026-11-08"]


_SAVER = """
import sys
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
from test_visits import _visit, PASS
from model.visits.store import VisitStore
store = VisitStore(sys.argv[1], PASS)
for n in range(int(sys.argv[2]), int(sys.argv[3])):
    store.save(*_visit(n, photos=int(sys.argv[4])))
    print(n, flush=True)
"""


def _saver(folder: Path, start: int, stop: int, photos: int) -> subprocess.Popen:
    code = _SAVER.format(root=str(ROOT), tests=str(ROOT / "tests"))
    return subprocess.Popen([sys.executable, "-c", code, str(folder), str(start), str(stop), str(photos)],
                            stdout=subprocess.PIPE, text=True)


def test_two_writers_at_once_both_land(tmp_path):
    VisitStore(tmp_path / "rec", PASS)  # made first, so both open the same keys
    writers = [_saver(tmp_path / "rec", 0, 6, 1), _saver(tmp_path / "rec", 100, 106, 1)]
    assert [w.wait(timeout=300) for w in writers] == [0, 0]
    visits = VisitStore(tmp_path / "rec", PASS).summaries()
    assert sorted(int(s.visit[-6:], 16) for s in visits) == [*range(6), *range(100, 106)]


def test_a_save_killed_halfway_leaves_every_earlier_visit_and_no_half_one(tmp_path):
    VisitStore(tmp_path / "rec", PASS)
    writer = _saver(tmp_path / "rec", 0, 10_000, 12)  # twelve photos a visit: a save takes a while
    saved = [writer.stdout.readline() for _ in range(3)]  # three are in; the fourth is under way
    time.sleep(0.05)
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=60)
    store = VisitStore(tmp_path / "rec", PASS)
    summaries = store.summaries()
    assert len(summaries) >= len(saved) == 3
    for summary in summaries:
        visit, jpegs = store.load(summary.visit)
        assert len(jpegs) == len(visit.photos) == summary.photos == 12
    with sqlite3.connect(tmp_path / "rec" / "visits.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_the_referral_bundle_validates_and_round_trips(tmp_path):
    from fhir.resources.R4B.bundle import Bundle

    from model.visits.fhir import BODY_SITES, visit_bundle

    visit, jpegs = _visit(photos=2)
    visit.photos[0].from_visit = "SG-20261001-000001"
    data = visit_bundle(visit, jpegs, pdf=b"%PDF-1.4 test")
    text = json.dumps(data)
    bundle = Bundle.model_validate_json(text)
    kinds = [e.resource.get_resource_type() for e in bundle.entry]
    assert kinds[:2] == ["Patient", "Encounter"] and kinds.count("Media") == 2 and kinds[-1] == "DiagnosticReport"
    assert kinds.count("Observation") == 5  # age, sex, body site, symptoms, notes
    resources = {e.fullUrl: e.resource for e in bundle.entry}
    report = bundle.entry[-1].resource
    assert report.status == "preliminary" and "not reviewed by a clinician" in report.conclusion
    assert [f.contentType for f in report.presentedForm][0] == "application/pdf"
    media = [resources[m.link.reference] for m in report.media]
    sent = {e["fullUrl"]: e["resource"] for e in data["entry"]}
    assert [base64.b64decode(sent[m.link.reference]["content"]["data"]) for m in report.media] == jpegs
    assert media[0].bodySite.coding[0].code == BODY_SITES["back"][0] and "SG-20261001-000001" in media[0].note[0].text
    assert bundle.entry[0].resource.identifier[0].value == "clinic-0042"
    assert json.loads(bundle.model_dump_json())["entry"][1]["resource"]["class"]["code"] == "AMB"


def test_a_follow_up_prompt_holds_the_earlier_photo_then_todays_both_dated():
    earlier = ImageInput.of(skin_photo(seed=1, size=(64, 64)))
    today = ImageInput.of(skin_photo(seed=2, size=(64, 64)))
    conversation = with_comparison(Conversation().ask("What changed?", [today]), earlier,
                                   "2026-10-06T09:00+01:00", "2026-12-07T10:15+01:00")
    assert conversation.images == (earlier, today)
    prompt = render(template("skingpt4"), conversation)
    assert prompt.endswith("###Human: <Img><ImageHere></Img> <Img><ImageHere></Img> Photo 1 is from the last visit "
                           "on 6 October 2026; photo 2 is from today, 7 December 2026. What changed?###Assistant:")


@pytest.mark.parametrize("answer, changed", [
    ("The lesion is larger than in photo 1 and its border is now irregular.", True),
    ("It has darkened since the last visit.", True),
    ("No visible change in size or colour.", False),
    ("The spot looks unchanged. It is stable.", False),
    ("与上次相比，皮损明显变大，颜色变深。", True),
    ("与上次相比没有明显变化。", False)])
def test_a_reported_change_since_the_last_visit_is_told_apart_from_none(answer, changed):
    assert changed_since_last_visit(answer) is changed


def _launch(*args, env_extra=None, tmp_path):
    env = {**os.environ, "SKINGPT_DEMO_BUNDLE": str(tmp_path / "demo"), "SKINGPT_RECORDS_PASSPHRASE": PASS,
           **(env_extra or {})}
    return subprocess.run([sys.executable, str(ROOT / "launch.py"), *args], capture_output=True, text=True,
                          timeout=600, cwd=ROOT, env=env)


def test_ask_keeps_a_visit_and_records_list_show_export_and_delete_it(tmp_path):
    from fhir.resources.R4B.bundle import Bundle

    skin_photo(seed=1).save(tmp_path / "today.jpg")
    (tmp_path / "history.yaml").write_text(f"age: 61\nbody_site: back\nchanges: [size]\nnotes: {NOTES}\n")
    records = str(tmp_path / "rec")
    first = _launch("ask", "--image", str(tmp_path / "today.jpg"), "--history", str(tmp_path / "history.yaml"),
                    "--records", records, "--patient", "clinic-0042", "--max-new-tokens", "8", "--json", tmp_path=tmp_path)
    assert first.returncode == 0, first.stderr
    saved = json.loads(first.stdout)["visit"]
    assert f"Visit {saved} of patient clinic-0042 saved" in first.stderr
    listed = _launch("records", "list", "--records", records, "--patient", "clinic-0042", "--json", tmp_path=tmp_path)
    [entry] = json.loads(listed.stdout)
    assert entry["visit"] == saved and entry["body_site"] == "back" and entry["photos"] == 1
    assert entry["red_flags"] == ["a mole or spot that is new or changing"]  # 61 and changed in size
    raw = _everything_under(tmp_path / "rec")
    assert not any(s in raw for s in SIGNATURES + (NOTES.encode(), b"clinic-0042"))

    wrong = _launch("records", "list", "--records", records, env_extra={"SKINGPT_RECORDS_PASSPHRASE": "not it at all"},
                    tmp_path=tmp_path)
    assert wrong.returncode == 2 and wrong.stdout == ""
    assert wrong.stderr.splitlines() == ["error: wrong passphrase for these records: nothing was opened or changed"]
    assert _everything_under(tmp_path / "rec") == raw

    skin_photo(seed=2).save(tmp_path / "later.jpg")
    follow = _launch("ask", "--image", str(tmp_path / "later.jpg"), "--records", records, "--patient", "clinic-0042",
                     "--compare-with", saved, "--report", "--max-new-tokens", "8", "--json", tmp_path=tmp_path)
    assert follow.returncode == 0, follow.stderr
    report = json.loads(follow.stdout)
    assert list(report["answers"])[0] == "compare" and "Photo 1 is from the last visit" not in report["questions"]["compare"]
    newest = json.loads(_launch("records", "list", "--records", records, "--json", tmp_path=tmp_path).stdout)[0]
    assert newest["visit"] != saved and newest["photos"] == 2
    shown = json.loads(_launch("records", "show", "--records", records, "--visit", newest["visit"], "--json",
                               tmp_path=tmp_path).stdout)
    assert shown["compared_with"] == saved and [p["from_visit"] for p in shown["photos"]] == [saved, None]

    out = tmp_path / "referral.json"
    exported = _launch("records", "export", "--records", records, "--visit", newest["visit"], "--fhir", str(out),
                       tmp_path=tmp_path)
    assert exported.returncode == 0, exported.stderr
    assert oct(out.stat().st_mode & 0o777) == "0o600"
    bundle = Bundle.model_validate_json(out.read_text())
    kinds = [e.resource.get_resource_type() for e in bundle.entry]
    assert kinds.count("Media") == 2 and bundle.entry[-1].resource.status == "preliminary"
    assert [f.contentType for f in bundle.entry[-1].resource.presentedForm][0] == "application/pdf"

    deleted = _launch("records", "delete", "--records", records, "--patient", "clinic-0042", tmp_path=tmp_path)
    assert deleted.returncode == 0 and "2 visit(s) of patient clinic-0042 deleted" in deleted.stderr
    assert json.loads(_launch("records", "list", "--records", records, "--json", tmp_path=tmp_path).stdout) == []


def test_records_flags_that_cannot_work_are_said_before_the_model_loads(tmp_path):
    skin_photo(seed=1, size=(300, 300)).save(tmp_path / "p.jpg")
    cases = [(("--records", str(tmp_path / "rec")), "add --patient REF"),
             (("--patient", "clinic-0042"), "add --records DIR"),
             (("--records", str(tmp_path / "rec"), "--patient", "no spaces please"), "a patient reference is 1 to 64"),
             (("--records", str(tmp_path / "rec"), "--patient", "p-1", "--compare-with", "SG-NONE"), "no visit SG-NONE")]
    for extra, said in cases:
        proc = _launch("ask", "--image", str(tmp_path / "p.jpg"), *extra, tmp_path=tmp_path)
        assert proc.returncode == 2 and said in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "demo").exists()  # nothing loaded, not even the demo bundle written
    nothing = _launch("records", "list", "--records", str(tmp_path / "rec2"),
                      env_extra={"SKINGPT_RECORDS_PASSPHRASE": ""}, tmp_path=tmp_path)
    assert nothing.returncode == 2 and "SKINGPT_RECORDS_PASSPHRASE" in nothing.stderr


def test_chat_save_keeps_the_answered_turns_and_their_photos(tmp_path):
    skin_photo(seed=4).save(tmp_path / "p.jpg")
    records = str(tmp_path / "rec")
    script = f"/save\n/image {tmp_path / 'p.jpg'}\nWhat is this?\n/save\n/quit\n"
    env = {**os.environ, "SKINGPT_DEMO_BUNDLE": str(tmp_path / "demo"), "SKINGPT_RECORDS_PASSPHRASE": PASS}
    chat = subprocess.run([sys.executable, str(ROOT / "launch.py"), "chat", "--records", records, "--patient", "clinic-7",
                           "--max-new-tokens", "6"], input=script, capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env=env)
    assert chat.returncode == 0, chat.stderr
    assert "Nothing to save yet" in chat.stderr and "of patient clinic-7 saved in" in chat.stderr
    [visit] = json.loads(_launch("records", "list", "--records", records, "--json", tmp_path=tmp_path).stdout)
    record, jpegs = VisitStore(tmp_path / "rec", PASS).load(visit["visit"])
    assert [t.question for t in record.turns] == ["What is this?"] and len(jpegs) == 1
    assert record.photos[0].quality is not None
