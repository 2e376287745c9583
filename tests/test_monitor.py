"""Drift statistics (`bigmodel_nb.monitor`) against their formulas and scipy, and `DriftMonitor` on real text: quiet on in-domain
windows at the rate it was set to, alarmed by another domain."""
import numpy as np
import pytest
import scipy.stats
import torch

from bigmodel_nb.monitor import (DriftMonitor, STATISTICS, ShareMonitor, adjusted_share, ks_distance, median_width, mmd2, psi,
                                 proxy_a_distance, quantile_edges, shares, wilson_interval)


@pytest.mark.parametrize("seed", range(5))
def test_psi_is_the_sum_of_the_two_kl_divergences(seed):
    rng = np.random.default_rng(seed)
    e, a = rng.dirichlet(np.ones(8)), rng.dirichlet(np.ones(8))
    assert psi(e, a, eps=1e-300) == pytest.approx(scipy.stats.entropy(a, e) + scipy.stats.entropy(e, a), rel=1e-9)
    assert psi(e, e) == pytest.approx(0.0, abs=1e-12) and psi(e, a) == pytest.approx(psi(a, e))
    empty = np.r_[0.0, a[1:] / a[1:].sum()]                                                     # an empty bin: floored, so finite
    fa, fe = np.clip(empty, 1e-4, None), np.clip(e, 1e-4, None)
    fa, fe = fa / fa.sum(), fe / fe.sum()
    assert psi(e, empty) == pytest.approx(np.sum((fa - fe) * np.log(fa / fe)), rel=1e-9) and np.isfinite(psi(e, empty))
    with pytest.raises(ValueError, match="bin both the same way"): psi(e, a[:5])


def test_quantile_bins_hold_equal_shares_and_catch_everything():
    rng = np.random.default_rng(1)
    ref = rng.normal(size=10_000)
    edges = quantile_edges(ref, 10)
    assert np.allclose(shares(ref, edges), 0.1, atol=0.001)
    assert shares(np.array([-1e9, 1e9]), edges).sum() == pytest.approx(1.0)                    # nothing falls outside
    lengths = np.r_[np.full(900, 7), np.arange(100)]                                           # many ties: repeated edges merged
    assert np.all(np.diff(quantile_edges(lengths, 10)) > 0)


@pytest.mark.parametrize("make", [lambda r: (r.normal(size=300), r.normal(0.3, 1, 200)),
                                  lambda r: (r.integers(0, 5, 100).astype(float), r.integers(0, 6, 80).astype(float)),   # ties
                                  lambda r: (r.random(3), r.random(1000))])
def test_ks_distance_equals_scipy(make):
    a, b = make(np.random.default_rng(2))
    assert ks_distance(a, b) == pytest.approx(scipy.stats.ks_2samp(a, b).statistic, abs=1e-12)


def test_mmd2_is_the_unbiased_formula_and_sees_a_shift():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(12, 4)), rng.normal(size=(9, 4)) + 0.5
    w = median_width(x)
    k = lambda p, q: np.exp(-np.sum((p - q) ** 2) / (2 * w * w))
    by_hand = (sum(k(x[i], x[j]) for i in range(12) for j in range(12) if i != j) / (12 * 11)
               + sum(k(y[i], y[j]) for i in range(9) for j in range(9) if i != j) / (9 * 8) - 2 * np.mean([k(p, q) for p in x for q in y]))
    assert mmd2(x, y, w) == pytest.approx(by_hand, abs=1e-12)
    big = rng.normal(size=(400, 4))
    assert abs(mmd2(big[:200], big[200:], w)) < 0.02 < mmd2(big[:200], big[200:] + 1.0, w)


@pytest.fixture(scope="module")
def monitor_and_texts():
    from bigmodel_nb.assets import load_sample
    from bigmodel_nb.core import set_seed
    from bigmodel_nb.models import load_classifier
    from bigmodel_nb.predict import Predictor
    set_seed(0)
    model, tok = load_classifier("minilm", labels=["negative", "positive"])
    predictor = Predictor(model, tok, device="cpu", max_length=48)
    movies = load_sample("movie_reviews").sample(1400, random_state=5).text.tolist()
    monitor = DriftMonitor(predictor, movies[:400], movies[400:800], window=60, alert_rate=0.1, seed=1)
    return monitor, movies[800:], load_sample("sms_spam").sample(180, random_state=5).text.tolist()


