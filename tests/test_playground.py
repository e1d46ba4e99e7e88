"""The playground page at `/` of `lynx-exit serve`: served, switchable, behind the API key, and driven in a
real headless Chromium on the reference model (marker `browser`; `.ci/run` installs Debian's chromium and
chromedriver)."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import httpx
import pytest
import torch
from conftest import BOUND_S, make_tiny_lm, serving

from lynx_exit.engine import GenerationConfig
from lynx_exit.models import load_model
from lynx_exit.probe import Probe, save_probe, write_conformal
from lynx_exit.serve import Server, ServerOptions

ALWAYS = {"delta": 0.2, "q_pos": 1.0, "q_neg": 0.0, "n_pos": 10, "n_neg": 10}  # exits at the first cue
NEVER = {"delta": 0.1, "q_pos": 0.0, "q_neg": 1.0, "n_pos": 10, "n_neg": 10}


def write_probe(folder: Path, lm) -> Path:
    spec = lm.feature_spec()
    torch.manual_seed(0)
    save_probe(folder, Probe(spec.feature_dim).to(lm.model.dtype), spec, {"training_task": "toy"})
    write_conformal(folder, {"event": [ALWAYS, NEVER], "trajectory": [], "harm": []})
    return folder


def options(probe: Path, **changes) -> ServerOptions:
    defaults = GenerationConfig(max_new_tokens=60, temperature=0.6, cue_regex="e")
    return ServerOptions(
        **{
            "model_name": "tiny",
            "defaults": defaults,
            "exit_defaults": (("delta", "0.2"),),
            "max_batch_size": 4,
            "probe": str(probe),
            **changes,
        }
    )


def test_the_page_is_served_switched_off_and_behind_the_key(tmp_path):
    lm = make_tiny_lm(seed=5)
    probe = write_probe(tmp_path / "probe", lm)
    with serving(Server(lm, options(probe))) as url:
        page = httpx.get(url + "/", timeout=BOUND_S)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert (
            'id="chart"' in page.text
            and "lynx_decision_points" in page.text
            and "http" not in page.text.split("<script>")[0]
        )
        card = httpx.get(url + "/v1/models", timeout=BOUND_S).json()["data"][0]
        assert card["exit"]["probe"]["decision_points"] == ["cue"] and card["exit"]["probe"][
            "calibrated_deltas"
        ]["event"] == [0.1, 0.2]
    with serving(Server(lm, options(probe, ui=False))) as url:
        assert httpx.get(url + "/", timeout=BOUND_S).status_code == 404
    with serving(Server(lm, options(probe, api_key="sesame"))) as url:
        assert httpx.get(url + "/", timeout=BOUND_S).status_code == 401
        assert httpx.get(url + "/?key=wrong", timeout=BOUND_S).status_code == 401
        assert httpx.get(url + "/?key=sesame", timeout=BOUND_S).status_code == 200
        assert (
            httpx.get(url + "/v1/models?key=sesame", timeout=BOUND_S).status_code == 401
        )  # only the page takes it


def _browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not binary or not driver_path:
        message = "Debian's chromium and chromium-driver are not installed (.ci/run installs them)"
        if os.environ.get("LYNX_REQUIRE_BROWSER"):
            pytest.fail(message)
        pytest.skip(message)
    chrome = webdriver.ChromeOptions()
    chrome.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,1000"):
        chrome.add_argument(flag)
    return webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver_path), options=chrome)


@pytest.mark.browser
def test_the_page_streams_a_lynx_exit_in_a_real_browser(tmp_path):
    """Submit a prompt on the reference model with a probe that exits at the first cue (δ 0.2) and the full
    chain beside it: the thinking, the answer, the decision points on the chart and the exit marker reach the
    DOM."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    lm = load_model("reference")
    probe = write_probe(tmp_path / "probe", lm)
    server = Server(
        lm,
        options(
            probe, model_name="reference", defaults=GenerationConfig(max_new_tokens=300, temperature=0.6)
        ),
    )
    with serving(server) as url:
        driver = _browser()
        try:
            driver.get(url + "/")
            wait = WebDriverWait(driver, BOUND_S)
            wait.until(lambda d: len(Select(d.find_element(By.ID, "delta")).options) == 2)
            Select(driver.find_element(By.ID, "method")).select_by_value("lynx")
            Select(driver.find_element(By.ID, "delta")).select_by_value("0.2")
            driver.find_element(By.ID, "compare").click()
            started = time.monotonic()
            driver.find_element(By.ID, "run").click()
            wait.until(
                lambda d: (
                    d.find_element(By.TAG_NAME, "body").get_attribute("data-done") == "1"
                    or "error" in (d.find_element(By.ID, "status").get_attribute("class") or "")
                )
            )
            assert driver.find_element(By.ID, "status").text == "done", driver.find_element(
                By.ID, "status"
            ).text
            assert time.monotonic() - started < BOUND_S
            thinking = driver.find_element(By.ID, "thinking").text
            assert "Step 1" in thinking or "starts with" in thinking
            assert driver.find_element(By.ID, "answer").text.strip()
            assert driver.find_elements(By.CSS_SELECTOR, "#chart circle.pt")
            assert driver.find_elements(By.CSS_SELECTOR, "#chart #exit-marker")
            assert "exit" in driver.find_element(By.ID, "exit-in-text").text
            assert driver.find_element(By.ID, "compare-answer").text.strip()
            assert "tokens saved by the exit" in driver.find_element(By.ID, "compare-stats").text
            shot = Path(os.environ.get("LYNX_SCREENSHOT_DIR", tmp_path)) / "playground.png"
            assert driver.save_screenshot(str(shot))
        finally:
            driver.quit()
