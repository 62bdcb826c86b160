"""Layout and wiring only: every behaviour lives in `app.web.handlers`.

Named API endpoints (usable from gradio_client): /ask (message with text and files, streams the
history), /regenerate, /stop, /new_patient, /report.
"""

from __future__ import annotations

from contextlib import closing
from dataclasses import dataclass
from typing import Iterator

import gradio as gr

from app.web.files import browser_of
from app.web.handlers import QUICK_PROMPTS, Handlers
from app.web.visits import VisitDesk
from app.web.visits_ui import RecordsPanel, cleared, records_panel, relabel_records, wire_records
from model.clinical.history import BODY_SITES, CHANGES, DURATIONS, SEXES, SYMPTOMS
from model.i18n.catalog import LANGUAGES, pick, text
from model.serving.sampler import SamplingSettings

# System fonts only: Gradio's default themes fetch web fonts from another host.
THEME = gr.themes.Soft(primary_hue="teal", font=["system-ui", "-apple-system", "Segoe UI", "Roboto", "sans-serif"],
                       font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "monospace"])

CSS = """
#demo-banner {background:#b45309;color:#fff;padding:10px 14px;border-radius:8px;font-weight:600}
#disclaimer {font-size:0.92em}
#red-flag p {background:#fee2e2;color:#7f1d1d;border:1px solid #ef4444;padding:10px 14px;border-radius:8px}
.quick button {min-width:0}
/* the question box's Stop shows only while an answer is being written (the box is locked meanwhile) */
#message .stop-button {display:none !important}
#message:has(textarea:disabled) .stop-button {display:inline-flex !important}
/* the footer's separator stays behind when its neighbour (Use via API) is hidden */
footer .divider {display:none !important}
/* long answers wrap instead of scrolling sideways */
#chat .message, #chat .prose {overflow-wrap:anywhere}
#chat img {max-width:100%;height:auto}
/* the footer's light grey text reads at 2.4:1; WCAG AA needs 4.5:1 */
footer, footer a, footer button, .show-api, .settings {color:#374151 !important}
#report-files label, #report-files label span {color:#1f2937 !important;background:#ffffff !important}
/* the report's files: whole names (a phone cut them to "skin-… .md"), and no Remove on a download list */
#report-files td.filename {display:table-cell !important;white-space:normal !important;overflow-wrap:anywhere}
#report-files td.filename > * {display:none !important}  /* Gradio's name and extension, apart */
#report-files td.filename::before {content:attr(aria-label)}  /* the whole name, as the cell is named */
#report-files .label-clear-button {display:none !important}
#differential h2 {font-size:1.05em;margin:0 0 4px}
#differential ol {list-style:none;padding:0;margin:0}
#differential li {display:grid;grid-template-columns:minmax(8em,14em) 1fr 3.5em;gap:8px;align-items:center;margin:3px 0}
#differential .bar {background:#e5e7eb;border-radius:4px;height:10px;display:block}
#differential .bar span {background:#0f766e;border-radius:4px;height:10px;display:block}
#differential .pct {text-align:right;font-variant-numeric:tabular-nums}
#differential .disagree {background:#fef3c7;color:#78350f;border:1px solid #d97706;padding:8px 12px;border-radius:8px}
#language {max-width:22em}
#language label, #language label span {color:#111827 !important;background:#ffffff !important}
/* rings drawn inside the radio: the group's edge clipped the first one's outside ring to a stray bracket */
#language label.selected {outline:2px solid #0f766e;outline-offset:-2px;font-weight:600}
/* the keyboard's place is always visible (WCAG 2.4.7): the language radios, the question box, buttons */
#language label:has(input:focus-visible) {outline:3px solid #1d4ed8 !important;outline-offset:-3px}
#message:focus-within {outline:3px solid #1d4ed8 !important;outline-offset:2px;border-radius:8px}
button:focus-visible, summary:focus-visible {outline:3px solid #1d4ed8 !important;outline-offset:2px}
/* read by screen readers, not shown: the finished answer, announced once */
.sr-only {position:absolute !important;width:1px;height:1px;padding:0;margin:-1px;overflow:hidden !important;
          clip:rect(0,0,0,0);white-space:nowrap;border:0}
/* New patient asks first (a confirm dialog); this button, which the dialog presses, is the wipe itself */
#new-patient-confirmed, .hidden-action {display:none !important}
#visit-list {list-style:none;padding:0;margin:0}
#visit-list li {display:flex;gap:10px;align-items:center;margin:6px 0}
#visit-list .signs {color:#7f1d1d;margin:0}
#history-status p {margin:0}
/* phones: the photo and question box on the first screen */
@media (max-width: 640px) {
  #demo-banner {font-size:0.75em;padding:4px 8px;font-weight:600;line-height:1.25}
  .quick {flex-wrap:wrap}
  .quick button {flex:1 1 45%;min-height:44px;white-space:normal}
  .actions button {min-height:44px;white-space:normal}  /* a finger's size, as the quick questions */
  #title h1 {font-size:1.35em;margin:0 0 2px}
  #title p, #disclaimer p {font-size:0.82em;margin:0}
  #new-patient {min-height:44px}
}
"""

