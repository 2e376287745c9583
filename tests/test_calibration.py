"""Temperature scaling (`evaluation.fit_temperature`, `apply_temperature`) and `bigmodel-nb finetune`'s calibration: the fitted
temperature is the one that minimises the NLL, ECE falls on rows it was not fitted on, the temperature folded into the head
gives z / T and survives saving, and a finetune run records what it did."""
import json

import pytest
import torch

from bigmodel_nb.evaluation import apply_temperature, fit_temperature, output_layer
from bigmodel_nb.metrics import MetricsError, expected_calibration_error


def _drawn(n, scale, seed=0, classes=3):
    "Labels drawn from softmax(z) and logits `scale` times z: over-confident for scale > 1, timid below."
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, classes, generator=g) * 2
    y = torch.multinomial(z.softmax(-1), 1, generator=g).squeeze(1)
    return scale * z, y


@pytest.mark.parametrize("scale", [3.0, 0.5])
def test_the_fitted_temperature_undoes_a_known_scale_and_ece_falls_on_other_rows(scale):
    valid_z, valid_y = _drawn(20_000, scale, seed=1)
    test_z, test_y = _drawn(20_000, scale, seed=2)
    t = fit_temperature(valid_z, valid_y)
    assert t == pytest.approx(scale, rel=0.05)
    grid = torch.linspace(0.2, 5, 2401)
    nll = torch.stack([torch.nn.functional.cross_entropy(valid_z / g, valid_y) for g in grid])
    assert abs(t - grid[nll.argmin()].item()) <= 0.004                               # the minimum of the NLL, not just near it
    before = expected_calibration_error(test_y.numpy(), test_z.softmax(-1).numpy())
    after = expected_calibration_error(test_y.numpy(), (test_z / t).softmax(-1).numpy())
    assert after < 0.5 * before and after < 0.02


def _tiny():
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(3)
    return BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                    intermediate_size=16, num_labels=3)).eval()


def test_the_temperature_folded_into_the_head_gives_z_over_t_and_is_saved(tmp_path):
    from transformers import AutoModelForSequenceClassification
    model = _tiny()
    x = dict(input_ids=torch.randint(5, 50, (4, 7)), attention_mask=torch.ones(4, 7, dtype=torch.long))
    with torch.no_grad(): raw = model(**x).logits
    assert output_layer(model) is model.classifier
    apply_temperature(model, 2.0, fitted_on="valid", rows=100)
    with torch.no_grad(): assert torch.allclose(model(**x).logits, raw / 2.0, atol=1e-6)
    assert model.config.calibration == dict(temperature=2.0, fitted_on="valid", rows=100)
    model.save_pretrained(tmp_path)
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    with torch.no_grad(): assert torch.allclose(again(**x).logits, raw / 2.0, atol=1e-6)
    assert again.config.calibration["temperature"] == 2.0
    apply_temperature(again, 1.5)
    assert again.config.calibration["temperature"] == pytest.approx(3.0)           # calibrating twice: the product


@pytest.mark.parametrize("call,words", [
    (lambda: fit_temperature(torch.zeros(4), torch.zeros(4)), "rows, classes"),
    (lambda: fit_temperature(torch.zeros(4, 2), torch.zeros(3)), "4 rows of logits and 3 targets"),
    (lambda: fit_temperature(torch.tensor([[0.0, float("nan")]]), torch.zeros(1)), "NaN"),
    (lambda: fit_temperature(torch.zeros(2, 2), torch.tensor([0, 2])), "from 0 to 1"),
    (lambda: apply_temperature(_tiny(), 0.0), "positive number"),
    (lambda: apply_temperature(_tiny(), float("inf")), "positive number"),
])
def test_bad_arguments_are_named(call, words):
    with pytest.raises(MetricsError, match=words): call()


def test_finetune_calibrates_on_the_valid_rows_and_records_it(finetuned_dir):
    run = json.loads((finetuned_dir / "run.json").read_text())
    c = run["metrics"]["calibration"]
    config = json.loads((finetuned_dir / "config.json").read_text())
    assert c["fitted_on"] == "valid" and c["rows"] == run["metrics"]["n_valid"] and c["split"] == "test" and c["temperature"] > 0
    assert config["calibration"]["temperature"] == pytest.approx(c["temperature"]) and config["calibration"]["rows"] == c["rows"]
    assert run["metrics"]["ece"] == pytest.approx(c["ece_after"]) and {"ece_before", "loss_before", "loss_after"} <= set(c)


def test_no_calibrate_keeps_the_raw_head(tiny_bert_dir, tmp_path, capsys):
    from bigmodel_nb.assets import load_sample
    from conftest import run_main
    load_sample("movie_reviews").sample(120, random_state=5).to_csv(tmp_path / "r.csv", index=False)
    code, out, err = run_main(capsys, "finetune", "--data", tmp_path / "r.csv", "--model", tiny_bert_dir, "--epochs", "1",
                              "--max-length", "16", "--out", tmp_path / "run", "--no-calibrate", "--json")
    assert code == 0, err[-2000:]
    assert "calibration" not in json.loads(out) and "calibration" not in json.loads((tmp_path / "run" / "config.json").read_text())
