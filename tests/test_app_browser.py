"""A real browser on the real server: upload, ask, watch the answer stream, start a new patient;
and not one request leaves for another host."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT
from tools.fixtures import skin_photo

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--disable-quic", "--disable-sync"]


@pytest.fixture(scope="module")
def playwright():
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing: .ci/run must install Debian's chromium")
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as instance:
        yield instance


def _browser(playwright, profile, **options):
    return playwright.chromium.launch_persistent_context(
        str(profile), executable_path=CHROMIUM, headless=True, args=FLAGS, viewport={"width": 1100, "height": 1000},
        **options)


@pytest.fixture(scope="module")
def browser_page(playwright, tmp_path_factory):
    context = _browser(playwright, tmp_path_factory.mktemp("chromium-profile"), locale="en-US")
    yield context
    context.close()


def _assert_only_its_own_server(requests: list[str], server) -> None:
    server_host = urlparse(server.url).netloc
    elsewhere = sorted({u for u in requests if urlparse(u).scheme in ("http", "https", "ws", "wss")
                        and urlparse(u).netloc != server_host})
    assert requests and not elsewhere, f"the page reached other hosts: {elsewhere}"


def test_upload_ask_stream_new_patient_and_no_other_hosts(server, browser_page, tmp_path):
    photo = tmp_path / "forearm.jpg"
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (300, 400, 3), dtype=np.uint8)).save(photo)
    requests: list[str] = []
    page = browser_page.new_page()
    page.on("request", lambda request: requests.append(request.url))
    page.on("dialog", lambda dialog: dialog.accept())  # New patient asks first

    page.goto(server.url, wait_until="domcontentloaded")
    page.wait_for_selector("#demo-banner", timeout=60_000)
    assert "random weights" in page.inner_text("#demo-banner")
    assert "decision support, not a diagnosis" in page.inner_text("#disclaimer")

    page.set_input_files("#message input[type=file]", str(photo))
    page.wait_for_selector("#message img, #message .thumbnail-item", timeout=30_000)  # the upload finished
    page.fill("#message textarea", "What is this rash?")
    page.press("#message textarea", "Enter")

    # the answer streams in: the bot message grows, then the input is usable again
    bot = page.locator("#chat .bot, #chat [data-testid='bot']").last
    bot.wait_for(timeout=60_000)
    lengths = []
    for _ in range(60):
        lengths.append(len(bot.inner_text()))
        if page.locator("#message textarea").is_enabled() and lengths[-1] > 0 and len(lengths) > 2:
            break
        page.wait_for_timeout(250)
    assert lengths[-1] > 0
    assert "What is this rash?" in page.inner_text("#chat")
    assert page.locator("#chat img").count() >= 1  # the photo shows in the conversation

    # nothing offers to send the conversation elsewhere, and the browser keeps no run history
    share = page.locator("#chat button[title*='share' i], #chat button[aria-label*='share' i]")
    assert all(not share.nth(i).is_visible() for i in range(share.count()))
    assert page.locator("footer a:has-text('Runs')").count() == 0
    stored = page.evaluate("() => JSON.stringify(Object.assign({}, localStorage)) + JSON.stringify(Object.assign({}, sessionStorage))")
    assert "What is this rash?" not in stored

    os.makedirs(ROOT / "artifacts", exist_ok=True)
    page.screenshot(path=str(ROOT / "artifacts" / "chat.png"), full_page=True)

    page.click("#new-patient")
    page.wait_for_function("() => !document.querySelector('#chat').innerText.includes('What is this rash?')",
                           timeout=30_000)
    sessions = server.private / "sessions"
    assert not sessions.exists() or not any(p.is_file() for p in sessions.rglob("*"))

    _assert_only_its_own_server(requests, server)
    page.close()
    shutil.copy(ROOT / "artifacts" / "chat.png", tmp_path / "chat.png")


def test_closing_the_tab_wipes_the_session(server, browser_page, tmp_path):
    import time

    photo = tmp_path / "neck.png"
    Image.fromarray(np.random.default_rng(4).integers(0, 256, (120, 160, 3), dtype=np.uint8)).save(photo)
    page = browser_page.new_page()
    page.goto(server.url, wait_until="domcontentloaded")
    page.wait_for_selector("#message textarea", timeout=60_000)
    page.set_input_files("#message input[type=file]", str(photo))
    page.wait_for_selector("#message img, #message .thumbnail-item", timeout=30_000)
    page.press("#message textarea", "Enter")  # a photo alone: kept, waiting for a question
    page.locator("#chat img").first.wait_for(timeout=30_000)
    sessions = server.private / "sessions"
    kept = lambda: [p for p in sessions.rglob("*") if p.is_file()] if sessions.exists() else []  # noqa: E731
    assert len(kept()) == 1
    page.close()
    deadline = time.monotonic() + 60
    while kept() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert kept() == [], "the closed tab's photo is still on disk"
    assert "session wiped" in server.output()


# -- phones and assistive technology (issue 16) ---------------------------------------------------------

def _axe_script() -> Path:
    """axe-core's script as the pinned `axe-playwright-python` wheel carries it (installed by requirements.txt)."""
    import axe_playwright_python

    return Path(axe_playwright_python.__file__).parent / "axe.min.js"


PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1280, "height": 900}


def _axe(page) -> list[dict]:
    """Serious and critical axe-core violations on the page as it is now (the script is injected by
    the test from the installed package; the page itself fetches nothing)."""
    if not page.evaluate("() => typeof window.axe !== 'undefined'"):
        page.add_script_tag(path=str(_axe_script()))
    result = page.evaluate("async () => (await axe.run(document, {resultTypes: ['violations']})).violations")
    return [{"id": v["id"], "impact": v["impact"], "nodes": [n["target"] for n in v["nodes"]][:3]}
            for v in result if v["impact"] in ("serious", "critical")]


def _open(browser_page, server, size):
    page = browser_page.new_page()
    page.on("dialog", lambda dialog: dialog.accept())  # New patient asks first
    page.set_viewport_size(size)
    page.goto(server.url, wait_until="domcontentloaded")
    page.wait_for_selector("#message textarea", timeout=60_000)
    page.wait_for_timeout(500)
    return page


def _answer(page, photo, question):
    page.set_input_files("#message input[type=file]", str(photo))
    page.wait_for_selector("#message img, #message .thumbnail-item", timeout=30_000)
    page.fill("#message textarea", question)
    page.press("#message textarea", "Enter")
    page.wait_for_function("() => document.querySelector('#answer-live').innerText.trim().length > 0",
                           timeout=60_000)


@pytest.mark.parametrize("size", [PHONE, DESKTOP], ids=["phone", "desktop"])
def test_no_serious_accessibility_violations_in_any_state(server, browser_page, tmp_path, size):
    photo = tmp_path / "mole.jpg"
    Image.fromarray(np.random.default_rng(8).integers(0, 256, (300, 400, 3), dtype=np.uint8)).save(photo)
    page = _open(browser_page, server, size)
    found = {"empty": _axe(page)}
    assert page.locator("h1").count() == 1
    _answer(page, photo, "My mole is changing and it bleeds")  # red-flag words: the notice shows
    page.wait_for_selector("#red-flag [role=alert], #red-flag[role=alert]", timeout=30_000)
    assert "Warning signs" in page.inner_text("#red-flag")
    found["answered, red flag"] = _axe(page)
    page.click("text=Full report")
    page.wait_for_function("() => document.body.innerText.includes('Skin consultation report')", timeout=120_000)
    found["report open"] = _axe(page)
    page.click("#new-patient")
    page.close()
    assert all(v == [] for v in found.values()), found


def test_on_a_phone_the_question_box_is_on_the_first_screen(server, browser_page):
    page = _open(browser_page, server, PHONE)
    box = page.locator("#message textarea").bounding_box()
    assert box is not None and box["y"] + box["height"] <= PHONE["height"], box
    upload = page.locator("#message input[type=file]")
    assert "image" in (upload.get_attribute("accept") or "")  # a phone offers its camera for image inputs
    width = page.evaluate("() => document.documentElement.scrollWidth")
    assert width <= PHONE["width"], "the page scrolls sideways on a phone"
    page.close()