# In the browser, once the page is there: the chat log is not read aloud token by token (the finished
# answer is announced once, from #answer-live); the red-flag notice is an alert; an image button
# without a name gets one; decorative footer images get an empty alt. Gradio's own Share (to a public
# hub) and Clear (the display only: the consultation would stay on the server) buttons are removed,
# found by their icons so that every browser language is covered, with the slot they leave; its
# English-only labels follow the page's language. Nothing is fetched.
JS = """
() => {
  const ICONS_TO_DROP = ['M23,20a5,5', 'M4,6V8H6V28'];  // Share, Clear
  // Gradio's English names, each [what Gradio writes, English, Chinese]; a message's name is its role, then its text
  const NAMES = [['Copy conversation', 'Copy conversation', '复制对话'], ['Copy message', 'Copy message', '复制消息'],
    ['Fullscreen', 'Fullscreen', '全屏'], ['Exit fullscreen mode', 'Exit fullscreen mode', '退出全屏'],
    ['Enlarge the photo', 'Enlarge the photo', '放大照片'], ['Multimedia input field', 'Question and photo box', '问题和照片输入框'],
    ['Click to upload or drop files', 'Click to upload or drop a photo', '点击上传或拖入照片'],
    ['Upload a file', 'Upload a photo', '上传照片'], ['Submit', 'Send', '发送'], ['Stop', 'Stop', '停止'],
    ['Remove', 'Remove', '移除'], ['File upload', 'Choose a photo file', '选择照片文件'],
    ['chatbot conversation', 'Conversation', '对话记录'],
    ["user's message: a component of type image", 'Your photo', '您的照片'],
    ['Gradio footer navigation', 'Page footer', '页脚导航']];
  const ROLES = [["bot's message: ", "SkinGPT's answer: ", 'SkinGPT 的回答：'], ["user's message: ", 'Your message: ', '您的消息：']];
  const mend = () => {
    document.querySelectorAll('#chat button').forEach(b => {
      const d = (b.querySelector('svg path') || {getAttribute: () => ''}).getAttribute('d') || '';
      if (ICONS_TO_DROP.some(icon => d.startsWith(icon)) && b.style.display !== 'none') {
        b.style.display = 'none';
        const slot = b.closest('.icon-button-wrapper');
        if (slot && [...slot.querySelectorAll('button')].every(x => x.style.display === 'none')) { slot.style.display = 'none'; }
      }
    });
    const lang = document.documentElement.lang.startsWith('zh') ? 2 : 1;
    document.querySelectorAll('[aria-label], #chat button[title]').forEach(b => {
      const now = b.getAttribute('aria-label') || b.getAttribute('title');
      const name = NAMES.find(n => n.includes(now));
      if (name) {
        if (now !== name[lang]) { b.setAttribute('aria-label', name[lang]); if (b.title) { b.setAttribute('title', name[lang]); } }
        return;
      }
      for (const role of ROLES) {
        const from = role.find(prefix => now.startsWith(prefix));
        if (from !== undefined) {
          if (from !== role[lang]) { b.setAttribute('aria-label', role[lang] + now.slice(from.length)); }
          return;
        }
      }
    });
    const question = document.querySelector('#message textarea');  // Gradio names it by its class alone
    const named = document.documentElement.lang.startsWith('zh') ? '您的问题和照片' : 'Your question and photos';
    if (question && question.getAttribute('aria-label') !== named) { question.setAttribute('aria-label', named); }
    document.querySelectorAll('#chat [aria-live]').forEach(e => e.setAttribute('aria-live', 'off'));
    const flag = document.querySelector('#red-flag');
    if (flag) { flag.setAttribute('role', 'alert'); }
    const live = document.querySelector('#answer-live');
    if (live) { live.setAttribute('aria-live', 'polite'); live.setAttribute('aria-atomic', 'true'); }
    document.querySelectorAll('#chat .image-container button, #chat button.image-button').forEach(b => {
      if (!b.getAttribute('aria-label') && !b.innerText.trim()) {
        b.setAttribute('aria-label', document.documentElement.lang.startsWith('zh') ? '放大照片' : 'Enlarge the photo');
      }
    });
    document.querySelectorAll('footer img').forEach(i => i.setAttribute('alt', ''));
  };
  mend();
  new MutationObserver(mend).observe(document.body, {subtree: true, childList: true});
  // follow the conversation: as an answer streams, the chat's own scroll box and the page keep the
  // newest text in view (unless the reader has scrolled up to read back), and the question box stays reachable
  let following = true;
  let scroller = null;  // found once (Gradio 6: #chat itself), not by styling every element on each token
  const box = () => {
    if (scroller && scroller.isConnected) { return scroller; }
    scroller = [...document.querySelectorAll('#chat, #chat *')].find(e => e.scrollHeight > e.clientHeight + 4 &&
        ['auto', 'scroll'].includes(getComputedStyle(e).overflowY)) || null;
    return scroller;
  };
  document.addEventListener('scroll', (e) => {
    const b = box();
    if (b && e.target === b) { following = b.scrollHeight - b.scrollTop - b.clientHeight < 80; }
  }, true);
  const follow = () => {
    if (!following) { return; }
    const b = box();
    if (b) { b.scrollTop = b.scrollHeight; }
    const messages = document.querySelectorAll('#chat .message-row, #chat .message');
    const last = messages[messages.length - 1];
    if (last && last.getBoundingClientRect().bottom > window.innerHeight) {
      last.scrollIntoView({block: 'end'});
    }
  };
  const chat = document.querySelector('#chat');
  if (chat) { new MutationObserver(follow).observe(chat, {subtree: true, childList: true, characterData: true}); }
}
"""
# New patient: asked first, in the page's language; the hidden button does the wipe (and is the API's /new_patient)
CONFIRM_WIPE = """
() => {
  const zh = document.documentElement.lang.startsWith('zh');
  const ask = zh ? '清除这位患者的照片、对话、病史和报告？此操作无法撤销。'
                 : 'Clear the photos, conversation, history and report of this patient? This cannot be undone.';
  if (window.confirm(ask)) {
    document.querySelector('#new-patient-confirmed').click();
  }
}
"""
# The report: into view when it is ready, its downloads first
SHOW_REPORT = """
() => setTimeout(() => { const r = document.querySelector('#report-panel');
                         if (r) { r.scrollIntoView({block: 'start'}); } }, 300)
"""
FOCUS_QUESTION = "() => { const box = document.querySelector('#message textarea'); if (box) { box.focus(); } }"

