"""The Patient records panel (only with --records): layout and wiring; behaviour in `app.web.visits`."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from model.i18n.catalog import text

from app.web.visits import VisitDesk

# Delete asks first, in the page's language; the hidden button it then presses is the deletion itself.
CONFIRM_DELETE = """
() => {{
  const zh = document.documentElement.lang.startsWith('zh');
  if (window.confirm(zh ? {zh!r} : {en!r})) {{ document.querySelector('#{target}').click(); }}
}}
"""


@dataclass
class RecordsPanel:
    panel: gr.Accordion
    hint: gr.Markdown
    patient: gr.Textbox
    name: gr.Textbox
    save: gr.Button
    open: gr.Button
    status: gr.Markdown
    visits: gr.HTML
    pick: gr.Dropdown
    compare: gr.Button
    referral: gr.Button
    delete_visit: gr.Button
    delete_patient: gr.Button
    delete_visit_confirmed: gr.Button
    delete_patient_confirmed: gr.Button
    referral_file: gr.File


def records_panel(lang: str = "en") -> RecordsPanel:
    t = lambda key: text(lang, f"records.{key}")  # noqa: E731
    with gr.Accordion(t("panel"), open=False, elem_id="records") as panel:
        hint = gr.Markdown(t("hint"))
        with gr.Row():
            patient = gr.Textbox(label=t("patient"), max_lines=1, max_length=64, elem_id="records-patient")
            name = gr.Textbox(label=t("name"), max_lines=1, max_length=200, elem_id="records-name")
        with gr.Row(elem_classes="actions"):
            save = gr.Button(t("save"), size="sm", variant="primary", elem_id="records-save")
            open_ = gr.Button(t("open"), size="sm", elem_id="records-open")
        status = gr.Markdown("", elem_id="records-status")
        visits = gr.HTML("", elem_id="records-visits")
        pick = gr.Dropdown([], value=None, label=t("pick"), elem_id="records-pick")
        with gr.Row(elem_classes="actions"):
            compare = gr.Button(t("compare"), size="sm", elem_id="records-compare")
            referral = gr.Button(t("referral"), size="sm", elem_id="records-referral")
            delete_visit = gr.Button(t("delete_visit"), size="sm", variant="stop", elem_id="records-delete-visit")
            delete_patient = gr.Button(t("delete_patient"), size="sm", variant="stop", elem_id="records-delete-patient")
            delete_visit_confirmed = gr.Button("delete", elem_id="delete-visit-confirmed", elem_classes="hidden-action")
            delete_patient_confirmed = gr.Button("delete", elem_id="delete-patient-confirmed",
                                                 elem_classes="hidden-action")
        referral_file = gr.File(label=t("referral"), interactive=False, visible=False,
                                elem_id="records-referral-file")  # shown once written
    return RecordsPanel(panel, hint, patient, name, save, open_, status, visits, pick, compare, referral, delete_visit,
                        delete_patient, delete_visit_confirmed, delete_patient_confirmed, referral_file)


def cleared(p: RecordsPanel) -> dict:
    """The panel for a new patient: no reference, list or file of the last one is left to act on."""
    return {p.patient: "", p.name: "", p.status: "", p.visits: "", p.pick: gr.update(choices=[], value=None),
            p.referral_file: gr.update(value=None, visible=False)}


def relabel_records(p: RecordsPanel, lang: str) -> dict:
    t = lambda key: text(lang, f"records.{key}")  # noqa: E731
    return {p.panel: gr.update(label=t("panel")), p.hint: gr.update(value=t("hint")), p.patient: gr.update(label=t("patient")),
            p.name: gr.update(label=t("name")), p.save: gr.update(value=t("save")), p.open: gr.update(value=t("open")),
            p.pick: gr.update(label=t("pick")), p.compare: gr.update(value=t("compare")),
            p.referral: gr.update(value=t("referral")), p.delete_visit: gr.update(value=t("delete_visit")),
            p.delete_patient: gr.update(value=t("delete_patient")), p.referral_file: gr.update(label=t("referral"))}


def wire_records(p: RecordsPanel, desk: VisitDesk, chatbot: gr.Chatbot, compare_quick: gr.Button) -> None:
    """Every records action; none touches the model, so none waits behind answers."""
    listing = [p.status, p.visits, p.pick]

    def shown(status: str, html: str, choices: list) -> tuple:
        return status, html, gr.update(choices=choices, value=choices[0][1] if choices else None)

    def save(patient, name, request: gr.Request):
        return shown(*desk.save(request.session_hash, patient, name))

    def open_patient(patient, request: gr.Request):
        return shown(*desk.open_patient(request.session_hash, patient))

    def compare(patient, visit, request: gr.Request):
        messages, compared = desk.compare(request.session_hash, patient, visit)
        return messages, (gr.update(visible=True) if compared else gr.update())

    def referral(visit, request: gr.Request):
        status, path = desk.referral(request.session_hash, visit)
        return status, gr.update(value=path, visible=path is not None)

    def delete_visit(patient, visit, request: gr.Request):
        return shown(*desk.delete_visit(request.session_hash, patient, visit))

    def delete_patient(patient, request: gr.Request):
        return shown(*desk.delete_patient(request.session_hash, patient))

    private = {"queue": False, "api_visibility": "private"}
    p.save.click(save, [p.patient, p.name], listing, **private)
    p.open.click(open_patient, [p.patient], listing, **private)
    p.patient.submit(open_patient, [p.patient], listing, **private)
    p.compare.click(compare, [p.patient, p.pick], [chatbot, compare_quick], **private)
    p.referral.click(referral, [p.pick], [p.status, p.referral_file], **private)
    for button, confirmed, target, handler, inputs in (
            (p.delete_visit, p.delete_visit_confirmed, "delete-visit-confirmed", delete_visit, [p.patient, p.pick]),
            (p.delete_patient, p.delete_patient_confirmed, "delete-patient-confirmed", delete_patient, [p.patient])):
        js = CONFIRM_DELETE.format(zh=text("zh", "records.confirm_delete"), en=text("en", "records.confirm_delete"),
                                   target=target)
        button.click(None, None, None, js=js, **private)
        confirmed.click(handler, inputs, listing, **private)
