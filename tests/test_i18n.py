"""Chinese and English end to end: the same keys in every language file, Chinese red flags, the
answer-language instruction only when Chinese is chosen, Chinese reports (Markdown and a PDF whose
text extracts as Chinese), and the CLI's --lang."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT
from model.clinical.consultation import build_report, extract_diagnosis, flow
from model.i18n.catalog import LANGUAGES, pick, strings, text
from model.clinical.safety import red_flags


def _keys(tree: dict, prefix: str = "") -> set[str]:
    out = set()
    for key, value in tree.items():
        out |= _keys(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}"}
    return out


def test_every_language_has_every_key():
    english = _keys(strings("en"))
    for lang in LANGUAGES:
        assert _keys(strings(lang)) == english, lang
        assert all(text(lang, k) or k == "answer_instruction" for k in english)


@pytest.mark.parametrize("preference, lang", [("zh-CN,zh;q=0.9,en;q=0.8", "zh"), ("en-GB,en;q=0.9", "en"),
                                              ("zh_TW.UTF-8", "zh"), ("fr-FR", "en"), (None, "en")])
def test_the_browser_or_terminal_language_is_picked(preference, lang):
    assert pick(preference) == lang


@pytest.mark.parametrize("phrase, reason", [
    ("我的痣最近变大了", "新出现或正在变化的痣或斑点"), ("伤口一直出血", "出血"), ("这个肿块长得很快", "迅速增大或扩散"),
    ("会不会是黑色素瘤", "可能的皮肤癌"), ("溃疡三个月不愈合", "不愈合的溃疡或伤口"), ("皮疹还伴有发烧", "皮疹伴发热"),
    ("嘴唇肿了，有点呼吸困难", "面部或喉咙肿胀，或呼吸困难"), ("全身大面积起疱", "大面积起疱或脱皮"),
    ("发红在扩散", "红肿热痛扩散（可能感染）"), ("疼得厉害", "剧烈疼痛"),
])
def test_chinese_warning_signs_raise_the_notice(phrase, reason):
    assert reason in red_flags(phrase, lang="zh")
    assert red_flags(phrase, lang="en")  # and on an English page too, in English


def test_the_chinese_instruction_is_in_the_prompt_only_when_chinese_is_chosen(tmp_path):
    from app.web.handlers import Handlers, SessionStore
    from test_app_handlers import FakeEngine, _upload

    engine = FakeEngine()
    handlers = Handlers(engine, SessionStore(tmp_path))
    list(handlers.submit("en", {"text": "What is it?", "files": [_upload(tmp_path)]}))
    assert engine.calls[-1][0].turns[-1].question == "What is it?"  # English: exactly as typed
    handlers.set_language("zh", "zh")
    history, _ = list(handlers.submit("zh", {"text": "这是什么？", "files": [_upload(tmp_path)]}))[-1]
    assert engine.calls[-1][0].turns[-1].question == "这是什么？ 请用简体中文回答。"
    assert history[1]["content"] == "这是什么？"  # the page shows what was typed
    assert [s.question for s in flow("en")] == [text("en", f"flow.{k}") for k in ("describe", "features", "causes",
                                                                                  "treatment", "see_doctor")]
    assert all(s.question.endswith("请用简体中文回答。") for s in flow("zh"))


def test_chinese_answers_give_a_typed_report():
    answers = {"describe": "照片显示边界清楚的红色斑块，上有银白色鳞屑。最可能是银屑病。鉴别诊断包括湿疹、体癣。",
               "features": "边界清楚。颜色均匀。", "causes": "免疫相关。", "treatment": "外用糖皮质激素。",
               "see_doctor": "如果出血请尽快就医。"}
    report = build_report(answers, {k: text("zh", f"flow.{k}") for k in answers}, "zh")
    assert report.diagnosis == "银屑病" and report.differentials == ["湿疹", "体癣"]
    assert "边界清楚。" in report.visible_features and report.red_flags == ["出血"]
    markdown = report.markdown()
    assert markdown.startswith("# 皮肤问诊报告") and "## 最可能的疾病\n银屑病" in markdown and "## 警示征象" not in markdown
    assert extract_diagnosis("It is most likely psoriasis, or eczema.")[0] == "psoriasis"


def test_a_chinese_pdf_report_holds_its_headings_as_text():
    from pypdf import PdfReader

    from model.clinical.report_pdf import report_pdf

    answers = {k: "可能是湿疹。" for k in ("describe", "features", "causes", "treatment", "see_doctor")}
    report = build_report(answers, {k: text("zh", f"flow.{k}") for k in answers}, "zh")
    pages = PdfReader(io.BytesIO(report_pdf(report))).pages
    extracted = "".join(page.extract_text() for page in pages)
    for key in ("title", "most_likely", "features", "causes", "treatment", "see_doctor", "full"):
        assert text("zh", f"report.{key}") in extracted
    assert "湿疹" in extracted


def test_without_a_cjk_font_the_pdf_says_what_to_install_and_the_markdown_stays(tmp_path, monkeypatch):
    from model.clinical import report_pdf as export
    from app.web.handlers import Handlers, SessionStore
    from test_app_handlers import FakeEngine, _upload

    monkeypatch.setattr(export, "CJK_FONTS", (tmp_path / "no-such-font.ttc",))
    handlers = Handlers(FakeEngine(), SessionStore(tmp_path))
    handlers.set_language("f", "zh")
    list(handlers.submit("f", {"text": "", "files": [_upload(tmp_path)]}))
    markdown, files = handlers.report("f", render_pdf=export.report_pdf)
    assert markdown.startswith("# 皮肤问诊报告") and "fonts-wqy-microhei" in markdown
    assert [f.rsplit("/", 1)[1] for f in files] == ["skin-report.md", "skin-report-photo-1.jpg"]


def test_cli_writes_a_chinese_report_and_pdf(tmp_path):
    from pypdf import PdfReader

    from test_cli import _demo_env

    photo = tmp_path / "photo.jpg"
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (90, 90, 3), dtype=np.uint8)).save(photo)
    proc = subprocess.run([sys.executable, str(ROOT / "launch.py"), "ask", "--image", str(photo), "--report",
                           "--lang", "zh", "--pdf", str(tmp_path / "report.pdf"), "--max-new-tokens", "8"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=_demo_env(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("# 皮肤问诊报告")
    extracted = "".join(p.extract_text() for p in PdfReader(tmp_path / "report.pdf").pages)
    assert "皮肤问诊报告" in extracted and "请用简体中文回答。" in extracted
    env = {**_demo_env(tmp_path), "LANG": "zh_CN.UTF-8"}  # the terminal's locale is the default
    proc = subprocess.run([sys.executable, str(ROOT / "launch.py"), "ask", "--image", str(photo), "--json",
                           "--max-new-tokens", "4"], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    result = json.loads(proc.stdout)
    assert result["language"] == "zh" and result["question"] == text("zh", "flow.describe")
    assert result["disclaimer"] == text("zh", "disclaimer")
    assert os.path.exists(tmp_path / "report.pdf")


def test_every_bold_and_italic_in_the_words_renders_as_such():
    """CommonMark only closes `**` beside punctuation when whitespace or punctuation follows: "**报告已
    生成：**文件" showed its asterisks. Every string of every language renders with none left over."""
    from markdown_it import MarkdownIt

    md = MarkdownIt("commonmark")

    def leaves(tree, path=""):
        for key, value in tree.items():
            if isinstance(value, dict):
                yield from leaves(value, f"{path}{key}.")
            elif isinstance(value, str):
                yield f"{path}{key}", value

    for lang in LANGUAGES:
        for key, value in leaves(strings(lang)):
            if "**" in value or "*" in value.replace("**", ""):
                html = md.render(value.replace("{", "").replace("}", ""))
                assert "*" not in html.replace("&quot;", ""), (lang, key, html)


