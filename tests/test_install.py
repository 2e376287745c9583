"""`pip install .` into a fresh virtual environment that already has torch: the runtime install.

It must bring no JupyterLab (that is a dev extra) and `import bigmodel_nb.core` must work. This builds a
real venv and installs from the package index, so it takes a minute or two.
"""
import subprocess
import sys

import pytest
import torch

from conftest import ROOT


@pytest.fixture(scope="module")
def runtime_venv(tmp_path_factory):
    venv = tmp_path_factory.mktemp("runtime") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    torch_req = "torch==" + torch.__version__.split("+")[0]
    subprocess.run([str(py), "-m", "pip", "install", "-q", torch_req], check=True)
    res = subprocess.run([str(py), "-m", "pip", "install", "-q", str(ROOT)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    return venv


def test_runtime_install_has_no_jupyterlab(runtime_venv):
    py = runtime_venv / "bin" / "python"
    res = subprocess.run([str(py), "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True, check=True)
    names = {line.split("==")[0].lower() for line in res.stdout.splitlines()}
    assert "bigmodel_nb" in names or "bigmodel-nb" in names
    assert not names & {"jupyterlab", "notebook", "nbdev", "pytest", "playwright", "python-fasthtml"}, names
    check = subprocess.run([str(py), "-m", "pip", "check"], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout


def test_runtime_install_imports_and_runs(runtime_venv):
    py = runtime_venv / "bin" / "python"
    res = subprocess.run([str(py), "-c", "import bigmodel_nb.core as c; print(c.get_device('cpu'))"],
                         capture_output=True, text=True, cwd="/")
    assert res.returncode == 0 and res.stdout.strip() == "cpu", res.stderr
    res = subprocess.run([str(runtime_venv / "bin" / "bigmodel-nb"), "env"], capture_output=True, text=True, cwd="/")
    assert res.returncode == 0 and "torch" in res.stdout, res.stderr


def test_the_colab_install_cell_installs_on_a_clean_environment(tmp_path):
    "The command every notebook runs on Colab, against a local clone in place of the repository URL (GitHub is out of reach here)."
    import json, re, shutil
    if shutil.which("git") is None or not (ROOT / ".git").exists(): pytest.skip("needs git and a git checkout")
    cell = "".join(json.loads((ROOT / "nbs" / "course" / "04_learning_rate_and_batch_size.ipynb").read_text())["cells"][0]["source"])
    command = re.search(r"%pip (install .*)", cell).group(1)
    url = re.search(r"git\+(\S+?)@(\w+)\"", command)
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    local = command.replace(url.group(1), ROOT.as_uri()).replace("@" + url.group(2) + '"', f'@{head}"')   # this commit, for the branch
    venv = tmp_path / "colab"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "-U", "pip"], check=True)     # Colab's is current; pip 23.2 misreads `name @ git+file:`
    subprocess.run([str(py), "-m", "pip", "install", "-q", "torch==" + torch.__version__.split("+")[0]], check=True)   # Colab has torch
    args = [a.strip('"') for a in re.findall(r'"[^"]*"|\S+', local.removeprefix("install "))]
    res = subprocess.run([str(py), "-m", "pip", "install", *args], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    res = subprocess.run([str(py), "-c", "import bigmodel_nb.dashboard as d; print(d.Dashboard.__name__)"], capture_output=True, text=True, cwd="/")
    assert res.returncode == 0 and res.stdout.strip() == "Dashboard", res.stderr[-2000:]
