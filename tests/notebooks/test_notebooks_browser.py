"""The playground and the effect explorer in a real browser: JupyterLab on 127.0.0.1 with a token,
headless Chromium (Debian's ``chromium`` and ``chromium-driver``, installed by ``.ci/run``) driven by
selenium. Opens 05_playground and 01_effects for the test run, runs all cells, clicks Generate,
and checks that unsteered and steered texts appear and differ. Screenshots go to the test's temp
folder. Slow: runs after test_notebooks.py, which leaves the test run's files behind (made here
when missing)."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from saets_utils.config import REPO_ROOT, load_config

pytestmark = [pytest.mark.slow, pytest.mark.browser]
PARAMS = "params/test.yaml"
LAB_START_S = 240  # JupyterLab's first start builds its settings; minutes on a loaded machine
CHROME_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1800",
)

if shutil.which("chromedriver") is None or shutil.which("chromium") is None:
    pytest.skip("needs Debian's chromium and chromium-driver (.ci/run installs them)", allow_module_level=True)


@pytest.fixture(scope="module")
def run():
    cfg = load_config(PARAMS)
    if not all((cfg.results_dir / f).is_file() for f in ("effects.safetensors", "approximator.safetensors")):
        from saets_utils.report.pipeline import run_pipeline

        run_pipeline(PARAMS, steps=["01_effects", "02_train"], timeout_s=1200)
    return cfg


def _notebook_copy(name: str, folder: Path, skip: str | None = None) -> Path:
    """``notebooks/<name>.ipynb`` with ``params_file`` set to the test run, without the code cells
    that contain ``skip``."""
    nb = json.loads((REPO_ROOT / "notebooks" / f"{name}.ipynb").read_text())
    nb["cells"] = [c for c in nb["cells"] if not (skip and skip in "".join(c["source"]))]
    for cell in nb["cells"]:
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            src = "".join(cell["source"])
            cell["source"] = re.sub(r"^params_file = .*$", f'params_file = "{PARAMS}"', src, flags=re.M)
    path = folder / f"{name}.ipynb"
    path.write_text(json.dumps(nb))
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def lab(run, tmp_path_factory) -> Iterator[tuple[str, str, Path]]:
    """A JupyterLab server on 127.0.0.1 serving copies of 01 and 05: (base url, token, folder)."""
    folder = tmp_path_factory.mktemp("lab")
    _notebook_copy("05_playground", folder)
    # 01 for its explorer: the measuring cell is left out (test_notebooks.py runs it; here it would
    # only resume a finished run)
    _notebook_copy("01_effects", folder, skip="= run_effects(")  # not load_run_effects(
    token, port = secrets.token_hex(16), _free_port()
    home = folder / ".jupyter"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
        "JUPYTER_CONFIG_DIR": str(home / "config"),
        "JUPYTER_DATA_DIR": str(home / "data"),
        "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
        "JUPYTERLAB_SETTINGS_DIR": str(home / "settings"),
        "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces"),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
    }
    cmd = [
        sys.executable,
        "-m",
        "jupyter",
        "lab",
        "--no-browser",
        "--allow-root",
        "--ip=127.0.0.1",
        f"--port={port}",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={folder}",
        "--LabApp.expose_app_in_browser=True",
        "--LabApp.news_url=None",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
    ]
    log = (folder / "lab.log").open("w")
    proc = subprocess.Popen(cmd, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + LAB_START_S
        while True:
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=10)
                break
            except OSError:
                assert proc.poll() is None, f"JupyterLab exited: {(folder / 'lab.log').read_text()}"
                if time.monotonic() > deadline:
                    pytest.fail(f"JupyterLab did not answer within {LAB_START_S} s: {(folder / 'lab.log').read_text()}")
                time.sleep(0.5)
        yield base, token, folder
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium") or ""
    for flag in CHROME_FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium')}")
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver") or ""), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


def _panel(name: str) -> str:
    """JavaScript that binds ``p`` to the open notebook panel of ``name`` (or returns null)."""
    return f"""const app = window.jupyterapp; if (!app) return null;
        const p = Array.from(app.shell.widgets('main')).find(
            w => w.context && w.context.path.endsWith('{name}.ipynb'));
        if (!p) return null;"""


NOTEBOOKS = ("05_playground", "01_effects")
KERNEL = "const k = p.sessionContext.session && p.sessionContext.session.kernel; return k ? k.status : null;"
# every code cell ran, or one raised (run-all stops there); and the kernel is idle again
DONE = """const code = p.content.widgets.filter(c => c.model.type === 'code');
    const ran = code.every(c => c.model.executionCount !== null);
    const raised = code.some(c => Array.from({length: c.model.outputs.length},
        (_, i) => c.model.outputs.get(i).type).includes('error'));
    return (ran || raised) && p.sessionContext.session.kernel.status === 'idle';"""
ERRORS = """const errs = [];
    for (const c of p.content.widgets) {
        if (c.model.type !== 'code') continue;
        for (let i = 0; i < c.model.outputs.length; i++) {
            const o = c.model.outputs.get(i).toJSON();
            if (o.output_type === 'error') errs.push(o.ename + ': ' + o.evalue);
        }
    }
    return errs;"""


@pytest.fixture(scope="module")
def running(lab, browser):
    """Both notebooks open in one JupyterLab page and running all their cells at once (two
    kernels: the two model loads overlap instead of adding up)."""
    from selenium.webdriver.support.ui import WebDriverWait

    base, token, _ = lab
    browser.get(f"{base}/lab/tree/{NOTEBOOKS[0]}.ipynb?token={token}")
    wait = WebDriverWait(browser, 120, poll_frequency=0.5)
    for i, name in enumerate(NOTEBOOKS):
        if i:
            browser.execute_script(f"window.jupyterapp.commands.execute('docmanager:open', {{path: '{name}.ipynb'}});")
        wait.until(lambda d, name=name: d.execute_script(_panel(name) + KERNEL) == "idle")
        browser.execute_script(
            _panel(name) + "app.shell.activateById(p.id); app.commands.execute('notebook:run-all-cells'); return 1;"
        )
        # run-all started in this notebook before the next one opens
        wait.until(lambda d, name=name: d.execute_script(_panel(name) + KERNEL) == "busy")
    return browser


def _finish(driver, name: str, timeout: float = 300) -> None:
    """Show ``name``'s tab, wait until its cells finished and check that none raised."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.execute_script(_panel(name) + "app.shell.activateById(p.id); return 1;")
    WebDriverWait(driver, timeout, poll_frequency=0.5).until(lambda d: d.execute_script(_panel(name) + DONE))
    errors = driver.execute_script(_panel(name) + ERRORS)
    assert not errors, f"{name} raised in the browser: {errors}"


