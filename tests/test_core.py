"Core behaviour that a notebook cannot show: fresh processes, environment variables, the console script."
import json
import subprocess
import sys
import types

import pytest
import torch

from bigmodel_nb import core
from conftest import run_py


def test_device_env_variable_is_read_in_a_fresh_process():
    res = run_py("from bigmodel_nb.core import get_device; print(get_device())", env={"BIGMODEL_NB_DEVICE": "cpu"})
    assert res.returncode == 0 and res.stdout.strip() == "cpu"


def test_bad_device_env_variable_names_the_variable():
    res = run_py("from bigmodel_nb.core import get_device; get_device()", env={"BIGMODEL_NB_DEVICE": "warp-drive"})
    assert res.returncode != 0 and "$BIGMODEL_NB_DEVICE" in res.stderr and "warp-drive" in res.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_missing_cuda_is_a_clear_error():
    with pytest.raises(ValueError, match="no CUDA GPU"):
        core.get_device("cuda")


def test_precision_choice():
    assert core.autocast_dtype("cpu") is torch.float32
    assert core.autocast_dtype("cpu", "BF16") is torch.bfloat16
    with pytest.raises(ValueError, match="precision"):
        core.autocast_dtype("cpu", "fp8")


def test_auto_precision_trains_in_bf16_only_on_a_cpu_that_runs_it(monkeypatch):
    native = core.bf16_supported("cpu")
    assert core.autocast_dtype("cpu", training=True) is (torch.bfloat16 if native else torch.float32)
    monkeypatch.setattr(core, "bf16_supported", lambda device=None: True)
    assert core.autocast_dtype("cpu", training=True) is torch.bfloat16
    assert core.autocast_dtype("cpu") is torch.float32                        # prediction stays fp32
    assert core.autocast_dtype("cpu", "fp32", training=True) is torch.float32  # a named precision wins
    monkeypatch.setattr(core, "bf16_supported", lambda device=None: False)
    assert core.autocast_dtype("cpu", training=True) is torch.float32         # emulated bf16 would be slower
    assert "training" in core.env_report("cpu")["precision (auto)"]


def test_seeding_repeats_initial_weights():
    core.set_seed(123); a = torch.nn.Linear(8, 2).weight.detach().clone()
    core.set_seed(123); b = torch.nn.Linear(8, 2).weight.detach().clone()
    core.set_seed(124); c = torch.nn.Linear(8, 2).weight.detach().clone()
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_cache_dir_follows_env(tmp_cache):
    assert core.cache_dir("assets") == tmp_cache / "assets" and (tmp_cache / "assets").is_dir()


def test_cache_dir_unwritable_says_what_to_do(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("BIGMODEL_NB_CACHE", str(blocker))
    with pytest.raises(OSError, match="BIGMODEL_NB_CACHE"):
        core.cache_dir("x")


def test_run_context_in_a_script():
    res = run_py("from bigmodel_nb.core import run_context, in_notebook; print(run_context(), in_notebook())")
    assert res.stdout.split() == ["terminal", "False"]


def test_env_command_json():
    res = subprocess.run(["bigmodel-nb", "env", "--json"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["torch"] == torch.__version__ and report["device"] == str(core.get_device())


def test_env_command_bad_device_exits_2_without_traceback():
    res = subprocess.run(["bigmodel-nb", "env", "--device", "abacus"], capture_output=True, text=True)
    assert res.returncode == 2 and "abacus" in res.stderr and "Traceback" not in res.stderr


def test_warn_names_the_first_line_outside_the_package_even_through_decorators():
    fake = types.ModuleType("bigmodel_nb._fake")                         # code that belongs to the package
    exec("import torch\n@torch.no_grad()\ndef inner(warn): warn('from inside', DeprecationWarning)\n"
         "def outer(warn): return inner(warn)", fake.__dict__)
    with pytest.warns(DeprecationWarning) as rec:
        fake.outer(core.warn); line = sys._getframe().f_lineno
    assert [(w.filename, w.lineno) for w in rec] == [(__file__, line)]


def test_check_texts_names_blank_items_by_position_and_refuses_one_string():
    assert core.check_texts(t for t in ("a", "b")) == ["a", "b"]            # any iterable comes back as a list
    with pytest.raises(TypeError, match="queries: pass a list of texts, not one string"): core.check_texts("one", "queries")
    with pytest.raises(ValueError, match="the list is empty"): core.check_texts([])
    with pytest.raises(ValueError, match=r"the text at position 2 \(counting from 0\) is blank"): core.check_texts(["a", "b", "  "])
    with pytest.raises(ValueError, match=r"the texts at positions 0 and 3 \(counting from 0\) are blank or not a string"): core.check_texts([None, "b", "c", ""])


def test_mean_pool_is_the_average_over_real_tokens_and_checks_shapes():
    from bigmodel_nb.models import mean_pool, model_outputs
    hidden = torch.arange(12.0).reshape(2, 3, 2)
    pooled = mean_pool(hidden, torch.tensor([[1, 1, 0], [1, 1, 1]]))
    assert torch.equal(pooled, torch.tensor([[1.0, 2.0], [8.0, 9.0]]))      # (0+2)/2, (1+3)/2; (6+8+10)/3, (7+9+11)/3
    with pytest.raises(ValueError, match="same batch and length"): mean_pool(hidden, torch.ones(2, 4))
    logits = torch.zeros(1, 2)
    assert model_outputs(types.SimpleNamespace(logits=logits)) is logits and model_outputs([logits]) is logits
    with pytest.raises(TypeError, match="without logits"): model_outputs(types.SimpleNamespace(loss=1.0))
