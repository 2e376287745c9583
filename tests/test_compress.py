"""Quantisation from the formula, checked against PyTorch's own quantiser, observers and dynamic-int8 Linear (used here only
as the reference: they are deprecated in PyTorch 2.13, and the library does not call them)."""
import warnings

import pytest
import torch

from bigmodel_nb.compress import EPS, QParams, QuantError, choose_qparams, int8_linear, qrange

warnings.filterwarnings("ignore", message=".*(quantize_per_tensor|torch.ao.quantization).*")
from torch.ao.quantization import MinMaxObserver, PerChannelMinMaxObserver  # noqa: E402


def _observed(x, axis=None, symmetric=True, signed=True, reduce_range=False):
    dtype = torch.qint8 if signed else torch.quint8
    if axis is None:
        obs = MinMaxObserver(dtype=dtype, qscheme=torch.per_tensor_symmetric if symmetric else torch.per_tensor_affine, reduce_range=reduce_range)
    else:
        obs = PerChannelMinMaxObserver(ch_axis=axis, dtype=dtype, reduce_range=reduce_range,
                                       qscheme=torch.per_channel_symmetric if symmetric else torch.per_channel_affine)
    obs(x)
    s, z = obs.calculate_qparams()
    return s, z, dtype


CASES = [dict(), dict(symmetric=False), dict(axis=0), dict(axis=1), dict(axis=-1, symmetric=False), dict(symmetric=True, signed=False),
         dict(symmetric=False, signed=True), dict(reduce_range=True), dict(symmetric=False, reduce_range=True)]


@pytest.mark.parametrize("kw", CASES, ids=[",".join(f"{k}={v}" for k, v in c.items()) or "default" for c in CASES])
@pytest.mark.parametrize("shift", [0.0, 0.9])
def test_same_scale_zero_point_and_integers_as_pytorch(kw, shift):
    torch.manual_seed(1)
    x = torch.randn(37, 53) * torch.rand(37, 1) * 3 + shift            # rows of different ranges; shifted: not centred on 0
    qp = choose_qparams(x, **kw)
    symmetric = kw.get("symmetric", True)
    s, z, dtype = _observed(x, kw.get("axis"), symmetric, kw.get("signed", symmetric), kw.get("reduce_range", False))
    assert torch.equal(qp.scale, s.reshape(qp.scale.shape)) and torch.equal(qp.zero_point, z.reshape(qp.zero_point.shape).long())
    if qp.axis is None: theirs = torch.quantize_per_tensor(x, s.item(), int(z), dtype)
    else: theirs = torch.quantize_per_channel(x, s, z, qp.axis, dtype)
    q = qp.quantize(x)
    if kw.get("reduce_range"):            # torch's integers still span all 8 bits; the reduced grid clips its one extreme value
        assert torch.equal(q, theirs.int_repr().long().clamp(qp.qmin, qp.qmax))
    else:
        assert torch.equal(q, theirs.int_repr().long())
        assert torch.allclose(qp.dequantize(q), theirs.dequantize(), atol=0, rtol=0)
    assert ((x - qp.fake(x)).abs() <= qp.half_step(x) * (1 + 1e-4)).all()        # the error bound, inside the range
    assert q.min() >= qp.qmin and q.max() <= qp.qmax


def test_ranges_and_zero():
    assert qrange(8) == (-128, 127) and qrange(8, signed=False) == (0, 255) and qrange(4) == (-8, 7)
    zeros = torch.zeros(5, 3)
    qp = choose_qparams(zeros)
    s, _, _ = _observed(zeros)
    assert qp.scale.item() == s.item() == EPS and torch.equal(qp.fake(zeros), zeros)
    x = torch.tensor([-1.0, 0.0, 0.3, 2.0])
    for sym in (True, False):
        assert choose_qparams(x, symmetric=sym).fake(x)[1] == 0.0              # 0 is always exactly on the grid


