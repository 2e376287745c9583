"""Images on the same engine, for real: EfficientNet-Lite0's released ImageNet weights (asset `efficientnet_lite0`), the
MNIST digits of asset `mnist_5k`, image folders written to disk as PNG and JPEG files, the `Learner`, its checkpoints,
the `Predictor` and the `bigmodel-nb` console script. Images are 32 pixels a side so that every run is short."""
import json
import os
import subprocess
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from bigmodel_nb.assets import ASSETS, fetch, get_asset, load_sample
from bigmodel_nb.data import DataError, DataWarning
from bigmodel_nb.learner import Learner
from bigmodel_nb.models import freeze_body
from bigmodel_nb.predict import Predictor
from bigmodel_nb.vision import (ImageData, ImageProcessor, default_image_size, is_image_model_folder, load_image_classifier,
                                read_image_folder, rename_lite0_weights, to_image_tensor)
from conftest import run_main

pytestmark = pytest.mark.usefixtures("one_thread")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def mnist():
    return load_sample("mnist_5k")


@pytest.fixture(scope="module")
def digit_folder(tmp_path_factory, mnist):
    "Three digits as a folder of class subfolders: 14 PNG files each, plus a JPEG, as a user would have them on disk."
    root = tmp_path_factory.mktemp("digits") / "images"
    for d in "012":
        (root / f"digit{d}").mkdir(parents=True)
        for k, img in enumerate(mnist[mnist.label == d].image[:14]): Image.fromarray(img).save(root / f"digit{d}" / f"{k:03d}.png")
    Image.fromarray(mnist[mnist.label == "1"].image.iloc[20]).convert("RGB").save(root / "digit1" / "extra.jpg", quality=95)
    return root


def test_assets_hold_the_digits_and_the_weights(mnist):
    a = get_asset("mnist_5k")
    assert a.kind == "images" and len(mnist) == a.rows == 5000 and mnist.label.value_counts().to_dict() == a.labels
    stacked = np.stack(mnist.image)
    assert stacked.shape == (5000, 28, 28) and stacked.dtype == np.uint8 and stacked.max() == 255
    state = torch.load(fetch("efficientnet_lite0") / ASSETS["efficientnet_lite0"].members[0].dest, weights_only=True)
    renamed = rename_lite0_weights(state)
    assert len(renamed) == len(state) == 296 and "body.blocks.15.project.bn.running_var" in renamed
    with pytest.raises(ValueError, match="'mystery.weight'"): rename_lite0_weights({"mystery.weight": torch.zeros(1)})


def test_the_network_computes_what_the_released_port_computes():
    "The port the weights were released with (efficientnet-lite-pytorch, a dev requirement) against this module, same weights."
    from efficientnet_lite_pytorch import EfficientNet
    weights = fetch("efficientnet_lite0") / ASSETS["efficientnet_lite0"].members[0].dest
    with warnings.catch_warnings(), open(os.devnull, "w") as null:
        import contextlib
        with contextlib.redirect_stdout(null): ref = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(weights)).eval()
    mine = load_image_classifier("efficientnet_lite0").eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(): a, b = mine(x).logits, ref(x)
    assert a.shape == (2, 1000) and torch.allclose(a, b, atol=1e-4, rtol=0)


