"""`bigmodel-nb finetune --adapter`, and the adapter folder it writes used by `predict`, `evaluate` and `export --merge`,
on a small real BERT and real movie reviews. A run stopped by Ctrl-C and resumed ends where an unbroken run ends."""
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from bigmodel_nb import cli
from bigmodel_nb.assets import load_sample
from conftest import interrupt_after_first_epoch

peft = pytest.importorskip("peft")
ENV = {**os.environ, "BIGMODEL_NB_DEVICE": "cpu", "TOKENIZERS_PARALLELISM": "false"}
FAST = ["--lr", "5e-3", "--batch-size", "16", "--max-length", "32"]


@pytest.fixture(scope="module")
def reviews_csv(tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapter-data")
    path = folder / "reviews.csv"
    load_sample("movie_reviews").sample(120, random_state=3).to_csv(path, index=False)
    return path


def _run(*args):
    "`main` in this process, its stdout and stderr caught (module fixtures cannot use capsys): (exit code, stdout, stderr)."
    import contextlib, io
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def lora_out(tiny_bert_dir, reviews_csv, tmp_path_factory):
    "A finished `finetune --adapter lora --lora-r 4` run: (its folder, its JSON result, its stderr)."
    out = tmp_path_factory.mktemp("adapter-run") / "run"
    code, stdout, err = _run("finetune", "--data", reviews_csv, "--model", tiny_bert_dir, *FAST, "--epochs", "2",
                             "--adapter", "lora", "--lora-r", "4", "--out", out, "--json")
    assert code == 0, err[-3000:]
    return out, json.loads(stdout.strip().splitlines()[-1]), err


def test_finetune_with_an_adapter_saves_the_adapter_only(lora_out, tiny_bert_dir):
    out, result, err = lora_out
    assert result["adapter"] == "lora" and 0 < result["trainable_params"] < 0.1 * 4_000_000
    assert "adapter: lora (rank 4)" in err and "weights train" in err
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "adapter_head.json", "run.json", "history.csv"} <= names
    assert "model.safetensors" not in names and "checkpoint" not in names
    head = json.loads((out / "adapter_head.json").read_text())
    assert head["base_model"] == str(Path(tiny_bert_dir).resolve()) and head["method"] == "lora"
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    assert result["adapter_bytes"] == (out / "adapter_model.safetensors").stat().st_size
    assert cli.read_run(out)["settings"]["adapter"] == "lora"


def test_predict_and_evaluate_load_the_adapter_on_its_base(lora_out, reviews_csv):
    out, result, _ = lora_out
    code, stdout, err = _run("evaluate", "--model", out, "--json", "--no-baselines")
    assert code == 0, err[-2000:]
    ev = json.loads(stdout.strip().splitlines()[-1])
    assert ev["n_test"] == result["n_test"] and ev["accuracy"] == pytest.approx(result["accuracy"], abs=1e-9)
    assert ev["loss"] == pytest.approx(result["loss"], rel=1e-5)
    texts = ["a tender, funny film", "dull and far too long"]
    code, stdout, err = _run("predict", "--model", out, *texts)
    assert code == 0, err[-2000:]
    answers = [json.loads(l) for l in stdout.strip().splitlines()]
    from bigmodel_nb.predict import Predictor
    pred = Predictor.from_pretrained(out, device="cpu", max_length=32)
    for a, b in zip(answers, pred.predict(texts)):
        assert a["label"] == b["label"] and a["probs"] == pytest.approx(b["probs"], abs=1e-6)