# the page's own language attribute follows the control, so that screen readers pronounce it right
SET_LANG = "(lang) => { document.documentElement.lang = lang === 'zh' ? 'zh-CN' : 'en'; return lang; }"


def drop_replaced_components(app: gr.Blocks) -> int:
    """Drop what Gradio leaves behind in each session after a property update; returns how many.

    Gradio 6 (6.31 seen) answers a property update (`gr.update(interactive=...)`, `open=`, `choices=`)
    by storing a new instance of the component in the session's copy of the page; the next event that
    reads it then files that instance under its own new id as well, and nothing removes it. The question
    box is updated on every answer, so an open tab gained a component (its config with it) per question:
    ~7 MB a minute under the soak, for as long as the tab stayed open. Ids the page itself never had
    are such leftovers (the app makes no components at run time: no gr.render)."""
    sessions = getattr(getattr(app, "state_holder", None), "session_data", None)
    if not sessions:
        return 0
    known = app.default_config.blocks
    dropped = 0
    for state in list(sessions.values()):
        config = getattr(state, "blocks_config", None)
        if config is None or config.blocks is known:
            continue
        for key in [key for key in list(config.blocks) if key not in known]:
            config.blocks.pop(key, None)
            state.config_values.pop(key, None)
            dropped += 1
    return dropped