def test_image_inputs_are_read_one_way_and_bad_ones_are_named(tmp_path):
    grey, rgb = np.arange(12, dtype=np.uint8).reshape(3, 4), np.zeros((5, 6, 3), np.uint8)
    assert to_image_tensor(grey).shape == (1, 3, 4) and to_image_tensor(rgb).shape == (3, 5, 6)
    assert to_image_tensor(torch.zeros(3, 5, 6, dtype=torch.uint8)).shape == (3, 5, 6)         # a tensor is channels first
    assert to_image_tensor(np.zeros((5, 6, 4), np.uint8)).shape == (3, 5, 6)                    # alpha dropped
    assert int(to_image_tensor(np.full((2, 2), 1.0))[0, 0, 0]) == 255                          # 0..1 floats
    Image.fromarray(rgb).save(tmp_path / "a.png")
    assert torch.equal(to_image_tensor(tmp_path / "a.png"), to_image_tensor(rgb))
    assert torch.equal(to_image_tensor(Image.fromarray(grey)), to_image_tensor(grey))
    (tmp_path / "b.png").write_bytes(b"GIF89a not really")
    for bad, words in [(np.zeros((5, 5, 2)), "channel"), (np.full((4, 4), 3.0), "0..1 floats"), (np.full((2, 2), 300, np.int32), "0..255"),
                       (np.zeros((2, 2, 2, 2)), "shape"), (tmp_path / "b.png", "not an image Pillow can read"), (tmp_path / "none.png", "no such file"),
                       (np.zeros((2, 2), bool), "boolean"), (np.full((2, 2), np.nan), "NaN"), ({"not": "an image"}, "not an image")]:
        with pytest.raises(ValueError, match=words) as e: to_image_tensor(bad, "image 9")
        assert "image 9" in str(e.value)


def test_the_processor_resizes_crops_and_normalises_and_round_trips(tmp_path):
    proc = ImageProcessor(size=16)
    wide = torch.arange(20 * 40, dtype=torch.float32).reshape(1, 20, 40).div(800 / 255).to(torch.uint8)
    out = proc.resize(wide)
    assert out.shape == (1, 16, 16) and out.dtype == torch.uint8       # shorter side to 16, the centre square kept
    batch = proc([np.zeros((8, 8), np.uint8), np.full((30, 30, 3), 255, np.uint8)])["pixel_values"]
    assert batch.shape == (2, 3, 16, 16) and torch.allclose(batch[0], torch.tensor(-127 / 128)) and torch.allclose(batch[1], torch.tensor(1.0))
    proc.save_pretrained(tmp_path)
    again = ImageProcessor.from_pretrained(tmp_path)
    assert (again.size, again.mean, again.std) == (proc.size, proc.mean, proc.std)
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"): ImageProcessor.from_pretrained(tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="size"): ImageProcessor(size=4)
    assert default_image_size([torch.zeros(1, 28, 28)]) == 32 and default_image_size([torch.zeros(3, 500, 300)]) == 224


def test_a_folder_of_class_subfolders(digit_folder):
    files = read_image_folder(digit_folder)
    assert len(files) == 43 and sorted(files.label.unique()) == ["digit0", "digit1", "digit2"] and files.split.isna().all()
    data = ImageData.from_folder(digit_folder, valid_pct=0.2, test_pct=0.2, seed=3)
    assert data.classes == ["digit0", "digit1", "digit2"] and data.processor.size == 32 and len(data) == 43
    counts = data.df.groupby(["split", "label"]).size()
    assert counts["train"].min() >= 8 and counts["valid"].min() >= 2 and counts["test"].min() >= 2
    again = ImageData.from_folder(digit_folder, valid_pct=0.2, test_pct=0.2, seed=3)
    assert again.df.split.tolist() == data.df.split.tolist() and again.card_data()["fingerprint"] == data.card_data()["fingerprint"]
    assert str(digit_folder / "digit1" / "extra.jpg") in data.df.image.tolist()


