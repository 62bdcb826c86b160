"""A visit as an HL7 FHIR Bundle for a store-and-forward referral (built as R4 JSON, validated with
`fhir.resources`' R4B models: R4B changed none of the resources used here).

    Patient            the clinic's reference (and the name, if the clinic recorded one)
    Encounter          the visit: ambulatory, finished, its date and reference
    Observation        one per history field given; the body site coded in SNOMED CT
    Media              one per photo, its JPEG inline, dated (a comparison photo says its visit)
    DiagnosticReport   the AI draft: status preliminary, said to be machine-generated and unreviewed,
                       the photos linked, the PDF report attached (a transcript when no report was run)

Export is the only way a visit leaves the machine, and it happens only when asked.
"""

from __future__ import annotations

import base64
import io
import uuid
from datetime import datetime
from typing import Any

from PIL import Image

from model.clinical.history import DURATION_WORDS
from model.visits.visit import Visit

SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"
PATIENT_SYSTEM = "urn:skingpt:patient-reference"  # the clinic's own numbering
VISIT_SYSTEM = "urn:skingpt:visit"
# SNOMED CT body structures for our body sites (codes and displays as published in dermatology
# body-site value sets; "other" has no code and travels as text)
BODY_SITES = {
    "scalp": ("41695006", "Scalp structure"), "face": ("89545001", "Face structure"),
    "ear": ("1910005", "Ear structure"), "mouth": ("123851003", "Mouth region structure"),
    "neck": ("45048000", "Neck structure"), "chest": ("51185008", "Thoracic structure"),
    "abdomen": ("818983003", "Abdomen"), "back": ("77568009", "Back structure, excluding neck"),
    "arm": ("53120007", "Upper limb structure"), "hand": ("85562004", "Hand structure"),
    "groin": ("26893007", "Inguinal region structure"), "buttock": ("46862004", "Buttock structure"),
    "leg": ("61685007", "Lower limb structure"), "foot": ("56459004", "Foot structure"),
    "nail": ("72651009", "Nail structure"),
}
MACHINE_MADE = ("Machine-generated draft by SkinGPT ({model}), not reviewed by a clinician: decision support, "
                "not a diagnosis. A clinician must review the photos and history before acting on it.")


def _instant(created: str) -> str:
    when = datetime.fromisoformat(created)
    return (when if when.tzinfo else when.astimezone()).isoformat(timespec="seconds")


def body_site(site: str | None) -> dict | None:
    if site is None:
        return None
    if site in BODY_SITES:
        code, display = BODY_SITES[site]
        return {"coding": [{"system": SNOMED, "code": code, "display": display}], "text": site}
    return {"text": site}


def _observations(visit: Visit, subject: dict, encounter: dict) -> list[dict]:
    h = visit.history
    if h is None or h.is_empty():
        return []
    base = {"resourceType": "Observation", "status": "final", "subject": subject, "encounter": encounter,
            "effectiveDateTime": _instant(visit.created)}
    rows: list[tuple[dict, dict]] = []
    if h.age is not None:
        rows.append(({"coding": [{"system": LOINC, "code": "30525-0", "display": "Age"}], "text": "age"},
                     {"valueQuantity": {"value": h.age, "unit": "years", "system": "http://unitsofmeasure.org",
                                        "code": "a"}}))
    if h.sex:
        rows.append(({"coding": [{"system": LOINC, "code": "46098-0", "display": "Sex"}], "text": "sex"},
                     {"valueString": h.sex}))
    if h.body_site:
        rows.append(({"text": "body site of the skin finding"},
                     {"valueCodeableConcept": body_site(h.body_site), "bodySite": body_site(h.body_site)}))
    texts = (("duration", DURATION_WORDS.get(h.duration or "", "")), ("symptoms", ", ".join(h.symptoms)),
             ("changes noticed", ", ".join(h.changes)), ("treatments tried", h.treatments),
             ("Fitzpatrick skin type", str(h.fitzpatrick or "")), ("notes", h.notes))
    rows += [({"text": label}, {"valueString": value}) for label, value in texts if value]
    return [{**base, "code": code, **value} for code, value in rows]