def test_keyboard_only_and_what_a_screen_reader_hears(server, browser_page, tmp_path):
    photo = tmp_path / "arm.png"
    Image.fromarray(np.random.default_rng(9).integers(0, 256, (120, 160, 3), dtype=np.uint8)).save(photo)
    page = _open(browser_page, server, DESKTOP)
    assert page.locator("#chat [aria-live]:not([aria-live=off])").count() == 0  # not read token by token
    assert page.get_attribute("#answer-live", "aria-live") == "polite"
    page.set_input_files("#message input[type=file]", str(photo))  # the file chooser a key press opens
    page.wait_for_selector("#message img, #message .thumbnail-item", timeout=30_000)
    page.focus("#message textarea")
    page.keyboard.type("What is it?")
    page.keyboard.press("Enter")
    page.wait_for_function("() => document.querySelector('#answer-live').innerText.trim().length > 0",
                           timeout=60_000)
    page.wait_for_function("() => document.activeElement && document.activeElement.closest('#message')",
                           timeout=10_000)  # focus is back in the question box
    for _ in range(40):  # Tab on to New patient, and press it
        page.keyboard.press("Tab")
        if page.evaluate("() => document.activeElement && document.activeElement.id === 'new-patient'"):
            break
    assert page.evaluate("() => document.activeElement.id") == "new-patient"
    page.keyboard.press("Enter")
    page.wait_for_function("() => !document.querySelector('#chat').innerText.includes('What is it?')", timeout=30_000)
    page.close()


def test_a_phone_photo_uploads_upright_and_text_enlarges_to_200_percent(server, browser_page, tmp_path):
    """A 4000x3000 camera JPEG stored sideways with EXIF orientation 6, sent from a phone-sized page."""
    ramp = np.linspace(0, 255, 4000, dtype=np.uint8)
    pixels = np.stack([np.tile(ramp, (3000, 1)), np.full((3000, 4000), 120, np.uint8),
                       np.tile(ramp[::-1], (3000, 1))], axis=-1)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view: the photo is portrait
    photo = tmp_path / "IMG_0001.jpg"
    Image.fromarray(pixels).save(photo, "JPEG", quality=90, exif=exif.tobytes())
    page = _open(browser_page, server, PHONE)
    page.set_input_files("#message input[type=file]", str(photo))
    page.wait_for_selector("#message img, #message .thumbnail-item", timeout=60_000)
    page.press("#message textarea", "Enter")
    shown = page.locator("#chat img").first
    shown.wait_for(timeout=60_000)
    page.wait_for_function("() => { const i = document.querySelector('#chat img'); return i && i.naturalWidth > 0; }",
                           timeout=30_000)
    width, height = page.evaluate("() => { const i = document.querySelector('#chat img'); "
                                  "return [i.naturalWidth, i.naturalHeight]; }")
    assert (width, height) == (3000, 4000)  # upright, at full size
    page.click("#new-patient")
    page.set_viewport_size(DESKTOP)
    page.evaluate("() => { document.documentElement.style.fontSize = '200%'; }")
    page.wait_for_timeout(300)
    assert page.evaluate("() => document.documentElement.scrollWidth") <= DESKTOP["width"]
    for selector in ("#message textarea", "#new-patient", "#disclaimer"):
        assert page.locator(selector).is_visible()
    page.close()


# -- Chinese (issue 14) --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def chinese_browser(playwright, tmp_path_factory):
    context = _browser(playwright, tmp_path_factory.mktemp("chromium-zh"), locale="zh-CN")
    yield context
    context.close()


def test_a_chinese_browser_gets_the_chinese_page_and_can_switch_to_english(server, chinese_browser, tmp_path):
    requests: list[str] = []
    page = chinese_browser.new_page()
    page.on("request", lambda request: requests.append(request.url))
    page.goto(server.url, wait_until="domcontentloaded")
    page.wait_for_function("() => document.querySelector('#new-patient') && "
                           "document.querySelector('#new-patient').innerText.includes('新患者')", timeout=60_000)
    assert "辅助决策" in page.inner_text("#disclaimer") and "演示模式" in page.inner_text("#demo-banner")
    assert page.evaluate("() => document.documentElement.lang") == "zh-CN"
    assert "这是什么" in page.inner_text(".quick")
    page.get_by_text("English", exact=True).click()
    page.wait_for_function("() => document.querySelector('#new-patient').innerText.includes('New patient')",
                           timeout=30_000)
    assert "decision support" in page.inner_text("#disclaimer")
    assert page.evaluate("() => document.documentElement.lang") == "en"
    _assert_only_its_own_server(requests, server)
    page.close()


# -- what a new user tripped over (issue 23) -------------------------------------------------------------

GRADIO_EXTRAS = "['M23,20a5,5', 'M4,6V8H6V28']"  # the icons of Gradio's Share and Clear buttons