def test_split_folders_bad_files_and_empty_folders(tmp_path, mnist):
    root = tmp_path / "split"
    for split, n in [("train", 6), ("val", 2), ("test", 2)]:
        for d in "34":
            (root / split / d).mkdir(parents=True)
            for k in range(n): Image.fromarray(mnist[mnist.label == d].image.iloc[k + 10 * (split == "test")]).save(root / split / d / f"{k}.png")
    data = ImageData.from_folder(root)
    assert data.split_origin == "given" and data.df.groupby("split").size().to_dict() == {"test": 4, "train": 12, "valid": 4}
    (root / "train" / "3" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (root / "train" / "3" / "notes.txt").write_text("not an image")
    with pytest.warns(DataWarning, match="notes.txt"), pytest.raises(DataError) as e: ImageData.from_folder(root)
    assert "broken.png" in str(e.value) and "on_invalid='drop'" in str(e.value)
    with pytest.warns(DataWarning):
        kept = ImageData.from_folder(root, on_invalid="drop")
    assert len(kept) == 20 and kept.report.dropped.row.tolist() == [str(root / "train" / "3" / "broken.png")]
    (tmp_path / "flat").mkdir()
    Image.fromarray(mnist.image[0]).save(tmp_path / "flat" / "0.png")
    with pytest.raises(FileNotFoundError, match="directly in it"): ImageData.from_folder(tmp_path / "flat")
    with pytest.raises(FileNotFoundError, match="not a folder"): read_image_folder(tmp_path / "missing")


def test_labels_are_checked_as_a_classifiers_are(mnist):
    imgs = list(mnist.image[:30])
    labels = ["a"] * 14 + ["b"] * 14 + [None, "c"]
    with pytest.raises(DataError) as e: ImageData.from_arrays(imgs, labels)
    text = str(e.value)
    assert "missing label" in text and "image 29" in text and "'c': 1" in text
    with pytest.raises(ValueError, match="30 images but 29 labels"): ImageData.from_arrays(imgs, labels[:-1])


def test_a_frozen_body_keeps_its_statistics_and_a_batch_of_one_trains():
    model = load_image_classifier("efficientnet_lite0", ["x", "y"])
    freeze_body(model)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    model(torch.randn(4, 3, 32, 32)).logits.sum().backward()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items() if "running" in k)
    assert model.classifier.weight.grad is not None and model.body.stem.conv.weight.grad is None
    model.requires_grad_(True).train()
    out = model(torch.randn(1, 3, 32, 32), labels=torch.tensor([1]))           # 1x1 maps of one image: no batch statistics
    assert torch.isfinite(out.loss) and out.logits.shape == (1, 2)


def test_the_learner_trains_saves_resumes_and_predicts_images(digit_folder, tmp_path):
    data = ImageData.from_folder(digit_folder, valid_pct=0.2, test_pct=0.2)
    model = load_image_classifier("efficientnet_lite0", data)
    hp = dict(lr=3e-3, batch_size=5, epochs=6, seed=0)
    learn = Learner(model, data, hparams=hp, out_dir=tmp_path / "run", progress=False)
    learn.fit(3)
    ckpt = learn.save_checkpoint()
    learn.fit(6)
    assert learn.history[-1]["valid_accuracy"] >= 2 / 3, learn.history        # three digits (chance 1/3), 6 epochs of 25 images
    again = Learner(load_image_classifier("efficientnet_lite0", data), data, hparams=hp, progress=False)
    again.fit(resume=ckpt)
    assert again.step == learn.step and np.isclose(again.history[-1]["valid_loss"], learn.history[-1]["valid_loss"], rtol=1e-4)
    learn.save_model(tmp_path / "model", metrics={"test": learn.evaluate("test")})
    assert is_image_model_folder(tmp_path / "model")
    card = json.loads((tmp_path / "model" / "metadata.json").read_text())
    assert card["model"]["task"] == "classification" and card["model"]["labels"] == data.classes and card["data"]["image_size"] == 32
    pred = Predictor.from_pretrained(tmp_path / "model", device="cpu")
    saved, live = pred.model.state_dict(), learn.model.state_dict()
    assert saved.keys() == live.keys() and [k for k in live if not torch.equal(saved[k], live[k].cpu())] == []   # batch-norm statistics too
    files = [str(p) for p in sorted((digit_folder / "digit2").glob("*.png"))[:4]]
    answers = pred.predict(files)
    assert [a["label"] for a in answers] == [a["label"] for a in learn.predict(files)] and len(answers) == 4
    logits_saved, logits_live = pred.outputs(files), learn.predictor.outputs(files)
    assert torch.allclose(logits_saved, logits_live, atol=1e-5)
    assert pred.predict([]) == [] and pred.outputs([]).numel() == 0
    with pytest.raises(ValueError, match="no such file"): pred.predict(["nowhere.png"])
    with pytest.raises(ValueError, match="predicts"): load_image_classifier(tmp_path / "model", ["a", "b"])