def _banner(lang: str) -> str:
    return f'<div id="demo-banner" role="alert">{text(lang, "ui.demo_banner")}</div>'


def _title(lang: str, model_name: str) -> str:
    return f"# SkinGPT\n{text(lang, 'ui.tagline')} {text(lang, 'ui.model')}: `{model_name}`"


def _disclaimer(lang: str) -> str:
    return f"**{text(lang, 'disclaimer')}** {text(lang, 'emergency')}"


@dataclass
class HistoryForm:
    """The clinical history form: every field optional (`model.clinical.history.ClinicalHistory`)."""

    panel: gr.Accordion
    hint: gr.Markdown
    age: gr.Textbox
    sex: gr.Dropdown
    body_site: gr.Dropdown
    duration: gr.Dropdown
    symptoms: gr.CheckboxGroup
    changes: gr.CheckboxGroup
    treatments: gr.Textbox
    fitzpatrick: gr.Dropdown
    notes: gr.Textbox
    save: gr.Button
    status: gr.Markdown

    FIELDS = ("age", "sex", "body_site", "duration", "symptoms", "changes", "treatments", "fitzpatrick", "notes")

    @property
    def inputs(self) -> list:
        return [getattr(self, name) for name in self.FIELDS]

    def cleared(self) -> list:
        """Values of `inputs` for a new patient."""
        return ["", None, None, None, [], [], "", None, ""]


def _choices(lang: str, section: str, keys) -> list[tuple[str, str]]:
    return [(text(lang, f"history.{section}.{key}"), key) for key in keys]


def _history_form(lang: str = "en") -> HistoryForm:
    t = lambda key: text(lang, f"history.{key}")  # noqa: E731
    with gr.Accordion(t("form_title"), open=False, elem_id="history") as panel:
        hint = gr.Markdown(t("hint"))
        with gr.Row():
            # text, not a number field: an empty number field reads as 0, which is an age
            age = gr.Textbox(label=t("age"), max_length=3, elem_id="history-age", placeholder=t("age_example"))
            sex = gr.Dropdown(_choices(lang, "sexes", SEXES), value=None, label=t("sex"))
            body_site = gr.Dropdown(_choices(lang, "sites", BODY_SITES), value=None, label=t("body_site"))
            duration = gr.Dropdown(_choices(lang, "durations", DURATIONS), value=None, label=t("duration"))
        symptoms = gr.CheckboxGroup(_choices(lang, "symptom_names", SYMPTOMS), label=t("symptoms"))
        changes = gr.CheckboxGroup(_choices(lang, "change_names", CHANGES), label=t("changes"))
        with gr.Row():
            treatments = gr.Textbox(label=t("treatments"), max_length=300, max_lines=2)
            fitzpatrick = gr.Dropdown(_choices(lang, "fitzpatrick_types", range(1, 7)), value=None,
                                      label=t("fitzpatrick"))
        notes = gr.Textbox(label=t("notes"), max_length=300, lines=2, max_lines=4)
        save = gr.Button(text(lang, "ui.save_history"), size="sm")
        status = gr.Markdown("", elem_id="history-status")
    return HistoryForm(panel, hint, age, sex, body_site, duration, symptoms, changes, treatments, fitzpatrick, notes,
                       save, status)


