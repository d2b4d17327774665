"""The MLflow UI, in a real headless Chromium, shows a sweep as parent/child runs with metric columns.

Needs Debian's ``chromium`` and ``chromium-driver`` (installed by ``.ci/run``); without them the test
is skipped with that reason. The screenshot is kept in the test's tmp dir (and copied to
``$GENATTR_SCREENSHOTS`` when set) so a human can look at what was asserted.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from helpers.mlflow_server import mlflow_server

from genattr.tracking.mlflow import MLflowTracker

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


def _browser():
    if not (Path(CHROMIUM).is_file() and Path(DRIVER).is_file()):
        pytest.skip("no headless browser: install Debian's chromium and chromium-driver (see .ci/run)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is a dev dependency: make install")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=2000,900"):
        options.add_argument(arg)
    options.binary_location = CHROMIUM
    return webdriver.Chrome(options=options, service=Service(DRIVER))


def _wait_for(driver, predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        found = predicate(driver)
        if found:
            return found
        if time.monotonic() > deadline:
            driver.save_screenshot("/tmp/genattr-ui-timeout.png")
            raise AssertionError(f"the MLflow UI did not show {what} within {timeout:.0f} s")
        time.sleep(0.5)


@pytest.mark.slow
def test_mlflow_ui_shows_parent_child_runs_and_metric_columns(tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver = _browser()
    try:
        with mlflow_server(tmp_path / "server") as uri:
            parent = MLflowTracker(uri, experiment="ui")
            parent.start(run_name="sweep-ui", tags={"genattr.sweep": "parent"}, params={})
            for method in ("lorax", "replay"):
                for seed in (0, 1):
                    child = MLflowTracker(uri, experiment="ui")
                    tags = {"method": method, "data": "cddb_hard", "seed": str(seed)}
                    child.start(run_name=f"{method}-s{seed}", tags=tags, params={}, parent_run_id=parent.run_id)
                    child.log_metrics({"final/aa": 70.25 + seed if method == "lorax" else 61.5 + seed})
                    child.end()
            parent.end()

            driver.get(f"{uri}/#/experiments/{parent.experiment_id}/runs")
            # the experiment opens in the training-runs view (genattr tags it custom_model_development)
            _wait_for(driver, lambda d: "Training runs" in d.page_source and "sweep-ui" in d.page_source, 90, "runs")
            for close in driver.find_elements(By.CSS_SELECTOR, 'button[aria-label="Close"]'):
                close.click()  # side panels would cover the table
            # the children are nested under the parent: not rows until the parent is expanded
            assert "lorax-s0" not in driver.page_source
            expand = driver.find_elements(By.CSS_SELECTOR, "div.ag-row button[data-component-type='button']")
            _wait_for(driver, lambda d: expand, 10, "the parent's expander")[0].click()
            _wait_for(
                driver,
                lambda d: all(f"{m}-s{s}" in d.page_source for m in ("lorax", "replay") for s in (0, 1)),
                30,
                "the four child runs",
            )
            # add the metric columns through the table's column picker
            driver.find_element(By.XPATH, "//*[contains(text(), 'Show more')]").click()
            group = _wait_for(
                driver,
                lambda d: d.find_elements(By.XPATH, "//*[starts-with(text(), 'Metrics (')]"),
                10,
                "the Metrics column group",
            )
            group[0].click()
            driver.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
            headers = _wait_for(
                driver,
                lambda d: [h.text for h in d.find_elements(By.CSS_SELECTOR, ".ag-header-cell") if "final/aa" in h.text],
                15,
                "the final/aa column",
            )
            assert headers
            cells = _wait_for(
                driver,
                lambda d: [
                    c.text
                    for c in d.find_elements(By.CSS_SELECTOR, ".ag-cell")
                    if c.text in ("70.25", "71.25", "61.5", "62.5")
                ],
                15,
                "metric values",
            )
            assert sorted(cells) == ["61.5", "62.5", "70.25", "71.25"]
            shot = tmp_path / "mlflow_ui.png"
            driver.save_screenshot(str(shot))
            assert shot.stat().st_size > 20_000  # a rendered page, not a blank one
            if os.environ.get("GENATTR_SCREENSHOTS"):
                shutil.copy(shot, Path(os.environ["GENATTR_SCREENSHOTS"]) / shot.name)
    finally:
        driver.quit()
