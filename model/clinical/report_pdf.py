"""The consultation report as a PDF (fpdf2). English uses the PDF core fonts; Chinese, or any text
core fonts cannot show, embeds a CJK font installed on this machine (Debian's fonts-wqy-microhei,
installed by the set-up and the Dockerfile): nothing is fetched, and the text stays selectable."""

from __future__ import annotations

import io
import logging
import re
from pathlib import Path
from typing import Sequence

from PIL import Image

from model.clinical.consultation import ConsultationReport
from model.errors import UserFacingError
from model.clinical.safety import red_flag_advice
from model.i18n.catalog import text

CJK_FONTS = (Path("/usr/share/fonts/truetype/wqy/wqy-microhei.ttc"),
             Path("/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc"),
             Path("/usr/share/fonts/truetype/arphic/uming.ttc"))
_BEYOND_LATIN1 = re.compile(r"[^\x00-\xff\u2013\u2014\u2019]")


class FontMissing(UserFacingError, RuntimeError):
    """No CJK font for a PDF that needs one."""


def cjk_font() -> Path | None:
    return next((path for path in CJK_FONTS if path.is_file()), None)


def _latin1(value: str) -> str:
    """Core PDF fonts cover Latin-1; anything else becomes '?' rather than failing the export."""
    return value.replace("\u2019", "'").replace("\u2013", "-").replace("\u2014", "-").encode(
        "latin-1", "replace").decode("latin-1")


PRINT_SIDE = 830  # pixels on a photo's long side: its 70 mm at 300 dpi


def _print_copy(photo: Image.Image) -> io.BytesIO:
    """The photo as the page prints it: at most 300 dpi, as a JPEG (embedded as it is, not re-encoded
    losslessly from the full-size pixels, which made a phone photo's report megabytes)."""
    copy = photo.convert("RGB")
    copy.thumbnail((PRINT_SIDE, PRINT_SIDE), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    copy.save(buffer, "JPEG", quality=88)
    buffer.seek(0)
    return buffer


def _new_pdf(report: ConsultationReport):
    """An A4 document with its first page, and the CJK font it carries (None: Latin-1 core fonts do)."""
    from fpdf import FPDF

    logging.getLogger("fontTools").setLevel(logging.ERROR)  # it logs each subsetting step of every PDF
    everything = report.full_text + "".join(report.red_flags) + "".join(report.history_lines())
    needs_cjk = report.lang != "en" or bool(_BEYOND_LATIN1.search(everything))
    font = cjk_font() if needs_cjk else None
    if report.lang != "en" and font is None:  # (an English report falls back to core fonts and '?')
        raise FontMissing("the PDF needs a font for Chinese text and none is installed: run "
                          "`apt-get install fonts-wqy-microhei` (Debian/Ubuntu). The Markdown report works without it.")
    pdf = FPDF(format="A4")
    pdf.set_auto_page_break(auto=True, margin=15)
    if font is not None:
        pdf.add_font("cjk", "", str(font))
    pdf.add_page()
    return pdf, font


def report_pdf(report: ConsultationReport, photos: Sequence[Image.Image] = ()) -> bytes:
    """The report, with the consultation's `photos` (as `report.details.photos` names them) on it."""
    pdf, font = _new_pdf(report)
    width = pdf.w - pdf.l_margin - pdf.r_margin
    family, clean = ("cjk", str) if font is not None else ("Helvetica", _latin1)

    def write(value: str, size: float, style: str = "", height: float = 5.5) -> None:
        pdf.set_font(family, style if font is None else "", size)  # the CJK face has no bold or italic
        pdf.multi_cell(width, height, clean(value), new_x="LMARGIN", new_y="NEXT", align="L")  # no justified gaps

    def heading(key: str) -> None:
        pdf.ln(2)
        write(report.heading(key), 13, "B", 7)

    write(report.heading("title"), 16, "B", 9)
    write(report.disclaimer, 10.5, "I")
    if report.details is not None:
        heading("details")
        write("\n".join(report.detail_lines()), 10.5)
        for n, photo in enumerate(photos, 1):
            scale = min(70 / photo.width, 60 / photo.height)  # mm: about a third of the page's width
            pdf.image(_print_copy(photo), w=photo.width * scale, h=photo.height * scale)
            write(report.heading("photo_caption").format(n=n), 9)
    if report.red_flags:
        heading("warning_signs")
        write(red_flag_advice(report.red_flags, report.lang), 10.5, "B")
    heading("most_likely")
    write(report.diagnosis or report.heading("none_named"), 10.5)
    if report.differential:
        heading("ranked")
        write("\n".join(report.differential_lines()), 10.5)
    if report.differentials:
        heading("other")
        write("\n".join(f"- {d}" for d in report.differentials), 10.5)
    heading("features")
    write("\n".join(f"- {f}" for f in report.visible_features) or "-", 10.5)
    pdf.ln(2)
    write(text(report.lang, "history.title"), 13, "B", 7)
    write("\n".join(report.history_lines()), 10.5)
    if report.photo_quality:
        pdf.ln(2)
        write(text(report.lang, "quality.title"), 13, "B", 7)
        write("\n".join(report.quality_lines()), 10.5)
    for key, value in (("causes", report.causes), ("treatment", report.treatment), ("see_doctor", report.see_doctor)):
        heading(key)
        write(value or "-", 10.5)
    heading("full")
    for key, question in report.questions.items():
        write(f"Q: {question}", 10.5, "B")
        write(f"A: {report.answers[key]}", 10.5)
    return bytes(pdf.output())
