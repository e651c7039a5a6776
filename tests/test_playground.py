"""The browser playground at /ui (issue 24, item 3), in a real headless Chromium driven by Selenium,
against the shipped default model as `make serve` serves it (with an API key).

A user's path: open the page (served without a key), give the key, search "German", open the
feature, steer a chat with it (default and steered answers streamed side by side), hover the
trace's heatmap, copy the request as curl and as Python and run both; then build dashboards
through the same server and see the feature's histogram and top examples. What the page shows is
compared with what the API answers for the same requests. The first run uses the clamp the page
proposes (about five times the feature's mean activation when it fires: German, as in the
README's first example); the chat panel stays beside the feature page, in view; the favicon
loads. One screenshot per panel goes to .state/screenshots/ (SCREENSHOTS), and one of the whole
first run (playground-first-run.png, copied to docs/playground.png).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time

import httpx
import pytest

from tests.conftest import API_KEY, AUTH, ROOT

SCREENSHOTS = ROOT / ".state" / "screenshots"
NAME = "fortunes-qwen3.5"
MAX_TOKENS = 32
# The German feature clamped to the page's default, 78.2 (5 x 15.63, the mean activation its label
# gives), on "Tell me something.": German, as the README's first example (the default before,
# 50, gave English: "The story is gonna be an information, in an inch, ...").
GERMAN_FIRST_RUN = ("The st ist ist ist ist ein krä ist, ist ein krä ist, ist\n"
                    "sch ist, ist ein er ist, ist ein er ist,")
STICKY_TOP = 16  # px: the chat panel's `top: 1rem` (style.css), the root font being 16 px


def js_number(x: float) -> str:
    """String(x) in JavaScript, for the numbers the page computes (no trailing ".0")."""
    return str(int(x)) if x == int(x) else repr(x)


def default_clamp(mean: float) -> float:
    """The page's default clamp: Math.round(5 * mean * 10) / 10 (app.js, defaultClamp)."""
    return math.floor(5 * mean * 10 + 0.5) / 10


def chromium() -> tuple[str, str]:
    """Debian's chromium and its driver (`make setup` installs them where it can)."""
    browser = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.skip(f"Chromium not found (browser: {browser}, chromedriver: {driver}); "
                    "install Debian's chromium and chromium-driver (`make setup` does as root or with sudo -n)")
    return browser, driver


@pytest.fixture(scope="session")  # session, like default_server, so that it is set up first: no server without a browser
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver = chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1200",
                 "--force-device-scale-factor=1"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the console, for the favicon's request
    chrome = webdriver.Chrome(service=Service(driver), options=options)
    try:
        yield chrome
    finally:
        chrome.quit()


@pytest.fixture(scope="module")
def http(default_server):
    with httpx.Client(base_url=default_server.base_url, headers=AUTH, timeout=300) as client:
        yield client


def test_the_page_needs_no_key_and_the_data_does(default_server):
    base = default_server.base_url
    assert httpx.get(f"{base}/ui", follow_redirects=True).text.startswith("<!doctype html>")
    for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css"), ("favicon.svg", "image/svg+xml")):
        response = httpx.get(f"{base}/ui/{name}")
        assert response.status_code == 200 and response.headers["content-type"].startswith(kind)
    assert httpx.get(f"{base}/v1/features/search", params={"q": "German"}).status_code == 401
    assert httpx.get(f"{base}/ui/secrets.txt").status_code == 401  # only the shipped files are open
    missing = httpx.get(f"{base}/ui/secrets.txt", headers=AUTH)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def wait_for(browser, condition, timeout: float = 120):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, timeout, poll_frequency=0.1).until(lambda _: condition())


def shot(browser, panel: str, name: str | None = None) -> None:
    from selenium.webdriver.common.by import By

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    element = browser.find_element(By.ID, f"{panel}-panel")
    browser.execute_script("arguments[0].scrollIntoView()", element)
    element.screenshot(str(SCREENSHOTS / f"playground-{name or panel}.png"))


