"""The stat-drift page in a real headless browser (Debian's chromium, driven by selenium):
pick a demo batch, analyze, and see the verdict, the output table and both bar charts."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOTS = ROOT / "artifacts" / "screenshots"

pytestmark = pytest.mark.browser


@pytest.fixture
def browser(tmp_path):
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip(
            "needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--window-size=1280,1400",
        f"--user-data-dir={tmp_path / 'profile'}",
    ):  # fmt: skip
        options.add_argument(flag)
    session = webdriver.Chrome(options=options, service=Service(executable_path=driver))
    session.set_page_load_timeout(30)
    yield session
    session.quit()


def test_drift_page_shows_verdict_and_charts(browser, digits_server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.select import Select
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 30)
    browser.get(f"{digits_server.url}/v2/models/digits/stat-drift/view")
    assert "digits" in browser.title
    wait.until(lambda b: len(Select(b.find_element(By.ID, "sample")).options) > 1)
    Select(browser.find_element(By.ID, "sample")).select_by_value("inverted")
    wait.until(lambda b: b.find_element(By.ID, "body").get_attribute("value").startswith("{"))
    browser.find_element(By.ID, "analyze").click()
    wait.until(ec.visibility_of_element_located((By.ID, "charts")))

    assert browser.find_element(By.ID, "verdict").text.lower() == "drift"
    assert browser.find_element(By.ID, "error").text == ""
    layers = browser.find_elements(By.CSS_SELECTOR, "#layers tbody tr")
    assert layers[0].find_element(By.TAG_NAME, "td").text == "input_bn"
    for chart in ("shift-chart", "var-chart"):
        bars = browser.find_elements(By.CSS_SELECTOR, f"#{chart} rect")
        assert len(bars) == 2 * len(layers)  # global and batch path per layer
    assert "input_bn" in browser.find_element(By.ID, "shift-chart").text
    output_row = browser.find_element(By.CSS_SELECTOR, "#outputs tbody tr").text
    assert output_row.startswith("logits")

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / "stat-drift-view.png"
    assert browser.save_screenshot(str(path))
    assert path.stat().st_size > 10_000


def test_drift_page_reports_errors_readably(browser, digits_server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(f"{digits_server.url}/v2/models/digits/stat-drift/view")
    browser.find_element(By.ID, "body").send_keys('{"inputs": []}')
    browser.find_element(By.ID, "analyze").click()
    WebDriverWait(browser, 20).until(lambda b: b.find_element(By.ID, "error").text)
    assert browser.find_element(By.ID, "error").text.startswith("400: invalid request")
