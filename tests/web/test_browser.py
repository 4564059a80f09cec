"""The search page in headless Chromium: search, see images, convert, see personalization move.

Debian's ``chromium`` and ``chromium-driver`` drive it (the driver's path given explicitly);
without them the tests skip, and under ``CI=true`` they fail. A screenshot of the page is kept
under ``var/test-artifacts/``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.web.conftest import HOSTILE

CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM = "/usr/bin/chromium"
ARTIFACTS_DIR = Path(__file__).resolve().parents[2] / "var" / "test-artifacts"
# Flags that let Chromium run headless in a container as root, and keep it off the network.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,1000",
)
COLOUR = "red"  # what the new user converts
PROBE = "circle"  # what they search before and after


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not shutil.which(p)]
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError as exc:
        missing.append(f"selenium ({exc})")
    if missing:
        reason = f"no browser to drive the search page: {', '.join(missing)} missing"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def wait_for(driver, predicate, timeout: float = 10.0, what: str = ""):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(
        lambda d: predicate(d), message=f"waited {timeout:g} s for {what}"
    )


def result_ids(driver) -> list[str]:
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('#results [data-photo-id]'))"
        ".map(e => e.dataset.photoId)"
    )


def run_search(driver, query: str) -> list[str]:
    """Type ``query``, press Enter (keyboard only), wait for a new set of results."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver.execute_script("document.getElementById('results').replaceChildren()")
    box = driver.find_element(By.ID, "query")
    box.clear()
    box.send_keys(query, Keys.ENTER)
    wait_for(driver, lambda d: len(result_ids(d)) > 0, what=f"results for {query!r}")
    return result_ids(driver)


def choose(driver, select_id: str, value: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    Select(driver.find_element(By.ID, select_id)).select_by_value(value)


def images_loaded(driver) -> int:
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('#results img'))"
        ".filter(i => i.complete && i.naturalWidth > 0).length"
    )


def test_search_convert_and_see_the_order_change(browser, door):
    from selenium.webdriver.common.by import By

    browser.get(door.url)
    wait_for(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#ranker option")) > 2,
             what="the ranker choices")  # fmt: skip
    choose(browser, "ranker", "als")
    choose(browser, "retriever", "keyword")
    choose(browser, "k", "10")
    choose(browser, "user", "__new__")
    before = run_search(browser, PROBE)
    assert len(before) == 10
    wait_for(browser, lambda d: images_loaded(d) == 10, what="ten images drawn")
    timings = browser.find_element(By.ID, "timings").text
    assert "retrieval" in timings and "ranking" in timings
    notes = browser.find_element(By.ID, "notes").text
    assert "unknown user" in notes  # a new user: the search says it fell back
    first_card = browser.find_element(By.CSS_SELECTOR, "#results .card")
    assert "keyword" in first_card.text  # the retrieval source is shown

    # The new user converts photos of one colour, by keyboard: Tab to a card, Enter.
    run_search(browser, COLOUR)
    picks = browser.find_elements(By.CSS_SELECTOR, "#results .pick")
    for pick in picks[:6]:
        pick.send_keys("\n")
    wait_for(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".card.converted")) == 6,
             what="six conversions acknowledged")  # fmt: skip
    user = browser.execute_script("return document.getElementById('user').value")
    assert user.startswith("web-")  # the new user now shows in the picker, selected

    def changed(driver) -> bool:
        return run_search(driver, PROBE) != before

    wait_for(browser, changed, timeout=5.0, what="the top 10 to change after the conversions")
    wait_for(browser, lambda d: images_loaded(d) == 10, what="ten images drawn")
    ARTIFACTS_DIR.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS_DIR / "search-page.png"))
    assert (ARTIFACTS_DIR / "search-page.png").stat().st_size > 10_000


def test_catalogue_text_is_shown_as_text(browser, door, hostile_query):
    from selenium.webdriver.common.by import By

    browser.get(door.url)
    wait_for(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#ranker option")) > 2,
             what="the ranker choices")  # fmt: skip
    choose(browser, "ranker", "none")  # retrieval order: the photo matches every word
    run_search(browser, hostile_query)
    assert HOSTILE in browser.find_element(By.ID, "results").text  # shown as written
    assert browser.title == "imgsearch"  # its onerror never ran
    assert not browser.find_elements(By.CSS_SELECTOR, "#results .description b")
