"""The page at `/` of `lorachat serve`, as a person uses it: Debian's Chromium, headless, driven by Selenium through
the system chromedriver (nothing is downloaded), against a live server on loopback serving a tiny base and two tiny
adapters trained through `lorachat finetune`. Skipped, with the reason, where Chromium or its driver is missing
(`apt-get install chromium chromium-driver`)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from adapter_factory import EN_ROWS, SERVED, SV_ROWS, finetune_adapter, layered
from lora_chat.serve.app import BackgroundServer

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (the dev extra)")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="needs Chromium and chromedriver: apt-get install chromium chromium-driver")

from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

KEY = "sesame"


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> tuple[Path, Path]:
    """Two adapters trained long enough (lr 0.05, 8 steps) that their greedy replies differ from each other."""
    from conftest import build_tiny_base

    root = tmp_path_factory.mktemp("webui")
    base = build_tiny_base(root / "base")
    longer = {"training": {"max_steps": 8, "lr": 0.05}}
    return (finetune_adapter(root, "faq-en", base, EN_ROWS,
                             **layered(SERVED, longer, {"output": {"language": "en", "domain": "construction"}})),
            finetune_adapter(root, "talk-sv", base, SV_ROWS,
                             **layered(SERVED, longer, {"output": {"language": "sv", "domain": "smalltalk"}})))


@pytest.fixture(scope="module")
def rt(adapters):
    from lora_chat.runtime import AdapterSet

    return AdapterSet.open(list(adapters))


def _live(rt, **options) -> BackgroundServer:
    from lora_chat.serve.app import ServeOptions, build_app

    return BackgroundServer(build_app(rt, ServeOptions(**options)))


@pytest.fixture(scope="module")
def server(rt):
    live = _live(rt)
    yield live
    live.stop()


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # As root in a sandbox, with no network: the background-networking flags stop Chromium reaching for Google.
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1280,800"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def page_url(server: BackgroundServer, query: str = "") -> str:
    return server.url.removesuffix("/v1") + "/" + query


def wait(browser, predicate, timeout: float = 60):
    return WebDriverWait(browser, timeout, poll_frequency=0.05).until(lambda _: predicate())


def panes(browser) -> dict[str, object]:
    return {p.get_attribute("data-model"): p for p in browser.find_elements(By.CSS_SELECTOR, ".pane")}


def replies(pane) -> list[str]:
    return [li.text for li in pane.find_elements(By.CSS_SELECTOR, ".messages li.assistant")]


def streaming(browser) -> bool:
    return bool(browser.find_elements(By.CSS_SELECTOR, ".messages li.streaming"))


def send(browser, text: str, max_tokens: int = 24) -> None:
    box = browser.find_element(By.ID, "max-tokens")
    box.clear()
    box.send_keys(str(max_tokens))
    prompt = browser.find_element(By.ID, "prompt")
    prompt.send_keys(text)
    prompt.send_keys(Keys.ENTER)


def not_blank(png: Path) -> bool:
    from PIL import Image

    with Image.open(png) as image:
        colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
    return colours is None or len(colours) > 20  # a blank or failed page is one or two flat colours


def test_page_lists_base_and_adapters_with_their_facts(server, browser):
    browser.get(page_url(server))
    wait(browser, lambda: len(browser.find_elements(By.CSS_SELECTOR, "#models button")) == 4)
    listed = {b.get_attribute("data-model"): b.text for b in browser.find_elements(By.CSS_SELECTOR, "#models button")}
    assert "construction · en · r=8" in listed["faq-en"]
    assert "smalltalk · sv · r=8" in listed["talk-sv"]
    assert "auto" in listed
    assert any("base model" in text for text in listed.values())


def test_one_prompt_streams_into_two_panes_and_their_replies_differ(server, browser, tmp_path):
    browser.get(page_url(server, "?models=faq-en,talk-sv"))
    wait(browser, lambda: len(panes(browser)) == 2)
    send(browser, "How long does a building permit take?")
    wait(browser, lambda: streaming(browser) or all(replies(p) for p in panes(browser).values()))
    wait(browser, lambda: not streaming(browser))
    en, sv = (replies(panes(browser)[name]) for name in ("faq-en", "talk-sv"))
    assert en[0] and sv[0] and en[0] != sv[0]
    shot = tmp_path / "two-panes.png"
    browser.save_screenshot(str(shot))
    assert not_blank(shot)


def test_auto_names_the_adapter_the_router_picked(server, browser):
    browser.get(page_url(server, "?models=auto"))
    wait(browser, lambda: "auto" in panes(browser))
    send(browser, "Hej, hur mår du idag?")
    route = panes(browser)["auto"].find_element(By.CSS_SELECTOR, ".route")
    wait(browser, lambda: route.is_displayed() and route.text)
    assert route.text.startswith("routed to talk-sv:")
    assert "language sv" in route.text


def test_copied_conversation_is_the_messages_format_a_recipe_reads(server, browser, tmp_path):
    from lora_chat.data.formats import detect, to_conversation
    from lora_chat.errors import Where

    browser.get(page_url(server, "?models=faq-en"))
    wait(browser, lambda: "faq-en" in panes(browser))
    browser.find_element(By.ID, "system").send_keys("Answer briefly.")
    send(browser, "How long does it take?")
    wait(browser, lambda: replies(panes(browser)["faq-en"]) and not streaming(browser))
    row = json.loads(browser.execute_script("return window.lorachat.conversationJSON(0)"))
    assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant"]
    assert row["messages"][2]["content"] == replies(panes(browser)["faq-en"])[0]
    assert detect(row, Where()) == "messages"
    assert to_conversation(row, "messages", Where()).messages[-1].role == "assistant"


def test_shift_enter_breaks_a_line_and_enter_sends(server, browser):
    browser.get(page_url(server, "?models=faq-en"))
    wait(browser, lambda: "faq-en" in panes(browser))
    prompt = browser.find_element(By.ID, "prompt")
    prompt.send_keys("first line")
    prompt.send_keys(Keys.SHIFT, Keys.ENTER)
    prompt.send_keys("second line")
    assert prompt.get_attribute("value") == "first line\nsecond line"
    prompt.send_keys(Keys.ENTER)
    user = panes(browser)["faq-en"].find_elements(By.CSS_SELECTOR, ".messages li.user")
    assert user and user[0].text == "first line\nsecond line"
    assert prompt.get_attribute("value") == ""
    wait(browser, lambda: not streaming(browser))


def test_unknown_model_in_the_address_is_named_and_the_rest_open(server, browser):
    browser.get(page_url(server, "?models=nope,faq-en"))
    wait(browser, lambda: "faq-en" in panes(browser))
    assert "unknown model 'nope'" in browser.find_element(By.ID, "notices").text
    assert list(panes(browser)) == ["faq-en"]


def test_a_long_reply_scrolls_inside_its_pane_and_the_page_stays_responsive(server, browser):
    browser.set_window_size(900, 500)
    try:
        browser.get(page_url(server, "?models=faq-en"))
        wait(browser, lambda: "faq-en" in panes(browser))
        for _ in range(3):
            send(browser, "Tell me everything about building permits.", max_tokens=300)
            wait(browser, lambda: not streaming(browser))
        box = panes(browser)["faq-en"].find_element(By.CSS_SELECTOR, ".messages")
        height, client, top = browser.execute_script(
            "const b = arguments[0]; return [b.scrollHeight, b.clientHeight, b.scrollTop]", box)
        assert height > client  # the pane scrolls rather than growing the page
        assert top + client >= height - 60  # and follows the reply to its end
        page_height = browser.execute_script("return document.documentElement.scrollHeight")
        assert page_height <= 500 + 2
        started = time.monotonic()
        browser.find_element(By.ID, "temperature").send_keys(Keys.RIGHT)
        assert browser.find_element(By.ID, "temperature-value").text != "0"
        assert time.monotonic() - started < 5
    finally:
        browser.set_window_size(1280, 800)


def test_phone_sized_window_in_dark_mode_is_readable(server, browser, tmp_path):
    browser.execute_cdp_cmd("Emulation.setEmulatedMedia",
                            {"features": [{"name": "prefers-color-scheme", "value": "dark"}]})
    browser.set_window_size(390, 844)
    try:
        browser.get(page_url(server, "?models=faq-en,talk-sv"))
        wait(browser, lambda: len(panes(browser)) == 2)
        background = browser.execute_script("return getComputedStyle(document.body).backgroundColor")
        assert background == "rgb(21, 24, 28)"
        widths = [p.size["width"] for p in panes(browser).values()]
        assert all(w <= 390 for w in widths)  # stacked, not side by side off-screen
        assert browser.find_element(By.ID, "prompt").is_displayed()
        shot = tmp_path / "phone-dark.png"
        browser.save_screenshot(str(shot))
        assert not_blank(shot)
    finally:
        browser.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": []})
        browser.set_window_size(1280, 800)


def test_a_wrong_key_is_asked_for_again(rt, browser):
    live = _live(rt, api_key=KEY)
    try:
        browser.get(page_url(live))
        dialog = browser.find_element(By.ID, "key-dialog")
        wait(browser, lambda: dialog.is_displayed())
        browser.find_element(By.ID, "api-key").send_keys("wrong", Keys.ENTER)
        wait(browser, lambda: dialog.is_displayed() and not browser.find_element(By.ID, "api-key").get_attribute("value"))
        browser.find_element(By.ID, "api-key").send_keys(KEY, Keys.ENTER)
        wait(browser, lambda: len(browser.find_elements(By.CSS_SELECTOR, "#models button")) == 4)
        assert not dialog.is_displayed()
    finally:
        browser.execute_script("sessionStorage.clear()")
        live.stop()


def test_a_server_stopped_mid_stream_is_reported_and_the_reply_so_far_kept(rt, browser):
    live = _live(rt)
    browser.get(page_url(live, "?models=faq-en"))
    wait(browser, lambda: "faq-en" in panes(browser))
    send(browser, "Tell me everything about building permits.", max_tokens=400)
    pane = panes(browser)["faq-en"]
    wait(browser, lambda: any(r for r in replies(pane)))
    live.server.force_exit = True  # stop now: open streams are cut, not drained
    live.stop()
    wait(browser, lambda: not streaming(browser))
    errors = [li.text for li in pane.find_elements(By.CSS_SELECTOR, ".messages li.error")]
    assert errors and "the server stopped mid-reply" in errors[0]
    assert replies(pane)[0]  # what arrived before the cut is still there


# ---------------------------------------------------------------- feedback (serve --record)


def press(element, key=Keys.ENTER) -> None:
    """Keyboard only: the element takes the focus as Tab would give it (buttons are in the tab order), then a key."""
    assert element.get_property("tabIndex") >= 0
    element.send_keys(key)


def test_without_record_the_page_shows_no_badge_and_no_votes(server, browser):
    browser.get(page_url(server, "?models=faq-en"))
    wait(browser, lambda: "faq-en" in panes(browser))
    send(browser, "How long does it take?")
    wait(browser, lambda: replies(panes(browser)["faq-en"]) and not streaming(browser))
    assert not browser.find_element(By.ID, "recording").is_displayed()
    assert not browser.find_elements(By.CSS_SELECTOR, ".messages li.feedback")


def test_votes_edits_and_a_side_by_side_verdict_are_recorded_from_the_keyboard(rt, browser, tmp_path):
    from lora_chat.feedback.store import read_records

    live = _live(rt, record=tmp_path / "rec")
    try:
        browser.get(page_url(live, "?models=faq-en,talk-sv"))
        badge = browser.find_element(By.ID, "recording")
        wait(browser, lambda: badge.is_displayed())
        assert "Recording" in badge.text
        send(browser, "How long does a building permit take?")
        wait(browser, lambda: len(browser.find_elements(By.CSS_SELECTOR, ".messages li.feedback")) == 2)
        en, sv = panes(browser)["faq-en"], panes(browser)["talk-sv"]
        up = en.find_element(By.CSS_SELECTOR, "li.feedback .vote-up")
        press(up, Keys.SPACE)
        wait(browser, lambda: up.get_attribute("aria-pressed") == "true")
        press(sv.find_element(By.CSS_SELECTOR, "li.feedback .edit"))
        box = sv.find_element(By.CSS_SELECTOR, ".editor textarea")
        wait(browser, lambda: browser.switch_to.active_element == box)  # the editor takes the focus
        box.clear()
        box.send_keys("A permit takes ten weeks.")
        press(sv.find_element(By.CSS_SELECTOR, ".editor button[type=submit]"))
        wait(browser, lambda: not sv.find_elements(By.CSS_SELECTOR, ".editor"))
        compare = browser.find_element(By.ID, "compare")
        assert compare.is_displayed()
        choices = {b.text: b for b in compare.find_elements(By.CSS_SELECTOR, "button")}
        assert list(choices) == ["A is better", "B is better", "Tie"]
        press(choices["A is better"])
        wait(browser, lambda: choices["A is better"].get_attribute("aria-pressed") == "true")
        wait(browser, lambda: "recorded: A is better" in browser.find_element(By.ID, "status").text)
    finally:
        live.stop()
    records = read_records(tmp_path / "rec")
    by_model = {e["model"]: e for e in records.exchanges.values()}
    assert set(by_model) == {"faq-en", "talk-sv"}
    assert [(f["response"], f.get("rating"), f.get("edit")) for f in records.feedback] == [
        (by_model["faq-en"]["id"], "up", None), (by_model["talk-sv"]["id"], None, "A permit takes ten weeks.")]
    [verdict] = records.comparisons
    assert verdict["models"] == ["faq-en", "talk-sv"] and verdict["winner"] == "a"


def test_the_feedback_controls_are_readable_in_dark_mode(rt, browser, tmp_path):
    browser.execute_cdp_cmd("Emulation.setEmulatedMedia",
                            {"features": [{"name": "prefers-color-scheme", "value": "dark"}]})
    live = _live(rt, record=tmp_path / "rec")
    try:
        browser.get(page_url(live, "?models=faq-en,talk-sv"))
        wait(browser, lambda: browser.find_element(By.ID, "recording").is_displayed())
        send(browser, "How long does a building permit take?")
        wait(browser, lambda: browser.find_element(By.ID, "compare").is_displayed())
        page = browser.execute_script("return getComputedStyle(document.body).backgroundColor")
        assert page == "rgb(21, 24, 28)"
        for selector in ("#recording", "li.feedback .vote-up", "#compare button"):
            element = browser.find_element(By.CSS_SELECTOR, selector)
            colour, background = browser.execute_script(
                "const s = getComputedStyle(arguments[0]); return [s.color, s.backgroundColor]", element)
            assert colour not in (page, background), selector  # text that shows on its ground
            assert colour.startswith("rgb(") and sum(map(int, colour[4:-1].split(","))) > 3 * 128, selector  # light
        shot = tmp_path / "feedback-dark.png"
        browser.save_screenshot(str(shot))
        assert not_blank(shot)
    finally:
        browser.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": []})
        live.stop()