def _media(visit: Visit, jpegs: list[bytes], subject: dict, encounter: dict) -> list[dict]:
    site = body_site(visit.history.body_site) if visit.history else None
    out = []
    for n, (photo, data) in enumerate(zip(visit.photos, jpegs), 1):
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
        media = {"resourceType": "Media", "status": "completed", "subject": subject, "encounter": encounter,
                 "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/media-type", "code": "image",
                                      "display": "Image"}]},
                 "createdDateTime": _instant(photo.taken), "width": width, "height": height,
                 "content": {"contentType": "image/jpeg", "data": base64.b64encode(data).decode(),
                             "title": f"Photo {n}"}}
        if site:
            media["bodySite"] = site
        if photo.from_visit:
            media["note"] = [{"text": f"Photo from the earlier visit {photo.from_visit}, shown for comparison"}]
        out.append(media)
    return out


def _report(visit: Visit, media: list[str], subject: dict, encounter: dict, pdf: bytes | None) -> dict:
    r = visit.report
    lines = [MACHINE_MADE.format(model=visit.model or "unknown model")]
    if r is not None and r.diagnosis:
        lines.append(f"Most likely, as the draft reads it: {r.diagnosis}.")
    if visit.red_flags:
        lines.append("Warning signs: " + "; ".join(visit.red_flags) + ".")
    forms = []
    if pdf:
        forms.append({"contentType": "application/pdf", "data": base64.b64encode(pdf).decode(),
                      "title": f"SkinGPT report {visit.visit}"})
    transcript = r.markdown() if r is not None else "\n\n".join(f"Q: {t.question}\nA: {t.answer}" for t in visit.turns)
    forms.append({"contentType": "text/markdown; charset=utf-8", "data": base64.b64encode(transcript.encode()).decode(),
                  "title": "SkinGPT draft (text)"})
    return {"resourceType": "DiagnosticReport", "status": "preliminary",
            "code": {"text": "Dermatology decision-support draft (machine-generated, unreviewed)"},
            "subject": subject, "encounter": encounter, "effectiveDateTime": _instant(visit.created),
            "issued": _instant(visit.created), "media": [{"link": {"reference": ref}} for ref in media],
            "conclusion": " ".join(lines), "presentedForm": forms}


def referral(visit: Visit, jpegs: list[bytes]) -> dict[str, Any]:
    """The Bundle a referral sends: `visit_bundle` with the visit's PDF report attached, if it ran one."""
    pdf = None
    if visit.report is not None:
        from model.clinical.report_pdf import report_pdf

        pdf = report_pdf(visit.report, [Image.open(io.BytesIO(data)) for data in jpegs])
    return visit_bundle(visit, jpegs, pdf)


def visit_bundle(visit: Visit, jpegs: list[bytes], pdf: bytes | None = None) -> dict[str, Any]:
    """The referral Bundle as JSON data, validated by fhir.resources (ValueError when it does not)."""
    from fhir.resources.R4B.bundle import Bundle

    ids = iter(lambda: f"urn:uuid:{uuid.uuid4()}", None)
    patient_ref, encounter_ref = next(ids), next(ids)
    subject, encounter = {"reference": patient_ref}, {"reference": encounter_ref}
    patient: dict[str, Any] = {"resourceType": "Patient",
                               "identifier": [{"system": PATIENT_SYSTEM, "value": visit.patient}]}
    if visit.name:
        patient["name"] = [{"text": visit.name}]
    entries = [(patient_ref, patient),
               (encounter_ref, {"resourceType": "Encounter", "status": "finished", "subject": subject,
                                "identifier": [{"system": VISIT_SYSTEM, "value": visit.visit}],
                                "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB",
                                          "display": "ambulatory"},
                                "period": {"start": _instant(visit.created)}})]
    entries += [(next(ids), obs) for obs in _observations(visit, subject, encounter)]
    media = [(next(ids), m) for m in _media(visit, jpegs, subject, encounter)]
    entries += media + [(next(ids), _report(visit, [ref for ref, _ in media], subject, encounter, pdf))]
    data = {"resourceType": "Bundle", "type": "collection", "timestamp": datetime.now().astimezone().isoformat(timespec="seconds"),
            "identifier": {"system": VISIT_SYSTEM, "value": visit.visit},
            "entry": [{"fullUrl": ref, "resource": resource} for ref, resource in entries]}
    Bundle.model_validate(data)  # raises on anything R4B does not allow
    return data