def _visible_extras(page) -> int:
    return page.evaluate(f"""() => [...document.querySelectorAll('#chat button')].filter(b => {{
        const d = (b.querySelector('svg path') || {{getAttribute: () => ''}}).getAttribute('d') || '';
        return {GRADIO_EXTRAS}.some(i => d.startsWith(i)) && b.offsetParent !== null; }}).length""")


def _open_chinese(chinese_browser, server, size=None):
    """The page in a Chinese browser, once its own labels are Chinese."""
    page = chinese_browser.new_page()
    if size is not None:
        page.set_viewport_size(size)
    page.goto(server.url, wait_until="domcontentloaded")
    page.wait_for_function("() => document.querySelector('#new-patient') && "
                           "document.querySelector('#new-patient').innerText.includes('新患者')", timeout=60_000)
    return page


def test_the_chat_follows_the_conversation_and_the_page_speaks_one_language(server, chinese_browser, tmp_path):
    """Chinese page on a phone: the newest turn in view after three, no Share/Clear (nor their empty
    slots), Gradio's own labels in Chinese, no stray footer dot; Stop only while an answer is written;
    a refused question stays in the box; the history form raises the warning signs; New patient asks."""
    photo = tmp_path / "back.jpg"
    skin_photo(0, size=(400, 300)).save(photo)
    page = _open_chinese(chinese_browser, server, PHONE)
    assert page.inner_text("footer").strip() == "设置" and "·" not in page.inner_text("footer")
    assert not page.locator("#message .stop-button").is_visible()
    assert page.locator("#demo-banner").bounding_box()["height"] <= 70  # not six lines of the first screen
    assert "模型" in page.inner_text("#title") and "Model:" not in page.inner_text("#title")

    page.fill("#message textarea", "这是什么皮疹？")  # no photo yet: refused, and the question stays
    page.press("#message textarea", "Enter")
    page.wait_for_function("() => document.querySelector('#chat').innerText.includes('请先添加')", timeout=30_000)
    page.wait_for_function("() => document.querySelector('#message textarea').value === '这是什么皮疹？'",
                           timeout=10_000)

    page.click("#history")  # the form, collapsed until opened
    page.fill("#history-age textarea, #history-age input", "63")
    page.get_by_label("出血").check()
    page.wait_for_function("() => document.querySelector('#red-flag').innerText.includes('出血')", timeout=30_000)

    page.set_input_files("#message input[type=file]", str(photo))
    page.wait_for_selector("#message img, #message .thumbnail-item", timeout=30_000)
    with server.holding():  # the answer stays under way (the test gate) until Stop has been seen
        page.press("#message textarea", "Enter")
        page.wait_for_selector("#message .stop-button", state="visible", timeout=30_000)  # while it answers
    idle = "() => !document.querySelector('#message textarea').disabled"
    for question in ("还有什么特征？", "怎么治疗？"):
        page.wait_for_function(idle, timeout=120_000, polling=20)  # sent the moment the box opens: never dropped
        page.fill("#message textarea", question)
        page.press("#message textarea", "Enter")
        page.wait_for_function(f"() => document.querySelector('#chat').innerText.includes('{question}')", timeout=30_000)
    page.wait_for_function(idle, timeout=120_000)
    page.wait_for_selector("#message .stop-button", state="hidden", timeout=30_000)  # Stop goes with the answer
    chat = page.evaluate("() => { const c = document.querySelector('#chat'); "
                         "return [c.scrollHeight, c.scrollTop + c.clientHeight]; }")
    assert chat[0] > chat[1] - 2 > 0 and chat[0] - chat[1] < 40, chat  # scrolled to the newest text
    assert _visible_extras(page) == 0
    assert page.evaluate("() => [...document.querySelectorAll('#chat .icon-button-wrapper')].filter(w => "
                         "w.offsetParent !== null && ![...w.querySelectorAll('button')].some(b => b.offsetParent "
                         "!== null)).length") == 0  # no empty slot (the stray circle)
    labels = page.evaluate("() => [...document.querySelectorAll('#chat button')].filter(b => b.offsetParent !== null)"
                           ".map(b => b.getAttribute('aria-label') || b.getAttribute('title') || '')")
    assert "复制消息" in labels and not [name for name in labels if name.isascii() and name.strip()], labels

    page.once("dialog", lambda dialog: dialog.dismiss())  # New patient asks; "no" keeps everything
    page.click("#new-patient")
    page.wait_for_timeout(1000)
    assert "怎么治疗？" in page.inner_text("#chat")
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#new-patient")
    page.wait_for_function("() => !document.querySelector('#chat').innerText.includes('怎么治疗？')", timeout=30_000)
    assert page.input_value("#history-age textarea, #history-age input") == ""  # the form is wiped too
    page.close()


