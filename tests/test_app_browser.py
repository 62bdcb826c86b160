"""A real browser on the real server: upload, ask, watch the answer stream, start a new patient;
and not one request leaves for another host."""

from __future__ import annotations

import os
import shutil
from urllib.parse import urlparse

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--disable-quic", "--disable-sync"]


@pytest.fixture(scope="module")
def browser_page(tmp_path_factory):
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing: .ci/run must install Debian's chromium")
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=CHROMIUM, headless=True, args=FLAGS,
            viewport={"width": 1100, "height": 1000})
        yield context
        context.close()


def test_upload_ask_stream_new_patient_and_no_other_hosts(server, browser_page, tmp_path):
    photo = tmp_path / "forearm.jpg"
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (300, 400, 3), dtype=np.uint8)).save(photo)
    requests: list[str] = []
    page = browser_page.new_page()
    page.on("request", lambda request: requests.append(request.url))

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

    server_host = urlparse(server.url).netloc
    elsewhere = sorted({u for u in requests if urlparse(u).scheme in ("http", "https", "ws", "wss")
                        and urlparse(u).netloc != server_host})
    assert requests and not elsewhere, f"the page reached other hosts: {elsewhere}"
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
