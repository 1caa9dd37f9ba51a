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


@pytest.fixture
def live_server(demo_repository):
    """Every request monitored, 2-second windows: a few seconds give a history to plot."""
    from service.launcher import ServiceProcess

    env = {
        "BNSERVE_DRIFT_SAMPLE_RATE": "1",
        "BNSERVE_DRIFT_MAX_SAMPLES_PER_S": "0",
        "BNSERVE_DRIFT_MAX_CPU": "0",
        "BNSERVE_DRIFT_WINDOW": "2",
        "BNSERVE_DRIFT_HISTORY": "20",
    }
    with ServiceProcess(demo_repository, env=env) as server:
        yield server


def test_live_view_plots_each_layer_over_the_windows_and_refreshes(
    browser, live_server, demo_repository
):
    import threading

    import httpx
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    body = (demo_repository / "digits" / "1" / "samples" / "brightened.json").read_bytes()
    stop = threading.Event()

    def traffic():  # the shifted stream, a batch every 0.3 s
        while not stop.wait(0.3):
            httpx.post(f"{live_server.url}/v2/models/digits/infer", content=body)

    sender = threading.Thread(target=traffic, daemon=True)
    sender.start()
    try:
        browser.get(f"{live_server.url}/v2/models/digits/stat-drift/view?refresh=1")
        wait = WebDriverWait(browser, 40)
        points = "#live-chart circle[data-layer='input_bn']"
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, points)) >= 3)
        assert browser.find_element(By.ID, "live-verdict").text.lower() == "drift"
        assert browser.find_element(By.ID, "live-error").text == ""
        lines = browser.find_elements(By.CSS_SELECTOR, "#live-chart polyline.series")
        layers = {line.get_attribute("data-layer") for line in lines}
        assert "input_bn" in layers
        assert len(layers) >= 3  # one line per layer
        legend = browser.find_element(By.ID, "live-legend").text
        assert "input_bn" in legend
        # Refreshing by itself: more windows appear without a reload.
        before = len(browser.find_elements(By.CSS_SELECTOR, points))
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, points)) > before)
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        path = SCREENSHOTS / "stat-drift-live.png"
        browser.execute_script("document.getElementById('live').scrollIntoView()")
        assert browser.save_screenshot(str(path))
        assert path.stat().st_size > 10_000
    finally:
        stop.set()
        sender.join(5)