def _relabel_history(form: HistoryForm, lang: str) -> dict:
    t = lambda key: text(lang, f"history.{key}")  # noqa: E731
    return {form.panel: gr.update(label=t("form_title")), form.hint: gr.update(value=t("hint")),
            form.age: gr.update(label=t("age"), placeholder=t("age_example")),
            form.sex: gr.update(label=t("sex"), choices=_choices(lang, "sexes", SEXES)),
            form.body_site: gr.update(label=t("body_site"), choices=_choices(lang, "sites", BODY_SITES)),
            form.duration: gr.update(label=t("duration"), choices=_choices(lang, "durations", DURATIONS)),
            form.symptoms: gr.update(label=t("symptoms"), choices=_choices(lang, "symptom_names", SYMPTOMS)),
            form.changes: gr.update(label=t("changes"), choices=_choices(lang, "change_names", CHANGES)),
            form.treatments: gr.update(label=t("treatments")),
            form.fitzpatrick: gr.update(label=t("fitzpatrick"),
                                        choices=_choices(lang, "fitzpatrick_types", range(1, 7))),
            form.notes: gr.update(label=t("notes")), form.save: gr.update(value=text(lang, "ui.save_history"))}


@dataclass
class Page:
    """The page's components, by role."""

    language: gr.Radio
    banner: gr.HTML
    title: gr.Markdown
    disclaimer: gr.Markdown
    chatbot: gr.Chatbot
    notice: gr.Markdown
    live: gr.Markdown
    ranked: gr.HTML
    box: gr.MultimodalTextbox
    quick: list[gr.Button]
    regenerate: gr.Button
    report_btn: gr.Button
    new_patient: gr.Button
    settings_panel: gr.Accordion
    max_new: gr.Slider
    sample: gr.Checkbox
    temperature: gr.Slider
    top_p: gr.Slider
    report_panel: gr.Accordion
    report_md: gr.Markdown
    report_files: gr.File
    history: HistoryForm
    wipe: gr.Button  # hidden: what New patient's confirm dialog presses
    compare_quick: gr.Button  # "What changed since last visit?": shown on a follow-up
    records: RecordsPanel | None  # with --records only

    @property
    def sampling_inputs(self) -> list:
        """The controls whose values `_sampling` turns into SamplingSettings, in its argument order."""
        return [self.max_new, self.sample, self.temperature, self.top_p]


def build(handlers: Handlers, *, demo_mode: bool, model_name: str, concurrency: int = 1,
          desk: VisitDesk | None = None) -> gr.Blocks:
    with gr.Blocks(title="SkinGPT: private dermatology assistant", analytics_enabled=False) as app:
        page = _layout(demo_mode, model_name, records=desk is not None)
        _wire_language(app, page, handlers, model_name)
        model_events = {"concurrency_id": "device", "concurrency_limit": concurrency}
        answers = _wire_answers(page, handlers, model_events)
        report_event = _wire_report(page, handlers, model_events)
        _wire_history(page, handlers)
        if page.records is not None:
            wire_records(page.records, desk, page.chatbot, page.compare_quick)
        records_cleared = cleared(page.records) if page.records is not None else {}

        def wipe(request: gr.Request):
            history, flag = handlers.new_patient(request.session_hash)
            return (history, flag, None, handlers.store.get(request.session_hash).t("ui.report_hint"), None, "",
                    "", *page.history.cleared(), gr.update(visible=False), *records_cleared.values())

        page.new_patient.click(None, None, None, js=CONFIRM_WIPE, queue=False, api_visibility="private")
        page.wipe.click(wipe, None, [page.chatbot, page.notice, page.box, page.report_md, page.report_files,
                                     page.ranked, page.history.status, *page.history.inputs, page.compare_quick,
                                     *records_cleared],
                        api_name="new_patient", cancels=[*answers, report_event]).then(
            None, None, None, js="() => window.scrollTo({top: 0})")  # the next patient starts at the top

        def on_unload(request: gr.Request) -> None:
            handlers.end_session(request.session_hash)  # the tab closed: nothing of it is kept

        def on_load(request: gr.Request) -> None:
            handlers.store.bind(request.session_hash, browser_of(dict(request.cookies)))  # its files are its own

        app.load(on_load, None, None, queue=False, api_visibility="private")
        app.unload(on_unload)
    return app


