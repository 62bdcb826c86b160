"""Evaluation: metrics whose answers are known by hand, synonym matching, the review table,
consistency, and predict on the tiny bundle with resume and bad manifests."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from model.evaluation.labels import LabelError, LabelSet
from model.evaluation.metrics import summary
from model.metrics import Case, accuracy, balanced_accuracy, confusion, fleiss_kappa, per_class, top_k
from model.evaluation.predict import EvalError, consistency, predict, read_cases
from model.evaluation.report import score
from model.evaluation.review import STATEMENTS, review_packet, review_score
from tools.fixtures import write_training_data

# Six cases whose metrics are worked out by hand below.
HAND = [Case("A", ("A",), 1), Case("A", ("B", "A"), 2), Case("B", ("B",), 3), Case("B", ("B",), 4),
        Case("C", (), 5), Case("C", ("A", "C"), 6)]


def test_metrics_by_hand():
    assert accuracy(HAND) == pytest.approx(3 / 6)  # cases 1, 3, 4
    assert top_k(HAND, 3) == pytest.approx(5 / 6)  # all but the case with no diagnosis
    assert balanced_accuracy(HAND) == pytest.approx((1 / 2 + 2 / 2 + 0 / 2) / 3)
    classes = per_class(HAND, ["A", "B", "C"])
    assert classes["A"]["precision"] == pytest.approx(1 / 2) and classes["B"]["precision"] == pytest.approx(2 / 3)
    assert math.isnan(classes["C"]["precision"]) and classes["C"]["recall"] == 0 and classes["B"]["support"] == 2
    columns, matrix = confusion(HAND, ["A", "B", "C"])
    assert columns == ["A", "B", "C", "none"]
    assert matrix == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 1]]
    result = summary(HAND, ["A", "B", "C"], n_boot=200)
    tones = result["by_skin_tone"]
    assert [tones[g]["top1"]["value"] for g in ("I-II", "III-IV", "V-VI")] == [0.5, 1.0, 0.0]
    assert [tones[g]["n"] for g in ("I-II", "III-IV", "V-VI")] == [2, 2, 2]
    low, high = result["overall"]["top1"]["ci95"]
    assert 0 <= low <= 0.5 <= high <= 1 and low < high
    assert result["overall"]["no_diagnosis"] == 1


def test_fleiss_kappa_known_values():
    # the worked example of Fleiss (1971) as commonly reproduced: 10 subjects, 14 raters, 5 categories
    table = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
             [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]
    assert fleiss_kappa(np.array(table)) == pytest.approx(0.210, abs=5e-4)
    assert fleiss_kappa(np.array([[3, 0], [0, 3], [3, 0]])) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="same number"):
        fleiss_kappa(np.array([[2, 0], [1, 0]]))


LABELS = LabelSet.of({"atopic dermatitis": ["eczema", "atopic eczema", "dermatitis"],
                      "seborrheic dermatitis": ["seborrhoeic dermatitis"], "psoriasis": ["plaque psoriasis"],
                      "melanoma": ["malignant melanoma"]})


def test_synonyms_and_ranking():
    assert LABELS.ranked("The rash is most likely eczema. Differentials include psoriasis and melanoma.") == (
        "atopic dermatitis", "psoriasis", "melanoma")
    assert LABELS.ranked("Scaly greasy patches: consistent with seborrheic dermatitis.") == ("seborrheic dermatitis",)
    assert LABELS.ranked("Red scaly patches. Psoriasis and eczema both fit.") \
        == ("psoriasis", "atopic dermatitis")  # no stated diagnosis phrase: order of mention
    assert LABELS.ranked("Psoriasis is less likely than eczema here.") == ("atopic dermatitis", "psoriasis")
    assert LABELS.ranked("A brown spot with a regular border.") == ()  # no diagnosis found
    assert LABELS.canonical("Atopic Eczema") == "atopic dermatitis"
    with pytest.raises(LabelError, match="unknown label 'rosacea'; known classes: atopic dermatitis"):
        LABELS.canonical("rosacea")
    with pytest.raises(LabelError, match="listed under both"):
        LabelSet.of({"a": ["x"], "b": ["x"]})


def _sheet(path, ratings: dict[str, list[str]], cases=("c1", "c2", "c3", "c4")):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["case_id", *STATEMENTS])
        for i, case in enumerate(cases):
            writer.writerow([case, *[ratings.get(s, ["agree"] * len(cases))[i] for s in STATEMENTS]])
    return path


def test_review_table_by_hand(tmp_path):
    one = _sheet(tmp_path / "r1.csv", {"diagnosis_correct": ["5", "strongly agree", "4", "3"]})
    two = _sheet(tmp_path / "r2.csv", {"diagnosis_correct": ["Strongly Agree", "同意", "agree", "不同意"]})  # a Chinese packet's words
    result = review_score([one, two], n_boot=200)
    row = result["statements"]["diagnosis_correct"]
    # 8 ratings: strongly agree 3, agree 3, neutral 1, disagree 1
    assert (row["strongly_agree"], row["agree"], row["agree_total"]) == (3 / 8, 3 / 8, 6 / 8)
    # per case: [SA,SA] [SA,A] [A,A] [N,D] -> P-bar 0.5, P_e (3/8)^2+(3/8)^2+(1/8)^2+(1/8)^2 = 0.3125
    assert row["fleiss_kappa"] == pytest.approx((0.5 - 0.3125) / (1 - 0.3125))
    other = result["statements"]["willing_to_use"]
    assert other["agree"] == 1.0 and other["agree_total"] == 1.0 and other["fleiss_kappa"] == pytest.approx(1.0)
    assert result["reviewers"] == 2 and result["cases"] == 4


def test_review_sheet_errors(tmp_path):
    bad = _sheet(tmp_path / "bad.csv", {"helps_doctors": ["agree", "maybe", "agree", "agree"]})
    with pytest.raises(Exception, match=r"bad.csv:3 \(helps_doctors\): 'maybe' is not a rating"):
        review_score([bad])
    short = _sheet(tmp_path / "short.csv", {}, cases=("c1", "c2"))
    full = _sheet(tmp_path / "full.csv", {})
    with pytest.raises(Exception, match="rate different cases"):
        review_score([full, short])


def test_consistency_with_known_answers(tmp_path):
    manifest = tmp_path / "cases.jsonl"
    write_training_data(tmp_path, n=3)
    manifest.write_text("".join(json.dumps({"image": f"image/{i}.jpg", "diagnosis": d, "id": f"c{i}"}) + "\n"
                                for i, d in enumerate(["psoriasis", "eczema", "melanoma"])))
    cases = read_cases(manifest, LABELS)
    script = {"c0": ["It is most likely psoriasis."] * 4,
              "c1": ["Most likely eczema."] * 3 + ["Most likely melanoma."],
              "c2": ["Likely melanoma."] * 2 + ["Likely psoriasis."] * 2}
    order = iter([(c.id, s) for c, _ in cases for s in range(100, 104)])

    def ask(image, seed):
        case_id, expected_seed = next(order)
        assert seed == expected_seed
        return script[case_id][seed - 100]

    result = consistency(ask, cases, LABELS, runs=4, seed=100)
    assert [r["agreement"] for r in result["per_case"]] == [1.0, 0.75, 0.5]
    assert result["consistency"] == pytest.approx(0.75)
    assert result["by_class"] == {"atopic dermatitis": 0.75, "melanoma": 0.5, "psoriasis": 1.0}


@pytest.fixture
def cases_manifest(tmp_path):
    write_training_data(tmp_path / "cases", n=4)
    manifest = tmp_path / "cases" / "cases.jsonl"
    rows = [{"image": f"image/{i}.jpg", "diagnosis": d, "fitzpatrick": f, "id": f"case-{i}"}
            for i, (d, f) in enumerate([("eczema", "II"), ("psoriasis", 4), ("melanoma", "VI"), ("psoriasis", None)])]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


class _Interrupting:
    """The real engine, stopped after `limit` answers, as a crash or Ctrl-C would."""

    def __init__(self, engine, limit=None):
        self.engine, self.limit, self.calls = engine, limit, 0
        self.loaded, self.config = engine.loaded, engine.config

    def answer(self, conversation, **kw):
        if self.limit is not None and self.calls >= self.limit:
            raise KeyboardInterrupt
        self.calls += 1
        return self.engine.answer(conversation, **kw)

    def forget(self, session):
        self.engine.forget(session)

    def forget_images(self, keys):
        self.engine.forget_images(keys)


def test_predict_on_the_tiny_bundle_resumes(tiny_bundle, cases_manifest, tmp_path):
    from model.weights.bundle import load_bundle
    from model.serving.engine import Engine

    engine = Engine(load_bundle(tiny_bundle))
    out = tmp_path / "run"
    settings = {"max_new_tokens": 6}
    with pytest.raises(KeyboardInterrupt):
        predict(_Interrupting(engine, limit=2), cases_manifest, out, labels=LABELS, report=False,
                settings=settings, say=lambda _: None)
    first = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in first] == ["case-0", "case-1"]
    resumed = _Interrupting(engine)
    predict(resumed, cases_manifest, out, labels=LABELS, report=False, settings=settings, say=lambda _: None)
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["case-0", "case-1", "case-2", "case-3"] and resumed.calls == 2
    assert rows[0]["label"] == "atopic dermatitis" and rows[2]["fitzpatrick"] == 6 and rows[3]["fitzpatrick"] is None
    prov = rows[0]["provenance"]
    assert prov["bundle_sha256"] == engine.loaded.bundle_hash and prov["settings"]["max_new_tokens"] == 6
    assert sorted(p.name for p in out.iterdir()) == ["predictions.jsonl", "run.json"]  # no image copied
    # the same seed and settings give the same answers
    again = tmp_path / "again"
    predict(engine, cases_manifest, again, labels=LABELS, report=False, settings=settings, say=lambda _: None)
    assert [json.loads(line)["answer"] for line in (again / "predictions.jsonl").read_text().splitlines()] == \
        [r["answer"] for r in rows]


def test_predict_with_reports_then_score_and_packet(tiny_bundle, cases_manifest, tmp_path):
    from model.weights.bundle import load_bundle
    from model.serving.engine import Engine

    out = tmp_path / "run"
    predict(Engine(load_bundle(tiny_bundle)), cases_manifest, out, labels=LABELS,
            settings={"max_new_tokens": 4}, say=lambda _: None)
    row = json.loads((out / "predictions.jsonl").read_text().splitlines()[0])
    assert set(row["report"]["answers"]) == {"describe", "features", "causes", "treatment", "see_doctor"}
    result = score(out, LABELS, n_boot=100)
    assert result["overall"]["n"] == 4 and set(result["by_skin_tone"]) == {"I-II", "III-IV", "V-VI", "unknown"}
    for name in ("score.json", "report.md", "confusion.png", "per_class.png", "skin_tone.png"):
        assert (out / name).stat().st_size > 0
    assert (out / "confusion.png").read_bytes()[:4] == b"\x89PNG"
    packet = review_packet(out, tmp_path / "review", reviewers=3)
    page = (packet / "packet.html").read_text()
    assert page.count("data:image/jpeg;base64,") == 4 and "src='http" not in page and 'src="http' not in page
    assert ((packet / "packet.html").stat().st_mode & 0o777) == 0o600
    sheet = list(csv.reader(open(packet / "sheets" / "reviewer-3.csv")))
    assert sheet[0] == ["case_id", *STATEMENTS] and [r[0] for r in sheet[1:]] == [f"case-{i}" for i in range(4)]
    chinese = (review_packet(out, tmp_path / "review-zh", reviewers=1, lang="zh") / "packet.html").read_text()
    assert "<h1>SkinGPT 评审材料</h1>" in chinese and "诊断正确或相关。" in chinese and "lang='zh-CN'" in chinese


def test_score_a_hand_made_run(tmp_path):
    rows = [("psoriasis", "It is most likely psoriasis.", 1), ("psoriasis", "Most likely eczema, or psoriasis.", 2),
            ("eczema", "This looks like eczema; differentials include psoriasis.", 5),
            ("melanoma", "A brown spot.", 6)]
    with open(tmp_path / "predictions.jsonl", "w") as handle:
        for i, (label, answer, skin) in enumerate(rows):
            handle.write(json.dumps({"id": str(i), "label": label, "fitzpatrick": skin, "answer": answer,
                                     "report": None}) + "\n")
    result = score(tmp_path, LABELS, n_boot=100, plots=False)
    assert result["overall"]["top1"]["value"] == 0.5 and result["overall"]["top3"]["value"] == 0.75
    assert result["overall"]["no_diagnosis"] == 1
    assert result["by_skin_tone"]["I-II"]["top1"]["value"] == 0.5 and result["by_skin_tone"]["V-VI"]["n"] == 2
    report = (tmp_path / "report.md").read_text()
    assert "| all | 4 | 50.0%" in report and "| Fitzpatrick V-VI | 2 |" in report


def test_bad_manifests_name_each_line(tmp_path):
    write_training_data(tmp_path, n=1)
    manifest = tmp_path / "cases.jsonl"
    manifest.write_text('{"image": "image/0.jpg", "diagnosis": "eczema"}\n'
                        '{"image": "image/404.jpg"}\n'
                        '{"image": "image/0.jpg", "diagnosis": "rosacea"}\n'
                        '{"image": "image/0.jpg", "diagnosis": \n'
                        '{"image": "image/0.jpg", "fitzpatrick": "VII"}\n')
    with pytest.raises(EvalError) as err:
        read_cases(manifest, LABELS)
    text = str(err.value)
    assert text.startswith(f"4 problem(s) in {manifest}")
    assert f"{manifest}:2: image image/404.jpg not found" in text
    assert f"{manifest}:3: unknown label 'rosacea'" in text
    assert f"{manifest}:4: not valid JSON" in text
    assert f"{manifest}:5: fitzpatrick:" in text


def test_eval_cli_end_to_end(tiny_bundle, cases_manifest, tmp_path):
    labels = tmp_path / "labels.yaml"
    labels.write_text("classes:\n  atopic dermatitis: [eczema]\n  psoriasis: []\n  melanoma: [malignant melanoma]\n")
    run = tmp_path / "run"
    base = [sys.executable, str(ROOT / "launch.py"), "eval"]
    proc = subprocess.run([*base, "predict", "--weights", str(tiny_bundle), "--manifest", str(cases_manifest),
                           "--out", str(run), "--labels", str(labels), "--no-report", "--max-new-tokens", "4"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = subprocess.run([*base, "score", str(run), "--labels", str(labels), "--bootstrap", "50"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0 and "# Diagnostic accuracy" in proc.stdout and "Fitzpatrick V-VI" in proc.stdout
    proc = subprocess.run([*base, "predict", "--weights", str(tiny_bundle), "--manifest", str(tmp_path / "none.jsonl"),
                           "--out", str(run)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 2 and "no case manifest at" in proc.stderr and "Traceback" not in proc.stderr
