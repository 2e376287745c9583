"""The HTTP server (`bigmodel_nb.serve`, `bigmodel-nb serve`): a real uvicorn server on a loopback port, called over HTTP.
500 concurrent requests each get the answer `Predictor` gives for their own text; malformed requests get a 4xx that says what
to send, a failing model a 5xx, and the server goes on serving."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
from bigmodel_nb.predict import Predictor  # noqa: E402
from bigmodel_nb.serve import (BackgroundServer, MicroBatcher, ServeClient, ServeError, format_answer, is_loopback,  # noqa: E402
                               load_test, make_app, parse_request, require_serve)

ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}


def call(url, body=None, method=None, timeout=60):
    "`(status, parsed JSON)` of a request; `body` a dict (sent as JSON) or raw bytes."
    data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r: return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        raw = e.read()
        try: return e.code, json.loads(raw)
        except ValueError: return e.code, raw.decode(errors="replace")


@pytest.fixture(scope="module")
def trained(finetuned_dir): return finetuned_dir


@pytest.fixture(scope="module")
def reviews():
    from bigmodel_nb.assets import load_sample
    return list(load_sample("movie_reviews").sample(500, random_state=11).text)


def _same(answer, expected, tol=1e-4):
    "The same probabilities (to `tol`: a shared batch pads differently) and so the same label, unless it is a tie within `tol`."
    probs = answer["probabilities"]
    assert set(probs) == set(expected["probs"])
    assert all(abs(probs[k] - expected["probs"][k]) < tol for k in probs), (probs, expected)
    if max(expected["probs"].values()) - min(expected["probs"].values()) > 2 * tol: assert answer["label"] == expected["label"]


def test_500_concurrent_requests_each_get_the_answer_for_their_own_text(trained, reviews):
    predictor = Predictor.from_pretrained(trained, device="cpu", max_length=32)
    expected = [predictor.predict([t])[0] for t in reviews]                        # each text alone
    app = make_app(predictor, max_batch=32, max_wait_ms=5)
    with BackgroundServer(app) as server:
        with ThreadPoolExecutor(64) as pool:
            got = list(pool.map(lambda t: call(server.url + "/predict", {"text": t}), reviews))
        status, metrics = call(server.url + "/metrics")
    assert all(s == 200 for s, _ in got), [a for s, a in got if s != 200][:3]
    for (_, answer), want in zip(got, expected): _same(answer, want)
    assert status == 200 and metrics["requests"] == 500 and metrics["errors"] == 0 and metrics["in_system"] == 0
    assert metrics["batches"] < 500 and metrics["mean_batch"] > 1                  # concurrent callers shared forward passes
    little = metrics["little"]
    assert little["L"] == pytest.approx(little["lam_W"], rel=1e-6)                 # Little's law, measured two ways
    assert metrics["latency_ms"]["p50"] <= metrics["latency_ms"]["p95"] <= metrics["latency_ms"]["p99"]


def test_a_list_of_texts_gets_its_answers_in_order(trained, reviews):
    predictor = Predictor.from_pretrained(trained, device="cpu", max_length=32)
    with BackgroundServer(make_app(predictor, max_batch=8)) as server:
        status, body = call(server.url + "/predict", {"texts": reviews[:20]})
        meta = call(server.url + "/metadata")[1]
    assert status == 200 and len(body["predictions"]) == 20
    for answer, want in zip(body["predictions"], predictor.predict(reviews[:20])): _same(answer, want)
    assert meta["labels"] == list(predictor.model.config.id2label.values()) and meta["max_length"] == 32 and meta["task"] == "classification"


MALFORMED = [
    (b"this is not json", 400, "not JSON"),
    (b"\xff\xfe\x00", 400, "not JSON"),
    (b'["a list"]', 422, "send an object"),
    (b"{}", 422, "empty"),
    (b'{"txt": "a typo"}', 422, "unknown field 'txt'"),
    (b'{"text": "a", "texts": ["b"]}', 422, "not both"),
    (b'{"text": 42}', 422, '"text" is a number'),
    (b'{"text": null}', 422, '"text" is null'),
    (b'{"text": "   "}', 422, "empty"),
    (b'{"texts": "one string"}', 422, "send a list"),
    (b'{"texts": []}', 422, "empty list"),
    (b'{"texts": ["fine", {"a": 1}]}', 422, '"texts"[1] is an object'),
    (json.dumps({"texts": ["short"] * 65}).encode(), 413, "at most 64"),
    (json.dumps({"text": "word " * 2001}).encode(), 413, "at most 10,000"),
]


def test_malformed_requests_get_a_4xx_that_says_what_to_send_and_the_server_keeps_serving(trained):
    predictor = Predictor.from_pretrained(trained, device="cpu", max_length=32)
    with BackgroundServer(make_app(predictor)) as server:
        for body, status, words in MALFORMED:
            got, answer = call(server.url + "/predict", body)
            assert got == status and words in answer["error"], (body[:60], got, answer)
        assert call(server.url + "/predict", method="GET")[0] == 405                    # the wrong method
        assert call(server.url + "/nowhere")[0] == 404
        import http.client                                                         # a body announced larger than any valid one:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)    # refused from its headers, before it is read
        conn.putrequest("POST", "/predict"); conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(100_000_000)); conn.endheaders()
        answer = conn.getresponse()
        assert answer.status == 413 and "fewer or shorter texts" in json.loads(answer.read())["error"]
        conn.close()
        assert call(server.url + "/predict", {"text": "still serving"})[0] == 200
        assert call(server.url + "/health") == (200, {"status": "ok"})


def test_parse_request_without_a_server():
    assert parse_request(b'{"text": "a good film"}') == (["a good film"], True)
    assert parse_request(b'{"texts": ["a", "b"]}', max_texts=2) == (["a", "b"], False)
    for body, status, words in MALFORMED:
        with pytest.raises(ServeError, match=words.replace("[", r"\[").replace("]", r"\]")) as e: parse_request(body)
        assert e.value.status == status
    assert format_answer({"value": 1.5}) == {"value": 1.5}
    assert format_answer({"label": "a", "probs": {"a": 0.9, "b": 0.1}}) == {"label": "a", "probabilities": {"a": 0.9, "b": 0.1}}


class _Flaky(torch.nn.Module):
    "Fails on any batch that holds a text of exactly 7 tokens."
    def __init__(self, model): super().__init__(); self.model, self.config = model, model.config
    def forward(self, input_ids, attention_mask=None, **kw):
        if (attention_mask.sum(1) == 7).any(): raise RuntimeError("the model broke on this batch")
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kw)


def test_a_failing_model_gets_a_500_and_the_next_request_is_served(trained):
    base = Predictor.from_pretrained(trained, device="cpu", max_length=32)
    predictor = Predictor(_Flaky(base.model), base.tokenizer, device="cpu", max_length=32)
    seven = "one two three four five"                                            # [CLS] + 5 words + [SEP]
    assert len(base.tokenizer(seven)["input_ids"]) == 7
    with BackgroundServer(make_app(predictor, max_wait_ms=0)) as server:
        status, answer = call(server.url + "/predict", {"text": seven})
        assert status == 500 and "the model broke" in answer["error"] and "goes on serving" in answer["error"]
        assert call(server.url + "/predict", {"text": "a film"})[0] == 200
        assert call(server.url + "/health")[0] == 200 and call(server.url + "/metrics")[1]["errors"] == 1


def test_the_python_client_answers_like_the_predictor_and_raises_what_the_server_refuses(trained, reviews):
    predictor = Predictor.from_pretrained(trained, device="cpu", max_length=32)
    expected = predictor.predict(reviews[:5])
    with BackgroundServer(make_app(predictor, max_wait_ms=0)) as server:
        url = server.url
        with ServeClient(url) as c:
            assert c.wait(timeout=5) is c and c.health()
            _same(c.predict(reviews[0]), expected[0])
            for got, want in zip(c.predict(reviews[:5]), expected): _same(got, want)
            with pytest.raises(ServeError, match="answered 422: .*empty") as e: c.predict([])
            assert e.value.status == 422
            assert c.metadata()["labels"] == ["negative", "positive"] and c.metrics()["requests"] == 2     # the refused one never reached the model
    with ServeClient(url) as c:                                                        # the server has stopped
        assert not c.health()
        with pytest.raises(ConnectionRefusedError, match="bigmodel-nb serve"): c.predict("a film")
        with pytest.raises(TimeoutError, match="no healthy server"): c.wait(timeout=0.5)
    with pytest.raises(ValueError, match="http://HOST:PORT"): ServeClient("127.0.0.1:8000")


def test_the_load_test_measures_each_setting_and_littles_law_holds(trained, reviews):
    predictor = Predictor.from_pretrained(trained, device="cpu", max_length=32)
    with BackgroundServer(make_app(predictor, max_batch=32, max_wait_ms=5)) as server:
        table = load_test(server.url, reviews[:100], clients=(1, 16), seconds=1.5)
        served = ServeClient(server.url).metrics()
    shown = table.round(3).to_string()                                                # in every message: the whole measurement
    assert list(table.index) == [1, 16] and (table.errors == 0).all() and served["errors"] == 0, shown
    assert (table.p50_ms <= table.p95_ms).all() and (table.p95_ms <= table.p99_ms).all(), shown
    assert table.loc[1, "mean_batch"] == pytest.approx(1.0) and table.loc[16, "mean_batch"] > 2, shown     # many clients share passes
    assert ((table.X_times_R <= table.index * 1.1) & (table.X_times_R >= table.index * 0.5)).all(), shown  # N = X R, up to the edges
    assert ((table.server_L - table.server_lam_W).abs() <= 0.2 * table.server_L + 0.1).all(), shown         # L = lambda W, likewise
    with pytest.raises(ValueError, match="non-empty strings"): load_test(server.url, ["a", ""], clients=(1,))


def test_a_regression_model_answers_a_number(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "film"]
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}, model_max_length=16)
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                     intermediate_size=16, num_labels=1, problem_type="regression")).eval()
    predictor = Predictor(model, tok, device="cpu")
    with BackgroundServer(make_app(predictor)) as server:
        status, answer = call(server.url + "/predict", {"texts": ["good film", "bad film"]})
        meta = call(server.url + "/metadata")[1]
    want = [p["value"] for p in predictor.predict(["good film", "bad film"])]
    assert status == 200 and [a["value"] for a in answer["predictions"]] == pytest.approx(want, abs=1e-5)
    assert meta["task"] == "regression"


def test_an_int8_onnx_export_serves_like_any_folder(trained, tmp_path, reviews):
    pytest.importorskip("onnxruntime")
    res = subprocess.run(["bigmodel-nb", "export", "--model", str(trained), "--format", "int8", "--out", str(tmp_path / "int8")],
                         capture_output=True, text=True, env=ENV, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    predictor = Predictor.from_pretrained(tmp_path / "int8", max_length=32)
    with BackgroundServer(make_app(predictor)) as server:
        with ThreadPoolExecutor(16) as pool: got = list(pool.map(lambda t: call(server.url + "/predict", {"text": t}), reviews[:64]))
    assert all(s == 200 for s, _ in got)
    for (_, answer), want in zip(got, [predictor.predict([t])[0] for t in reviews[:64]]): _same(answer, want, tol=1e-3)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


def test_the_serve_command_serves_a_finetune_folder_until_ctrl_c(trained):
    port = _free_port()
    proc = subprocess.Popen(["bigmodel-nb", "serve", "--model", str(trained), "--port", str(port), "--log-level", "warning", "--drift", "--drift-window", "10"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            try:
                if call(url + "/health", timeout=2)[0] == 200: break
            except (urllib.error.URLError, ConnectionError, OSError): pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        status, answer = call(url + "/predict", {"text": "a gripping, funny film"})
        meta = call(url + "/metadata")[1]
        waiting = call(url + "/metrics")[1]["drift"]
        call(url + "/predict", {"texts": [f"message {i}: call now to claim your prize" for i in range(10)]})
        drift = call(url + "/metrics")[1]["drift"]
    finally:
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    pred = subprocess.run(["bigmodel-nb", "predict", "--model", str(trained), "a gripping, funny film"], capture_output=True, text=True, env=ENV)
    want = json.loads(pred.stdout)
    assert status == 200 and answer["label"] == want["label"]
    assert meta["model"] == str(trained) and meta["max_length"] == 32                # the run's length, as `predict` uses
    assert meta["calibration"]["fitted_on"] == "valid" and meta["calibration"]["temperature"] > 0   # what finetune folded into the head
    assert proc.returncode == 0 and f"http://127.0.0.1:{port}" in stderr and "drift monitor: reference 20 valid rows" in stderr
    assert "1 of the 10 texts" in waiting["waiting"]
    assert set(drift["statistics"]) == set(drift["thresholds"]) and drift["texts"] == 10 and isinstance(drift["alert"], bool)


def test_drift_needs_windows_the_run_can_fill(trained, capsys):
    from conftest import run_main
    code, _, err = run_main(capsys, "serve", "--model", trained, "--drift")          # the default window, 200, against 20 valid rows
    assert code == 2 and "--drift-window 200" in err and "20 valid and 20 test rows" in err


def test_without_the_extra_serving_says_how_to_install_it(monkeypatch, trained, capsys):
    from conftest import run_main
    monkeypatch.setitem(sys.modules, "fastapi", None)
    with pytest.raises(ImportError, match=r"bigmodel_nb\[serve\]"): require_serve()
    code, _, err = run_main(capsys, "serve", "--model", trained)
    assert code == 2 and 'pip install "bigmodel_nb[serve]"' in err


def test_loopback_hosts_and_batcher_arguments():
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1") and is_loopback("127.0.0.2")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("example.com")
    with pytest.raises(ValueError, match="max_batch"): MicroBatcher(None, max_batch=0)
    with pytest.raises(ValueError, match="max_wait_ms"): MicroBatcher(None, max_wait_ms=-1)