def test_no_alarm_on_in_domain_windows_at_the_chosen_rate_and_alarms_on_another_domain(monitor_and_texts):
    monitor, fresh, sms = monitor_and_texts
    assert set(monitor.thresholds) == set(STATISTICS)
    alarms = [monitor.check(fresh[i:i + 60])["alert"] for i in range(0, 600, 60)]             # ten unseen in-domain windows
    assert sum(alarms) <= 3                                                                     # alert_rate 0.1: P(4 or more of 10) < 0.013
    shifted = [monitor.check(sms[i:i + 60]) for i in range(0, 180, 60)]
    assert all(r["alert"] and "mmd2_embedding" in r["over"] for r in shifted)
    r = shifted[0]
    assert r["texts"] == 60 and 0 <= r["ks_p_value"] <= 1 and sum(r["predicted"].values()) == pytest.approx(1.0)


def test_monitor_arguments_are_checked(monitor_and_texts):
    monitor, fresh, _ = monitor_and_texts
    with pytest.raises(ValueError, match="at least 60"): DriftMonitor(monitor.predictor, fresh[:100], fresh[:10], window=60)
    with pytest.raises(ValueError, match="alert_rate"): DriftMonitor(monitor.predictor, fresh[:100], fresh[:100], window=60, alert_rate=1.5)
    with pytest.raises(ValueError, match="two texts"): monitor.check(fresh[:1])


