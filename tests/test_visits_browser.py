"""Kept visits on the real page (a server started with --records): save a visit, New patient, open
the patient, compare with the earlier visit: both photos in the chat with their dates, in English
and in Chinese; and nothing readable under the records folder."""

from __future__ import annotations

import os
import re

import pytest

from conftest import ROOT, start_server
from test_app_browser import _assert_only_its_own_server, _browser, playwright  # noqa: F401 (fixture)
from test_visits import PASS, SIGNATURES, _everything_under
from tools.fixtures import skin_photo

DATES = {"en": r"\d{1,2} (January|February|March|April|May|June|July|August|September|October|November|December) \d{4}",
         "zh": r"\d{4}年\d{1,2}月\d{1,2}日"}


@pytest.fixture(scope="module")
def records_server(tmp_path_factory):
    work = tmp_path_factory.mktemp("records-server")
    yield from start_server(work, SKINGPT_RECORDS=str(work / "records"), SKINGPT_RECORDS_PASSPHRASE=PASS,
                            SKINGPT_RETAIN_DAYS="365")


def _answered(page, server, since: int) -> None:
    """The answer asked after `since` (a log mark) is over, and the question box open again."""
    server.wait_for(r"answer session=\S+ tokens=\d+", since=since)
    page.wait_for_function("() => { const t = document.querySelector('#message textarea'); return t && !t.disabled; }",
                           timeout=120_000)


def _send_photo(page, path, question: str = "") -> None:
    page.set_input_files("#message input[type=file]", str(path))
    page.wait_for_selector("#message img, #message .thumbnail-item", timeout=30_000)
    if question:
        page.fill("#message textarea", question)
    page.press("#message textarea", "Enter")


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_a_saved_patients_follow_up_shows_both_photos_dated(records_server, playwright, tmp_path, lang):  # noqa: F811
    context = _browser(playwright, tmp_path / "profile", locale="zh-CN" if lang == "zh" else "en-US")
    page = context.new_page()
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    page.on("dialog", lambda dialog: dialog.accept())
    page.goto(records_server.url, wait_until="domcontentloaded")
    panel = {"en": "Patient records", "zh": "患者记录"}[lang]  # the page has taken the browser's language
    page.wait_for_function(f"() => (document.querySelector('#records') || {{innerText: ''}}).innerText.includes({panel!r})",
                           timeout=60_000)
    patient = f"clinic-{lang}-0042"
    skin_photo(seed=11).save(tmp_path / "first.jpg")
    mark = records_server.mark()
    _send_photo(page, tmp_path / "first.jpg", "What is this?" if lang == "en" else "这是什么？")
    _answered(page, records_server, mark)

    page.click("#records")  # the panel, collapsed until opened
    page.fill("#records-patient input, #records-patient textarea", patient)
    page.click("#records-save")
    page.wait_for_function(f"() => document.querySelector('#records-status').innerText.includes({patient!r})",
                           timeout=30_000)
    visit = re.search(r"SG-\d{8}-[0-9A-F]{6}", page.inner_text("#records-status")).group(0)

    page.click("#new-patient")
    page.wait_for_function("() => document.querySelectorAll('#chat img').length === 0", timeout=30_000)
    assert page.input_value("#records-patient input, #records-patient textarea") == ""  # not left for the next patient

    skin_photo(seed=12).save(tmp_path / "today.jpg")
    _send_photo(page, tmp_path / "today.jpg")
    page.locator("#chat img").first.wait_for(timeout=30_000)
    page.fill("#records-patient input, #records-patient textarea", patient)
    page.click("#records-open")
    page.wait_for_selector("#visit-list li img", timeout=30_000)  # the earlier visit, with its thumbnail
    assert visit in page.inner_text("#records-visits") and re.search(DATES[lang], page.inner_text("#records-visits"))
    page.click("#records-compare")
    page.wait_for_function("() => document.querySelectorAll('#chat img').length >= 2", timeout=30_000)
    chat = page.inner_text("#chat")
    assert len(re.findall(DATES[lang], chat)) >= 2 and visit in chat  # photo 1 and photo 2, each dated
    page.locator("#quick-compare").wait_for(state="visible", timeout=30_000)
    mark = records_server.mark()
    page.click("#quick-compare")
    _answered(page, records_server, mark)
    page.wait_for_timeout(300)  # the answer's last update has painted
    os.makedirs(ROOT / "artifacts", exist_ok=True)
    page.screenshot(path=str(ROOT / "artifacts" / f"follow-up-{lang}.png"), full_page=True)
    question = {"en": "Compare photo 2 with photo 1", "zh": "请把照片 2 与上次就诊时的照片 1 比较"}[lang]
    assert question in page.inner_text("#chat")

    _assert_only_its_own_server(requests, records_server)
    context.close()


def test_the_records_folder_holds_nothing_readable(records_server):
    folder = next(p for p in (records_server.log.parent / "records",) if p.exists())
    raw = _everything_under(folder)
    assert raw and not any(s in raw for s in SIGNATURES + (b"clinic-en-0042", b"clinic-zh-0042", b"What is this?"))
    assert "visits are saved (on Save visit only) encrypted in" in records_server.output()


def test_the_referral_downloads_from_the_page(records_server, playwright, tmp_path):  # noqa: F811
    from fhir.resources.R4B.bundle import Bundle

    context = _browser(playwright, tmp_path / "profile", locale="en-US", accept_downloads=True)
    page = context.new_page()
    page.goto(records_server.url, wait_until="domcontentloaded")
    page.wait_for_selector("#records", timeout=60_000)
    page.click("#records")
    page.fill("#records-patient input, #records-patient textarea", "clinic-en-0042")  # saved by the test above
    page.click("#records-open")
    page.wait_for_selector("#visit-list li", timeout=30_000)
    page.click("#records-referral")
    link = page.locator("#records-referral-file a").first
    link.wait_for(timeout=30_000)
    with page.expect_download() as download:
        link.click()
    bundle = Bundle.model_validate_json(open(download.value.path()).read())
    assert bundle.entry[-1].resource.status == "preliminary"
    context.close()
