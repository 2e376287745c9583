"""Token attributions (bigmodel_nb.interpret) on a tiny BERT: completeness, captum, finite differences, words, rollout,
deletion curves, a regression head, errors, the model's state, HTML, and `bigmodel-nb explain`."""
import copy
import html as htmllib
import json
import re
import sys

import numpy as np
import pytest
import torch

from bigmodel_nb import interpret as I
from bigmodel_nb.predict import Predictor
from conftest import run_main

TEXT = "A gripping, beautifully acted film that doesn't waste a minute."


pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(tiny_bert_dir, folder, **head):
    "The tiny BERT's shape and tokenizer with larger random weights (so outputs move with the input) and a non-zero [PAD] row, saved."
    from transformers import AutoConfig, AutoTokenizer, BertForSequenceClassification
    cfg = AutoConfig.from_pretrained(tiny_bert_dir)
    cfg.update(dict(initializer_range=0.3, **head))
    torch.manual_seed(3)
    model = BertForSequenceClassification(cfg)
    with torch.no_grad(): model.bert.embeddings.word_embeddings.weight[0].normal_(0, 0.3)   # init leaves [PAD] at 0, like "zero"
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_bert_dir).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def clf_dir(tiny_bert_dir, tmp_path_factory):
    return _tiny(tiny_bert_dir, tmp_path_factory.mktemp("explain-clf"), num_labels=2, id2label={0: "negative", 1: "positive"},
                 label2id={"negative": 0, "positive": 1}, problem_type="single_label_classification")


@pytest.fixture(scope="module")
def pred(clf_dir):
    return Predictor.from_pretrained(clf_dir, device="cpu")


@pytest.fixture(scope="module")
def reg_pred(tiny_bert_dir, tmp_path_factory):
    folder = _tiny(tiny_bert_dir, tmp_path_factory.mktemp("explain-reg"), num_labels=1, id2label={0: "score"}, label2id={"score": 0},
                   problem_type="regression")
    return Predictor.from_pretrained(folder, device="cpu")


def _relative_gap(a):
    return abs(a.delta) / abs(a.output - a.baseline_output)


# ---- integrated gradients -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("baseline", I.BASELINES)
@pytest.mark.parametrize("output", I.OUTPUTS)
def test_completeness_for_each_baseline_and_output(pred, baseline, output):
    a = I.integrated_gradients(pred, TEXT, steps=64, baseline=baseline, output=output)
    logits = pred.outputs([TEXT])[0]
    f_x = logits.softmax(-1)[a.target] if output == "prob" else logits[a.target]
    assert a.output == pytest.approx(f_x.item(), abs=1e-5) and a.target == int(logits.argmax())
    assert abs(a.output - a.baseline_output) > 1e-2                 # there is a change to explain
    assert a.scores.sum() == pytest.approx(a.output - a.baseline_output, rel=1e-4) and _relative_gap(a) < 1e-4
    assert (a.method, a.steps, a.baseline, a.output_kind) == ("ig", 64, baseline, output)
    assert np.all(a.scores[a.special] == 0)                          # [CLS] and [SEP] are the same in x and x'


def test_baselines_differ(pred):
    f = I.TargetFunction(pred, TEXT)
    outs = {k: f.value(f.baseline(k)) for k in I.BASELINES}
    assert len({round(v, 6) for v in outs.values()}) == 3, outs
    assert torch.equal(f.baseline("mask")[0, f.special], f.x[0, f.special])


def test_the_gap_falls_as_the_steps_grow(pred):
    gaps = [abs(I.integrated_gradients(pred, TEXT, steps=m).delta) for m in (2, 8, 32)]
    assert gaps[-1] < gaps[0] / 100, gaps