def test_outside_the_range_is_clipped():
    qp = choose_qparams(torch.tensor([-1.0, 1.0]))
    far = torch.tensor([5.0, -5.0])
    assert qp.quantize(far).tolist() == [127, -128]


def test_int8_linear_matches_pytorchs_dynamic_int8_layer():
    torch.manual_seed(2)
    for d_in, d_out, shape in [(48, 16, (64,)), (384, 384, (3, 11)), (20, 7, (1,))]:
        lin = torch.nn.Linear(d_in, d_out)
        x = torch.randn(*shape, d_in) * 2 + 0.3
        qlin = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear}, dtype=torch.qint8)[0]
        with torch.no_grad():
            ours, theirs = int8_linear(x, lin.weight, lin.bias), qlin(x)
            assert ours.shape == theirs.shape
            assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-6), (ours - theirs).abs().max()
            assert qlin.weight().q_scale() == choose_qparams(lin.weight).scale.item()
            no_bias = int8_linear(x, lin.weight)
            assert torch.allclose(no_bias + lin.bias, ours, atol=1e-5)


def test_the_integer_sums_are_exact():
    torch.manual_seed(3)
    x, w = torch.randn(5, 300), torch.randn(10, 300)
    qx, qw = choose_qparams(x, symmetric=False, reduce_range=True), choose_qparams(w)
    a = (qx.quantize(x) - qx.zero_point).to(torch.int32) @ qw.quantize(w).to(torch.int32).T
    b = (qx.quantize(x) - qx.zero_point).double() @ qw.quantize(w).double().T
    assert a.dtype == torch.int32 and torch.equal(a.double(), b)


@pytest.mark.parametrize("call, words", [
    (lambda: qrange(1), "bits=1"), (lambda: qrange(True), "bits=True"),
    (lambda: choose_qparams(torch.tensor([])), "empty"), (lambda: choose_qparams(torch.tensor([1.0, float("nan")])), "NaN"),
    (lambda: choose_qparams(torch.ones(3, 4), axis=2), "axis=2"), (lambda: choose_qparams(torch.ones(3, dtype=torch.long)), "floating-point"),
])
def test_bad_arguments_are_named(call, words):
    with pytest.raises(QuantError, match=words):
        call()
    assert issubclass(QuantError, ValueError) and QParams


# ---- distillation

from bigmodel_nb.compress import Distill, distillation_loss, drop_layers  # noqa: E402


def test_distillation_loss_is_the_formula_and_skips_padding():
    torch.manual_seed(4)
    zs, zt = torch.randn(7, 3), torch.randn(7, 3)
    y = torch.tensor([0, 2, 1, -100, 1, 0, -100])
    T, a = 3.0, 0.3
    real = y != -100
    ce = -torch.log_softmax(zs[real], -1).gather(1, y[real, None]).sum()
    pt, ps = (zt[real] / T).softmax(-1), (zs[real] / T).softmax(-1)
    kl = (pt * (pt.log() - ps.log())).sum()
    total, n = distillation_loss(zs, zt, y, T=T, alpha=a)
    assert n == 5 and torch.allclose(total, (1 - a) * ce + a * T * T * kl, atol=1e-5)
    assert torch.allclose(distillation_loss(zs, zt, y, alpha=0.0)[0], ce, atol=1e-5)           # alpha 0: plain cross-entropy
    same, _ = distillation_loss(zs, zs, y, T=2.0, alpha=1.0)
    assert abs(same.item()) < 1e-5                                                            # imitating itself costs nothing


def test_distillation_gradient_is_T_times_the_difference_of_softened_probabilities():
    torch.manual_seed(5)
    zs, zt, y = torch.randn(4, 5, requires_grad=True), torch.randn(4, 5), torch.tensor([1, 0, 4, 2])
    for T in (1.0, 2.5, 6.0):
        g, = torch.autograd.grad(distillation_loss(zs, zt, y, T=T, alpha=1.0)[0], zs)
        assert torch.allclose(g, T * ((zs / T).softmax(-1) - (zt / T).softmax(-1)), atol=1e-6)