def test_playground_generates_in_the_browser(running, tmp_path):
    try:
        _drive_playground(running)
    finally:
        running.save_screenshot(str(tmp_path / "playground.png"))


def _drive_playground(browser) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    _finish(browser, "05_playground")
    button = WebDriverWait(browser, 60).until(
        lambda d: next((b for b in d.find_elements(By.TAG_NAME, "button") if b.text == "Generate"), None)
    )
    tokens = browser.find_element(By.XPATH, "//label[normalize-space()='new tokens']/following-sibling::input")
    tokens.send_keys(Keys.CONTROL, "a")
    tokens.send_keys("8", Keys.ENTER)  # fewer tokens than the default 24: the test checks the page, not the model
    button.click()
    # the button is disabled while the kernel generates (or generation already finished: the status
    # names the steered prompt only after a generation); texts stream into the two columns
    WebDriverWait(browser, 60, poll_frequency=0.1).until(lambda d: not button.is_enabled() or _status(d))

    def texts(d):
        cells = d.find_elements(By.CSS_SELECTOR, ".saets-samples pre")
        return [c.text for c in cells]

    WebDriverWait(browser, 180, poll_frequency=0.5).until(lambda d: button.is_enabled() and _status(d))
    cells = texts(browser)
    unsteered, steered = cells[0::2], cells[1::2]
    assert len(unsteered) == len(steered) == 3
    assert all(t.strip() for t in unsteered + steered)
    assert unsteered != steered
    # labels from the feature dashboards next to the measured features
    assert "label" in browser.find_element(By.TAG_NAME, "body").text


def _status(driver) -> str:
    from selenium.webdriver.common.by import By

    return " ".join(
        e.text for e in driver.find_elements(By.CSS_SELECTOR, ".widget-html-content") if "steered prompt" in e.text
    )


def test_effect_explorer_in_the_browser(running, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser = running
    try:
        _finish(browser, "01_effects")
        body = WebDriverWait(browser, 60).until(
            lambda d: d.find_element(By.TAG_NAME, "body") if "raised / lowered features" in d.page_source else None
        )
        browser.execute_script(
            "const t = Array.from(document.querySelectorAll('b')).find(e => e.textContent.includes('raised / lowered'));"
            "if (t) t.scrollIntoView();"
        )
    finally:
        browser.save_screenshot(str(tmp_path / "explorer.png"))
    text = body.text
    assert "vector 0" in text and "calibration:" in text and "steered samples" in text