def test_tolerance_doubles_the_steps_until_the_gap_is_small(pred):
    a = I.integrated_gradients(pred, TEXT, steps=2, tolerance=1e-5)
    assert a.steps in (4, 8, 16, 32, 64, 128, 256, 512) and _relative_gap(a) <= 1e-5
    assert abs(I.integrated_gradients(pred, TEXT, steps=a.steps // 2).delta) > 1e-5 * abs(a.output - a.baseline_output)  # it needed them
    capped = I.integrated_gradients(pred, TEXT, steps=2, tolerance=1e-12, max_steps=8)
    assert capped.steps == 8


@pytest.mark.parametrize("target,baseline,output", [(0, "pad", "logit"), (1, "mask", "logit"), ("negative", "zero", "logit"),
                                                    ("positive", "pad", "prob")])
def test_captum_agrees(pred, target, baseline, output):
    ours = I.integrated_gradients(pred, TEXT, target=target, steps=24, baseline=baseline, output=output)
    theirs = I.captum_integrated_gradients(pred, TEXT, target=target, steps=24, baseline=baseline, output=output)
    scale = np.abs(ours.scores).max()
    assert np.abs(theirs.scores - ours.scores).max() < 1e-5 * scale
    assert (theirs.method, theirs.target, theirs.baseline_output) == ("captum_ig", ours.target, pytest.approx(ours.baseline_output))
    rough = I.captum_integrated_gradients(pred, TEXT, target=target, steps=3, baseline=baseline, output=output, method="riemann_right")
    assert np.abs(rough.scores - ours.scores).max() > 1e-3 * scale      # the comparison can tell a different integral apart


def test_two_classes(pred):
    p0, p1 = (I.integrated_gradients(pred, TEXT, target=t, steps=32, output="prob") for t in ("negative", "positive"))
    assert np.allclose(p0.scores, -p1.scores, atol=1e-6)              # p0 = 1 - p1 all along the path
    z0, z1 = (I.integrated_gradients(pred, TEXT, target=t, steps=32) for t in (0, 1))
    assert (z1.scores - z0.scores).sum() == pytest.approx((z1.output - z0.output) - (z1.baseline_output - z0.baseline_output), rel=1e-3)
    assert _relative_gap(z0) < 1e-3 and _relative_gap(z1) < 1e-3


# ---- gradients ------------------------------------------------------------------------------------------------------------

def test_the_gradient_matches_a_finite_difference(pred):
    p64 = Predictor(copy.deepcopy(pred.model).double(), pred.tokenizer, device="cpu")
    f = I.TargetFunction(p64, TEXT)
    v = torch.randn(f.x.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    _, g = f.gradient(f.x)
    h = 1e-5                                                          # O(h^2) error ~1e-10 relative; rounding ~1e-11
    fd = (f.value(f.x + h * v) - f.value(f.x - h * v)) / (2 * h)
    assert fd == pytest.approx((g * v).sum().item(), rel=1e-7)
    # gradient x input: piece i's score is d/dt F(x with x_i scaled by 1 + t) at t = 0
    a = I.gradient_x_input(p64, TEXT)
    for i in np.flatnonzero(~f.special)[:4]:
        up, down = f.x.clone(), f.x.clone()
        up[0, i] *= 1 + h
        down[0, i] *= 1 - h
        assert a.scores[i] == pytest.approx((f.value(up) - f.value(down)) / (2 * h), rel=1e-6, abs=1e-10)
    assert a.method == "grad_x_input" and a.delta == pytest.approx(a.scores.sum() - (a.output - a.baseline_output))


# ---- words, html, dict ----------------------------------------------------------------------------------------------------

def test_words_merge_pieces_by_offsets(pred):
    text = "  The unbelievably tedious plot   doesn't work. "
    a = I.integrated_gradients(pred, text, steps=8)
    words = a.words()
    assert [w for w, _ in words] == text.split()
    pieces = dict(zip(a.tokens, a.scores))
    assert a.tokens.count("'") == 1 and "doesn" in a.tokens and any(t.startswith("##") for t in a.tokens)   # split words
    d = dict(words)
    assert d["doesn't"] == pytest.approx(pieces["doesn"] + pieces["'"] + pieces["t"])
    assert sum(d.values()) == pytest.approx(a.scores[~a.special].sum())
    neg = a.top(10, sign="negative")
    assert all(s < 0 for _, s in neg) and [s for _, s in neg] == sorted(s for _, s in neg)
    top = a.top(3)
    assert [abs(s) for _, s in top] == sorted((abs(s) for _, s in words), reverse=True)[:3]
    assert all(t not in ("[CLS]", "[SEP]") for t, _ in a.top(100, words=False))


def test_html_escapes_the_text(pred):
    text = "<script>alert('x')</script> a great & moving film"
    a = I.gradient_x_input(pred, text)
    fragment, page = a.to_html(), I.html_page([a], title="<b>bold</b>")
    for html in (fragment, page):
        assert "<script" not in html and "</script" not in html and "&lt;" in html and "&amp;" in html
    pieces = re.search(r"</div><div>(.*)</div></div>", fragment).group(1)       # the text, piece by piece
    assert htmllib.unescape(re.sub(r"<[^>]+>", "", pieces)) == text                # shows exactly the text, escaped
    assert "<b>bold</b>" not in page and "&lt;b&gt;bold&lt;/b&gt;" in page and page.startswith("<!DOCTYPE html>")
    assert a._repr_html_() == fragment and "rgba(214,39,40," in fragment and "rgba(31,119,180," in fragment


def test_to_dict_is_json(pred):
    a = I.integrated_gradients(pred, TEXT, steps=8)
    d = json.loads(json.dumps(a.to_dict(k=3)))
    assert d["target"] == a.label and d["target_index"] == a.target and d["steps"] == 8 and len(d["words"]) == 3
    assert d["delta"] == pytest.approx(a.delta) and d["scores"] == pytest.approx(a.scores.tolist())
    r = json.loads(json.dumps(I.attention_rollout(pred, TEXT).to_dict()))
    assert r["delta"] is None and r["baseline_output"] is None and r["method"] == "rollout"


# ---- rollout and curves ---------------------------------------------------------------------------------------------------

def test_rollout(pred):
    model = pred.model
    model.set_attn_implementation("sdpa")                            # PyTorch's fused attention returns no attention weights
    a = I.attention_rollout(pred, TEXT)
    assert model.config._attn_implementation == "sdpa"
    with I.eager_attention(model), torch.no_grad():
        atts = model(**pred.tokenizer(TEXT, return_tensors="pt"), output_attentions=True).attentions
    assert model.config._attn_implementation == "sdpa" and len(atts) == 2
    R = I.rollout(atts)
    assert torch.allclose(R.sum(-1), torch.ones(len(R), dtype=R.dtype)) and (R >= 0).all()
    assert np.allclose(a.scores, R[0].numpy()) and a.scores.sum() == pytest.approx(1.0)
    by_hand = torch.eye(len(R), dtype=torch.float64)
    for layer in atts:
        m = layer[0].double().mean(0) + torch.eye(len(R), dtype=torch.float64)
        by_hand = (m / m.sum(-1, keepdim=True)) @ by_hand
    assert torch.allclose(R, by_hand)
    assert a.method == "rollout" and a.delta is None and a.steps is None


def test_deletion_and_insertion_curves_end_where_they_should(pred):
    a = I.integrated_gradients(pred, TEXT, steps=16, output="prob")
    n = int((~a.special).sum())
    dele = I.deletion_curve(pred, TEXT, a)
    ins = I.deletion_curve(pred, TEXT, a, mode="insertion")
    assert len(dele.values) == len(ins.values) == n + 1 and dele.fractions[0] == 0 and dele.fractions[-1] == 1
    assert dele.values[0] == pytest.approx(a.output, abs=1e-6) and dele.values[-1] == pytest.approx(a.baseline_output, abs=1e-6)
    assert ins.values[0] == pytest.approx(a.baseline_output, abs=1e-6) and ins.values[-1] == pytest.approx(a.output, abs=1e-6)
    assert dele.order[0] == int(np.argmax(np.where(a.special, -np.inf, a.scores)))    # the highest score goes first
    # one step by hand: the first deletion replaces that piece with the [PAD] embedding
    f = I.TargetFunction(pred, TEXT, target=a.target, output="prob")
    x = f.x.clone()
    x[0, dele.order[0]] = f.baseline("pad")[0, dele.order[0]]
    assert dele.values[1] == pytest.approx(f.value(x), abs=1e-6)
    area = I.curve_area(dele)
    assert area == pytest.approx(np.sum(np.diff(dele.fractions) * (dele.values[1:] + dele.values[:-1]) / 2))
    assert I.curve_area(([0, 0.5, 1], [1, 1, 0])) == pytest.approx(0.75)
    same = I.deletion_curve(pred, TEXT, a.scores.tolist(), target=a.target)
    assert np.allclose(same.values, dele.values)
    with pytest.raises(ValueError, match="one score per piece"):
        I.deletion_curve(pred, TEXT, [1.0, 2.0])
    with pytest.raises(ValueError, match="mode must be one of"):
        I.deletion_curve(pred, TEXT, a, mode="sideways")


# ---- a regression head ----------------------------------------------------------------------------------------------------

def test_a_regression_model(reg_pred):
    a = I.integrated_gradients(reg_pred, TEXT, steps=64)
    assert (a.target, a.label) == (0, "score") and _relative_gap(a) < 1e-4
    assert a.output == pytest.approx(reg_pred.predict([TEXT])[0]["value"], abs=1e-5)
    assert I.integrated_gradients(reg_pred, TEXT, steps=8, target="score").target == 0
    for method in I.EXPLAINERS: assert I.explain(reg_pred, TEXT, method=method).label == "score"
    with pytest.raises(ValueError, match="output='prob' needs a classifier"):
        I.integrated_gradients(reg_pred, TEXT, output="prob")
    with pytest.raises(ValueError, match="1 output"):
        I.integrated_gradients(reg_pred, TEXT, target=1)
    curve = I.deletion_curve(reg_pred, TEXT, a)
    assert curve.output_kind == "logit" and curve.values[0] == pytest.approx(a.output, abs=1e-5)


# ---- errors and the model's state -----------------------------------------------------------------------------------------

def test_errors_say_what_to_do(pred):
    with pytest.raises(ValueError, match=r"target='neutral' is not a label .* 0 'negative', 1 'positive'"):
        I.integrated_gradients(pred, TEXT, target="neutral")
    with pytest.raises(ValueError, match="index from 0 to 1"):
        I.gradient_x_input(pred, TEXT, target=2)
    with pytest.raises(TypeError, match="target=1.5"):
        I.integrated_gradients(pred, TEXT, target=1.5)
    with pytest.raises(ValueError, match="method='lime' is not an attribution method; use one of 'ig'"):
        I.explain(pred, TEXT, method="lime")
    with pytest.raises(ValueError, match="baseline must be one of 'pad', 'mask', 'zero'"):
        I.integrated_gradients(pred, TEXT, baseline="unk")
    with pytest.raises(ValueError, match="baseline must be one of"):
        I.captum_integrated_gradients(pred, TEXT, baseline="unk")
    with pytest.raises(ValueError, match="text is blank"):
        I.integrated_gradients(pred, "   ")
    with pytest.raises(ValueError, match=r"texts to explain: the text at position 1 \(counting from 0\) is blank"):
        pred.explain(["a film", ""])
    with pytest.raises(ValueError, match="texts to explain: the list is empty"):
        pred.explain([])
    with pytest.raises(TypeError, match="pass a string"):
        I.attention_rollout(pred, 42)
    with pytest.raises(ValueError, match="takes no steps="):
        pred.explain(TEXT, method="rollout", steps=8)
    with pytest.raises(ValueError, match="steps must be a whole number"):
        I.integrated_gradients(pred, TEXT, steps=0)
    with pytest.raises(ValueError, match="output must be one of"):
        I.integrated_gradients(pred, TEXT, output="logprob")


def test_captum_missing_says_how_to_install(pred, monkeypatch):
    monkeypatch.setitem(sys.modules, "captum.attr", None)
    with pytest.raises(ImportError, match=r'pip install "bigmodel_nb\[interpret\]"'):
        I.captum_integrated_gradients(pred, TEXT)


def test_the_models_mode_and_gradients_are_restored(pred):
    model = pred.model
    model.train()
    frozen = model.bert.embeddings.word_embeddings.weight
    frozen.requires_grad_(False)
    try:
        flags = [p.requires_grad for p in model.parameters()]
        for method in I.EXPLAINERS: pred.explain(TEXT, method=method)
        I.deletion_curve(pred, TEXT, pred.explain(TEXT, method="grad_x_input"))
        assert model.training and all(m.training for m in model.modules())
        assert [p.requires_grad for p in model.parameters()] == flags and not frozen.requires_grad
        assert all(p.grad is None for p in model.parameters())
        assert model.config._attn_implementation == "sdpa"
    finally:
        frozen.requires_grad_(True)
        model.eval()


def test_predictor_explain_dispatches(pred):
    one = pred.explain(TEXT, steps=8)
    many = pred.explain([TEXT, "a tedious mess"], method="grad_x_input", target="positive")
    direct = I.integrated_gradients(pred, TEXT, steps=8)
    assert np.allclose(one.scores, direct.scores) and [a.label for a in many] == ["positive", "positive"]
    assert [a.text for a in many] == [TEXT, "a tedious mess"] and all(a.method == "grad_x_input" for a in many)


# ---- the command line -----------------------------------------------------------------------------------------------------

def test_explain_prints_one_json_line_per_text(clf_dir, pred, capsys):
    texts = ["a gripping, beautifully acted film", "a tedious mess"]
    code, out, err = run_main(capsys, "explain", "--model", clf_dir, *texts, "--steps", "32", "--top", "3", "--device", "cpu")
    assert code == 0, err
    lines = [json.loads(l) for l in out.splitlines()]
    assert [l["text"] for l in lines] == texts
    logits = pred.outputs(texts)
    for l, z in zip(lines, logits):
        assert l["method"] == "ig" and l["steps"] == 32 and l["target"] == ["negative", "positive"][int(z.argmax())]
        assert l["output"] == pytest.approx(z.max().item(), abs=1e-4) and len(l["words"]) == 3
        assert abs(l["delta"]) < 1e-3 * abs(l["output"] - l["baseline_output"])
        assert all(w in l["text"].split() for w, _ in l["words"])
    code, out, err = run_main(capsys, "explain", "--model", clf_dir, texts[0], "--target", "1", "--method", "grad_x_input")
    assert code == 0 and json.loads(out)["target"] == "positive" and json.loads(out)["baseline"] == "zero"


def test_explain_with_captum(clf_dir, capsys):
    code, out, err = run_main(capsys, "explain", "--model", clf_dir, TEXT, "--method", "captum_ig", "--steps", "16", "--baseline", "mask",
                              "--target", "negative")
    assert code == 0, err
    theirs = json.loads(out)
    code, out, err = run_main(capsys, "explain", "--model", clf_dir, TEXT, "--steps", "16", "--baseline", "mask", "--target", "negative")
    ours = json.loads(out)
    assert theirs["method"] == "captum_ig" and theirs["target"] == "negative"
    assert dict(theirs["words"]) == pytest.approx(dict(ours["words"]), abs=1e-5)


def test_explain_writes_an_html_page(clf_dir, tmp_path, capsys):
    page = tmp_path / "why.html"
    args = ["explain", "--model", clf_dir, "<script>x</script> a fine film", "a dull film", "--html", page, "--steps", "8"]
    code, out, err = run_main(capsys, *args)
    assert code == 0 and len(out.splitlines()) == 2 and f"wrote 2 attributions to {page}" in err
    html = page.read_text()
    assert html.startswith("<!DOCTYPE html>") and "&lt;" in html and "<script" not in html and "dull" in html
    code, out, err = run_main(capsys, *args)
    assert code == 2 and "exists; pass --overwrite" in err and not out
    code, out, err = run_main(capsys, *args, "--overwrite", "--method", "rollout", "--steps", "8")
    assert code == 2 and "--steps applies to --method ig and captum_ig" in err
    code, out, err = run_main(capsys, *args[:-2], "--overwrite", "--method", "rollout")
    assert code == 0 and "rollout" in page.read_text()
    code, out, err = run_main(capsys, "explain", "--model", clf_dir, "a film", "--html", tmp_path / "why.txt")
    assert code == 2 and "write the page to a .html file" in err


def test_explain_usage_errors(clf_dir, capsys, monkeypatch):
    code, out, err = run_main(capsys, "explain", "--model", clf_dir, "a film", "--target", "neutral")
    assert code == 2 and "--target neutral" in err and "0 'negative', 1 'positive'" in err and "Traceback" not in err
    code, out, err = run_main(capsys, "explain", "--model", clf_dir, "a film", "--method", "lime")
    assert code == 2 and "invalid choice: 'lime'" in err
    code, out, err = run_main(capsys, "explain", "--model", clf_dir, "a film", "--method", "grad_x_input", "--tolerance", "0.01")
    assert code == 2 and "--tolerance applies to --method ig" in err
    code, out, err = run_main(capsys, "explain", "--model", clf_dir, "a film", "  ")
    assert code == 2 and "argument 2" in err
    monkeypatch.setitem(sys.modules, "captum.attr", None)
    code, out, err = run_main(capsys, "explain", "--model", clf_dir, "a film", "--method", "captum_ig")
    assert code == 2 and 'pip install "bigmodel_nb[interpret]"' in err