def test_chinese_warning_signs_are_punctuated_in_chinese():
    from model.clinical.safety import red_flag_notice, red_flags

    flags = red_flags("有出血，而且在发烧", lang="zh")
    notice = red_flag_notice(flags, "zh")
    assert len(flags) >= 2 and "、" in notice and "。" in notice and ", " not in notice and ". " not in notice
    assert notice.startswith("**提到的警示征象**：")


def test_a_report_pdf_with_a_phone_photo_stays_small_in_both_languages():
    """A 12-megapixel photo is printed at 300 dpi as a JPEG, so the report is kilobytes, not megabytes,
    and the Chinese one (its CJK font subset to the characters used) is near the English one in size."""
    from pypdf import PdfReader

    from model.clinical.consultation import new_visit
    from model.clinical.report_pdf import PRINT_SIDE, report_pdf
    from tools.fixtures import skin_photo

    photo = skin_photo(3, size=(4000, 3000))
    sizes = {}
    for lang, said in (("zh", "可能是湿疹。"), ("en", "Probably eczema.")):
        answers = {k: said for k in ("describe", "features", "causes", "treatment", "see_doctor")}
        report = build_report(answers, {k: text(lang, f"flow.{k}") for k in answers}, lang)
        report.details = new_visit("demo", ["photo-1.jpg"])
        data = report_pdf(report, [photo])
        images = [image for page in PdfReader(io.BytesIO(data)).pages for image in page.images]
        assert len(images) == 1 and max(images[0].image.size) == PRINT_SIDE  # the photo is on it, at print size
        sizes[lang] = len(data)
    assert sizes["en"] < 300_000 and sizes["zh"] < 300_000 and sizes["zh"] < 2 * sizes["en"], sizes
