"""ONNX export and ONNX Runtime (with its int8 quantisation), and `bigmodel-nb export --format plain|fp16|onnx|int8`: every exported
folder loads in `predict` and `evaluate` and answers as the model it came from (a small real BERT fine-tuned on real movie reviews)."""
import contextlib
import io
import json

import pytest
import torch

from bigmodel_nb import cli

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
from bigmodel_nb.compress import ONNX_FILE, OnnxClassifier, export_onnx, is_onnx_folder, load_onnx, quantize_onnx  # noqa: E402
from bigmodel_nb.predict import Predictor  # noqa: E402


def _run(*args):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def trained(finetuned_dir): return finetuned_dir


TEXTS = ["a gripping, funny film", "dull and far too long", "the cast is superb but the plot is thin", "not worth the ticket", "moving"]


def _probs(folder):
    code, stdout, err = _run("predict", "--model", folder, *TEXTS)
    assert code == 0, err[-2000:]
    return [json.loads(l) for l in stdout.strip().splitlines()]


def test_onnx_matches_pytorch_at_any_batch_and_length(trained, tmp_path):
    from bigmodel_nb.models import load_classifier
    model, tok = load_classifier(trained)
    folder = export_onnx(model, tok, tmp_path / "onnx")
    assert is_onnx_folder(folder) and {"config.json", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    onnx_model, onnx_tok = load_onnx(folder)
    assert isinstance(onnx_model, OnnxClassifier) and onnx_model.config.id2label == model.config.id2label
    model.eval()
    for texts, length in [(TEXTS[:1], 8), (TEXTS, 32), (TEXTS * 7, 20)]:              # batch 1, 5, 35; other lengths than the example
        enc = tok(texts, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
        with torch.no_grad(): want = model(**enc).logits
        assert torch.allclose(onnx_model(**enc), want, atol=1e-5)
    with pytest.raises(FileExistsError, match="already holds"):
        export_onnx(model, tok, folder)


def test_int8_is_smaller_and_close(trained, tmp_path):
    from bigmodel_nb.models import load_classifier
    model, tok = load_classifier(trained)
    fp32 = export_onnx(model, tok, tmp_path / "fp32")
    int8 = quantize_onnx(fp32, tmp_path / "int8")
    assert (int8 / ONNX_FILE).stat().st_size < (fp32 / ONNX_FILE).stat().st_size
    a = Predictor(*load_onnx(fp32)).outputs(TEXTS)
    b = Predictor(*load_onnx(int8)).outputs(TEXTS)
    assert (a - b).abs().max() < 0.1 and not torch.equal(a, b)              # int8 is an approximation, and a close one
    with pytest.raises(FileNotFoundError, match="export the model first"):
        quantize_onnx(tmp_path / "nothing", tmp_path / "x")


@pytest.mark.parametrize("fmt, tol", [("plain", 1e-6), ("fp16", 5e-3), ("onnx", 1e-5), ("int8", 0.1)])
def test_export_formats_load_in_predict_and_evaluate(trained, tmp_path, fmt, tol):
    out = tmp_path / fmt
    code, stdout, err = _run("export", "--model", trained, "--out", out, "--format", fmt, "--json")
    assert code == 0, err[-2000:]
    info = json.loads(stdout)
    assert info["format"] == fmt and info["labels"] == ["negative", "positive"] and info["weights_bytes"] > 0
    names = {p.name for p in out.iterdir()}
    assert "run.json" not in names and ("model.onnx" in names) == (fmt in ("onnx", "int8"))
    for a, b in zip(_probs(trained), _probs(out)):
        assert a["probs"] == pytest.approx(b["probs"], abs=tol)
    code, stdout, err = _run("evaluate", "--model", out, "--data", trained.parent / "reviews.csv", "--split", "all", "--json", "--no-baselines")
    assert code == 0, err[-2000:]
    code0, stdout0, _ = _run("evaluate", "--model", trained, "--data", trained.parent / "reviews.csv", "--split", "all", "--json", "--no-baselines")
    ours, theirs = json.loads(stdout.strip().splitlines()[-1]), json.loads(stdout0.strip().splitlines()[-1])
    assert ours["n_test"] == theirs["n_test"] == 200
    assert abs(ours["accuracy"] - theirs["accuracy"]) <= (0 if fmt in ("plain", "onnx") else 0.05)


def test_fp16_is_half_the_size(trained, tmp_path):
    _run("export", "--model", trained, "--out", tmp_path / "a")
    _run("export", "--model", trained, "--out", tmp_path / "b", "--format", "fp16")
    a, b = (tmp_path / "a" / "model.safetensors").stat().st_size, (tmp_path / "b" / "model.safetensors").stat().st_size
    assert 0.45 < b / a < 0.55


def test_export_refusals(trained, tmp_path, monkeypatch):
    import sys
    code, _, _ = _run("export", "--model", trained, "--out", tmp_path / "o", "--format", "onnx")
    assert code == 0
    code, _, err = _run("export", "--model", tmp_path / "o", "--out", tmp_path / "again", "--format", "int8")
    assert code == 2 and "already" in err
    code, _, err = _run("export", "--model", trained, "--out", tmp_path / "o", "--format", "onnx")
    assert code == 2 and "not empty" in err
    code, _, err = _run("export", "--model", trained, "--out", tmp_path / "z", "--format", "onnx16")
    assert code == 2 and "invalid choice" in err
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    code, _, err = _run("export", "--model", trained, "--out", tmp_path / "w", "--format", "int8")
    assert code == 2 and 'pip install "bigmodel_nb[deploy]"' in err and not (tmp_path / "w").exists()