def test_the_report_comes_into_view_downloads_first(server, browser_page, tmp_path):
    photo = tmp_path / "arm.jpg"
    skin_photo(1, size=(400, 300)).save(photo)
    page = _open(browser_page, server, PHONE)
    _answer(page, photo, "What is it?")
    page.click("#full-report")
    page.wait_for_function("() => (document.querySelector('#report-text') || {innerText: ''}).innerText"
                           ".includes('report is ready')", timeout=180_000)
    in_view = f"() => {{ const top = document.querySelector('#report-panel').getBoundingClientRect().top; " \
              f"return top >= 0 && top < {PHONE['height'] / 3}; }}"
    page.wait_for_function(in_view, timeout=30_000)  # brought into view (it scrolls smoothly: waited for, not slept)
    order = page.evaluate("() => { const f = document.querySelector('#report-files'), t = "
                          "document.querySelector('#report-text'); return f.compareDocumentPosition(t); }")
    assert order & 4  # the downloads come before the text (DOCUMENT_POSITION_FOLLOWING)
    names = page.evaluate("() => [...document.querySelectorAll('#report-files a[download]')].map(a => a.download)")
    assert "skin-report.pdf" in names and "skin-report-photo-1.jpg" in names, names
    page.wait_for_function("() => { const shown = [...document.querySelectorAll('#report-text img')]; return "
                           "shown.length > 0 && shown.every(i => i.complete && i.naturalWidth > 0); }",
                           timeout=30_000)  # the photo shows, not a broken image
    page.click("#new-patient")
    page.close()


def _settled(page) -> None:
    """The page after an answer ended or was stopped: no error badge anywhere, the question box open,
    Stop gone."""
    page.wait_for_function("() => !document.querySelector('#message textarea').disabled", timeout=30_000)
    page.wait_for_selector("#message .stop-button", state="hidden", timeout=30_000)
    errors = page.evaluate("() => [...document.querySelectorAll('.error, .toast-body.error, [class*=\"error\"]')]"
                           ".filter(e => e.offsetParent !== null).map(e => e.className + ': ' + e.innerText)")
    assert not errors, errors


def test_stop_at_any_moment_leaves_the_page_ready_for_the_next_question(server, browser_page, tmp_path):
    """Stop before the first token, mid-stream (decoding held by the test gate) and once the answer is
    done: each time nothing shows an error, the box opens, Stop hides, and the next question (the
    next moment's) is answered."""
    photo = tmp_path / "shin.jpg"
    skin_photo(4, size=(400, 300)).save(photo)
    page = _open(browser_page, server, DESKTOP)
    page.set_input_files("#message input[type=file]", str(photo))
    page.wait_for_selector("#message img, #message .thumbnail-item", timeout=30_000)
    answers = 0
    for moment in ("mid-stream", "before the first token", "after the answer"):
        page.fill("#message textarea", f"What is it ({moment})?")
        if moment == "mid-stream":
            with server.holding():
                since = server.mark()
                page.press("#message textarea", "Enter")
                server.wait_for(r"decode held by the test gate", since)
                page.click("#message .stop-button")
                server.wait_for(r"answer cancelled", since)
        elif moment == "before the first token":
            page.press("#message textarea", "Enter")
            page.click("#message .stop-button")  # at once: the answer has not begun to stream
        else:
            page.press("#message textarea", "Enter")
            page.wait_for_selector("#message .stop-button", state="hidden", timeout=120_000)
        _settled(page)
        answers += 1
        page.wait_for_function(f"() => document.querySelectorAll('#chat .message-row, #chat [data-testid=\"bot\"]')"
                               f".length >= {2 * answers}", timeout=30_000)
    os.makedirs(ROOT / "artifacts", exist_ok=True)
    page.screenshot(path=str(ROOT / "artifacts" / "stop-then-ask.png"), full_page=True)
    page.close()


