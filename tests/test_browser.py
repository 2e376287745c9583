"""The dashboard in a real browser: JupyterLab on 127.0.0.1, Debian's Chromium driven by Playwright.

A notebook starts the dashboard on a small model, the test moves the learning-rate slider with the
keyboard, and asks the kernel whether the learner's learning rate changed. A screenshot of the panel is
saved to test-artifacts/dashboard.png. Needs /usr/bin/chromium (`apt-get install -y chromium`); CI installs it.
"""
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = ROOT / "test-artifacts"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


@pytest.fixture
def lab(tmp_path):
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"): pytest.fail("CI must install Chromium (apt-get install -y chromium) for the browser test")
        pytest.skip("no /usr/bin/chromium here: apt-get install -y chromium")
    pytest.importorskip("playwright")
    port, token = _free_port(), "bigmodel-nb-test-token"
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(tmp_path / "jcfg"), "JUPYTER_RUNTIME_DIR": str(tmp_path / "jrt")}
    proc = subprocess.Popen([sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
                             f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={tmp_path}", "--ServerApp.open_browser=False",
                             "--allow-root",
                             "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    url = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    while True:
        try:
            urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2); break
        except OSError:
            if proc.poll() is not None or time.monotonic() - t0 > 90:
                proc.kill(); raise AssertionError("JupyterLab did not start: " + (proc.stdout.read() if proc.stdout else ""))
            time.sleep(0.5)
    yield url, token, tmp_path
    proc.terminate()
    try: proc.wait(20)
    except subprocess.TimeoutExpired: proc.kill()


def write_notebook(folder, tiny_bert_dir):
    setup = f"""
import time
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from bigmodel_nb.assets import load_sample
from bigmodel_nb.data import TextClassificationData
from bigmodel_nb.dashboard import Dashboard
from bigmodel_nb.learner import Callback, HParams, Learner
class Slow(Callback):
    def after_step(self): time.sleep(0.05)
data = TextClassificationData.from_df(load_sample("movie_reviews").sample(200, random_state=3))
data.tokenize(AutoTokenizer.from_pretrained({str(tiny_bert_dir)!r}), max_length=48)
learn = Learner(AutoModelForSequenceClassification.from_pretrained({str(tiny_bert_dir)!r}, num_labels=2), data,
                HParams(lr=1e-4, batch_size=16, epochs=200), device="cpu", progress=False, cbs=[Slow()])
dash = Dashboard(learn, lr_range=(1e-6, 1e-2))
dash""".strip()
    cells = [setup, "dash.start()", ("import time\n_t = time.time()\n"     # changes apply at the next batch boundary: on a loaded machine, wait for it
             "while (learn.hp.pending or learn.hp.lr < 1.5e-4) and time.time() - _t < 120: time.sleep(0.2)\n"
             "print('LR=%r LOG=%s STEP=%d' % (learn.hp.lr, [str(c) for c in learn.hp.log], learn.step))")]
    nb = {"cells": [{"cell_type": "code", "execution_count": None, "id": f"c{i}", "metadata": {}, "outputs": [],
                     "source": src} for i, src in enumerate(cells)],
          "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"}},
          "nbformat": 4, "nbformat_minor": 5}
    (folder / "dash.ipynb").write_text(json.dumps(nb))


def test_dashboard_lr_slider_in_jupyterlab(lab, tiny_bert_dir):
    from playwright.sync_api import sync_playwright
    url, token, folder = lab
    write_notebook(folder, tiny_bert_dir)
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        try:
            page.goto(f"{url}/lab/tree/dash.ipynb?token={token}")
            idle = page.get_by_text(re.compile(r"\| Idle"))
            idle.first.wait_for(timeout=120_000)

            def run_cell(i):
                cell = page.locator(".jp-Notebook .jp-Cell").nth(i)
                cell.locator(".jp-InputArea-editor").click()
                page.keyboard.press("Shift+Enter")
                return cell

            first = run_cell(0)
            handle = first.locator(".noUi-handle").first
            handle.wait_for(timeout=120_000)
            page.get_by_text(re.compile(r"\| Idle")).first.wait_for(timeout=60_000)
            run_cell(1)
            page.get_by_text(re.compile(r"running · epoch")).first.wait_for(timeout=60_000)

            handle.focus()
            for _ in range(10): page.keyboard.press("ArrowRight")     # ten slider steps up: 1e-4 -> about 3e-4
            page.keyboard.press("Tab")
            page.get_by_text(re.compile(r"lr 0\.0001 → ")).first.wait_for(timeout=60_000)
            first.locator(".widget-vbox").first.screenshot(path=str(ARTIFACTS / "dashboard.png"))

            third = run_cell(2)
            out = third.locator(".jp-OutputArea-output")
            out.get_by_text(re.compile("LR=")).wait_for(timeout=150_000)
            text = out.inner_text()
        finally:
            browser.close()
    lr = float(re.search(r"LR=([0-9.e+-]+)", text).group(1))
    assert lr > 1e-4 * 1.5, text
    assert "→" in text and "dashboard" in text, text
    assert (ARTIFACTS / "dashboard.png").stat().st_size > 10_000
