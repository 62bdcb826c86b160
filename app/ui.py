"""Layout and wiring only: every behaviour lives in `app.handlers`.

Named API endpoints (usable from gradio_client): /ask (message with text and files, streams the
history), /regenerate, /stop, /new_patient, /report.
"""

from __future__ import annotations

from contextlib import closing
from typing import Iterator

import gradio as gr

from model.safety import DISCLAIMER

from .handlers import QUICK_PROMPTS, Handlers

# System fonts only: Gradio's default themes fetch web fonts from another host.
THEME = gr.themes.Soft(primary_hue="teal", font=["system-ui", "-apple-system", "Segoe UI", "Roboto", "sans-serif"],
                       font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "monospace"])

CSS = """
#demo-banner {background:#b45309;color:#fff;padding:10px 14px;border-radius:8px;font-weight:600}
#disclaimer {font-size:0.92em;opacity:0.9}
#red-flag p {background:#fee2e2;color:#7f1d1d;border:1px solid #ef4444;padding:10px 14px;border-radius:8px}
.quick button {min-width:0}
/* the image viewer inside chat messages offers "Share" (to a public hub) whatever the chatbot's buttons say */
#chat button[aria-label="Share"], #chat button[title="Share"] {display:none !important}
"""

DEMO_BANNER = ("DEMO MODE: this server runs random weights. Its answers are meaningless text and must not be "
               "read as medical information. Install a real bundle (see weights/README.md) and start with --weights.")


def build(handlers: Handlers, *, demo_mode: bool, model_name: str, concurrency: int = 1) -> gr.Blocks:
    with gr.Blocks(title="SkinGPT: private dermatology assistant", analytics_enabled=False) as app:
        if demo_mode:
            gr.HTML(f'<div id="demo-banner" role="alert">{DEMO_BANNER}</div>')
        gr.Markdown(f"## SkinGPT\nA private dermatology assistant. Photos and messages stay on this machine. "
                    f"Model: `{model_name}`.")
        gr.Markdown(f"**{DISCLAIMER}** In an emergency, call your local emergency number.", elem_id="disclaimer")
        chatbot = gr.Chatbot(label="Consultation", show_label=False, height=480, latex_delimiters=[], elem_id="chat",
                             placeholder="Attach a photo of the skin, then ask a question.",
                             allow_file_downloads=False, buttons=["copy", "copy_all"])  # no "share" to a hub
        notice = gr.Markdown("", elem_id="red-flag")  # under the answer, where a phone user is looking
        box = gr.MultimodalTextbox(
            file_types=["image"], file_count="multiple", sources=["upload"], elem_id="message",
            placeholder="Attach or drop a photo (on a phone: take one), then ask a question...",
            show_label=False, submit_btn=True, stop_btn=True)
        with gr.Row(elem_classes="quick"):
            quick = [gr.Button(label, size="sm", variant="secondary") for label in QUICK_PROMPTS]
        with gr.Row():
            regenerate = gr.Button("Regenerate", size="sm")
            report_btn = gr.Button("Full report", size="sm")
            new_patient = gr.Button("New patient", size="sm", variant="stop", elem_id="new-patient")
        with gr.Accordion("Generation settings", open=False):
            max_new = gr.Slider(16, 600, value=300, step=1, label="Maximum answer length (tokens)")
            sample = gr.Checkbox(value=False, label="Varied answers (sampling); off: the most likely answer")
            temperature = gr.Slider(0.1, 1.5, value=1.0, step=0.05, label="Temperature (with sampling)")
            top_p = gr.Slider(0.1, 1.0, value=0.9, step=0.05, label="Top-p (with sampling)")
        with gr.Accordion("Full report", open=False) as report_panel:
            report_md = gr.Markdown("Press **Full report** to run the structured consultation on the first photo.")
            report_files = gr.File(label="Download (Markdown, PDF)", file_count="multiple", interactive=False)

        gen_inputs = [max_new, sample, temperature, top_p]
        model_events = {"concurrency_id": "device", "concurrency_limit": concurrency}

        def settings(max_new_tokens, do_sample, temp, p) -> dict:
            return {"max_new_tokens": int(max_new_tokens), "do_sample": bool(do_sample),
                    "temperature": float(temp), "top_p": float(p)}

        def ask(message, max_new_tokens, do_sample, temp, p, request: gr.Request) -> Iterator:
            cleared = gr.MultimodalTextbox(value=None, interactive=False)
            # closing() passes a cancel (Stop, a closed tab) on to the handler, which keeps the partial answer
            with closing(handlers.submit(request.session_hash, message,
                                         settings(max_new_tokens, do_sample, temp, p))) as updates:
                for history, flag in updates:
                    yield history, flag, cleared
            yield history, flag, gr.MultimodalTextbox(interactive=True)

        ask_event = box.submit(ask, [box, *gen_inputs], [chatbot, notice, box], api_name="ask", **model_events)

        def attached(message, request: gr.Request) -> None:
            handlers.attached(request.session_hash, message)  # deleted with the consultation if never sent

        box.change(attached, [box], None, queue=False, api_visibility="private")

        def stop(request: gr.Request) -> None:
            handlers.stop(request.session_hash)

        def again(max_new_tokens, do_sample, temp, p, request: gr.Request) -> Iterator:
            yield from handlers.regenerate(request.session_hash, settings(max_new_tokens, do_sample, temp, p))

        regen_event = regenerate.click(again, gen_inputs, [chatbot, notice], api_name="regenerate", **model_events)
        quick_events = []
        for button, label in zip(quick, QUICK_PROMPTS):
            def quick_ask(max_new_tokens, do_sample, temp, p, request: gr.Request, _label=label) -> Iterator:
                yield from handlers.ask_quick(request.session_hash, _label, settings(max_new_tokens, do_sample, temp, p))
            quick_events.append(button.click(quick_ask, gen_inputs, [chatbot, notice], api_visibility="private",
                                             **model_events))
        box.stop(stop, None, None, api_name="stop", cancels=[ask_event, regen_event, *quick_events], queue=False)

        def wipe(request: gr.Request):
            history, flag = handlers.new_patient(request.session_hash)
            return (history, flag, None, "Press **Full report** to run the structured consultation on the first photo.",
                    None)

        def report(max_new_tokens, do_sample, temp, p, request: gr.Request, progress=gr.Progress()):
            from .export import report_pdf

            def step(done: int, total: int) -> None:
                progress(done / total, desc=f"Consultation question {done + 1} of {total}")

            markdown, files = handlers.report(request.session_hash, settings(max_new_tokens, do_sample, temp, p),
                                              render_pdf=report_pdf, on_step=step)
            return markdown, files or None, gr.Accordion(open=True)

        report_event = report_btn.click(report, gen_inputs, [report_md, report_files, report_panel], api_name="report",
                                        **model_events)
        new_patient.click(wipe, None, [chatbot, notice, box, report_md, report_files], api_name="new_patient",
                          cancels=[ask_event, regen_event, report_event, *quick_events])

        def on_unload(request: gr.Request) -> None:
            handlers.end_session(request.session_hash)  # the tab closed: nothing of it is kept

        app.unload(on_unload)
    return app
