"""`bigmodel-nb pretrain` end to end, in-process through `main([...])`: a new small BERT (and one with NSP) pretrained on a
few hundred real sentences for a few steps, then fine-tuned with `finetune --model OUT`; the mistakes it must refuse."""
import contextlib
import io
import json

import pytest
import torch

from bigmodel_nb import cli
from bigmodel_nb.assets import load_sample
from conftest import run_main

TINY = ["--config", "small", "--hidden", "32", "--layers", "1", "--vocab-size", "500", "--max-length", "64",
        "--batch-size", "16", "--no-progress"]   # a one-layer BERT of width 32: seconds on a CPU


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    "300 real movie-review sentences: one per line in a .txt, and 60 of them with their labels in a .csv."
    folder = tmp_path_factory.mktemp("pretrain-data")
    df = load_sample("movie_reviews").sample(300, random_state=3)
    (folder / "reviews.txt").write_text("\n".join(df.text) + "\n")
    df.head(60)[["text", "label"]].to_csv(folder / "labelled.csv", index=False)
    df.head(20).rename(columns={"text": "review"})[["review", "label"]].to_csv(folder / "renamed.csv", index=False)
    plays = load_sample("shakespeare").text[:6]      # six documents of 40 lines, separated by blank lines: pairs for --nsp
    (folder / "plays.txt").write_text("\n\n".join("\n".join(t.splitlines()[300:340]) for t in plays) + "\n")
    return folder


@pytest.fixture(scope="module")
def pretrained(corpus, tmp_path_factory):
    "A finished `pretrain --max-steps 20` run of a new small BERT on the .txt: (folder, run.json, stdout)."
    out = tmp_path_factory.mktemp("pretrain-run") / "pre"
    stdout, stderr = io.StringIO(), io.StringIO()            # (capsys is for one test; this fixture serves the module)
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = cli.main(["pretrain", "--data", str(corpus / "reviews.txt"), *TINY, "--max-steps", "20", "--lr", "3e-3", "--out", str(out)])
    assert code == 0, stderr.getvalue()[-3000:]
    return out, json.loads((out / "run.json").read_text()), stdout.getvalue()


def test_pretrain_writes_a_model_folder_and_the_loss_falls(pretrained):
    out, run, stdout = pretrained
    assert run["kind"] == "pretrain" and run["status"] == "done" and run["settings"]["config"] == "small"
    m = run["metrics"]
    assert m["task"] == "masked_lm" and m["steps"] == 20 and m["n_train"] == 285 and m["n_valid"] == 15
    assert m["train_loss"] < m["first_train_loss"] - 0.1, m                  # 20 steps at 3e-3 learn the token frequencies at least
    assert m["valid_perplexity"] > 1 and abs(m["valid_perplexity"] - torch.tensor(m["valid_loss"]).exp().item()) < 1e-3 * m["valid_perplexity"]
    assert {"config.json", "model.safetensors", "tokenizer.json", "run.json", "history.csv"} <= {p.name for p in out.iterdir()}
    assert not (out / "checkpoint").exists() and "valid_perplexity" in (out / "history.csv").read_text()
    assert "pretrained 20 steps" in stdout and f"finetune --model {out}" in stdout


def test_finetune_starts_from_the_pretrained_weights(pretrained, corpus, tmp_path, capsys):
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig, BertForSequenceClassification
    pre, _, _ = pretrained
    out = tmp_path / "ft"
    code, stdout, err = run_main(capsys, "finetune", "--model", pre, "--data", corpus / "labelled.csv", "--epochs", "1", "--batch-size", "32",
                                 "--max-length", "64", "--valid-pct", "0.1", "--test-pct", "0.1", "--out", out, "--no-progress", "--json")
    assert code == 0, err[-3000:]
    assert "no pooler" in err and "start random" not in err                 # a note, not a warning that the body is random
    assert AutoTokenizer.from_pretrained(out).get_vocab() == AutoTokenizer.from_pretrained(pre).get_vocab()
    key = "bert.embeddings.word_embeddings.weight"
    before, after = load_file(str(pre / "model.safetensors"))[key], AutoModelForSequenceClassification.from_pretrained(out).state_dict()[key]
    torch.manual_seed(0)
    fresh = BertForSequenceClassification(BertConfig.from_pretrained(pre)).state_dict()[key]
    assert before.shape == after.shape == fresh.shape == (500, 32)
    moved, apart = (after - before).abs().max().item(), (fresh - before).abs().mean().item()
    assert moved < 0.01 < apart, (moved, apart)                               # two steps at lr 1e-4 barely move the embeddings
    assert json.loads(stdout.strip().splitlines()[-1])["steps"] == 2


