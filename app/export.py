"""The consultation report as a PDF (fpdf2, core fonts: no font files fetched or shipped)."""

from __future__ import annotations

from model.consultation import ConsultationReport
from model.safety import URGENT_ADVICE


def _latin1(text: str) -> str:
    """Core PDF fonts cover Latin-1; anything else becomes '?' rather than failing the export."""
    return text.replace("\u2019", "'").replace("\u2013", "-").replace("\u2014", "-").encode(
        "latin-1", "replace").decode("latin-1")


def report_pdf(report: ConsultationReport) -> bytes:
    from fpdf import FPDF

    pdf = FPDF(format="A4")
    pdf.set_auto_page_break(auto=True, margin=15)
    pdf.add_page()
    width = pdf.w - pdf.l_margin - pdf.r_margin

    def heading(text: str) -> None:
        pdf.set_font("Helvetica", "B", 13)
        pdf.ln(2)
        pdf.multi_cell(width, 7, _latin1(text), new_x="LMARGIN", new_y="NEXT")

    def body(text: str, style: str = "") -> None:
        pdf.set_font("Helvetica", style, 10.5)
        pdf.multi_cell(width, 5.5, _latin1(text), new_x="LMARGIN", new_y="NEXT")

    pdf.set_font("Helvetica", "B", 16)
    pdf.multi_cell(width, 9, "Skin consultation report", new_x="LMARGIN", new_y="NEXT")
    body(report.disclaimer, "I")
    if report.red_flags:
        heading("Warning signs")
        body(f"{', '.join(report.red_flags)}. {URGENT_ADVICE}", "B")
    heading("Most likely condition")
    body(report.diagnosis or "No condition was named.")
    if report.differentials:
        heading("Other possibilities")
        body("\n".join(f"- {d}" for d in report.differentials))
    heading("Visible features")
    body("\n".join(f"- {f}" for f in report.visible_features) or "-")
    for title, text in (("Possible causes", report.causes), ("Treatment suggestions", report.treatment),
                        ("When to see a doctor", report.see_doctor)):
        heading(title)
        body(text or "-")
    heading("Full consultation")
    for key, question in report.questions.items():
        body(f"Q: {question}", "B")
        body(f"A: {report.answers[key]}")
    return bytes(pdf.output())
