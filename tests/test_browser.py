"""End to end: the demo page in headless Chromium, driven by Selenium, against the demo server.

Chromium and chromedriver are the Debian packages (``tests/run.sh`` installs them); the
tests skip, saying why, only when those two programs cannot be found. Selenium is pointed
at both explicitly, so Selenium Manager never runs (the machine may have no network).
Set ``WSROUTE_SCREENSHOT=/tmp/demo.png`` to keep a screenshot of the page after its calls.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Iterator, Optional, Tuple

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import Select, WebDriverWait

from wsroute_sync import Server
from wsroute_sync.cli import make_demo_server

from conftest import TIMEOUT, ListHandler, running


def _find(name: str, debian_path: str) -> Optional[str]:
    if os.access(debian_path, os.X_OK):
        return debian_path
    return shutil.which(name)


CHROMIUM = _find("chromium", "/usr/bin/chromium")
CHROMEDRIVER = _find("chromedriver", "/usr/bin/chromedriver")

needs_browser = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="headless browser tests need chromium and chromedriver (Debian packages "
    "chromium, chromium-driver; tests/run.sh installs them): "
    f"chromium={CHROMIUM}, chromedriver={CHROMEDRIVER}",
)

#: A page load or a browser round trip can be slower than a socket one: a few units.
BROWSER_TIMEOUT = 3 * TIMEOUT

CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
    "--window-size=1000,1100",
)


@pytest.fixture
def browser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[WebDriver]:
    """Headless Chromium with a fresh profile; quit (browser and chromedriver) always."""
    assert CHROMIUM is not None and CHROMEDRIVER is not None
    # Belt and braces: with both paths given Selenium Manager is skipped, and offline it
    # would not try to download a driver or a browser anyway.
    monkeypatch.setenv("SE_OFFLINE", "true")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in CHROMIUM_ARGS:
        options.add_argument(arg)
    options.add_argument(f"--user-data-dir={tmp_path / 'profile'}")
    service = Service(CHROMEDRIVER, log_output=subprocess.DEVNULL)
    driver = webdriver.Chrome(service=service, options=options)
    try:
        driver.set_page_load_timeout(BROWSER_TIMEOUT)
        driver.set_script_timeout(BROWSER_TIMEOUT)
        yield driver
    finally:
        driver.quit()


def page_url(server: Server) -> str:
    assert isinstance(server.address, tuple)
    return f"http://127.0.0.1:{server.address[1]}/"


def wait(driver: WebDriver) -> WebDriverWait[WebDriver]:
    return WebDriverWait(driver, BROWSER_TIMEOUT, poll_frequency=0.02)


def wait_for_state(driver: WebDriver, state: str) -> None:
    """Wait until the page's connection status is ``state`` (exactly: "disconnected"
    contains "connected")."""
    status = driver.find_element(By.CSS_SELECTOR, '[data-testid="status"]')
    wait(driver).until(lambda d: status.get_attribute("data-state") == state)
    assert status.text == state


def open_demo(driver: WebDriver, server: Server) -> None:
    driver.get(page_url(server))
    wait_for_state(driver, "connected")


def answers(driver: WebDriver) -> list[WebElement]:
    """The log's replies and error envelopes, oldest first."""
    return driver.find_elements(
        By.CSS_SELECTOR, '[data-testid="entry"][data-kind="reply"], '
        '[data-testid="entry"][data-kind="error"]'
    )


def call(driver: WebDriver, route: str, params: str, *, custom: bool = False) -> WebElement:
    """Pick ``route`` (or type it as a custom one), type ``params``, Send; the answer."""
    Select(driver.find_element(By.CSS_SELECTOR, '[data-testid="route"]')).select_by_value(
        "" if custom else route
    )
    if custom:
        field = driver.find_element(By.CSS_SELECTOR, '[data-testid="custom-route"]')
        field.clear()
        field.send_keys(route)
    textarea = driver.find_element(By.CSS_SELECTOR, '[data-testid="params"]')
    textarea.clear()
    textarea.send_keys(params)
    before = len(answers(driver))
    driver.find_element(By.CSS_SELECTOR, '[data-testid="send"]').click()
    wait(driver).until(lambda d: len(answers(d)) > before)
    answer = answers(driver)[before]
    assert answer.get_attribute("data-route") == route
    return answer


def body(entry: WebElement) -> str:
    return entry.find_element(By.CSS_SELECTOR, '[data-testid="entry-body"]').text