def _layout(demo_mode: bool, model_name: str, records: bool = False) -> Page:
    t = lambda key: text("en", key)  # noqa: E731 - the first render; the language control relabels
    language = gr.Radio([(text(code, "language_name"), code) for code in LANGUAGES], value="en",
                        label="Language / 语言", elem_id="language", container=False)
    banner = gr.HTML(_banner("en"), visible=demo_mode)
    title = gr.Markdown(_title("en", model_name), elem_id="title")
    disclaimer = gr.Markdown(_disclaimer("en"), elem_id="disclaimer")
    # small while empty, growing with the conversation: on a phone the question box stays on the first screen
    chatbot = gr.Chatbot(label="Consultation", show_label=False, height=None, min_height=80, max_height=600,
                         latex_delimiters=[], elem_id="chat", placeholder=t("ui.chat_placeholder"),
                         allow_file_downloads=False, buttons=["copy", "copy_all"])  # no "share" to a hub
    notice = gr.Markdown("", elem_id="red-flag")  # under the answer, where a phone user is looking
    live = gr.Markdown("", elem_id="answer-live", elem_classes="sr-only")  # the finished answer, announced once
    ranked = gr.HTML("", elem_id="differential-panel")  # the bundle's calibrated ranking, when it has a head
    box = gr.MultimodalTextbox(
        file_types=["image"], file_count="multiple", sources=["upload"], elem_id="message",
        placeholder=t("ui.box_placeholder"), label=t("ui.box_label"), show_label=False, submit_btn=True,
        stop_btn=True)  # the label, unshown, is the box's accessible name (Gradio's default: "MultimodalTextbox")
    history = _history_form("en")
    with gr.Row(elem_classes="quick"):
        quick = [gr.Button(t(f"ui.{key}"), size="sm", variant="secondary") for key in QUICK_PROMPTS]
        compare_quick = gr.Button(t("ui.quick_compare"), size="sm", variant="primary", visible=False,
                                  elem_id="quick-compare")
    with gr.Row(elem_classes="actions"):
        regenerate = gr.Button(t("ui.regenerate"), size="sm", elem_id="regenerate")
        report_btn = gr.Button(t("ui.full_report"), size="sm", elem_id="full-report")
        new_patient = gr.Button(t("ui.new_patient"), size="sm", variant="stop", elem_id="new-patient")
        wipe = gr.Button("wipe", elem_id="new-patient-confirmed", size="sm")
    with gr.Accordion(t("ui.settings"), open=False) as settings_panel:
        max_new = gr.Slider(16, 600, value=300, step=1, label=t("ui.max_length"))
        sample = gr.Checkbox(value=False, label=t("ui.sampling"))
        temperature = gr.Slider(0.1, 1.5, value=1.0, step=0.05, label=t("ui.temperature"))
        top_p = gr.Slider(0.1, 1.0, value=0.9, step=0.05, label=t("ui.top_p"))
    with gr.Accordion(t("ui.report_panel"), open=False, elem_id="report-panel") as report_panel:
        report_files = gr.File(label=t("ui.download"), file_count="multiple", interactive=False,
                               elem_id="report-files")  # first: the downloads are what a clinician files
        report_md = gr.Markdown(t("ui.report_hint"), elem_id="report-text")
    panel = records_panel("en") if records else None
    return Page(language, banner, title, disclaimer, chatbot, notice, live, ranked, box, quick, regenerate,
                report_btn, new_patient, settings_panel, max_new, sample, temperature, top_p, report_panel,
                report_md, report_files, history, wipe, compare_quick, panel)


