"""The page's kept visits (`--records`): save, open a patient, compare with an earlier visit, export
a referral, delete. Plain functions over the session store and the records (no Gradio here).

Nothing is kept unless Save visit is pressed; what is kept is sealed (`model.visits.store`). The
earlier photo of a follow-up is shown from the consultation's private folder, which New patient
empties as it does every other file of the consultation. Logs say what was done, never to whom.
"""

from __future__ import annotations

import base64
import html
import json
import logging
from dataclasses import dataclass

from model.clinical.consultation import readable_date
from model.images.decode import ImageError
from model.visits.fhir import referral
from model.visits.followup import earlier_photo, visit_record
from model.visits.store import VisitStore
from model.visits.vault import RecordsError
from model.visits.visit import Visit, check_reference

from app.web.session import Consultation, Message, SessionStore, Wiped

log = logging.getLogger("skingpt.app")

Listing = tuple[str, str, list[tuple[str, str]]]  # (status, the visits as HTML, the visit choices)


@dataclass
class VisitDesk:
    store: SessionStore
    records: VisitStore
    model_label: str = "SkinGPT"

    def save(self, session: str, patient: str, name: str = "") -> Listing:
        """Keep this consultation as one visit of `patient` (once; New patient starts another)."""
        state = self.store.get(session)
        reference = _reference(patient)
        if reference is None:
            return state.t("records.need_patient"), "", []
        with state.lock:
            if state.saved_as:
                return state.t("records.already_saved", visit=state.saved_as), *self._listing(state, reference)
            visit, jpegs = _record(state, reference, name.strip(), self.model_label)
        if visit is None:
            return state.t("records.nothing_to_save"), "", []
        self.records.save(visit, jpegs)
        with state.lock:
            state.saved_as = visit.visit
        log.info("visit saved session=%s photos=%d", state.id[:8], len(jpegs))
        return state.t("records.saved", visit=visit.visit, patient=reference), *self._listing(state, reference)

    def open_patient(self, session: str, patient: str) -> Listing:
        state = self.store.get(session)
        reference = _reference(patient)
        if reference is None:
            return state.t("records.need_patient"), "", []
        html_list, choices = self._listing(state, reference)
        status = (state.t("records.visits", count=len(choices), patient=reference) if choices
                  else state.t("records.no_visits", patient=reference))
        return status, html_list, choices

    def _listing(self, state: Consultation, patient: str) -> tuple[str, list[tuple[str, str]]]:
        """The patient's visits, newest first: date, body site, photos, warning signs, a thumbnail."""
        rows, choices = [], []
        for s in self.records.summaries(patient):
            site = state.t(f"history.sites.{s.body_site}") if s.body_site else state.t("records.no_site")
            line = state.t("records.row", date=readable_date(s.created, state.lang), site=site, photos=s.photos)
            thumb = (f"<img src='data:image/jpeg;base64,{base64.b64encode(s.thumbnail).decode()}' alt='' "
                     f"width='80'>" if s.thumbnail else "")
            signs = (f"<p class='signs'>{html.escape(state.t('records.signs', signs='; '.join(s.red_flags)))}</p>"
                     if s.red_flags else "")
            rows.append(f"<li>{thumb}<div><p><strong>{html.escape(line)}</strong> · {html.escape(s.visit)}</p>"
                        f"{signs}</div></li>")
            choices.append((f"{line} · {s.visit}", s.visit))
        return (f"<ul id='visit-list'>{''.join(rows)}</ul>" if rows else ""), choices

    def compare(self, session: str, patient: str, visit: str | None) -> tuple[list[Message], str]:
        """A follow-up: the chosen earlier visit's photo joins this consultation (photo 1), dated."""
        state = self.store.get(session)
        reference = _reference(patient)
        if reference is None or not visit:
            return state.note(state.t("records.need_patient" if reference is None else "records.pick_first")), ""
        if state.earlier is not None:
            return state.note(state.t("records.compare_again", earlier=readable_date(state.earlier.created, state.lang))), ""
        try:
            earlier = earlier_photo(self.records, reference, visit)
        except (RecordsError, ImageError) as err:
            return state.error(str(err)), ""
        try:
            state.compare_with(earlier)
        except Wiped:
            return state.messages, ""
        log.info("follow-up session=%s", state.id[:8])
        return state.messages, earlier.visit

    def referral(self, session: str, visit: str | None) -> tuple[str, str | None]:
        """The visit as a FHIR Bundle in the consultation's private folder, for download."""
        state = self.store.get(session)
        if not visit:
            return state.t("records.pick_first"), None
        record, jpegs = self.records.load(visit)
        data = json.dumps(referral(record, jpegs), indent=1).encode()
        path = state.write_file(f"referral-{record.visit}.json", data)
        log.info("referral exported session=%s", state.id[:8])
        return state.t("records.referral_ready", visit=record.visit), str(path)

    def delete_visit(self, session: str, patient: str, visit: str | None) -> Listing:
        state = self.store.get(session)
        reference = _reference(patient)
        if reference is None or not visit:
            return state.t("records.need_patient" if reference is None else "records.pick_first"), "", []
        if visit not in {s.visit for s in self.records.summaries(reference)}:  # only this patient's own
            return state.t("records.pick_first"), *self._listing(state, reference)
        self.records.delete(visit)
        log.info("visit deleted session=%s", state.id[:8])
        return state.t("records.deleted_visit", visit=visit), *self._listing(state, reference)

    def delete_patient(self, session: str, patient: str) -> Listing:
        state = self.store.get(session)
        reference = _reference(patient)
        if reference is None:
            return state.t("records.need_patient"), "", []
        count = self.records.delete_patient(reference)
        log.info("patient deleted session=%s visits=%d", state.id[:8], count)
        return state.t("records.deleted_patient", count=count, patient=reference), "", []


def _reference(patient: str | None) -> str | None:
    try:
        return check_reference(patient or "")
    except ValueError:
        return None


def _record(state: Consultation, patient: str, name: str, model_label: str) -> tuple[Visit | None, list[bytes]]:
    """This consultation as a Visit and its JPEGs; (None, []) before anything was answered. Called with
    the consultation's lock held."""
    from model.clinical.consultation import new_visit

    turns = [(t.question, t.answer) for t in state.conversation.turns if t.answer is not None]
    if not turns:
        return None, []
    ranking = state.ranking[1] if state.ranking else None
    details = new_visit(model_label)
    return visit_record(reference=details.visit, created=details.created, taken=state.started, patient=patient,
                        lang=state.lang, model=model_label, images=list(state.conversation.images) + state.pending,
                        qualities=state.quality, turns=turns, history=state.history, ranking=ranking,
                        red_flags=state.flags, report=state.report, earlier=state.earlier, name=name)
