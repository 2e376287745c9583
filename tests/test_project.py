"The project's shape: README in step with its notebook, CI calling README's test command, notebooks ready for Colab."
import json
import os
import re
import subprocess
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import make_readme  # noqa: E402
import colab  # noqa: E402


def quick_start_commands():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.*?)\n```", section, flags=re.S)


def test_readme_is_built_from_index_notebook():
    res = subprocess.run([sys.executable, str(ROOT / "tools" / "make_readme.py"), "--check"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_readme_check_fails_when_stale(tmp_path, monkeypatch):
    stale = tmp_path / "README.md"
    stale.write_text((ROOT / "README.md").read_text().replace("A short tour", "A longer tour"))
    monkeypatch.setattr(make_readme, "README", stale)
    assert make_readme.main(["--check"]) == 1
    assert make_readme.main([]) == 0 and make_readme.main(["--check"]) == 0


def test_readme_builder_honours_directives():
    nb = {"cells": [
        {"cell_type": "markdown", "source": ["# Title"]},
        {"cell_type": "code", "source": ["#| hide\n", "secret = 1"], "outputs": [{"output_type": "stream", "name": "stdout", "text": "hidden"}]},
        {"cell_type": "code", "source": ["#| echo: false\n", "quiet = 2"], "outputs": [{"output_type": "stream", "name": "stdout", "text": "shown output"}]},
        {"cell_type": "code", "source": ["#| output: false\n", "x = 3"], "outputs": [{"output_type": "stream", "name": "stdout", "text": "dropped output"}]},
        {"cell_type": "code", "source": ["y = 4"], "outputs": [{"output_type": "execute_result", "data": {"text/plain": "4"}}]},
    ]}
    text = make_readme.build(nb)
    assert "secret" not in text and "hidden" not in text
    assert "quiet" not in text and "shown output" in text
    assert "x = 3" in text and "dropped output" not in text
    assert "y = 4" in text and "```\n4\n```" in text
    assert "#|" not in text


def test_quick_start_is_two_commands_and_ci_runs_the_test_one():
    cmds = quick_start_commands()
    assert len(cmds) == 2, cmds
    setup_and_run, setup_and_test = cmds
    assert "bigmodel-nb" in setup_and_run and "[dev]" not in setup_and_run
    test_cmd = setup_and_test.split('".[dev]" && ', 1)[1]
    assert test_cmd == "OMP_NUM_THREADS=1 nbdev_test && pytest tests/"
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_cmd in ci, "CI must call exactly README's test command"
    after = ci[ci.index(test_cmd) + 1]
    assert after.startswith("[ $? -eq 0 ] || ") and "exit 1" in after, "CI must fail when the test command fails: `set -e` ignores a failure inside `a && b`"
    install = setup_and_test.split(" && " + test_cmd)[0].split(" && ", 2)[2]
    assert install in ci, "CI must install the way README says"


def test_settings_and_setup():
    ini = (ROOT / "settings.ini").read_text()
    reqs = re.search(r"^requirements = (.*)$", ini, flags=re.M).group(1).split()
    names = {re.split(r"[<>=!~ ]", r)[0].lower() for r in reqs}
    for needed in ["torch", "transformers", "accelerate", "scikit-learn", "matplotlib", "ipywidgets", "numpy", "pandas", "safetensors", "tqdm"]:
        assert needed in names, needed
    assert not names & {"jupyterlab", "nbdev", "pytest", "playwright", "fastcore", "fastprogress"}
    assert all("==" not in r for r in reqs), "runtime requirements are floors, never pins"
    floors = {re.split(r"[<>=!~ ]", r)[0].lower(): r for r in reqs}
    from packaging.requirements import Requirement
    assert not Requirement(floors["torch"]).specifier.contains("2.4.1"), "the Learner needs torch >= 2.5 (torch.OutOfMemoryError, fused AdamW on the CPU)"
    assert re.search(r"^min_python = 3\.1\d$", ini, flags=re.M), "the quick start's torch needs Python >= 3.10"
    assert not Requirement(floors["transformers"]).specifier.contains("5.5.4"), "transformers < 5.6 saves LayerNorm weights a checkpoint cannot load"
    assert all(re.fullmatch(r"[A-Za-z0-9_.\-]+(>=[0-9.]+)?", r) for r in reqs), "plain `name>=X` floors, so .ci/floors can install each at X"
    assert os.access(ROOT / ".ci" / "floors", os.X_OK)
    dev = re.search(r"^dev_requirements = (.*)$", ini, flags=re.M).group(1).split()
    assert {"nbdev==2.4.14", "fastcore<2", "execnb<0.2"} <= set(dev)
    assert set(re.search(r"^tst_flags = (.*)$", ini, flags=re.M).group(1).split()) >= {"slow", "cuda", "browser"}
    assert "pkg_resources" not in (ROOT / "setup.py").read_text().replace("imports `pkg_resources`", "")
    meta = subprocess.run([sys.executable, "setup.py", "--license", "--classifiers"], capture_output=True, text=True, cwd=ROOT).stdout
    assert meta.splitlines()[0] == "Apache-2.0" and "License ::" not in meta       # an SPDX identifier, not the deprecated classifier


def test_every_notebook_installs_itself_on_colab():
    nbs = [p for p in (ROOT / "nbs").rglob("*.ipynb") if not any(part.startswith((".", "_")) for part in p.relative_to(ROOT / "nbs").parts)]
    assert nbs
    for p in nbs:
        code = [c for c in json.loads(p.read_text())["cells"] if c["cell_type"] == "code"]
        first = code[1] if "default_exp" in "".join(code[0]["source"]) else code[0]
        src = "".join(first["source"])
        assert "google.colab" in src and "pip install" in src, f"{p.name}: the first code cell must install the package on Colab"
        known = {k.removesuffix("_requirements") for k in colab.settings() if k.endswith("_requirements") and k != "dev_requirements"}
        asked = re.search(r'bigmodel_nb(?:\[([a-z,]+)\])? @', src)
        extras = asked.group(1).split(",") if asked and asked.group(1) else []
        assert asked and set(extras) <= known, f"{p.name}: extras {extras} are not all in settings.ini ({sorted(known)})"
        assert colab.install_command(f"[{','.join(extras)}]" if extras else "") in src, f"{p.name}: run python tools/colab.py"


def test_every_notebook_frees_its_namespace_under_nbdev_test():
    """nbdev_test runs notebook after notebook in each worker process, and IPython keeps every finished shell (and so
    every model a notebook loaded) alive until the process ends: each notebook's last cell clears its namespace
    when IN_TEST is set, so a worker's memory stays that of its largest notebook, not the sum."""
    nbs = [p for p in (ROOT / "nbs").rglob("*.ipynb") if p.name != "index.ipynb"
           and not any(part.startswith((".", "_")) for part in p.relative_to(ROOT / "nbs").parts)]
    for p in nbs:
        last = "".join([c for c in json.loads(p.read_text())["cells"] if c["cell_type"] == "code"][-1]["source"])
        assert last.startswith("#| hide") and 'if os.environ.get("IN_TEST"): get_ipython().run_line_magic("reset", "-f")' in last, (
            f"{p.name}: end the notebook with a hidden cell that runs `%reset -f` under nbdev_test (copy the last cell of nbs/00_core.ipynb)")


def test_colab_cells_and_badges_follow_settings_ini():
    cfg = colab.settings()
    assert colab.stale() == [], "run python tools/colab.py"
    lessons = sorted((ROOT / "nbs" / "course").glob("*.ipynb"))
    readme = (ROOT / "README.md").read_text()
    for p in lessons:
        title = "".join(next(c for c in json.loads(p.read_text())["cells"] if c["cell_type"] == "markdown")["source"])
        url = f"https://colab.research.google.com/github/{cfg['git_url'].split('github.com/')[1]}/blob/{cfg['branch']}/nbs/course/{p.name}"
        assert url in title and url in readme, p.name
    for path in re.findall(r"colab\.research\.google\.com/github/[^/]+/[^/]+/blob/[^/]+/([^)\s]+)", readme):
        assert (ROOT / path).is_file(), f"README links to {path}, which does not exist"
    moved = {**cfg, "git_url": "https://github.com/someone-else/fork", "branch": "dev"}     # publishing elsewhere: one line
    assert len(colab.stale(moved)) == len(colab.notebooks())
    assert colab.install_command(cfg=moved) == '%pip install -q "bigmodel_nb @ git+https://github.com/someone-else/fork@dev"'


def test_exported_modules_are_marked_generated():
    for p in (ROOT / "bigmodel_nb").glob("*.py"):
        if p.name in ("__init__.py", "_modidx.py"): continue
        assert "# AUTOGENERATED! DO NOT EDIT!" in "".join(p.read_text().splitlines(True)[:4]), p