def _relabel(page: Page, lang: str, model_name: str) -> dict:
    """Every text on the page in `lang`, keyed by component (no list to keep in step with an outputs list)."""
    tr = lambda key: text(lang, key)  # noqa: E731
    updates = {page.banner: gr.update(value=_banner(lang)), page.title: gr.update(value=_title(lang, model_name)),
               page.disclaimer: gr.update(value=_disclaimer(lang)),
               page.chatbot: gr.update(placeholder=tr("ui.chat_placeholder")),
               page.box: gr.update(placeholder=tr("ui.box_placeholder"), label=tr("ui.box_label")),
               page.regenerate: gr.update(value=tr("ui.regenerate")),
               page.report_btn: gr.update(value=tr("ui.full_report")),
               page.new_patient: gr.update(value=tr("ui.new_patient")),
               page.settings_panel: gr.update(label=tr("ui.settings")),
               page.max_new: gr.update(label=tr("ui.max_length")), page.sample: gr.update(label=tr("ui.sampling")),
               page.temperature: gr.update(label=tr("ui.temperature")), page.top_p: gr.update(label=tr("ui.top_p")),
               page.report_panel: gr.update(label=tr("ui.report_panel")),
               page.report_md: gr.update(value=tr("ui.report_hint")),
               page.report_files: gr.update(label=tr("ui.download"))}
    updates.update({button: gr.update(value=tr(f"ui.{key}")) for button, key in zip(page.quick, QUICK_PROMPTS)})
    updates.update(_relabel_history(page.history, lang))
    updates[page.compare_quick] = gr.update(value=tr("ui.quick_compare"))
    if page.records is not None:
        updates.update(relabel_records(page.records, lang))
    return updates


def _wire_language(app: gr.Blocks, page: Page, handlers: Handlers, model_name: str) -> None:
    def relabel(lang: str, request: gr.Request) -> dict:
        """Every text on the page in the chosen language; the consultation follows it too."""
        handlers.set_language(request.session_hash, lang)
        return _relabel(page, lang, model_name)

    outputs = list(_relabel(page, "en", model_name))
    page.language.change(relabel, [page.language], outputs, queue=False, api_visibility="private", js=SET_LANG)

    def first_language(request: gr.Request) -> str:
        """The browser's language at first load (its Accept-Language), if this app speaks it."""
        return pick(request.headers.get("accept-language"))

    app.load(first_language, None, [page.language], queue=False, api_visibility="private")


def _sampling(max_new_tokens, do_sample, temp, p) -> SamplingSettings:
    return SamplingSettings(max_new_tokens=int(max_new_tokens), greedy=not do_sample, temperature=float(temp),
                            top_p=float(p))


def _wire_answers(page: Page, handlers: Handlers, model_events: dict) -> list:
    """Ask, regenerate, the quick questions and stop; after each answer, the live region, the focus
    and the ranking. Returns the answering events (what Stop and New patient cancel)."""
    def ask(message, max_new_tokens, do_sample, temp, p, request: gr.Request) -> Iterator:
        cleared = gr.update(value=None, interactive=False)
        # closing() passes a cancel (Stop, a closed tab) on to the handler, which keeps the partial answer
        with closing(handlers.submit(request.session_hash, message,
                                     _sampling(max_new_tokens, do_sample, temp, p))) as updates:
            for history, flag in updates:
                yield history, flag, cleared
        unsent = handlers.store.get(request.session_hash).unsent  # a refused question stays in the box
        yield history, flag, (gr.update(value={"text": unsent, "files": []}, interactive=False) if unsent
                              else gr.update(interactive=False))  # `_unlock` opens it after the event

    inputs = page.sampling_inputs
    ask_event = page.box.submit(ask, [page.box, *inputs], [page.chatbot, page.notice, page.box], api_name="ask",
                                **model_events)

    def attached(message, request: gr.Request) -> str:
        return handlers.attached(request.session_hash, message)  # a poor photo is said before it is sent

    page.box.change(attached, [page.box], [page.notice], queue=False, api_visibility="private")

    def again(max_new_tokens, do_sample, temp, p, request: gr.Request) -> Iterator:
        settings = _sampling(max_new_tokens, do_sample, temp, p)
        yield from _locking_box(handlers.regenerate(request.session_hash, settings))

    answering = [page.chatbot, page.notice, page.box]  # the box is locked while an answer is written: its Stop shows
    events = [ask_event, page.regenerate.click(again, inputs, answering, api_name="regenerate", **model_events)]
    for button, key in zip(page.quick, QUICK_PROMPTS):
        def quick_ask(max_new_tokens, do_sample, temp, p, request: gr.Request, _key=key) -> Iterator:
            yield from _locking_box(handlers.ask_quick(request.session_hash, _key,
                                                       _sampling(max_new_tokens, do_sample, temp, p)))
        events.append(button.click(quick_ask, inputs, answering, api_visibility="private", **model_events))

    def what_changed(max_new_tokens, do_sample, temp, p, request: gr.Request) -> Iterator:
        yield from _locking_box(handlers.ask_what_changed(request.session_hash,
                                                          _sampling(max_new_tokens, do_sample, temp, p)))

    events.append(page.compare_quick.click(what_changed, inputs, answering, api_visibility="private", **model_events))
    _wire_stop_and_after(page, handlers, events, model_events)
    return events


