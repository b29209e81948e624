"""A person in a real browser: Debian's chromium, driven by selenium through Debian's
chromedriver (never a downloaded browser), against `maild serve` in front of a real
Postfix. Subscribes through the form, confirms through the page the mail links, and
unsubscribes with the one-click link of a list message. Screenshots of every step go
to tests/artifacts/web/ (or $MAILD_TEST_ARTIFACTS), which CI keeps and git ignores.
"""

from __future__ import annotations

import email
import email.policy
import os
import re
from pathlib import Path

import pytest

from tests.harness import require_binary
from tests.harness.waits import patience
from tests.integration import test_optin, test_web
from tests.integration.test_web import LIST, links, list_mail, state, unsubscribe_url

postfix = test_optin.postfix  # the opt-in tests' Postfix (hosted.example, the list domain)
m = test_web.m  # maild with [web] and require_one_click, in front of it
ARTIFACTS = (
    Path(
        os.environ.get("MAILD_TEST_ARTIFACTS") or Path(__file__).resolve().parents[1] / "artifacts"
    )
    / "web"
)


@pytest.fixture
def chrome(request):
    chromium, driver = require_binary("chromium"), require_binary("chromedriver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1000,800",
        "--no-first-run",
        "--disable-extensions",
    ):
        opts.add_argument(arg)
    browser = webdriver.Chrome(service=Service(executable_path=driver), options=opts)
    browser.set_page_load_timeout(60)
    shots = ARTIFACTS / request.node.name
    shots.mkdir(parents=True, exist_ok=True)
    n = [0]

    def shot(name: str) -> None:
        n[0] += 1
        assert browser.save_screenshot(str(shots / f"{n[0]:02d}-{name}.png"))

    browser.shot = shot  # type: ignore[attr-defined]

    def result() -> str:
        """The answer page's text once it has loaded: a click on a form's button
        returns before the browser has the next page."""
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support import expected_conditions as ec
        from selenium.webdriver.support.ui import WebDriverWait

        return (
            WebDriverWait(browser, patience(30))
            .until(ec.presence_of_element_located((By.ID, "result")))
            .text
        )

    browser.result = result  # type: ignore[attr-defined]
    yield browser
    browser.quit()


def test_subscribe_confirm_and_one_click_unsubscribe_in_a_browser(postfix, m, chrome):
    from selenium.webdriver.common.by import By

    frank = "frank@hosted.example"
    chrome.get(f"{m.web}/subscribe/{LIST}")
    assert chrome.find_element(By.ID, "consent").text == test_web.CONSENT
    chrome.shot("subscribe-form")
    chrome.find_element(By.ID, "address").send_keys(frank)
    chrome.find_element(By.ID, "subscribe").click()
    assert "asking you to confirm" in chrome.result()
    chrome.shot("subscribe-sent")
    assert state(m, frank) == "pending"

    [confirm] = [u for u in links(postfix.wait_for_messages(frank, 1)[-1]) if "/confirm/" in u]
    chrome.get(confirm)
    assert chrome.find_element(By.ID, "consent").text == test_web.CONSENT
    chrome.shot("confirm-page")
    assert state(m, frank) == "pending"  # opening the page confirmed nothing
    chrome.find_element(By.ID, "confirm").click()
    assert "is now subscribed to Acme News" in chrome.result()
    chrome.shot("confirmed")
    assert state(m, frank) == "confirmed"

    # a list message with maild's one-click URL; the person clicks it in the message
    assert list_mail(m, frank, unsubscribe_url(m, frank)).data_code == 250
    news = email.message_from_bytes(
        postfix.wait_for_messages(frank, 2)[-1], policy=email.policy.default
    )
    [url] = [
        u for u in re.findall(r"<([^>]+)>", str(news["List-Unsubscribe"])) if u.startswith("http")
    ]
    chrome.get(url)
    chrome.shot("unsubscribe-page")
    assert state(m, frank) == "confirmed"
    chrome.find_element(By.ID, "unsubscribe").click()
    assert "is unsubscribed from Acme News" in chrome.result()
    chrome.shot("unsubscribed")
    assert state(m, frank) == "revoked"
    r = list_mail(m, frank, url)
    assert r.rcpt_codes == [550] and "unsubscribed from list news.acme.example" in r.output