@pytest.mark.parametrize("kw, words", [(dict(T=0), "T=0"), (dict(alpha=1.5), "alpha=1.5"), (dict(T=True), "T=True")])
def test_distillation_arguments_are_checked(kw, words):
    with pytest.raises(ValueError, match=words):
        distillation_loss(torch.zeros(2, 2), torch.zeros(2, 2), torch.zeros(2, dtype=torch.long), **kw)
    with pytest.raises(ValueError, match=words):
        Distill(torch.nn.Linear(2, 2), **{"T": 2.0, "alpha": 0.5, **kw})
    with pytest.raises(ValueError, match="same classes"):
        distillation_loss(torch.zeros(2, 2), torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))


def test_drop_layers_keeps_the_chosen_layers_and_reloads(tiny_bert_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification
    big = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    big.config.num_hidden_layers = 2
    small = drop_layers(big, keep=[1])
    assert small.config.num_hidden_layers == 1 and len(small.bert.encoder.layer) == 1 and len(big.bert.encoder.layer) == 2
    assert torch.equal(small.bert.encoder.layer[0].attention.self.query.weight, big.bert.encoder.layer[1].attention.self.query.weight)
    small.bert.encoder.layer[0].attention.self.query.weight.data += 1            # a copy: the teacher is untouched
    assert not torch.equal(small.bert.encoder.layer[0].attention.self.query.weight, big.bert.encoder.layer[1].attention.self.query.weight)
    small.save_pretrained(tmp_path / "s")
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path / "s")
    x = dict(input_ids=torch.tensor([[2, 50, 60, 3]]), attention_mask=torch.ones(1, 4, dtype=torch.long))
    small.eval(); again.eval()
    assert torch.allclose(small(**x).logits, again(**x).logits, atol=1e-6)
    assert drop_layers(big).config.num_hidden_layers == 1                        # every other layer of 2: layer 0
    for bad in ([2], [], [0, 0], [True]):
        with pytest.raises(ValueError, match="keep="):
            drop_layers(big, keep=bad)


def test_distill_callback_trains_on_the_formula_and_leaves_the_teacher_alone(tiny_bert_dir, movie_data):
    from transformers import AutoModelForSequenceClassification
    from bigmodel_nb.core import set_seed
    from bigmodel_nb.events import Callback
    from bigmodel_nb.learner import Learner
    set_seed(0)
    teacher = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2).train()
    frozen = {n: p.clone() for n, p in teacher.named_parameters()}

    class Check(Callback):
        order = 0
        def __init__(self): self.diffs, self.mixed = [], []
        def after_loss(self):
            l = self.learn
            inputs = {k: v for k, v in l.batch.items() if k != "labels"}
            with torch.no_grad(): t = teacher(**inputs).logits
            total, _ = distillation_loss(l.pred, t, l.batch["labels"], T=3.0, alpha=0.7)
            ce, _ = l.task.loss(l.pred, l.batch["labels"])
            self.diffs.append(abs((total * l.loss_scale - l.loss).item()))
            self.mixed.append(abs((ce * l.loss_scale - l.loss).item()))

    check = Check()
    student = drop_layers(teacher, keep=[0])
    learn = Learner(student, movie_data, dict(lr=1e-3, batch_size=32, epochs=1), device="cpu", progress=False,
                    cbs=[Distill(teacher, T=3.0, alpha=0.7), check])
    learn.fit()
    assert len(check.diffs) == learn.batches and max(check.diffs) < 1e-5
    assert max(check.mixed) > 1e-3                                               # the loss really changed from plain cross-entropy
    assert all(torch.equal(p, frozen[n]) for n, p in teacher.named_parameters())
    assert teacher.training and all(p.requires_grad for p in teacher.parameters())   # lent in training mode, given back so