def test_the_keyboards_place_is_visible_on_the_language_radios_and_the_question_box(server, browser_page):
    """Tabbed to, the language radio and the question box each draw an outline of 3 px; the radio
    untouched draws none of it."""
    page = _open(browser_page, server, DESKTOP)
    outline = ("(sel) => { const e = document.querySelector(sel); const s = getComputedStyle(e); "
               "return s.outlineStyle !== 'none' ? parseFloat(s.outlineWidth) : 0; }")
    radio = "#language label:has(input[value=en])"
    assert page.evaluate(outline, radio) < 3  # the chosen language's own ring is thinner
    page.focus("#language input[value=en]")
    page.keyboard.press("Shift+Tab")
    page.keyboard.press("Tab")  # back onto the radio by the keyboard
    page.wait_for_function(f"({outline})('{radio}') === 3", timeout=10_000)
    page.focus("#message textarea")
    assert page.evaluate(outline, "#message") == 3
    page.close()


def test_a_poor_photo_is_said_as_soon_as_it_is_attached(server, browser_page, tmp_path):
    """The quality note shows before the question is sent, so the patient can retake the photo first."""
    from PIL import ImageFilter

    photo = tmp_path / "blurred.jpg"
    skin_photo(2, size=(400, 300)).filter(ImageFilter.GaussianBlur(4)).save(photo)
    page = _open(browser_page, server, PHONE)
    page.set_input_files("#message input[type=file]", str(photo))
    page.wait_for_function("() => document.querySelector('#red-flag').innerText.includes('blurred')", timeout=30_000)
    assert "Photo quality" in page.inner_text("#red-flag") and "What is it" not in page.inner_text("#chat")
    box = page.locator("#red-flag").bounding_box()
    assert box and box["y"] + box["height"] <= PHONE["height"], box  # on the phone's screen, not scrolled away
    page.close()


def test_the_question_box_has_a_name_in_the_pages_language(server, chinese_browser):
    """Its accessible name was Gradio's class name, "MultimodalTextbox", in both languages."""
    page = _open_chinese(chinese_browser, server)
    page.wait_for_function("() => document.querySelector('#message textarea').getAttribute('aria-label') === "
                           "'您的问题和照片'", timeout=30_000)
    names = page.evaluate("() => [...document.querySelectorAll('#message [aria-label]')].filter(e => "
                          "e.offsetParent !== null).map(e => e.getAttribute('aria-label'))")
    assert names and not [name for name in names if name.isascii()], names  # every visible name in Chinese
    page.close()


def test_on_a_phone_every_action_button_is_a_fingers_size(server, browser_page):
    page = _open(browser_page, server, PHONE)
    heights = {sel: page.locator(sel).bounding_box()["height"] for sel in ("#regenerate", "#full-report", "#new-patient")}
    assert all(h >= 44 for h in heights.values()), heights  # Regenerate and Full report were 26 px
    page.close()


def test_new_patient_starts_at_the_top_of_the_page(server, browser_page, tmp_path):
    photo = tmp_path / "hand.jpg"
    skin_photo(5, size=(400, 300)).save(photo)
    page = _open(browser_page, server, PHONE)  # (its dialogs are accepted)
    _answer(page, photo, "What is it?")
    page.evaluate("() => window.scrollTo(0, document.body.scrollHeight)")
    assert page.evaluate("() => window.scrollY") > 100
    page.click("#new-patient")
    page.wait_for_function("() => !document.querySelector('#chat').innerText.includes('What is it?')", timeout=30_000)
    page.wait_for_function("() => window.scrollY < 10", timeout=10_000)
    page.close()


def test_one_control_is_named_full_report_in_each_language(server, browser_page, chinese_browser):
    """The button that writes the report, not also the panel that holds it."""
    for context, name in ((browser_page, "Full report"), (chinese_browser, "完整报告")):
        page = context.new_page()
        page.goto(server.url, wait_until="domcontentloaded")
        page.wait_for_function(f"() => document.querySelector('#full-report') && "
                               f"document.querySelector('#full-report').innerText.trim() === '{name}'", timeout=60_000)
        named = page.evaluate(f"() => [...document.querySelectorAll('button, [role=button], summary, .label-wrap')]"
                              f".filter(e => e.offsetParent !== null && e.innerText.trim() === '{name}').length")
        assert named == 1, (name, named)
        page.close()


# -- what a review found on a phone (issue 33) ------------------------------------------------------------

def _in_view(page, selector: str) -> bool:
    return page.evaluate(f"""() => {{ const r = document.querySelector({selector!r}).getBoundingClientRect();
        return r.height > 0 && r.top >= 0 && r.bottom <= window.innerHeight; }}""")


