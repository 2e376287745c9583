"Shared test settings: paths, and a private cache folder so tests never touch the user's cache."
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    "A fresh, empty `BIGMODEL_NB_CACHE` for one test."
    cache = tmp_path / "cache"
    monkeypatch.setenv("BIGMODEL_NB_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one CPU thread for a module's tests: tensors this small run fastest so, and a busy machine is spared
    two threads waiting for each other. Use it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run_py(code: str, env: dict | None = None, **kw):
    "Run `code` in a fresh interpreter (so environment variables are read anew)."
    import subprocess
    full = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, **kw)


def run_main(capsys, *args):
    "The command line's `main` in this process: (exit code, stdout, stderr)."
    from bigmodel_nb import cli
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def interrupt_after_first_epoch(cmd: list, out, env: dict, timeout: float = 240):
    "Start `cmd` (a `finetune` run writing to `out`), send Ctrl-C once its first epoch is done: (return code, stdout, stderr)."
    import signal, subprocess, time
    proc = subprocess.Popen([str(a) for a in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + timeout
    while not (out / "history.csv").exists():                  # written after the first epoch: training is under way
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no epoch finished in time"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    return proc.returncode, stdout, stderr


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    """A small BERT (2 layers, hidden 32) with random weights and the real MiniLM tokenizer, saved as a
    `from_pretrained` folder: fast enough to train for real in a test, same code path as the full model."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification
    from bigmodel_nb.assets import model_path
    import torch
    folder = tmp_path_factory.mktemp("tiny-bert")
    tok = AutoTokenizer.from_pretrained(model_path("minilm"))
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=512, num_labels=2)
    torch.manual_seed(0)
    BertForSequenceClassification(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def movie_data(tiny_bert_dir):
    "300 real movie-review sentences, split 80/10/10 and tokenized with the MiniLM tokenizer."
    from transformers import AutoTokenizer
    from bigmodel_nb.assets import load_sample
    from bigmodel_nb.data import TextClassificationData
    df = load_sample("movie_reviews").sample(300, random_state=1)
    data = TextClassificationData.from_df(df)
    data.tokenize(AutoTokenizer.from_pretrained(tiny_bert_dir), max_length=64)
    return data


@pytest.fixture(scope="session")
def finetuned_dir(tiny_bert_dir, tmp_path_factory):
    "A `bigmodel-nb finetune` run of the tiny BERT on 200 real movie reviews (2 epochs, 32 tokens): its folder."
    import contextlib, io
    from bigmodel_nb import cli
    from bigmodel_nb.assets import load_sample
    root = tmp_path_factory.mktemp("finetuned")
    load_sample("movie_reviews").sample(200, random_state=4).to_csv(root / "reviews.csv", index=False)
    out, err = root / "run", io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = cli.main(["finetune", "--data", str(root / "reviews.csv"), "--model", str(tiny_bert_dir), "--epochs", "2", "--lr", "1e-3",
                         "--batch-size", "16", "--max-length", "32", "--out", str(out), "--json"])
    assert code == 0, err.getvalue()[-3000:]
    return out
