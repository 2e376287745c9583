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
