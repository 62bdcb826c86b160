"""The structured consultation: the flow's questions in order, and a report read out of free text."""

from __future__ import annotations

import numpy as np
from PIL import Image

from model.clinical.consultation import DEFAULT_FLOW, ConsultStep, build_report, consult, extract_diagnosis
from model.prompt.conversation import ImageInput
from model.clinical.safety import DISCLAIMER, red_flags


def test_extract_diagnosis_and_differentials():
    text = ("The photo shows a red, scaly plaque on the elbow. It is most likely plaque psoriasis. "
            "Differential diagnoses include eczema, tinea corporis and lichen planus.")
    diagnosis, others = extract_diagnosis(text)
    assert diagnosis == "plaque psoriasis"
    assert others == ["eczema", "tinea corporis", "lichen planus"]
    assert extract_diagnosis("This could be acne or rosacea.") == ("acne", ["rosacea"])
    assert extract_diagnosis("A brown patch with regular borders.") == (None, [])


def test_consult_asks_the_flow_in_order_and_builds_the_report():
    asked = []
    answers = {
        "describe": "There is an itchy red rash. It is consistent with atopic dermatitis.",
        "features": "The skin is dry with lichenification. Excoriations are visible.",
        "causes": "A skin barrier defect and allergy.",
        "treatment": "Emollients and topical corticosteroids.",
        "see_doctor": "Yes, within a few weeks if it does not improve.",
    }

    def ask(conversation):
        turn = conversation.turns[-1]
        asked.append((turn.question, len(turn.images), len(conversation.turns)))
        key = DEFAULT_FLOW[len(conversation.turns) - 1].key
        return answers[key]

    image = ImageInput.of(Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)))
    report = consult(ask, image)
    assert [q for q, _, _ in asked] == [s.question for s in DEFAULT_FLOW]
    assert [n for _, n, _ in asked] == [1, 0, 0, 0, 0]  # the photo goes with the first question only
    assert [t for _, _, t in asked] == [1, 2, 3, 4, 5]  # each step sees the whole conversation so far
    assert report.diagnosis == "atopic dermatitis"
    assert "The skin is dry with lichenification." in report.visible_features
    assert report.treatment == answers["treatment"] and report.see_doctor == answers["see_doctor"]
    assert report.red_flags == [] and report.disclaimer == DISCLAIMER
    md = report.markdown()
    assert DISCLAIMER in md and "## Most likely condition\natopic dermatitis" in md


def test_custom_flow_and_red_flags():
    flow = (ConsultStep("describe", "What is this?"), ConsultStep("causes", "Why?"))
    report = build_report({"describe": "A changing mole that bleeds; possibly melanoma.", "causes": "Sun."},
                          {s.key: s.question for s in flow})
    assert report.diagnosis == "melanoma"
    assert report.red_flags == ["a mole or spot that is new or changing", "bleeding", "a possible skin cancer"]
    assert report.see_doctor.startswith("See a doctor")  # the default advice when the flow has no such step


def test_red_flags_are_not_raised_by_ordinary_text():
    assert red_flags("Dry skin on the hands in winter; use a moisturiser.") == []
    assert red_flags("It has been growing rapidly") == ["rapid growth or spread"]


def test_the_reports_time_reads_as_a_date_in_each_language():
    """Local time, readable, with its offset: not "2026-12-06T13:51+00:00"."""
    from model.clinical.consultation import readable_time

    assert readable_time("2026-12-06T13:51+01:00", "en") == "6 December 2026, 13:51 (UTC+01:00)"
    assert readable_time("2026-12-06T13:51+05:30", "zh") == "2026年12月6日 13:51（UTC+05:30）"
    assert readable_time("not a time", "en") == "not a time"