def test_distill_refuses_a_regression_task(tiny_bert_dir):
    from transformers import AutoModelForSequenceClassification
    from bigmodel_nb.assets import load_sample
    from bigmodel_nb.data import TextData
    from bigmodel_nb.learner import Learner
    from transformers import AutoTokenizer
    df = load_sample("movie_reviews").sample(40, random_state=0)
    data = TextData(list(df.text), [float(i % 5) for i in range(40)], task="regression")
    data.tokenize(AutoTokenizer.from_pretrained(tiny_bert_dir), max_length=16)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=1, ignore_mismatched_sizes=True)
    learn = Learner(model, data, dict(epochs=1), device="cpu", progress=False, cbs=[Distill(model)])
    with pytest.raises(ValueError, match="classification"):
        learn.fit()


# ---- magnitude pruning

from bigmodel_nb.compress import prunable_weights, prune_magnitude, sparsity  # noqa: E402


def _tiny_classifier():
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(6)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_labels=2)
    return BertForSequenceClassification(cfg).eval()


def test_global_pruning_is_the_top_k_mask():
    model = _tiny_classifier()
    before = torch.cat([m.weight.detach().abs().flatten() for m, _ in prunable_weights(model)])
    assert len(prunable_weights(model)) == 2 * 6                           # q, k, v, attention out, intermediate, output per layer
    embeddings = model.bert.embeddings.word_embeddings.weight.clone()
    prune_magnitude(model, 0.4)
    after = torch.cat([m.weight.detach().flatten() for m, _ in prunable_weights(model)])
    k = int(round(0.4 * before.numel()))
    want = torch.ones_like(before, dtype=torch.bool); want[before.argsort()[:k]] = False
    assert torch.equal(after != 0, want) and sparsity(model) == pytest.approx(0.4, abs=1 / before.numel())
    assert torch.equal(model.bert.embeddings.word_embeddings.weight, embeddings)      # embeddings and head are not pruned
    assert not any(n.endswith("_orig") or n.endswith("_mask") for n, _ in model.named_parameters())   # a plain model again


def test_layer_pruning_gives_each_matrix_the_same_share(tmp_path):
    model = prune_magnitude(_tiny_classifier(), 0.25, scope="layer")
    for m, _ in prunable_weights(model):
        assert (m.weight == 0).float().mean().item() == pytest.approx(0.25, abs=1 / m.weight.numel())
    model.save_pretrained(tmp_path)
    from transformers import AutoModelForSequenceClassification
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert sparsity(again) == pytest.approx(sparsity(model))


@pytest.mark.parametrize("kw, words", [(dict(amount=1.0), "amount=1.0"), (dict(amount=-0.1), "amount=-0.1"),
                                       (dict(amount=0.5, scope="rows"), "scope='rows'")])
def test_pruning_arguments_are_checked(kw, words):
    with pytest.raises(ValueError, match=words):
        prune_magnitude(_tiny_classifier(), **kw)


# ---- whole-model quantisation in PyTorch

from bigmodel_nb.compress import QUANTIZE_METHODS, quantize  # noqa: E402


@pytest.mark.parametrize("method", QUANTIZE_METHODS)
def test_quantize_returns_a_close_copy(method):
    pytest.importorskip("torchao")
    model = _tiny_classifier()
    x = dict(input_ids=torch.randint(5, 100, (4, 9)), attention_mask=torch.ones(4, 9, dtype=torch.long))
    with torch.no_grad():
        want = model(**x).logits
        q = quantize(model, method)
        got = q(**x).logits.float()
    assert q is not model and model.bert.encoder.layer[0].attention.self.query.weight.dtype == torch.float32   # the original is untouched
    assert torch.allclose(got, want, atol=0.05) and got.shape == want.shape
    if method in ("fp16", "bf16"):
        assert next(q.parameters()).dtype == (torch.float16 if method == "fp16" else torch.bfloat16)
    else:
        assert type(q.bert.encoder.layer[0].attention.self.query.weight).__name__ != "Parameter"      # a torchao int8 tensor