def _report_files(page) -> None:
    """Once the answer is written: Full report, until its three files (Markdown, PDF, photo) are listed."""
    page.wait_for_function("() => !document.querySelector('#message textarea').disabled", timeout=120_000)
    page.click("#full-report")
    page.wait_for_function("() => document.querySelectorAll('#report-files a[download]').length >= 3", timeout=120_000)
    page.wait_for_timeout(500)


def test_on_a_phone_the_hint_the_refusal_and_the_report_files_are_whole(server, browser_page, tmp_path):
    """The empty box's hint had its third line clipped, a refusal could sit below the screen, and the
    report's files read "skin-… .md" with a Remove button on a list that only downloads."""
    photo = tmp_path / "knee.jpg"
    skin_photo(6, size=(400, 300)).save(photo)
    page = _open(browser_page, server, PHONE)
    cut = page.evaluate("""() => { const t = document.querySelector('#message textarea');
        t.value = t.placeholder; const need = t.scrollHeight; t.value = '';
        const bottom = t.getBoundingClientRect().top + need, cut = [];
        if (need > t.clientHeight + 1) { cut.push(['the box', need, t.clientHeight]); }
        for (let e = t.parentElement; e; e = e.parentElement) {
            const s = getComputedStyle(e);
            if (s.overflowY !== 'visible' && bottom > e.getBoundingClientRect().bottom + 1) {
                cut.push([e.className || e.tagName, bottom, e.getBoundingClientRect().bottom]); } }
        return cut; }""")
    assert cut == [], cut  # every line of the hint shown, by the box and all that holds it

    page.fill("#message textarea", "What is this?")  # no photo: refused, and the refusal on the screen
    page.press("#message textarea", "Enter")
    page.wait_for_function("() => document.querySelector('#chat').innerText.includes('Cannot do that')", timeout=30_000)
    page.wait_for_timeout(500)
    refusal = page.evaluate("""() => { const m = [...document.querySelectorAll('#chat .message')].pop();
        const r = m.getBoundingClientRect(); return [r.top, r.bottom, window.innerHeight]; }""")
    assert refusal[0] >= 0 and refusal[1] <= refusal[2], refusal

    page.fill("#message textarea", "")
    _answer(page, photo, "What is it?")
    _report_files(page)
    files = page.evaluate("""() => [...document.querySelectorAll('#report-files tr.file')].map(row => {
        const cell = row.querySelector('td.filename');
        const cut = [...cell.querySelectorAll('*')].filter(e => e.offsetParent !== null && e.scrollWidth > e.clientWidth + 1);
        return {download: row.querySelector('a[download]').getAttribute('download'),
                shown: (getComputedStyle(cell, '::before').content.replace(/^"|"$/g, '') + cell.innerText).trim(),
                cut: cut.length, overflows: cell.scrollWidth > cell.clientWidth + 1,
                remove: [...row.querySelectorAll('button')].filter(b => b.offsetParent !== null).length}; })""")
    assert len(files) >= 3 and all(f["shown"] == f["download"] and not f["cut"] and not f["overflows"]
                                   and not f["remove"] for f in files), files
    page.close()


_RING_CLIPPED = """(selector) => {
    const label = document.querySelector(selector);
    const style = getComputedStyle(label);
    const grow = parseFloat(style.outlineOffset) + parseFloat(style.outlineWidth);
    const r = label.getBoundingClientRect();
    const clipped = [];
    for (let e = label.parentElement; e; e = e.parentElement) {
        const s = getComputedStyle(e);
        if (s.overflowX === 'visible' && s.overflowY === 'visible') { continue; }
        const b = e.getBoundingClientRect();
        for (const [side, out] of [['left', r.left - grow < b.left - 0.5], ['right', r.right + grow > b.right + 0.5],
                                   ['top', r.top - grow < b.top - 0.5], ['bottom', r.bottom + grow > b.bottom + 0.5]]) {
            if (out) { clipped.push(side + ' by ' + (e.id || e.className || e.tagName)); }
        }
    }
    return style.outlineStyle === 'none' ? ['no ring'] : clipped;
}"""


