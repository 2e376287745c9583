"""Model cards (`bigmodel_nb.card`): every saved folder carries `metadata.json` and a `README.md` card made from it; `bigmodel-nb
info` prints it; `compare_models` names what differs. Checked on real `finetune` runs and real Learner runs."""
import json

import pytest
import torch

from bigmodel_nb.card import CARD_FILE, METADATA_FILE, CardError, compare_models, model_metadata, read_metadata, render_card


def test_a_finetune_folder_carries_its_card(finetuned_dir):
    meta = read_metadata(finetuned_dir)
    run = json.loads((finetuned_dir / "run.json").read_text())
    assert meta["model"]["task"] == "classification" and meta["model"]["labels"] == ["negative", "positive"]
    assert meta["metrics"]["test"]["accuracy"] == pytest.approx(run["metrics"]["accuracy"])        # the split the numbers are from
    assert meta["calibration"]["temperature"] == pytest.approx(run["metrics"]["calibration"]["temperature"])
    assert meta["data"]["splits"] == {"train": run["metrics"]["n_train"], "valid": run["metrics"]["n_valid"], "test": run["metrics"]["n_test"]}
    assert meta["hparams"]["initial"]["lr"] == 1e-3 and meta["hparams"]["final"]["epochs"] == 2 and meta["command"].startswith("bigmodel-nb finetune")
    assert meta["versions"]["torch"] == torch.__version__
    assert (finetuned_dir / CARD_FILE).read_text() == render_card(meta)


def _learner(lr=1e-3, seed=0, steer=False):
    from bigmodel_nb.assets import load_sample, model_path
    from bigmodel_nb.data import TextClassificationData
    from bigmodel_nb.events import Callback
    from bigmodel_nb.learner import HParams, Learner
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification
    tok = AutoTokenizer.from_pretrained(model_path("minilm"))
    data = TextClassificationData.from_df(load_sample("movie_reviews").sample(80, random_state=2))
    data.tokenize(tok, max_length=16)
    torch.manual_seed(seed)
    model = BertForSequenceClassification(BertConfig(vocab_size=tok.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                     intermediate_size=16, num_labels=2, id2label=dict(data.id2label), label2id=dict(data.label2id)))
    class Steer(Callback):
        def after_step(self):
            if self.learn.step == 2: self.learn.hp.set(lr=lr / 2)
    return Learner(model, data, HParams(lr=lr, batch_size=16, epochs=1, seed=seed), tokenizer=tok, progress=False, cbs=[Steer()] if steer else [])


def test_save_model_writes_the_card_with_live_changes_and_compare_names_the_differences(tmp_path):
    a, b = _learner(steer=True), _learner(lr=5e-4)
    for learn, folder in ((a, tmp_path / "a"), (b, tmp_path / "b")):
        learn.fit(); learn.save_model(folder, metrics={"test": learn.evaluate("test")})
    meta = read_metadata(tmp_path / "a")
    assert [(c["name"], c["old"], c["new"], c["step"]) for c in meta["hparams"]["changes"]] == [("lr", 1e-3, 5e-4, 2)]
    assert "- step 2: lr 0.001 → 0.0005 (user)" in (tmp_path / "a" / CARD_FILE).read_text()
    diff = compare_models(tmp_path / "a", tmp_path / "b")
    assert {"hparams.initial.lr", "hparams.changes"} <= set(diff.index) and "data.fingerprint" not in diff.index   # the same rows
    assert diff.loc["hparams.initial.lr", "a"] == 1e-3 and diff.loc["hparams.initial.lr", "b"] == 5e-4
    assert compare_models(tmp_path / "a", tmp_path / "a").empty and "created_at" not in diff.index


def test_the_fingerprint_changes_with_one_label():
    learn = _learner()
    before = model_metadata(learn.model, learn.data)["data"]["fingerprint"]
    learn.data.df.loc[learn.data.df.index[0], "label"] = "positive" if learn.data.df.label.iloc[0] == "negative" else "negative"
    assert model_metadata(learn.model, learn.data)["data"]["fingerprint"] != before


def test_a_pretraining_model_has_no_labels():
    from transformers import BertConfig, BertForMaskedLM
    meta = model_metadata(BertForMaskedLM(BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)))
    assert meta["model"]["task"] == "pretraining" and meta["model"]["labels"] is None and "data" not in meta
    assert render_card(meta).startswith("# BertForMaskedLM")


def test_bigmodel_nb_info_prints_the_card_and_names_what_is_wrong(finetuned_dir, tmp_path, capsys):
    from conftest import run_main
    code, out, _ = run_main(capsys, "info", finetuned_dir)
    assert code == 0 and out.strip() == (finetuned_dir / CARD_FILE).read_text().strip()
    code, out, _ = run_main(capsys, "info", finetuned_dir, "--json")
    assert code == 0 and json.loads(out) == read_metadata(finetuned_dir)
    code, _, err = run_main(capsys, "info", tmp_path)
    assert code == 2 and f"holds no {METADATA_FILE}" in err
    (tmp_path / METADATA_FILE).write_text("{broken")
    code, _, err = run_main(capsys, "info", tmp_path)
    assert code == 2 and "not valid JSON" in err and str(tmp_path / METADATA_FILE) in err
    (tmp_path / METADATA_FILE).write_text(json.dumps({"format": 99, "model": {}}))
    with pytest.raises(CardError, match="upgrade bigmodel_nb"): read_metadata(tmp_path)


def test_an_export_carries_the_card_and_says_what_it_is(finetuned_dir, tmp_path, capsys):
    from conftest import run_main
    code, _, err = run_main(capsys, "export", "--model", finetuned_dir, "--format", "fp16", "--out", tmp_path / "fp16")
    assert code == 0, err[-2000:]
    meta = read_metadata(tmp_path / "fp16")
    assert meta["export"]["format"] == "fp16" and meta["export"]["source"] == str(finetuned_dir)
    assert meta["metrics"] == read_metadata(finetuned_dir)["metrics"] and "## Export" in (tmp_path / "fp16" / CARD_FILE).read_text()