def _wire_stop_and_after(page: Page, handlers: Handlers, events: list, model_events: dict) -> None:
    """Stop, and what follows every answering event: the box unlocked, the focus back, the ranking."""
    def stop(request: gr.Request) -> None:
        handlers.stop(request.session_hash)

    # Stop ends the answer through the engine (it keeps what was written), so the answering event ends
    # as any answer does: its last update, then `unlock`. Gradio's own `cancels=` would kill the event
    # mid-update, which its page shows as "Error" badges over the chat and a question box locked for good.
    page.box.stop(stop, None, None, api_name="stop", queue=False)

    def unlock(history, request: gr.Request):
        handlers.answer_ended(request.session_hash)
        return _unlock(history)

    def differential(request: gr.Request) -> str:
        return handlers.differential(request.session_hash)

    for event in events:
        event.then(unlock, [page.chatbot], [page.live, page.box], queue=False, api_visibility="private").then(
            None, None, None, js=FOCUS_QUESTION).then(  # the keyboard is back in the question box
            differential, None, [page.ranked], api_visibility="private", **model_events)


def _locking_box(updates: Iterator) -> Iterator:
    """(history, notice) updates, with the question box locked (what it holds stays); `_unlock` opens it."""
    with closing(updates):  # a cancel (Stop, a closed tab) reaches the handler, which keeps the partial answer
        for history, flag in updates:
            yield history, flag, gr.update(interactive=False)


def _unlock(history) -> tuple[str, dict]:
    """After an answering event has ended: the answer for the live region, and the question box open.
    Not in the event's own last update: a question sent between that update and the event's end is
    dropped by Gradio (an event already pending takes no second submit)."""
    return _announce(history), gr.update(interactive=True)


def _wire_report(page: Page, handlers: Handlers, model_events: dict):
    def report(max_new_tokens, do_sample, temp, p, request: gr.Request, progress=gr.Progress()):
        from model.clinical.report_pdf import report_pdf

        def step(done: int, total: int) -> None:
            progress(done / total, desc=f"Consultation question {done + 1} of {total}")

        markdown, files = handlers.report(request.session_hash, _sampling(max_new_tokens, do_sample, temp, p),
                                          render_pdf=report_pdf, on_step=step)
        if files:
            markdown = handlers.store.get(request.session_hash).t("ui.report_ready") + "\n\n" + markdown
        return markdown, files or None, gr.update(open=True)

    event = page.report_btn.click(report, page.sampling_inputs, [page.report_md, page.report_files, page.report_panel],
                                  api_name="report", **model_events)
    event.then(None, None, None, js=SHOW_REPORT, api_visibility="private")
    return event


def _wire_history(page: Page, handlers: Handlers) -> None:
    """Saved on Save (the gradio_client endpoint /history) and whenever a field changes."""
    form = page.history

    def save(age, sex, body_site, duration, symptoms, changes, treatments, fitzpatrick, notes, request: gr.Request):
        fields = {"age": age, "sex": sex, "body_site": body_site, "duration": duration, "symptoms": symptoms,
                  "changes": changes, "treatments": treatments, "fitzpatrick": fitzpatrick, "notes": notes}
        return handlers.set_history(request.session_hash, fields)

    form.save.click(save, form.inputs, [form.status, page.notice], api_name="history", queue=False)
    for field in form.inputs:
        field.change(save, form.inputs, [form.status, page.notice], api_visibility="private", queue=False)


def _announce(history) -> str:
    """The finished answer, for the polite live region (screen readers hear it once, whole)."""
    answers = [m for m in history or [] if m.get("role") == "assistant" and not (m.get("metadata") or {})]
    content = answers[-1]["content"] if answers else ""
    if isinstance(content, list):  # as Gradio hands it back: parts
        content = " ".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content if isinstance(content, str) else ""