def test_finetune_and_predict_on_the_command_line(digit_folder, tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, stderr = run_main(capsys, "finetune", "--task", "image", "--data", digit_folder, "--epochs", "1", "--batch-size", "8",
                                    "--valid-pct", "0.2", "--test-pct", "0.2", "--out", out, "--no-progress", "--json")
    assert code == 0, stderr[-3000:]
    result = json.loads(stdout)
    assert result["n_train"] + result["n_valid"] + result["n_test"] == 43 and 0 <= result["accuracy"] <= 1
    assert "images 32x32" in stderr and "efficientnet_lite0" in stderr
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "done" and run["settings"]["task"] == "image" and run["settings"]["model"] == "efficientnet_lite0"
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= {p.name for p in out.iterdir()}
    img = digit_folder / "digit0" / "000.png"
    res = subprocess.run(["bigmodel-nb", "predict", "--model", str(out), str(img)], capture_output=True, text=True, env=ENV, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    line = json.loads(res.stdout)
    assert line["image"] == str(img) and line["label"] in ["digit0", "digit1", "digit2"] and abs(sum(line["probs"].values()) - 1) < 1e-4
    code, _, err = run_main(capsys, "predict", "--model", out, tmp_path / "missing.png")
    assert code == 2 and "missing.png" in err and "Traceback" not in err
    code, _, err = run_main(capsys, "evaluate", "--model", out, "--data", "mnist_5k")        # text-only commands say so
    assert code == 2 and "image classifier" in err and "bigmodel-nb predict" in err


@pytest.mark.parametrize("args, words", [
    (["--data", "movie_reviews"], "needs labelled images"),
    (["--data", "no_such_folder"], "neither a folder nor an image asset"),
    (["--image-size", "3"], "size"),
    (["--adapter", "lora"], "--adapter"),
])
def test_image_runs_refuse_bad_arguments_with_a_message(args, words, tmp_path, capsys):
    code, _, err = run_main(capsys, "finetune", "--task", "image", *args, "--out", tmp_path / "r", "--epochs", "1")
    assert code == 2 and words in err and "Traceback" not in err


def test_image_size_is_only_for_images(capsys, tmp_path):
    code, _, err = run_main(capsys, "finetune", "--image-size", "64", "--out", tmp_path / "r")
    assert code == 2 and "--task image" in err


def test_the_dashboard_steers_an_image_run(digit_folder):
    "The same ipywidgets panel as for text: a learning-rate change from the panel lands on the run and in its log."
    import time
    from bigmodel_nb.dashboard import Dashboard
    from bigmodel_nb.events import Callback
    class Slow(Callback):
        def after_step(self): time.sleep(0.05)
    data = ImageData.from_folder(digit_folder, valid_pct=0.2, test_pct=0.2)
    learn = Learner(load_image_classifier("efficientnet_lite0", data), data, hparams=dict(lr=1e-3, batch_size=4, epochs=2, seed=0),
                    progress=False, cbs=[Slow()])
    d = Dashboard(learn, mode="thread")
    try:
        assert 4 in d.bs.options
        d.start()
        t0 = time.monotonic()
        while learn.step < 2:
            assert time.monotonic() - t0 < 120 and d.thread.is_alive()
            time.sleep(0.01)
        d.lr.value = 2e-3
        d.thread.join(180)
    finally: d.close()
    assert learn.error is None and learn.epoch == 2
    assert [(c.name, c.new, c.source) for c in learn.hp.log] == [("lr", 2e-3, "dashboard")]
