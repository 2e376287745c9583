"""Retrieval: BM25 and TF-IDF scores against their formulas written as loops, embedding search against
`Predictor.embed`, the top-k order with ties, ranking metrics by hand and against scikit-learn, and clear errors."""
import math
import warnings

import numpy as np
import pytest
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.metrics import ndcg_score

from bigmodel_nb.assets import load_sample
from bigmodel_nb.models import NewHeadWarning, load_classifier
from bigmodel_nb.predict import Predictor
from bigmodel_nb.retrieval import Bm25Search, EmbeddingSearch, TfidfSearch, ranking_metrics, top_k, words


@pytest.fixture(scope="module")
def questions():
    q = load_sample("trec_questions")
    return list(q.text[:400]), list(q.text[400:410])


def bm25_by_loop(stored, query, k1, b):
    docs = [words(d) for d in stored]
    avg = sum(map(len, docs)) / len(docs)
    n = {t: sum(t in set(d) for d in docs) for t in set(words(query))}
    return np.array([sum(math.log(1 + (len(docs) - n[t] + 0.5) / (n[t] + 0.5)) * d.count(t) * (k1 + 1)
                         / (d.count(t) + k1 * (1 - b + b * len(d) / avg)) for t in words(query) if n[t])
                     for d in docs])


@pytest.mark.parametrize("k1,b", [(1.2, 0.75), (2.0, 0.0), (0.5, 1.0)])
def test_bm25_equals_the_formula_on_real_questions(questions, k1, b):
    stored, queries = questions
    S = Bm25Search(stored, k1=k1, b=b).scores(queries + ["what what what is is"])   # repeated query words count per repeat
    for i, q in enumerate(queries + ["what what what is is"]):
        np.testing.assert_allclose(S[i], bm25_by_loop(stored, q, k1, b), rtol=1e-10, atol=1e-12)


def test_tfidf_search_is_the_cosine_of_sklearn_vectors(questions):
    stored, queries = questions
    vec = TfidfVectorizer(sublinear_tf=True, ngram_range=(1, 2)).fit(stored)
    D, Q = vec.transform(stored).toarray(), vec.transform(queries).toarray()
    np.testing.assert_allclose(TfidfSearch(stored).scores(queries), Q @ D.T, atol=1e-12)


def test_embedding_search_ranks_by_the_predictors_cosine(tiny_bert_dir, questions):
    stored, queries = questions
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NewHeadWarning)
        model, tok = load_classifier(tiny_bert_dir, labels=["a", "b"])
    pred = Predictor(model.eval(), tok, batch_size=7)
    for pooling in ("mean", "cls"):
        es = EmbeddingSearch(pred, stored[:60], pooling=pooling)
        expected = (pred.embed(queries, pooling=pooling) @ pred.embed(stored[:60], pooling=pooling).T).numpy()
        np.testing.assert_allclose(es.scores(queries), expected, atol=1e-5)
        idx, val = es.search(queries, k=5)
        assert idx.shape == (10, 5) and (np.diff(val, axis=1) <= 1e-12).all()
        np.testing.assert_allclose(val, np.take_along_axis(expected, idx, 1), atol=1e-5)


def test_top_k_orders_ties_by_position_and_caps_k():
    idx, val = top_k(np.array([[1.0, 2.0, 2.0, 0.5]]), k=3)
    assert idx.tolist() == [[1, 2, 0]] and val.tolist() == [[2.0, 2.0, 1.0]]
    assert top_k(np.ones((2, 3)), k=10)[0].tolist() == [[0, 1, 2], [0, 1, 2]]
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="k="): top_k(np.ones((1, 3)), k=bad)
    with pytest.raises(ValueError, match="one row per query"): top_k(np.ones(3))


def test_ranking_metrics_by_hand_and_against_sklearn():
    m = ranking_metrics(np.array([[3, 1, 2], [0, 2, 1]]), [[1, 2], {5, 0}], ks=(1, 2))
    assert m["hit@1"] == 0.5 and m["hit@2"] == 1.0
    assert m["recall@2"] == pytest.approx((1 / 2 + 1 / 2) / 2) and m["mrr"] == pytest.approx((1 / 2 + 1) / 2)
    assert m["ndcg@2"] == pytest.approx(((1 / math.log2(3)) / (1 + 1 / math.log2(3)) + 1 / (1 + 1 / math.log2(3))) / 2)
    table = ranking_metrics([[3, 1, 2], [0, 2, 1]], [[1, 2], [0]], per_query=True)
    assert len(table) == 2 and table.loc[1, "ndcg@1"] == 1.0 and table.loc[0, "recall@5"] == 1.0
    rng = np.random.default_rng(1)
    scores, truth = rng.random((30, 25)), rng.random((30, 25)) < 0.2
    truth[:, 3] = True
    ranked, _ = top_k(scores, 25)
    for k in (1, 3, 10):
        got = ranking_metrics(ranked, [np.flatnonzero(t) for t in truth], ks=k)
        assert got[f"ndcg@{k}"] == pytest.approx(ndcg_score(truth, scores, k=k))


def test_clear_errors(questions):
    stored, _ = questions
    with pytest.raises(TypeError, match="not one string"): Bm25Search("one text")
    with pytest.raises(ValueError, match=r"stored texts: the text at position 1 \(counting from 0\) is blank"): TfidfSearch(["a question", "  ", "another"])
    with pytest.raises(ValueError, match="empty"): Bm25Search([])
    with pytest.raises(ValueError, match=r"queries: the text at position 0 \(counting from 0\) is blank"): Bm25Search(stored).scores([""])
    with pytest.raises(ValueError, match="k1="): Bm25Search(stored, b=2)
    with pytest.raises(ValueError, match="query 1 .*no right answer"): ranking_metrics([[0], [1]], [{0}, []])
    with pytest.raises(ValueError, match="mismatched lengths"): ranking_metrics([[0]], [{0}, {1}])