def rect(browser, css: str) -> dict:
    """An element's box in the window (CSS pixels): left, right, top, bottom, height."""
    return browser.execute_script(
        "const r = document.querySelector(arguments[0]).getBoundingClientRect(); "
        "return {left: r.left, right: r.right, top: r.top, bottom: r.bottom, height: r.height}", css)


def api_chat(http, steering=None) -> dict:
    """What the page's request asks, as one JSON response (same sampling: temperature 0, seed 0)."""
    body = {"model": NAME, "messages": [{"role": "user", "content": "Tell me something."}], "max_tokens": MAX_TOKENS,
            "temperature": 0, "seed": 0, "trace": {"layers": [1, 2, 3], "top_k": 5}}
    if steering:
        body["steering"] = steering
    return http.post("/v1/chat/completions", json=body).raise_for_status().json()["choices"][0]


def test_search_feature_steer_and_trace_in_a_browser(browser, default_server, http):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    started = time.monotonic()
    find = lambda css: browser.find_element(By.CSS_SELECTOR, css)  # noqa: E731
    finds = lambda css: browser.find_elements(By.CSS_SELECTOR, css)  # noqa: E731

    browser.get(f"{default_server.base_url}/ui")
    wait_for(browser, lambda: "401" in find("#status").text)  # no key yet: the API refuses, the page says so
    find("#api-key").send_keys(API_KEY)
    find("#key-form button").click()
    wait_for(browser, lambda: find("#status").text == f"{NAME}; SAE layers 1, 2, 3")

    # Search: the page lists what the API finds.
    expected = http.get("/v1/features/search", params={"q": "German", "limit": 20}).json()
    german = expected["data"][0]
    assert german["label"] == "German"
    find("#search-q").send_keys("German")
    find("#search-form button").click()
    wait_for(browser, lambda: len(finds("#search-results li")) == len(expected["data"]))
    first = finds("#search-results li button")[0]
    assert first.text == f"L{german['layer']} #{german['index']}: German"
    shot(browser, "search")
    chat_before = rect(browser, "#chat-panel")
    assert chat_before["left"] > rect(browser, "#search-panel")["right"]  # beside the search, at the top

    # The feature page: label and the logit lens, token for token.
    first.click()
    wait_for(browser, lambda: find("#feature-title").text == f"L{german['layer']} #{german['index']}: German")
    # The chat panel stays where it was, beside the feature page (which opens below the search),
    # wholly in view; scrolled down the feature page, it stays at the top of the window.
    chat, page = rect(browser, "#chat-panel"), rect(browser, "#feature-panel")
    assert chat["left"] > page["right"] and chat["height"] == chat_before["height"]
    assert 0 <= chat["top"] and chat["bottom"] <= browser.execute_script("return innerHeight")
    browser.execute_script("scrollTo(0, document.documentElement.scrollHeight)")
    assert browser.execute_script("return scrollY") > chat_before["top"]  # the page scrolled past the chat's place
    assert rect(browser, "#chat-panel")["top"] == STICKY_TOP
    browser.execute_script("scrollTo(0, 0)")
    mean = float(re.search(r"mean activation (\d+\.\d+)", german["description"]).group(1))
    assert find("#feature-numbers").text.startswith(f"mean activation when it fires {mean:.2f} (from its label); ")
    lens = http.get(f"/v1/features/{german['layer']}/{german['index']}").json()["logit_lens"]
    for side in ("promoted", "suppressed"):
        cells = [row.find_element(By.TAG_NAME, "code").text for row in finds(f"#lens-{side} tbody tr")]
        shown = [t["token"].replace("\n", "↵").replace(" ", "·") or "∅" for t in lens[side]]
        assert cells == shown and len(cells) == 20
    shot(browser, "feature")

    # Steer: the clamp the page proposes, five times the label's mean activation (78.2), and
    # generate; both answers stream in and equal the API's, the steered one German.
    find("#feature-steer").click()
    steer_id = f"steer-{german['layer']}-{german['index']}"
    clamp = default_clamp(mean)
    assert (mean, clamp) == (15.63, 78.2)  # the shipped model's label, as the README quotes it
    assert find(f"#{steer_id}-value").get_attribute("value") == js_number(clamp)
    assert find(f"#{steer_id}-slider").get_attribute("value") == js_number(clamp)
    assert find(f"#{steer_id}-mode").get_attribute("value") == "clamp"
    assert find(f"#{steer_id}-default").text == (f"default clamp {js_number(clamp)} = 5 × mean activation when it "
                                                f"fires {mean:.2f} (from its label)")
    find("#chat-run").click()
    wait_for(browser, lambda: find("#chat-message-line").text.startswith("done"))
    steering = {"features": [{"layer": german["layer"], "index": german["index"], "mode": "clamp", "value": clamp}]}
    plain, steered = api_chat(http), api_chat(http, steering)
    assert find("#answer-default").text == plain["message"]["content"].strip()
    assert find("#answer-steered").text == steered["message"]["content"].strip()
    assert steered["message"]["content"] == GERMAN_FIRST_RUN
    assert plain["message"]["content"] != steered["message"]["content"]
    assert find("#chat-message-line").text == "done: the answers differ"
    browser.execute_script("scrollTo(0, 0)")
    browser.save_screenshot(str(SCREENSHOTS / "playground-first-run.png"))  # docs/playground.png

    # The request as curl and as Python: both run, and stream the steered answer.
    find("#request-view summary").click()
    curl = find("#request-code").text
    find("#tab-python").click()
    python = find("#request-code").text
    env = dict(os.environ, STEERSERVE_API_KEY=API_KEY)
    ran = subprocess.run([sys.executable, "-c", python], capture_output=True, text=True, env=env, timeout=300)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip() == steered["message"]["content"].strip()
    if shutil.which("curl"):
        streamed = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, env=env, timeout=300).stdout
        chunks = [json.loads(line[6:]) for line in streamed.splitlines() if line.startswith("data: {")]
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
        assert text == steered["message"]["content"]
    find("#tab-curl").click()
    shot(browser, "chat")

    # The trace heatmap: one cell per generated token plus the end of the prompt, coloured, and
    # hovering a token lists the features the API traced at its position.
    wait_for(browser, lambda: find("#trace-panel").is_displayed())
    browser.execute_script("document.getElementById('trace-panel').scrollIntoView()")
    assert rect(browser, "#chat-panel")["bottom"] <= rect(browser, "#trace-panel")["top"]  # sticky above it, never over
    tokens = finds("#heatmap-steered .tok")
    assert len(tokens) == len(steered["trace"]) + 1
    colours = {t.value_of_css_property("background-color") for t in tokens}
    assert len(colours) > 2, colours
    j = 3
    ActionChains(browser).move_to_element(tokens[j]).perform()  # cell j reads generated token j - 1: entry j
    wait_for(browser, lambda: "position" in find("#token-details h3").text)
    want = [f"#{f['index']}" for f in steered["trace"][j]["features"]["3"]]
    assert [row.find_element(By.TAG_NAME, "button").text for row in finds("#token-details tbody tr")] == want
    assert f"(position {steered['trace'][j]['position']}), layer 3" in find("#token-details h3").text
    shot(browser, "trace")

    # The favicon: the page names one and it loads; the console's only errors are the 401s of
    # the first visit, before the key (without the icon, the browser asks for /favicon.ico).
    icon = browser.execute_script("return document.querySelector('link[rel=icon]').href")
    assert icon == f"{default_server.base_url}/ui/favicon.svg"
    assert httpx.get(icon).headers["content-type"] == "image/svg+xml"
    errors = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors and all(re.fullmatch(r"\S+/v1/(models|saes) - Failed to load resource: the server responded with "
                                       r"a status of 401 \(Unauthorized\)", e) for e in errors), errors
    print(f"\nbrowser walk-through: {time.monotonic() - started:.1f}s; screenshots in {SCREENSHOTS}", file=sys.stderr)


