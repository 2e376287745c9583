"""Sentence embeddings: `Predictor.embed` against pooling done by hand, and the `bigmodel-nb embed` command."""
import json
import warnings

import numpy as np
import pytest
import torch

from bigmodel_nb.assets import load_sample
from bigmodel_nb.models import NewHeadWarning, load_classifier
from bigmodel_nb.predict import Predictor
from conftest import run_main


@pytest.fixture(scope="module")
def tiny(tiny_bert_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NewHeadWarning)
        model, tok = load_classifier(tiny_bert_dir, labels=["negative", "positive"])
    return model.eval(), tok


@pytest.fixture(scope="module")
def sentences():
    return list(load_sample("movie_reviews").sample(12, random_state=3).text)


def _alone(model, tok, text):
    "The last hidden states of one text run on its own (no padding)."
    with torch.no_grad(): return model.base_model(**tok(text, return_tensors="pt")).last_hidden_state[0]


def test_mean_and_cls_pooling_equal_the_hidden_states_pooled_by_hand_whatever_the_batch(tiny, sentences):
    model, tok = tiny
    hidden = [_alone(model, tok, t) for t in sentences]
    for batch_size in (1, 5, 64):                                   # padding differs with the batch; the vectors must not
        pred = Predictor(model, tok, batch_size=batch_size)
        mean, cls = pred.embed(sentences, normalize=False), pred.embed(sentences, pooling="cls", normalize=False)
        assert mean.shape == cls.shape == (12, model.config.hidden_size)
        assert torch.allclose(mean, torch.stack([h.mean(0) for h in hidden]), atol=1e-5)
        assert torch.allclose(cls, torch.stack([h[0] for h in hidden]), atol=1e-5)
    unit = Predictor(model, tok).embed(sentences)
    assert torch.allclose(unit.norm(dim=1), torch.ones(12), atol=1e-6) and torch.allclose(unit, torch.nn.functional.normalize(mean, dim=-1), atol=1e-6)
    assert not model.training


def test_embed_refuses_what_it_cannot_embed(tiny):
    model, tok = tiny
    pred = Predictor(model, tok)
    with pytest.raises(ValueError, match="'mean' or 'cls'"): pred.embed(["a film"], pooling="max")
    with pytest.raises(ValueError, match="blank"): pred.embed(["a film", " "])
    assert pred.embed([]).shape == (0, 0)


def test_minilm_sentence_embeddings_put_paraphrases_closest():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NewHeadWarning)
        model, tok = load_classifier("minilm", labels=["a", "b"])
    e = Predictor(model, tok).embed(["How do I reset my password?", "I forgot my password and need to change it.",
                                     "When does the shop open on Sundays?", "What are your opening hours at the weekend?"])
    sims = (e @ e.T).numpy()
    assert sims[0, 1] > max(sims[0, 2], sims[0, 3], sims[1, 2], sims[1, 3])
    assert sims[2, 3] > max(sims[0, 2], sims[0, 3], sims[1, 2], sims[1, 3])


def test_the_embed_command_writes_json_lines_or_a_npy_file(tiny_bert_dir, tiny, tmp_path, capsys, sentences):
    model, tok = tiny
    expected = Predictor(model, tok).embed(sentences[:3]).numpy()
    code, stdout, err = run_main(capsys, "embed", "--model", tiny_bert_dir, *sentences[:3])
    assert code == 0, err
    lines = [json.loads(l) for l in stdout.splitlines()]
    assert [l["text"] for l in lines] == sentences[:3]
    assert np.allclose([l["embedding"] for l in lines], expected, atol=1e-5)

    (tmp_path / "texts.txt").write_text("\n".join(sentences[:3]) + "\n\n")
    out = tmp_path / "vectors.npy"
    code, stdout, err = run_main(capsys, "embed", "--model", tiny_bert_dir, "--file", tmp_path / "texts.txt", "--out", out)
    assert code == 2 and "blank text (line 4)" in err and not out.exists()
    code, stdout, err = run_main(capsys, "embed", "--model", tiny_bert_dir, "--file", tmp_path / "texts.txt", "--out", out, "--skip-blank")
    assert code == 0 and not stdout and "wrote 3 embeddings" in err
    saved = np.load(out)
    assert saved.dtype == np.float32 and np.allclose(saved, expected, atol=1e-5)
    code, _, err = run_main(capsys, "embed", "--model", tiny_bert_dir, "a film", "--out", out)
    assert code == 2 and "--overwrite" in err and np.allclose(np.load(out), saved)            # nothing replaced without asking
    code, _, err = run_main(capsys, "embed", "--model", tiny_bert_dir, "a film", "--out", out, "--overwrite", "--pooling", "cls", "--no-normalize")
    assert code == 0 and np.allclose(np.load(out)[0], _alone(model, tok, "a film")[0].numpy(), atol=1e-5)
    code, _, err = run_main(capsys, "embed", "--model", tiny_bert_dir, "a film", "--out", tmp_path / "vectors.csv")
    assert code == 2 and ".npy" in err