@pytest.mark.parametrize("method,embeddings", [("int8-dynamic", "int8"), ("int8-weight", "fp16"), ("fp16", "int8"), ("bf16", "fp16")])
def test_embeddings_stored_compactly_give_their_rows_back_within_half_a_step(method, embeddings):
    pytest.importorskip("torchao")
    import io
    from bigmodel_nb.compress import CompactEmbedding
    model = _tiny_classifier()
    x = dict(input_ids=torch.randint(5, 100, (4, 9)), attention_mask=torch.ones(4, 9, dtype=torch.long))
    plain, compact = quantize(model, method), quantize(model, method, embeddings=embeddings)
    words = compact.bert.embeddings.word_embeddings
    assert isinstance(words, CompactEmbedding) and isinstance(model.bert.embeddings.word_embeddings, torch.nn.Embedding)
    assert words.table.dtype == (torch.int8 if embeddings == "int8" else torch.float16)
    w = model.bert.embeddings.word_embeddings.weight.detach()
    step = choose_qparams(w, axis=0).scale[:, None] if embeddings == "int8" else w.abs() * 2**-10
    rounding = w.abs() * (2**-8 if method in ("fp16", "bf16") else 0)     # the 16-bit model's own rounding of the table first
    assert ((words(torch.arange(100)).float() - w).abs() <= step / 2 + rounding + 1e-6).all()
    def size(m):
        b = io.BytesIO(); torch.save(m.state_dict(), b); return b.tell()
    assert size(compact) < size(plain) if (method, embeddings) != ("bf16", "fp16") else size(compact) == size(plain)   # 16 bits either way
    with torch.no_grad():
        assert torch.allclose(compact(**x).logits.float(), model(**x).logits, atol=0.05)


def test_quantize_refuses_unknown_methods_and_says_what_to_install(monkeypatch):
    with pytest.raises(QuantError, match="int8-dynamic"):
        quantize(_tiny_classifier(), "int4")
    with pytest.raises(QuantError, match="embeddings='int4'"):
        quantize(_tiny_classifier(), "fp16", embeddings="int4")
    import sys
    monkeypatch.setitem(sys.modules, "torchao", None)
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    with pytest.raises(ImportError, match=r'bigmodel_nb\[torchao\]'):
        quantize(_tiny_classifier(), "int8-dynamic")


# ---- attention-head pruning

from bigmodel_nb.compress import head_importance, least_important_heads, prune_heads  # noqa: E402


def _batches(n=3):
    torch.manual_seed(7)
    return [dict(input_ids=torch.randint(5, 100, (4, 10)), attention_mask=torch.ones(4, 10, dtype=torch.long),
                 labels=torch.randint(0, 2, (4,))) for _ in range(n)]


def test_head_importance_is_the_gate_gradient():
    model = _tiny_classifier()
    batches = _batches()
    imp = head_importance(model, batches)
    assert imp.shape == (2, 2) and torch.allclose(imp.norm(dim=1), torch.ones(2))
    # the same by hand: a gate on layer 0's heads, through a hook of our own
    gates = torch.ones(2, requires_grad=True)
    hook = model.bert.encoder.layer[0].attention.output.dense.register_forward_pre_hook(
        lambda m, a: ((a[0].unflatten(-1, (2, -1)) * gates[:, None]).flatten(-2),))
    total = torch.zeros(2)
    for b in batches:
        b = dict(b); y = b.pop("labels")
        total += torch.autograd.grad(torch.nn.functional.cross_entropy(model(**b).logits, y), gates)[0].abs()
    hook.remove()
    assert torch.allclose(imp[0], total / total.norm(), atol=1e-5)
    assert all(p.grad is None for p in model.parameters())                   # the model's own gradients are untouched