@pytest.mark.parametrize("size", [PHONE, DESKTOP], ids=["phone", "desktop"])
def test_the_chosen_language_and_the_keyboards_place_show_their_whole_ring(server, browser_page, size):
    """The selected language's ring was cut by the group's edge to a one-sided bar (a stray bracket);
    the keyboard's ring on the first radio too."""
    page = _open(browser_page, server, size)
    assert page.evaluate(_RING_CLIPPED, "#language label.selected") == []
    page.focus("#language input[value=en]")
    page.keyboard.press("Shift+Tab")
    page.keyboard.press("Tab")  # the keyboard on the first radio, the one whose ring was cut
    ring = f"(sel) => {{ const clipped = ({_RING_CLIPPED})(sel); return clipped.includes('no ring') ? false : clipped; }}"
    keyboard = "#language label:has(input:focus-visible)"
    assert page.wait_for_function(ring, arg=keyboard, timeout=10_000, polling=10).json_value() == []
    page.focus("#message textarea")
    assert page.evaluate(_RING_CLIPPED, "#language label.selected") == []
    page.close()


def test_every_name_a_screen_reader_hears_on_the_chinese_page_is_chinese(server, chinese_browser, tmp_path):
    """Gradio names the chat, its messages ("bot's message: ..."), the file input, the report's Remove
    and the footer in English whatever the page's language. A name is English when what comes before its
    first colon (the role; after it, the message's own text) is ASCII; file names are left as they are."""
    photo = tmp_path / "cheek.jpg"
    skin_photo(7, size=(400, 300)).save(photo)
    page = _open_chinese(chinese_browser, server, PHONE)
    _answer(page, photo, "这是什么？")
    _report_files(page)
    names = page.evaluate("""() => [...document.querySelectorAll('[aria-label], [title], img[alt], [placeholder]')]
        .filter(e => e.offsetParent !== null || e.tagName === 'INPUT')
        .flatMap(e => ['aria-label', 'title', 'alt', 'placeholder'].map(a => e.getAttribute(a)).filter(Boolean))""")
    english = sorted({name for name in names if re.split(r"[:：]", name)[0].isascii()
                      and not re.fullmatch(r"[\w.-]+\.\w{2,4}", name)})
    assert names and not english, english
    assert any(name.startswith("SkinGPT 的回答：") for name in names), names  # the answers are named, in Chinese
    page.close()


def test_a_private_file_is_served_only_to_the_browser_that_made_it(server, browser_page, playwright, tmp_path):
    """The chat's photo and the attached photo's preview load in the page that made them; the same URLs
    from another browser, or from a client with no cookie or a forged one, are 404s (issue 33, low)."""
    import httpx

    photo = tmp_path / "arm.jpg"
    skin_photo(5, size=(400, 300)).save(photo)
    page = _open(browser_page, server, DESKTOP)
    page.set_input_files("#message input[type=file]", str(photo))
    page.wait_for_selector("#message img", timeout=30_000)
    preview = page.eval_on_selector("#message img", "img => img.src")  # the upload, not sent yet
    cookie = next(c for c in browser_page.cookies(server.url) if c["name"] == "skingpt_browser")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["expires"] == -1  # a session cookie
    mine, forged = ({"Cookie": f"skingpt_browser={value}"} for value in (cookie["value"], "A" * 43))
    assert "/uploads/" in preview
    with httpx.Client(timeout=30) as plain:
        assert plain.get(preview, headers=mine).status_code == 200
        assert plain.get(preview).status_code == 404 and plain.get(preview, headers=forged).status_code == 404
    page.fill("#message textarea", "What is this?")
    page.press("#message textarea", "Enter")
    page.wait_for_function("() => document.querySelector('#answer-live').innerText.trim().length > 0",
                           timeout=60_000)
    page.wait_for_function("() => [...document.querySelectorAll('#chat img')].some(i => i.complete && i.naturalWidth > 0)",
                           timeout=30_000)  # the chat's photo loaded in its own page
    shown = page.eval_on_selector_all("#chat img", "imgs => imgs.map(i => i.src).filter(s => s.includes('sessions'))")
    assert shown, "the chat's photo is a file of the consultation"
    photo_url = shown[0]
    with httpx.Client(timeout=30) as plain:
        assert plain.get(photo_url, headers=mine).status_code == 200
        assert plain.get(photo_url).status_code == 404  # no cookie
        assert plain.get(photo_url, headers=forged).status_code == 404  # another browser's
        assert plain.get(photo_url.replace("file=", "file/")).status_code == 404  # Gradio's older route
        assert plain.get(photo_url.replace("file=", "file/"), headers=mine).status_code == 200
    other = _browser(playwright, tmp_path / "other-profile", locale="en-US")
    try:
        stranger = other.new_page()
        assert stranger.goto(photo_url).status == 404
    finally:
        other.close()
    page.close()