def test_feature_page_shows_dashboards_built_through_the_server(browser, default_server, http, monkeypatch):
    """`steerserve dashboards --base-url` fills the file the server serves (the built-in sample at
    layer 3); the German feature's page then draws its histogram, one bar per bin the API gives,
    and its top examples, token for token, the peak token the most highlighted."""
    from selenium.webdriver.common.by import By

    from steerserve.analysis import explanation_store
    from steerserve.analysis.dashboards import main as dashboards_main

    monkeypatch.setenv("VLLM_API_KEY", API_KEY)
    assert dashboards_main(["--base-url", default_server.base_url, "--layers", "3", "--top-n", "5",
                            "--output", str(default_server.dashboards_file), "--explain", "--explain-limit", "1"]) == 0
    german = http.get("/v1/features/search", params={"q": "German"}).json()["data"][0]
    feature = http.get(f"/v1/features/{german['layer']}/{german['index']}").json()
    counts, examples = feature["histogram"]["counts"], feature["top_examples"]
    assert german["label"] == "German" and sum(counts) > 0 and len(examples) == 5

    find = lambda css: browser.find_element(By.CSS_SELECTOR, css)  # noqa: E731
    finds = lambda css: browser.find_elements(By.CSS_SELECTOR, css)  # noqa: E731
    browser.get(f"{default_server.base_url}/ui")
    if not find("#api-key").get_attribute("value"):
        find("#api-key").send_keys(API_KEY)
    find("#key-form button").click()
    find("#search-q").clear()
    find("#search-q").send_keys("German")
    find("#search-form button").click()
    wait_for(browser, lambda: finds("#search-results li button"))
    finds("#search-results li button")[0].click()
    wait_for(browser, lambda: len(finds("#feature-histogram svg rect")) == len(counts))
    bars = [float(bar.get_attribute("height")) for bar in finds("#feature-histogram svg rect")]
    assert bars.index(max(bars)) == counts.index(max(counts)) and max(bars) == 80.0
    assert find("#feature-histogram .caption").text.endswith(f"; {sum(counts)} firing tokens")
    rows = finds("#feature-examples ol li")
    assert len(rows) == len(examples)
    for row, example in zip(rows, examples):
        spans = row.find_elements(By.CSS_SELECTOR, ".tok")
        assert [s.get_attribute("textContent") for s in spans] == example["tokens"]
        colours = [s.value_of_css_property("background-color") for s in spans]
        alphas = [float(c.rsplit(",", 1)[1].rstrip(")")) if c.startswith("rgba") else 1.0 for c in colours]
        peak = example["activations"].index(max(example["activations"]))
        assert alphas[peak] == max(alphas) > 0, (colours, example["activations"])
    assert not find("#feature-explanation").is_displayed()  # only the most often firing feature is explained
    # With a dashboard, its mean activation (over the sample) sets the default clamp, not the label's.
    mean = feature["mean_activation"]
    assert mean != 15.63 and find("#feature-numbers").text.startswith(
        f"mean activation when it fires {mean:.2f} (from its dashboard); ")
    find("#feature-steer").click()
    value = find(f"#steer-{german['layer']}-{german['index']}-value").get_attribute("value")
    assert value == js_number(default_clamp(mean))
    shot(browser, "feature", "feature-dashboards")

    # The explained feature shows its explanation and detection score as the API gives them.
    with sqlite3.connect(default_server.dashboards_file) as db:
        ((layer, index),) = explanation_store.explained(db)
    explanation = http.get(f"/v1/features/{layer}/{index}").json()["explanation"]
    browser.execute_script(f"openFeature({layer}, {index})")
    wait_for(browser, lambda: find("#feature-explanation").is_displayed())
    shown = find("#feature-explanation").text
    assert shown.startswith(f"Explanation by {NAME}: {explanation['text']} (detection score ")
    assert f"{explanation['held_out']} held-out vs {explanation['random']} random contexts" in shown
