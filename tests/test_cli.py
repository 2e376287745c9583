"""The `bigmodel-nb` command end to end: the console script in a subprocess where the process boundary matters
(stdout that stays parseable, exit codes, a real Ctrl-C), `main([...])` in-process where it is faster."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bigmodel_nb import cli
from bigmodel_nb.assets import load_sample
from conftest import interrupt_after_first_epoch, run_main

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
TRAIN = ["--epochs", "1", "--lr", "1e-3", "--batch-size", "16", "--max-length", "32"]   # fast settings for the tiny BERT


def bigmodel_nb(*args, cwd=None, timeout=300):
    "Run the console script; the CompletedProcess (text)."
    return subprocess.run(["bigmodel-nb", *map(str, args)], capture_output=True, text=True, env=ENV, cwd=cwd, timeout=timeout)


@pytest.fixture(scope="module")
def reviews_csv(tmp_path_factory):
    "120 real movie reviews in a CSV whose columns are named `review` and `sentiment`."
    folder = tmp_path_factory.mktemp("cli-data")
    df = load_sample("movie_reviews").sample(120, random_state=2)
    path = folder / "reviews.csv"
    df.rename(columns={"text": "review", "label": "sentiment"})[["review", "sentiment"]].to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def trained(tiny_bert_dir, reviews_csv, tmp_path_factory):
    "A `bigmodel-nb finetune --json` run of the console script: (output folder, parsed JSON, the process)."
    out = tmp_path_factory.mktemp("cli-run") / "run"
    res = bigmodel_nb("finetune", "--data", reviews_csv, "--text-col", "review", "--label-col", "sentiment",
                      "--model", tiny_bert_dir, *TRAIN, "--out", out, "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    return out, json.loads(res.stdout.strip().splitlines()[-1]), res


def test_finetune_json_on_a_csv_with_custom_columns(trained):
    out, result, res = trained
    assert len(res.stdout.strip().splitlines()) == 1, res.stdout        # progress and notes went to stderr
    assert {"accuracy", "f1_macro", "loss", "n_train", "n_test", "samples_per_s", "out"} <= set(result)
    assert (result["n_train"], result["n_valid"], result["n_test"]) == (96, 12, 12) and result["split"] == "test"
    assert 0 <= result["accuracy"] <= 1 and 0 <= result["f1_macro"] <= 1 and result["samples_per_s"] > 0
    assert Path(result["out"]) == out and "epoch 1/1" in res.stderr   # the progress bar
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.label2id == {"negative": 0, "positive": 1}
    assert AutoTokenizer.from_pretrained(out)("a film")["input_ids"]
    assert {"run.json", "history.csv", "model.safetensors"} <= {p.name for p in out.iterdir()} and not (out / "checkpoint").exists()
    run = cli.read_run(out)
    assert run["status"] == "done" and run["settings"]["text_col"] == "review" and run["metrics"]["accuracy"] == result["accuracy"]


def test_the_saved_folder_fine_tunes_again_with_the_learner(trained):
    from bigmodel_nb.data import TextClassificationData
    from bigmodel_nb.learner import HParams, Learner
    from bigmodel_nb.models import load_classifier
    out, _, _ = trained
    data = TextClassificationData.from_df(load_sample("movie_reviews").sample(60, random_state=5))
    model, tok = load_classifier(out, labels=data)
    learn = Learner(model, data, HParams(epochs=1, batch_size=16), tokenizer=tok, progress=False, device="cpu")
    learn.fit()
    assert learn.step == 3 and learn.evaluate("test")["accuracy"] >= 0


def test_evaluate_scores_the_rows_finetune_held_out(trained, reviews_csv, capsys):
    out, result, _ = trained
    code, stdout, err = run_main(capsys, "evaluate", "--model", out, "--json")     # --data and its columns from run.json
    assert code == 0, err
    ev = json.loads(stdout.strip().splitlines()[-1])
    assert ev["n_test"] == result["n_test"] and ev["accuracy"] == pytest.approx(result["accuracy"])
    assert ev["f1_macro"] == pytest.approx(result["f1_macro"]) and {"loss", "samples_per_s"} <= set(ev)
    code, stdout, err = run_main(capsys, "evaluate", "--model", out, "--data", reviews_csv, "--text-col", "review",
                                 "--label-col", "sentiment", "--split", "all", "--json")
    assert code == 0, err
    assert json.loads(stdout)["n_test"] == 120 and json.loads(stdout)["split"] == "all"
    code, stdout, err = run_main(capsys, "evaluate", "--model", out)             # the human-readable table and per-class report
    assert code == 0 and "accuracy" in stdout and "evaluated 12 rows" in stdout
    per_class = {l.split()[0]: l.split()[1:] for l in stdout.splitlines() if l.strip().startswith(("negative", "positive"))}
    assert set(per_class) == {"negative", "positive"} and sum(int(v[-1]) for v in per_class.values()) == 12   # supports add up
    assert "macro avg" in stdout and "weighted avg" in stdout


def test_predict_prints_one_json_line_per_text(trained, tmp_path, capsys):
    out, _, _ = trained
    res = bigmodel_nb("predict", "--model", out, "a gripping, beautifully acted film", "a tedious mess")
    assert res.returncode == 0, res.stderr[-2000:]
    lines = [json.loads(l) for l in res.stdout.splitlines()]
    assert [l["text"] for l in lines] == ["a gripping, beautifully acted film", "a tedious mess"]
    for l in lines:
        assert l["label"] in ("negative", "positive") and set(l["probs"]) == {"negative", "positive"}
        assert sum(l["probs"].values()) == pytest.approx(1, abs=1e-4) and l["probs"][l["label"]] == max(l["probs"].values())
    (tmp_path / "texts.txt").write_text("first text\n\nsecond text\n")
    code, stdout, err = run_main(capsys, "predict", "--model", out, "--file", tmp_path / "texts.txt")
    assert code == 2 and "blank text (line 2)" in err and "--skip-blank" in err and not stdout     # a blank text has no answer
    code, stdout, err = run_main(capsys, "predict", "--model", out, "--file", tmp_path / "texts.txt", "--skip-blank")
    assert code == 0 and [json.loads(l)["text"] for l in stdout.splitlines()] == ["first text", "second text"] and "line 2" in err
    code, stdout, err = run_main(capsys, "predict", "--model", out, "a film", "  ")
    assert code == 2 and "argument 2" in err
    (tmp_path / "texts.jsonl").write_text('{"body": "one"}\n{"body": "two"}\n{"body": "three"}\n')
    code, stdout, err = run_main(capsys, "predict", "--model", out, "--file", tmp_path / "texts.jsonl", "--text-col", "body")
    assert code == 0 and len(stdout.splitlines()) == 3


def test_assets_and_env(capsys):
    code, out, _ = run_main(capsys, "assets", "list", "--json")
    names = {r["name"]: r for r in json.loads(out)}
    assert code == 0 and {"movie_reviews", "minilm"} <= set(names) and names["movie_reviews"]["kind"] == "dataset"
    code, out, _ = run_main(capsys, "assets", "list")
    assert code == 0 and "movie_reviews" in out and "sms_spam" in out
    code, out, _ = run_main(capsys, "assets", "fetch", "movie_reviews", "--json")     # cached already: no download
    assert code == 0 and Path(json.loads(out)["movie_reviews"]).is_dir()
    code, out, err = run_main(capsys, "assets", "fetch", "movie_reviews", "no_such_asset")
    assert code == 2 and "unknown asset 'no_such_asset'" in err and "Traceback" not in err
    code, out, _ = run_main(capsys, "env", "--device", "cpu", "--json")
    assert code == 0 and json.loads(out)["device"] == "cpu"


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "empty.csv").write_text("")
    (d / "header-only.csv").write_text("text,label\n")
    (d / "cp1252.csv").write_bytes("text,label\nA fine film,positive\nA clichéd mess,negative\n".encode("cp1252"))
    (d / "holes.csv").write_text("text,label\n" + "".join(f"film number {i},{'good' if i % 2 else 'bad'}\n" for i in range(30)) + ",good\n")
    (d / "spam.csv").write_text("text,label\n" + "".join(f"message {i},{'spam' if i % 2 else 'ham'}\n" for i in range(40)))
    (d / "split.csv").write_text("text,label,split\n" + "".join(f"review {i},{'positive' if i % 2 else 'negative'},{'valid' if i % 5 == 0 else 'train'}\n" for i in range(40)))
    (d / "busy").mkdir(); (d / "busy" / "old.txt").write_text("x")
    return d


BAD = {  # what is wrong: (arguments, a phrase the message must hold)
    "missing column":   (["finetune", "--data", "{csv}", "--model", "{tiny}"], "has no column 'text', 'label'"),
    "empty file":       (["finetune", "--data", "{bad}/empty.csv", "--model", "{tiny}"], "is empty"),
    "header only":      (["finetune", "--data", "{bad}/header-only.csv", "--model", "{tiny}"], "no usable rows"),
    "undecodable":      (["finetune", "--data", "{bad}/cp1252.csv", "--model", "{tiny}"], "--encoding cp1252"),
    "invalid rows":     (["finetune", "--data", "{bad}/holes.csv", "--model", "{tiny}"], "--drop-invalid"),
    "no such folder":   (["finetune", "--data", "{csv}", "--text-col", "review", "--label-col", "sentiment", "--model", "./no-such-model"], "there is no folder"),
    "model typo":       (["finetune", "--data", "{csv}", "--text-col", "review", "--label-col", "sentiment", "--model", "minilmm"], "did you mean 'minilm'"),
    "unknown data":     (["finetune", "--data", "movie_reveiws"], "neither a file nor a dataset asset"),
    "model as data":    (["finetune", "--data", "minilm"], "is a model asset"),
    "bad precision":    (["finetune", "--precision", "fp8"], "invalid choice: 'fp8'"),
    "zero epochs":      (["finetune", "--epochs", "0"], "must be a whole number >= 1"),
    "out in use":       (["finetune", "--data", "{csv}", "--out", "{bad}/busy"], "already holds files"),
    "no checkpoint":    (["finetune", "--resume", "{bad}/busy"], "no checkpoint"),
    "other labels":     (["evaluate", "--model", "{run}", "--data", "{bad}/spam.csv"], "trained for the labels ['negative', 'positive']"),
    "no such split":    (["evaluate", "--model", "{run}", "--data", "{bad}/split.csv", "--split", "test"], "the data has no 'test' rows"),
    "no texts":         (["predict", "--model", "{run}"], "give the texts as arguments or with --file"),
    "no such --file":   (["predict", "--model", "{run}", "--file", "{bad}/nothing.txt"], "no such file"),
    "untrained head":   (["predict", "--model", "minilm", "some text"], "has no trained head"),
}


@pytest.mark.parametrize("what", list(BAD))
def test_bad_input_exits_2_with_a_message_and_no_traceback(what, bad_files, reviews_csv, tiny_bert_dir, trained, capsys):
    args, phrase = BAD[what]
    fill = dict(bad=bad_files, csv=reviews_csv, tiny=tiny_bert_dir, run=trained[0])
    code, out, err = run_main(capsys, *[a.format(**fill) for a in args])
    assert code == 2, (code, err[-2000:])
    assert phrase in err and "Traceback" not in err, err[-2000:]


def test_a_bad_file_through_the_console_script(bad_files, tiny_bert_dir):
    res = bigmodel_nb("finetune", "--data", bad_files / "cp1252.csv", "--model", tiny_bert_dir, "--json")
    assert res.returncode == 2 and res.stdout == "" and "Traceback" not in res.stderr
    assert "\nbigmodel-nb finetune: error: " in res.stderr and "is not valid utf-8" in res.stderr and "--encoding cp1252" in res.stderr


def test_dropping_invalid_rows_reports_them(bad_files, capsys):
    data = cli.load_data(str(bad_files / "holes.csv"), drop_invalid=True)
    err = capsys.readouterr().err
    assert len(data) == 30 and "line 32" in err


def test_an_unexpected_error_exits_1_and_shows_the_traceback_only_with_debug(monkeypatch, capsys):
    def boom(*a, **k): raise RuntimeError("a bug")
    monkeypatch.setattr(cli, "load_data", boom)
    code, out, err = run_main(capsys, "finetune")
    assert code == 1 and "unexpected error: RuntimeError: a bug" in err and "--debug" in err and "Traceback" not in err
    code, out, err = run_main(capsys, "finetune", "--debug")
    assert code == 1 and "Traceback" in err and "a bug" in err


def test_no_command_help_and_usage_errors(capsys):
    assert run_main(capsys, )[0] == 2
    code, out, _ = run_main(capsys, "--help")
    assert code == 0 and "finetune" in out and "exit codes" in out
    code, out, _ = run_main(capsys, "finetune", "--help")
    assert code == 0 and "--resume" in out and "default: movie_reviews" in out and "default: 2" in out
    assert run_main(capsys, "finetune", "--lr", "fast")[0] == 2


def test_default_out_folder_names():
    from datetime import datetime
    when = datetime(2026, 3, 1, 14, 25, 1)
    assert cli.default_out("movie_reviews", "minilm", when) == Path("runs/movie_reviews-minilm-20260301-142501")
    assert cli.default_out("/data/my reviews.csv", "/models/run-7/", when).name == "my_reviews-run-7-20260301-142501"


def test_ctrl_c_saves_a_checkpoint_and_resume_finishes_the_run(tiny_bert_dir, reviews_csv, tmp_path, capsys):
    out = tmp_path / "run"
    cmd = ["bigmodel-nb", "finetune", "--data", str(reviews_csv), "--text-col", "review", "--label-col", "sentiment",
           "--model", str(tiny_bert_dir), "--epochs", "3", "--lr", "1e-3", "--batch-size", "16", "--max-length", "32",
           "--out", str(out), "--json"]
    returncode, stdout, stderr = interrupt_after_first_epoch(cmd, out, ENV)
    assert returncode == 130, stderr[-3000:]
    assert stdout == "" and "Traceback" not in stderr
    assert f"bigmodel-nb finetune --resume {out / 'checkpoint'}" in stderr
    from bigmodel_nb.learner import checkpoint_progress
    state = checkpoint_progress(out / "checkpoint")
    assert 6 <= state["step"] < 18 and cli.read_run(out)["status"] == "interrupted"

    code, _, err = run_main(capsys, "finetune", "--resume", out / "checkpoint", "--lr", "0.1")
    assert code == 2 and "--lr 0.1 (the run used 0.001)" in err

    res = bigmodel_nb("finetune", "--resume", out / "checkpoint", "--json")    # every setting comes from run.json
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads(res.stdout.strip().splitlines()[-1])
    assert f"step {state['step']}" in res.stderr and result["epochs"] == 3 and result["steps"] == 18
    run = cli.read_run(out)
    assert result["out"] == str(out) and run["status"] == "done" and not (out / "checkpoint").exists()
    assert "--epochs 3" in run["command"] and run["resumed"][0]["command"].endswith("--json")
    history = (out / "history.csv").read_text().splitlines()
    assert [l.split(",")[0] for l in history[1:]] == ["1", "2", "3"]


def test_class_weights_are_counted_on_the_training_rows_and_kept_in_the_run(tiny_bert_dir, tmp_path, capsys):
    from bigmodel_nb.assets import load_sample
    sms = load_sample("sms_spam").groupby("label").head(60)                       # 60 spam, 60 ham ...
    sms = sms[(sms.label == "ham") | (sms.index.isin(sms[sms.label == "spam"].index[:20]))]   # ... then 20 spam: 1 in 4
    path = tmp_path / "sms.csv"
    sms.to_csv(path, index=False)
    code, out, err = run_main(capsys, "finetune", "--data", path, "--model", tiny_bert_dir, *TRAIN, "--class-weights", "balanced",
                              "--out", tmp_path / "run")
    assert code == 0, err[-2000:]
    data = cli.load_data(str(path))
    train = data.df.label[data.df.split == "train"]
    n, counts = len(train), train.value_counts()
    line = next(l for l in err.splitlines() if l.startswith("class weights"))
    shown = dict(part.rsplit(" ", 1) for part in line.split(": ", 1)[1].split(", "))
    assert {c: float(w) for c, w in shown.items()} == pytest.approx({c: n / (2 * m) for c, m in counts.items()}, rel=1e-2)
    assert float(shown["spam"]) > 1 > float(shown["ham"])
    assert json.loads((tmp_path / "run" / "run.json").read_text())["settings"]["class_weights"] == "balanced"
    code, _, err = run_main(capsys, "finetune", "--data", "movie_reviews", "--label-col", "score", "--task", "regression",
                            "--model", tiny_bert_dir, *TRAIN, "--class-weights", "balanced", "--out", tmp_path / "reg")
    assert code == 2 and "--class-weights weighs classes" in err
