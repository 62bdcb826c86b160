"""Layout and wiring only: every behaviour lives in `app.web.handlers`.

Named API endpoints (usable from gradio_client): /ask (message with text and files, streams the
history), /regenerate, /stop, /new_patient, /report.
"""

from __future__ import annotations

from contextlib import closing
from dataclasses import dataclass
from typing import Iterator

import gradio as gr

from app.web.handlers import QUICK_PROMPTS, Handlers
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
/* the image viewer inside chat messages offers "Share" (to a public hub) whatever the chatbot's buttons say */
#chat button[aria-label="Share"], #chat button[title="Share"] {display:none !important}
/* long answers wrap instead of scrolling sideways */
#chat .message, #chat .prose {overflow-wrap:anywhere}
#chat img {max-width:100%;height:auto}
/* the footer's light grey text reads at 2.4:1; WCAG AA needs 4.5:1 */
footer, footer a, footer button, .show-api, .settings {color:#374151 !important}
#report-files label, #report-files label span {color:#1f2937 !important;background:#ffffff !important}
#differential h2 {font-size:1.05em;margin:0 0 4px}
#differential ol {list-style:none;padding:0;margin:0}
#differential li {display:grid;grid-template-columns:minmax(8em,14em) 1fr 3.5em;gap:8px;align-items:center;margin:3px 0}
#differential .bar {background:#e5e7eb;border-radius:4px;height:10px;display:block}
#differential .bar span {background:#0f766e;border-radius:4px;height:10px;display:block}
#differential .pct {text-align:right;font-variant-numeric:tabular-nums}
#differential .disagree {background:#fef3c7;color:#78350f;border:1px solid #d97706;padding:8px 12px;border-radius:8px}
#language {max-width:22em}
#language label, #language label span {color:#111827 !important;background:#ffffff !important}
#language label.selected {outline:2px solid #0f766e;font-weight:600}
/* read by screen readers, not shown: the finished answer, announced once */
.sr-only {position:absolute !important;width:1px;height:1px;padding:0;margin:-1px;overflow:hidden !important;
          clip:rect(0,0,0,0);white-space:nowrap;border:0}
/* phones: the photo and question box on the first screen */
@media (max-width: 640px) {
  #demo-banner {font-size:0.8em;padding:6px 10px;font-weight:600}
  #title h1 {font-size:1.35em;margin:0 0 2px}
  #title p, #disclaimer p {font-size:0.82em;margin:0}
  .quick button, #new-patient {min-height:44px}
}
"""

# In the browser, once the page is there: the chat log is not read aloud token by token (the finished
# answer is announced once, from #answer-live); the red-flag notice is an alert; an image button
# without a name gets one; decorative footer images get an empty alt. Nothing is fetched.
JS = """
() => {
  const mend = () => {
    document.querySelectorAll('#chat [aria-live]').forEach(e => e.setAttribute('aria-live', 'off'));
    const flag = document.querySelector('#red-flag');
    if (flag) { flag.setAttribute('role', 'alert'); }
    const live = document.querySelector('#answer-live');
    if (live) { live.setAttribute('aria-live', 'polite'); live.setAttribute('aria-atomic', 'true'); }
    document.querySelectorAll('#chat .image-container button, #chat button.image-button').forEach(b => {
      if (!b.getAttribute('aria-label') && !b.innerText.trim()) { b.setAttribute('aria-label', 'Enlarge the photo'); }
    });
    document.querySelectorAll('footer img').forEach(i => i.setAttribute('alt', ''));
  };
  mend();
  new MutationObserver(mend).observe(document.body, {subtree: true, childList: true});
}
"""
FOCUS_QUESTION = "() => { const box = document.querySelector('#message textarea'); if (box) { box.focus(); } }"

# the page's own language attribute follows the control, so that screen readers pronounce it right
SET_LANG = "(lang) => { document.documentElement.lang = lang === 'zh' ? 'zh-CN' : 'en'; return lang; }"


def _banner(lang: str) -> str:
    return f'<div id="demo-banner" role="alert">{text(lang, "ui.demo_banner")}</div>'


def _title(lang: str, model_name: str) -> str:
    return f"# SkinGPT\n{text(lang, 'ui.tagline')} Model: `{model_name}`."


def _disclaimer(lang: str) -> str:
    return f"**{text(lang, 'disclaimer')}** {text(lang, 'emergency')}"


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

    @property
    def sampling_inputs(self) -> list:
        """The controls whose values `_sampling` turns into SamplingSettings, in its argument order."""
        return [self.max_new, self.sample, self.temperature, self.top_p]


def build(handlers: Handlers, *, demo_mode: bool, model_name: str, concurrency: int = 1) -> gr.Blocks:
    with gr.Blocks(title="SkinGPT: private dermatology assistant", analytics_enabled=False) as app:
        page = _layout(demo_mode, model_name)
        _wire_language(app, page, handlers, model_name)
        model_events = {"concurrency_id": "device", "concurrency_limit": concurrency}
        answers = _wire_answers(page, handlers, model_events)
        report_event = _wire_report(page, handlers, model_events)
        def wipe(request: gr.Request):
            history, flag = handlers.new_patient(request.session_hash)
            return history, flag, None, handlers.store.get(request.session_hash).t("ui.report_hint"), None

        page.new_patient.click(lambda: "", None, [page.ranked], queue=False, api_visibility="private")
        page.new_patient.click(wipe, None, [page.chatbot, page.notice, page.box, page.report_md, page.report_files],
                               api_name="new_patient", cancels=[*answers, report_event])

        def on_unload(request: gr.Request) -> None:
            handlers.end_session(request.session_hash)  # the tab closed: nothing of it is kept

        app.unload(on_unload)
    return app


def _layout(demo_mode: bool, model_name: str) -> Page:
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
        placeholder=t("ui.box_placeholder"), show_label=False, submit_btn=True, stop_btn=True)
    with gr.Row(elem_classes="quick"):
        quick = [gr.Button(t(f"ui.{key}"), size="sm", variant="secondary") for key in QUICK_PROMPTS]
    with gr.Row():
        regenerate = gr.Button(t("ui.regenerate"), size="sm")
        report_btn = gr.Button(t("ui.full_report"), size="sm", elem_id="full-report")
        new_patient = gr.Button(t("ui.new_patient"), size="sm", variant="stop", elem_id="new-patient")
    with gr.Accordion(t("ui.settings"), open=False) as settings_panel:
        max_new = gr.Slider(16, 600, value=300, step=1, label=t("ui.max_length"))
        sample = gr.Checkbox(value=False, label=t("ui.sampling"))
        temperature = gr.Slider(0.1, 1.5, value=1.0, step=0.05, label=t("ui.temperature"))
        top_p = gr.Slider(0.1, 1.0, value=0.9, step=0.05, label=t("ui.top_p"))
    with gr.Accordion(t("ui.full_report"), open=False) as report_panel:
        report_md = gr.Markdown(t("ui.report_hint"))
        report_files = gr.File(label=t("ui.download"), file_count="multiple", interactive=False,
                               elem_id="report-files")
    return Page(language, banner, title, disclaimer, chatbot, notice, live, ranked, box, quick, regenerate,
                report_btn, new_patient, settings_panel, max_new, sample, temperature, top_p, report_panel,
                report_md, report_files)


def _relabel(page: Page, lang: str, model_name: str) -> dict:
    """Every text on the page in `lang`, keyed by component (no list to keep in step with an outputs list)."""
    tr = lambda key: text(lang, key)  # noqa: E731
    updates = {page.banner: gr.update(value=_banner(lang)), page.title: gr.update(value=_title(lang, model_name)),
               page.disclaimer: gr.update(value=_disclaimer(lang)),
               page.chatbot: gr.update(placeholder=tr("ui.chat_placeholder")),
               page.box: gr.update(placeholder=tr("ui.box_placeholder")),
               page.regenerate: gr.update(value=tr("ui.regenerate")),
               page.report_btn: gr.update(value=tr("ui.full_report")),
               page.new_patient: gr.update(value=tr("ui.new_patient")),
               page.settings_panel: gr.update(label=tr("ui.settings")),
               page.max_new: gr.update(label=tr("ui.max_length")), page.sample: gr.update(label=tr("ui.sampling")),
               page.temperature: gr.update(label=tr("ui.temperature")), page.top_p: gr.update(label=tr("ui.top_p")),
               page.report_panel: gr.update(label=tr("ui.full_report")),
               page.report_md: gr.update(value=tr("ui.report_hint")),
               page.report_files: gr.update(label=tr("ui.download"))}
    updates.update({button: gr.update(value=tr(f"ui.{key}")) for button, key in zip(page.quick, QUICK_PROMPTS)})
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
        cleared = gr.MultimodalTextbox(value=None, interactive=False)
        # closing() passes a cancel (Stop, a closed tab) on to the handler, which keeps the partial answer
        with closing(handlers.submit(request.session_hash, message,
                                     _sampling(max_new_tokens, do_sample, temp, p))) as updates:
            for history, flag in updates:
                yield history, flag, cleared
        yield history, flag, gr.MultimodalTextbox(interactive=True)

    inputs = page.sampling_inputs
    ask_event = page.box.submit(ask, [page.box, *inputs], [page.chatbot, page.notice, page.box], api_name="ask",
                                **model_events)

    def attached(message, request: gr.Request) -> None:
        handlers.attached(request.session_hash, message)  # deleted with the consultation if never sent

    page.box.change(attached, [page.box], None, queue=False, api_visibility="private")

    def again(max_new_tokens, do_sample, temp, p, request: gr.Request) -> Iterator:
        yield from handlers.regenerate(request.session_hash, _sampling(max_new_tokens, do_sample, temp, p))

    events = [ask_event, page.regenerate.click(again, inputs, [page.chatbot, page.notice], api_name="regenerate",
                                               **model_events)]
    for button, key in zip(page.quick, QUICK_PROMPTS):
        def quick_ask(max_new_tokens, do_sample, temp, p, request: gr.Request, _key=key) -> Iterator:
            yield from handlers.ask_quick(request.session_hash, _key, _sampling(max_new_tokens, do_sample, temp, p))
        events.append(button.click(quick_ask, inputs, [page.chatbot, page.notice], api_visibility="private",
                                   **model_events))

    def stop(request: gr.Request) -> None:
        handlers.stop(request.session_hash)

    page.box.stop(stop, None, None, api_name="stop", cancels=events, queue=False)

    def differential(request: gr.Request) -> str:
        return handlers.differential(request.session_hash)

    for event in events:
        event.then(_announce, [page.chatbot], [page.live], queue=False, api_visibility="private").then(
            None, None, None, js=FOCUS_QUESTION).then(  # the keyboard is back in the question box
            differential, None, [page.ranked], api_visibility="private", **model_events)
    return events


def _wire_report(page: Page, handlers: Handlers, model_events: dict):
    def report(max_new_tokens, do_sample, temp, p, request: gr.Request, progress=gr.Progress()):
        from model.clinical.report_pdf import report_pdf

        def step(done: int, total: int) -> None:
            progress(done / total, desc=f"Consultation question {done + 1} of {total}")

        markdown, files = handlers.report(request.session_hash, _sampling(max_new_tokens, do_sample, temp, p),
                                          render_pdf=report_pdf, on_step=step)
        return markdown, files or None, gr.Accordion(open=True)

    return page.report_btn.click(report, page.sampling_inputs, [page.report_md, page.report_files, page.report_panel],
                                 api_name="report", **model_events)


def _announce(history) -> str:
    """The finished answer, for the polite live region (screen readers hear it once, whole)."""
    answers = [m for m in history or [] if m.get("role") == "assistant" and not (m.get("metadata") or {})]
    content = answers[-1]["content"] if answers else ""
    if isinstance(content, list):  # as Gradio hands it back: parts
        content = " ".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content if isinstance(content, str) else ""