@needs_browser
def test_demo_page_calls_routes(browser: WebDriver) -> None:
    with running(make_demo_server()) as server:
        open_demo(browser, server)

        # The route selector pre-fills a working example.
        textarea = browser.find_element(By.CSS_SELECTOR, '[data-testid="params"]')
        assert textarea.get_attribute("value") == '{"hello": "world"}'

        reply = call(browser, "echo", '{"greeting": "héllo", "n": [1, 2]}')
        assert reply.get_attribute("data-kind") == "reply"
        assert "error" not in (reply.get_attribute("class") or "").split()
        assert body(reply) == '{"greeting":"héllo","n":[1,2]}'

        reply = call(browser, "add", '{"numbers": [2, 3, 4.5]}')
        assert reply.get_attribute("data-kind") == "reply"
        assert body(reply) == '{"sum":9.5}'

        error = call(browser, "add", '{"numbers": ["two", 3]}')
        assert error.get_attribute("data-kind") == "error"
        assert "error" in (error.get_attribute("class") or "").split()
        summary = error.find_element(By.CSS_SELECTOR, '[data-testid="entry-summary"]')
        assert summary.text == 'add expects {"numbers": [1, 2, ...]}'
        assert '"code":1' in body(error)

        error = call(browser, "no-such-route", "{}", custom=True)
        assert "error" in (error.get_attribute("class") or "").split()
        summary = error.find_element(By.CSS_SELECTOR, '[data-testid="entry-summary"]')
        assert summary.text == "unknown route: no-such-route"

        # Params that are not JSON never leave the page; the connection stays up.
        Select(browser.find_element(By.CSS_SELECTOR, '[data-testid="route"]')).select_by_value(
            "upper"
        )
        textarea.clear()
        textarea.send_keys("{not json")
        before = len(browser.find_elements(By.CSS_SELECTOR, '[data-testid="entry"]'))
        browser.find_element(By.CSS_SELECTOR, '[data-testid="send"]').click()
        problem = browser.find_element(By.CSS_SELECTOR, '[data-testid="params-error"]')
        wait(browser).until(lambda d: problem.is_displayed())
        assert problem.text.startswith("Params are not valid JSON")
        assert len(browser.find_elements(By.CSS_SELECTOR, '[data-testid="entry"]')) == before
        reply = call(browser, "upper", '{"text": "loud"}')
        assert body(reply) == '{"text":"LOUD"}'

        screenshot = os.environ.get("WSROUTE_SCREENSHOT")
        if screenshot:  # for a person to look at the page; not part of the assertions
            browser.save_screenshot(screenshot)

        # The server closing shows on the page as a disconnection.
        server.close(timeout=TIMEOUT)
        wait_for_state(browser, "disconnected")
        assert browser.find_element(By.CSS_SELECTOR, '[data-testid="send"]').get_attribute(
            "disabled"
        ) is not None


@needs_browser
def test_page_from_another_origin_is_refused(browser: WebDriver) -> None:
    logger = logging.getLogger("test.browser.other")
    records = ListHandler()
    logger.addHandler(records)
    logger.propagate = False
    level = logger.level
    logger.setLevel(logging.INFO)  # refusals of a handshake are logged at WARNING
    with contextlib.ExitStack() as stack:
        stack.callback(logger.setLevel, level)
        stack.callback(logger.removeHandler, records)
        home = stack.enter_context(running(make_demo_server()))
        other = stack.enter_context(running(make_demo_server(logger=logger)))
        open_demo(browser, home)
        # A script on home's page opens a WebSocket to each server; the browser sends
        # home's origin both times, and only home's own host matches it.
        script = """
            const done = arguments[arguments.length - 1];
            const ws = new WebSocket(arguments[0]);
            ws.onopen = () => { ws.close(); done("open"); };
            ws.onclose = (event) => done("closed " + event.code);
        """
        assert browser.execute_async_script(script, home.url) == "open"
        assert browser.execute_async_script(script, other.url) == "closed 1006"
        assert any("handshake refused with 403: origin not allowed" in m
                   for m in records.messages())


def fetch(server: Server, method: str, path: str = "/") -> Tuple[http.client.HTTPResponse, bytes]:
    """One plain HTTP request on a fresh connection: the response and its body."""
    assert isinstance(server.address, tuple)
    conn = http.client.HTTPConnection("127.0.0.1", server.address[1], timeout=TIMEOUT)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response, response.read()
    finally:
        conn.close()


def test_page_is_served_as_html() -> None:
    with running(make_demo_server()) as server:
        response, page = fetch(server, "GET")
        assert response.status == 200
        assert response.getheader("Content-Type") == "text/html; charset=utf-8"
        assert int(response.getheader("Content-Length", "-1")) == len(page)
        text = page.decode("utf-8")
        assert "<title>wsroute_sync demo</title>" in text
        assert '<meta name="ws-path" content="/">' in text
        # Self-contained: nothing is fetched from elsewhere (the machine may be offline).
        assert not re.search(r"https?://|@import|url\(|(src|href)\s*=\s*[\"'](?!data:)", text)

        head, nothing = fetch(server, "HEAD")
        assert head.status == 200
        assert head.getheader("Content-Type") == "text/html; charset=utf-8"
        assert int(head.getheader("Content-Length", "-1")) == len(page)
        assert nothing == b""

        # Other paths are still the WebSocket endpoint's 426.
        assert fetch(server, "GET", "/nothing-here")[0].status == 426


def test_page_connects_to_the_servers_websocket_path() -> None:
    with running(make_demo_server(path=["/ws"])) as server:
        response, page = fetch(server, "GET")
        assert response.status == 200
        assert b'<meta name="ws-path" content="/ws">' in page