def test_a_pruned_head_is_a_closed_gate_and_the_model_exports(tmp_path):
    model = _tiny_classifier()
    x = dict(input_ids=torch.randint(5, 100, (3, 8)), attention_mask=torch.ones(3, 8, dtype=torch.long))
    hook = model.bert.encoder.layer[1].attention.output.dense.register_forward_pre_hook(
        lambda m, a: ((a[0].unflatten(-1, (2, -1)) * torch.tensor([1.0, 0.0])[:, None]).flatten(-2),))
    with torch.no_grad(): closed = model(**x).logits
    hook.remove()
    prune_heads(model, {1: [1]})
    sa = model.bert.encoder.layer[1].attention.self
    assert sa.num_attention_heads == 1 and sa.query.out_features == 16 and model.bert.encoder.layer[1].attention.output.dense.in_features == 16
    with torch.no_grad(): assert torch.allclose(model(**x).logits, closed, atol=1e-6)
    pytest.importorskip("onnxscript"); pytest.importorskip("onnxruntime")
    from transformers import AutoTokenizer
    from bigmodel_nb.assets import model_path
    from bigmodel_nb.compress import export_onnx, load_onnx
    big = _tiny_classifier().eval()
    big.resize_token_embeddings(len(AutoTokenizer.from_pretrained(model_path("minilm"))))
    prune_heads(big, {0: [0]})
    folder = export_onnx(big, AutoTokenizer.from_pretrained(model_path("minilm")), tmp_path / "onnx")    # checks ONNX against torch itself
    assert load_onnx(folder)[0].config.num_labels == 2


def test_least_important_heads_keeps_one_per_layer_and_bad_requests_are_named():
    imp = torch.tensor([[0.1, 0.2, 0.3], [0.05, 0.9, 0.8]])
    assert least_important_heads(imp, 2) == {1: [0], 0: [0]}
    assert sum(map(len, least_important_heads(imp, 10).values())) == 4      # never the last head of a layer
    model = _tiny_classifier()
    for heads, words in [({0: [0, 1]}, "keep at least one"), ({5: [0]}, "layer 5"), ({0: [7]}, "heads \\[7\\]")]:
        with pytest.raises(ValueError, match=words):
            prune_heads(model, heads)


# ---- timing and torchao's import

from bigmodel_nb.compress import import_torchao, inference_speed  # noqa: E402


def test_inference_speed_runs_the_batches_asked_for_and_names_too_few_texts():
    model = _tiny_classifier().train()
    calls = []
    model.register_forward_pre_hook(lambda m, args, kwargs: calls.append(kwargs["input_ids"].shape), with_kwargs=True)
    texts = [f"review number {i} " + "word " * (i % 5) for i in range(20)]
    class Words:                                                   # a tokenizer over whitespace words, enough for a timing
        def __call__(self, batch, padding, truncation, max_length, return_tensors):
            longest = min(max(len(t.split()) for t in batch), max_length)
            ids = torch.tensor([[1 + len(w) % 50 for w in t.split()[:longest]] + [0] * (longest - len(t.split()[:longest])) for t in batch])
            from transformers import BatchEncoding
            return BatchEncoding({"input_ids": ids, "attention_mask": (ids > 0).long()})
    r = inference_speed(model, Words(), texts, batch_size=4, batches=3, warmup=1, repeats=2, max_length=3)
    assert len(calls) == 1 + 3 * 2 and all(s[0] == 4 and s[1] <= 3 for s in calls)
    assert r["ms_per_batch"] > 0 and r["texts_per_s"] == pytest.approx(4000 / r["ms_per_batch"]) and r["repeats"] == 2
    assert model.training                                          # the mode it came in is given back
    with pytest.raises(ValueError, match="pass at least 20"):
        inference_speed(model, Words(), texts[:19], batch_size=5, batches=3)
    with pytest.raises(ValueError, match="positive integers"):
        inference_speed(model, Words(), texts, repeats=0)


def test_import_torchao_gives_the_module_and_leaves_logging_as_it_was():
    import logging
    before = logging.getLogger("torchao").level
    torchao = import_torchao()
    assert hasattr(torchao, "quantization") and logging.getLogger("torchao").level == before