def test_statistics_of_observed_rows_are_those_of_check(monitor_and_texts):
    monitor, fresh, sms = monitor_and_texts
    texts = fresh[:30] + sms[:30]
    obs = monitor.observe(texts)
    assert {k: len(v) for k, v in obs.items()} == dict(probs=60, confidence=60, length=60, embedding=60)
    assert monitor.statistics(obs) == pytest.approx(monitor.check(texts)["statistics"], rel=1e-5, abs=1e-7)
    picked = {k: v[30:] for k, v in obs.items()}                                   # a window drawn from rows seen before
    assert monitor.statistics(picked) == pytest.approx(monitor.check(sms[:30])["statistics"], rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("k,n", [(0, 1), (0, 30), (1, 30), (29, 30), (30, 30), (137, 400)])
def test_wilson_interval_equals_scipy_and_stays_inside_0_1(k, n):
    for conf in (0.9, 0.95, 0.99):
        ci = scipy.stats.binomtest(k, n).proportion_ci(conf, method="wilson")
        lo, hi = wilson_interval(k, n, conf)
        assert (lo, hi) == pytest.approx((ci.low, ci.high), abs=1e-12) and 0 <= lo <= k / n <= hi <= 1
    with pytest.raises(ValueError, match="0 <= k <= n"): wilson_interval(5, 4)


def _classifier(rng, share, n, tpr, fpr):
    y = rng.random(n) < share
    return np.where(y, "neg", "pos"), np.where(np.where(y, rng.random(n) < tpr, rng.random(n) < fpr), "neg", "pos")


@pytest.mark.parametrize("tpr,fpr", [(0.9, 0.05), (0.6, 0.3), (0.95, 0.5)])
def test_adjusted_share_removes_the_counting_bias_and_the_alert_keeps_its_rate(tpr, fpr):
    rng = np.random.default_rng(0)
    y, pred = _classifier(rng, 0.25, 50_000, tpr, fpr)
    sm = ShareMonitor(y, pred, "neg", reference_share=0.25, alpha=0.02)
    assert sm.tpr == pytest.approx(tpr, abs=0.01) and sm.fpr == pytest.approx(fpr, abs=0.01)
    quiet = [sm.window(_classifier(rng, 0.25, 400, tpr, fpr)[1]) for _ in range(1500)]
    # the rates carry the labelled sample's noise, amplified by 1 / (tpr - fpr): about 0.007 at tpr 0.6, fpr 0.3
    assert np.mean([w["share"] for w in quiet]) == pytest.approx(0.25, abs=0.025)
    assert abs(np.mean([w["flagged_share"] for w in quiet]) - 0.25) > 0.02 or fpr < 0.1   # counting is biased by the error rates
    assert 0.92 <= np.mean([w["low"] <= 0.25 <= w["high"] for w in quiet]) <= 0.975
    assert 0.005 <= np.mean([w["alert"] for w in quiet]) <= 0.04
    loud = [sm.window(_classifier(rng, 0.6, 400, tpr, fpr)[1]) for _ in range(200)]    # 25% -> 60%: caught
    assert np.mean([w["alert"] for w in loud]) > 0.9


def test_share_monitor_refuses_what_it_cannot_measure():
    with pytest.raises(ValueError, match="both members and non-members"): ShareMonitor(["neg"] * 5, ["neg"] * 5, "neg")
    with pytest.raises(ValueError, match="does not separate"): ShareMonitor(["neg", "pos", "pos"], ["pos", "neg", "neg"], "neg")
    with pytest.raises(ValueError, match="mismatched lengths"): ShareMonitor(["neg", "pos"], ["neg"], "neg")
    sm = ShareMonitor(["neg", "pos", "pos", "neg"], ["neg", "pos", "pos", "pos"], "neg")
    with pytest.raises(ValueError, match="empty"): sm.window([])
    with pytest.raises(ValueError, match="not above fpr"): adjusted_share(0.3, 0.2, 0.2)
    assert adjusted_share(0.0, 0.8, 0.1) == 0.0 and adjusted_share(1.0, 0.8, 0.1) == 1.0        # clipped to [0, 1]


def _gaussians(delta, n=800, d=12, seed=0):
    r = np.random.default_rng(seed)
    return r.normal(size=(n, d)), r.normal(size=(n, d)) + np.r_[delta, np.zeros(d - 1)]


def test_proxy_a_distance_is_near_0_for_one_distribution_and_near_2_for_separated_ones():
    same = proxy_a_distance(*_gaussians(0.0))
    assert same.distance < 0.15 and abs(same.error - 0.5) < 0.05 and same.rows == 800 and len(same.fold_errors) == 5
    apart = proxy_a_distance(*_gaussians(10.0))
    assert apart.distance > 1.95 and apart.error < 0.0125
    assert proxy_a_distance(*_gaussians(0.5), seed=3) == proxy_a_distance(*_gaussians(0.5), seed=3)   # seeded


def test_proxy_a_distance_rises_with_the_separation_and_follows_the_best_linear_rule():
    from scipy.stats import norm
    deltas = [0.0, 0.5, 1.0, 1.5, 2.5, 4.0]
    measured = [proxy_a_distance(*_gaussians(d, seed=1)).distance for d in deltas]
    assert all(b > a for a, b in zip(measured, measured[1:])), measured
    # two unit Gaussians delta apart: the best rule errs with probability Phi(-delta/2)
    assert measured == pytest.approx([2 * (1 - 2 * norm.cdf(-d / 2)) for d in deltas], abs=0.15)


def test_proxy_a_distance_balances_the_two_samples():
    r = np.random.default_rng(2)
    big, small = r.normal(size=(900, 6)), r.normal(size=(100, 6))      # one distribution, 9 to 1
    res = proxy_a_distance(big, small)
    # unbalanced, "always the big one" would err on 10% and read as d_A = 1.6; on equal samples it is near 0
    assert res.rows == 100 and res.distance < 0.3
    assert proxy_a_distance(big, r.normal(size=(500, 6)), max_rows=60).rows == 60
    flipped = proxy_a_distance(small, big, seed=4)
    assert flipped.rows == 100 and flipped.distance < 0.3


def test_proxy_a_distance_refuses_bad_input():
    x = np.zeros((20, 4))
    with pytest.raises(ValueError, match=r"source has shape \(20,\)"): proxy_a_distance(np.zeros(20), x)
    with pytest.raises(ValueError, match="target is empty"): proxy_a_distance(x, np.zeros((0, 4)))
    with pytest.raises(ValueError, match="4 features per row and target 3"): proxy_a_distance(x, np.zeros((20, 3)))
    with pytest.raises(ValueError, match="at least 5 rows of each"): proxy_a_distance(x, np.zeros((3, 4)))
    with pytest.raises(ValueError, match="folds=1"): proxy_a_distance(x, x, folds=1)
    with pytest.raises(ValueError, match="target: row 2 holds NaN"): proxy_a_distance(x, np.where(np.arange(20)[:, None] == 2, np.nan, x))


def test_proxy_a_distance_of_real_sentence_embeddings():
    import warnings
    from bigmodel_nb.assets import load_sample, model_path
    from bigmodel_nb.models import NewHeadWarning
    from bigmodel_nb.predict import Predictor
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NewHeadWarning)
        encoder = Predictor.from_pretrained(model_path("minilm"), device="cpu", max_length=48)
    movies = load_sample("movie_reviews").text.sample(300, random_state=11).tolist()
    tweets = load_sample("scored_tweets").text.sample(150, random_state=11).tolist()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                  # faster here than two threads that wait for each other
    try: a, b, t = encoder.embed(movies[:150]), encoder.embed(movies[150:]), encoder.embed(tweets)
    finally: torch.set_num_threads(threads)
    within, across = proxy_a_distance(a, b), proxy_a_distance(a, t)
    assert within.distance < 0.5 < 1.2 < across.distance, (within, across)
