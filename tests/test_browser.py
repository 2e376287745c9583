"""The dashboard in a real browser: JupyterLab on 127.0.0.1, Debian's Chromium driven by Playwright.

A notebook starts the dashboard on a small model, the test moves the learning-rate slider with the
keyboard, watches the page show progress, the plot and the change, and asks the kernel whether the
learner's learning rate changed. It runs on the usual kernel in thread mode, and on a Colab-like kernel
(tests/colab_like_kernel.py: widget messages from threads are dropped) in ticker mode; a third run shows
that the Colab-like kernel does freeze a thread-mode panel, so the second run means something.
Screenshots go to test-artifacts/. Needs /usr/bin/chromium (`apt-get install -y chromium`); CI installs it.
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
    kernels = tmp_path / "jpath" / "kernels" / "colablike"
    kernels.mkdir(parents=True)
    (kernels / "kernel.json").write_text(json.dumps({"argv": [sys.executable, str(ROOT / "tests" / "colab_like_kernel.py"), "-f", "{connection_file}"],
                                                     "display_name": "Python 3 (Colab-like widgets)", "language": "python"}))
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(tmp_path / "jcfg"), "JUPYTER_RUNTIME_DIR": str(tmp_path / "jrt"),
           "JUPYTER_PATH": str(tmp_path / "jpath") + os.pathsep + os.environ.get("JUPYTER_PATH", "")}
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


def write_notebook(folder, tiny_bert_dir, kernel="python3", mode="thread"):
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
dash = Dashboard(learn, lr_range=(1e-6, 1e-2), mode={mode!r})
dash""".strip()
    cells = [setup, "dash.start()", ("import time\n_t = time.time()\n"     # changes apply at the next batch boundary: on a loaded machine, wait for it
             "while (learn.hp.pending or learn.hp.lr < 1.5e-4) and time.time() - _t < 120: time.sleep(0.2)\n"
             "print('LR=%r LOG=%s STEP=%d' % (learn.hp.lr, [str(c) for c in learn.hp.log], learn.step))"),
             "print('STEP=%d' % learn.step)"]
    nb = {"cells": [{"cell_type": "code", "execution_count": None, "id": f"c{i}", "metadata": {}, "outputs": [],
                     "source": src} for i, src in enumerate(cells)],
          "metadata": {"kernelspec": {"display_name": kernel, "language": "python", "name": kernel}},
          "nbformat": 4, "nbformat_minor": 5}
    (folder / "dash.ipynb").write_text(json.dumps(nb))


def open_lab(pw, url, token):
    browser = pw.chromium.launch(executable_path=CHROMIUM, args=[
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"])
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(f"{url}/lab/tree/dash.ipynb?token={token}")
    page.get_by_text(re.compile(r"\| Idle")).first.wait_for(timeout=120_000)
    return browser, page


def run_cell(page, i):
    cell = page.locator(".jp-Notebook .jp-Cell").nth(i)
    cell.locator(".jp-InputArea-editor").click()
    page.keyboard.press("Shift+Enter")
    return cell


def examples_shown(page) -> int:
    m = re.search(r"running · epoch \d+/\d+ · ([\d,]+)/", page.locator(".jp-Notebook").inner_text())
    return int(m.group(1).replace(",", "")) if m else -1


@pytest.mark.parametrize("kernel,mode", [("python3", "thread"), ("colablike", "ticker")])
def test_dashboard_in_jupyterlab(lab, tiny_bert_dir, kernel, mode):
    from playwright.sync_api import sync_playwright
    url, token, folder = lab
    write_notebook(folder, tiny_bert_dir, kernel, mode)
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        browser, page = open_lab(pw, url, token)
        try:
            first = run_cell(page, 0)
            handle = first.locator(".noUi-handle").first
            handle.wait_for(timeout=120_000)
            page.get_by_text(re.compile(r"\| Idle")).first.wait_for(timeout=60_000)
            run_cell(page, 1)
            page.get_by_text(re.compile(r"running · epoch")).first.wait_for(timeout=60_000)
            seen = examples_shown(page)
            t0 = time.monotonic()
            while examples_shown(page) <= max(seen, 0) and time.monotonic() - t0 < 60: time.sleep(0.3)
            assert examples_shown(page) > max(seen, 0), "the page's progress did not move"
            plot = first.locator("img[src^='data:image/png;base64,']").first
            plot.wait_for(timeout=30_000)

            handle.focus()
            for _ in range(10): page.keyboard.press("ArrowRight")     # ten slider steps up: 1e-4 -> about 3e-4
            page.keyboard.press("Tab")
            page.get_by_text(re.compile(r"lr 0\.0001 → ")).first.wait_for(timeout=60_000)
            time.sleep(1.5)                                           # a redraw or two after the change
            first.locator(".widget-vbox").first.screenshot(path=str(ARTIFACTS / f"dashboard-{mode}.png"))

            third = run_cell(page, 2)
            out = third.locator(".jp-OutputArea-output")
            out.get_by_text(re.compile("LR=")).wait_for(timeout=150_000)
            text = out.inner_text()
        finally:
            browser.close()
    lr = float(re.search(r"LR=([0-9.e+-]+)", text).group(1))
    assert lr > 1e-4 * 1.5, text
    assert "→" in text and "dashboard" in text, text
    assert (ARTIFACTS / f"dashboard-{mode}.png").stat().st_size > 10_000


def test_colab_like_kernel_freezes_a_thread_mode_panel(lab, tiny_bert_dir):
    "The check that the Colab-like kernel means something: thread-mode updates never reach the page there."
    from playwright.sync_api import sync_playwright
    url, token, folder = lab
    write_notebook(folder, tiny_bert_dir, "colablike", "thread")
    with sync_playwright() as pw:
        browser, page = open_lab(pw, url, token)
        try:
            first = run_cell(page, 0)
            first.locator(".noUi-handle").first.wait_for(timeout=120_000)
            page.get_by_text(re.compile(r"\| Idle")).first.wait_for(timeout=60_000)
            run_cell(page, 1)
            page.get_by_text(re.compile(r"\| Idle")).first.wait_for(timeout=60_000)
            time.sleep(8)                                              # the training thread runs and sends updates all along
            shown = page.locator(".jp-Notebook").inner_text()
            probe = run_cell(page, 3)                                 # the kernel side: training did move
            probe.locator(".jp-OutputArea-output").get_by_text(re.compile("STEP=")).wait_for(timeout=150_000)
            steps = int(re.search(r"STEP=(\d+)", probe.inner_text()).group(1))
        finally:
            browser.close()
    assert steps > 5 and "running · epoch" not in shown and "ready · epoch" in shown, shown[-800:]