def test_export_merge_writes_a_plain_model_that_predicts_the_same(lora_out, tmp_path):
    out, _, _ = lora_out
    code, _, err = _run("export", "--model", out, "--out", tmp_path / "plain")
    assert code == 2 and "--merge" in err
    code, stdout, err = _run("export", "--model", out, "--out", tmp_path / "plain", "--merge", "--json")
    assert code == 0, err[-2000:]
    info = json.loads(stdout.strip())
    assert info["merged"] and info["labels"] == ["negative", "positive"]
    names = {p.name for p in (tmp_path / "plain").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names and "adapter_config.json" not in names
    texts = ["a tender, funny film", "dull and far too long", "the plot never quite holds"]
    _, a, _ = _run("predict", "--model", out, *texts)
    _, b, _ = _run("predict", "--model", tmp_path / "plain", *texts)
    for x, y in zip(a.splitlines(), b.splitlines()):
        x, y = json.loads(x), json.loads(y)
        assert x["label"] == y["label"] and x["probs"] == pytest.approx(y["probs"], abs=1e-5)
    code, _, err = _run("export", "--model", tmp_path / "plain", "--out", tmp_path / "again", "--merge")
    assert code == 2 and "no adapter to merge" in err
    code, _, err = _run("export", "--model", tmp_path / "plain", "--out", tmp_path / "again")      # a plain copy
    assert code == 0 and (tmp_path / "again" / "model.safetensors").is_file()


def test_a_moved_base_is_named_and_base_overrides_it(lora_out, tiny_bert_dir, tmp_path):
    import shutil
    out, _, _ = lora_out
    moved = tmp_path / "adapter"
    shutil.copytree(out, moved)
    head = json.loads((moved / "adapter_head.json").read_text())
    (moved / "adapter_head.json").write_text(json.dumps(dict(head, base_model=str(tmp_path / "nowhere"))))
    code, _, err = _run("predict", "--model", moved, "a fine film")
    assert code == 2 and "nowhere" in err and "--base" in err and "Traceback" not in err
    code, stdout, err = _run("predict", "--model", moved, "--base", tiny_bert_dir, "a fine film")
    assert code == 0 and json.loads(stdout)["label"] in ("negative", "positive")


def test_adapter_flags_are_checked(tiny_bert_dir, reviews_csv, tmp_path):
    code, _, err = _run("finetune", "--data", reviews_csv, "--model", tiny_bert_dir, "--lora-r", "4", "--out", tmp_path / "a")
    assert code == 2 and "--lora-r" in err and "--adapter lora" in err
    code, _, err = _run("finetune", "--data", reviews_csv, "--model", tiny_bert_dir, "--adapter", "prefix", "--lora-r", "4", "--out", tmp_path / "b")
    assert code == 2 and "--adapter prefix" in err
    code, _, err = _run("finetune", "--adapter", "dora")
    assert code == 2 and "invalid choice" in err


def test_an_evaluate_with_other_labels_is_refused(lora_out, tmp_path):
    import pandas as pd
    out, _, _ = lora_out
    other = tmp_path / "other.csv"
    pd.DataFrame({"text": ["good", "bad", "fine", "awful"] * 5, "label": ["yes", "no", "yes", "no"] * 5}).to_csv(other, index=False)
    code, _, err = _run("evaluate", "--model", out, "--data", other)
    assert code == 2 and "adapter" in err and "labels" in err


@pytest.mark.parametrize("method", ["lora", "adalora"])
def test_ctrl_c_and_resume_end_where_an_unbroken_run_ends(tiny_bert_dir, reviews_csv, tmp_path, method):
    from safetensors.torch import load_file
    args = ["--data", reviews_csv, "--model", tiny_bert_dir, *FAST, "--epochs", "4", "--adapter", method, "--seed", "7"]
    code, stdout, err = _run("finetune", *args, "--out", tmp_path / "whole", "--json")
    assert code == 0, err[-2000:]
    whole = json.loads(stdout.strip().splitlines()[-1])
    out = tmp_path / "cut"
    returncode, _, stderr = interrupt_after_first_epoch(["bigmodel-nb", "finetune", *args, "--out", out, "--json"], out, ENV)
    assert returncode == 130, stderr[-3000:]                      # stopped in the second epoch
    assert not (out / "checkpoint" / "model.safetensors").exists() and (out / "checkpoint" / "trainable.safetensors").is_file()
    code, _, err = _run("predict", "--model", out, "a film")
    assert code == 2 and "--resume" in err
    code, stdout, err = _run("finetune", "--resume", out / "checkpoint", "--json")
    assert code == 0, err[-2000:]
    resumed = json.loads(stdout.strip().splitlines()[-1])
    assert resumed["steps"] == whole["steps"] and resumed["accuracy"] == whole["accuracy"]
    assert resumed["loss"] == pytest.approx(whole["loss"], abs=1e-6)
    a, b = load_file(str(tmp_path / "whole" / "adapter_model.safetensors")), load_file(str(out / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_adapter_without_peft_says_what_to_install(tiny_bert_dir, reviews_csv, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)                      # `import peft` now fails, as where it is not installed
    code, _, err = _run("finetune", "--data", reviews_csv, "--model", tiny_bert_dir, "--adapter", "lora", "--out", tmp_path / "run")
    assert code == 2 and 'pip install "bigmodel_nb[peft]"' in err and "Traceback" not in err


def test_an_adapter_merges_straight_into_onnx(lora_out, tmp_path):
    pytest.importorskip("onnxruntime"); pytest.importorskip("onnxscript")
    out, _, _ = lora_out
    code, stdout, err = _run("export", "--model", out, "--out", tmp_path / "onnx", "--merge", "--format", "onnx", "--json")
    assert code == 0, err[-2000:]
    assert json.loads(stdout)["merged"] and (tmp_path / "onnx" / "model.onnx").is_file()
    texts = ["a tender, funny film", "dull and far too long"]
    _, a, _ = _run("predict", "--model", out, *texts)
    _, b, _ = _run("predict", "--model", tmp_path / "onnx", *texts)
    for x, y in zip(a.splitlines(), b.splitlines()):
        assert json.loads(x)["probs"] == pytest.approx(json.loads(y)["probs"], abs=1e-5)