def test_overwrite_replaces_only_a_pretrain_run(pretrained, corpus, tmp_path, capsys):
    pre, run, _ = pretrained
    args = ["pretrain", "--data", corpus / "reviews.txt", *TINY, "--max-steps", "2", "--valid-pct", "0"]
    code, _, err = run_main(capsys, *args, "--out", pre)
    assert code == 2 and "already holds files" in err and "--overwrite" in err
    assert json.loads((pre / "run.json").read_text()) == run                 # untouched
    other = tmp_path / "other"; other.mkdir(); (other / "notes.txt").write_text("mine")
    code, _, err = run_main(capsys, *args, "--out", other, "--overwrite")
    assert code == 2 and "holds no pretrain run.json" in err and (other / "notes.txt").read_text() == "mine"
    again = tmp_path / "again"
    assert run_main(capsys, *args, "--out", again)[0] == 0
    (again / "extra.txt").write_text("left by the first run")
    code, _, err = run_main(capsys, *args, "--out", again, "--overwrite")
    assert code == 0, err[-2000:]
    assert not (again / "extra.txt").exists() and json.loads((again / "run.json").read_text())["metrics"]["n_valid"] == 0


def test_nsp_writes_a_folder_that_a_classifier_loads(corpus, tmp_path, capsys):
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification
    out = tmp_path / "nsp"
    code, stdout, err = run_main(capsys, "pretrain", "--data", corpus / "plays.txt", "--nsp", *TINY, "--max-steps", "5", "--out", out, "--json")
    assert code == 0, err[-3000:]
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["task"] == "pretraining" and result["steps"] == 5 and result["n_valid"] > 0 and "valid_perplexity" in result
    model = AutoModelForSequenceClassification.from_pretrained(out)
    saved = load_file(str(out / "model.safetensors"))
    assert torch.equal(model.bert.pooler.dense.weight, saved["bert.pooler.dense.weight"])   # NSP trains the pooler: it is kept
    assert torch.equal(model.bert.embeddings.word_embeddings.weight, saved["bert.embeddings.word_embeddings.weight"])


def test_model_continues_pretraining_with_a_new_head(tiny_bert_dir, corpus, tmp_path, capsys):
    out = tmp_path / "more"
    code, _, err = run_main(capsys, "pretrain", "--data", corpus / "reviews.txt", "--model", tiny_bert_dir, "--max-length", "32",
                            "--batch-size", "16", "--max-steps", "2", "--valid-pct", "0", "--out", out, "--no-progress")
    assert code == 0, err[-3000:]
    assert "has no pretraining head" in err and "cls.predictions.transform.dense" in err
    from transformers import AutoModelForMaskedLM
    assert AutoModelForMaskedLM.from_pretrained(out).config.vocab_size == 30522           # MiniLM's tokenizer, kept


@pytest.mark.parametrize("what", ["neither", "both", "missing column", "shape with --model", "one-line documents", "model as data"])
def test_bad_input_exits_2_with_a_message(what, corpus, tiny_bert_dir, tmp_path, capsys):
    out = tmp_path / "never"
    data = ["--data", corpus / "reviews.txt"]
    argv = {
        "neither": [*data],
        "both": [*data, "--config", "small", "--model", tiny_bert_dir],
        "missing column": ["--data", corpus / "renamed.csv", "--config", "small"],
        "shape with --model": [*data, "--model", tiny_bert_dir, "--hidden", "64"],
        "one-line documents": [*data, "--config", "small", "--nsp"],
        "model as data": ["--data", "minilm", "--config", "small"],
    }[what]
    code, stdout, err = run_main(capsys, "pretrain", *argv, "--out", out)
    assert code == 2 and "Traceback" not in err and stdout == "" and not out.exists(), err
    message = err.strip().splitlines()[-1]
    assert message.startswith("bigmodel-nb pretrain: error: ")
    expected = {
        "neither": ["--config small", "--model", "not neither"],
        "both": ["not both"],
        "missing column": [str(corpus / "renamed.csv"), "no column 'text'", "'review', 'label'", "--text-column"],
        "shape with --model": ["--hidden", "--config small"],
        "one-line documents": ["--nsp", "blank lines", "leave out --nsp"],
        "model as data": ["model asset", "--model minilm"],
    }[what]
    assert all(e in message for e in expected), message
