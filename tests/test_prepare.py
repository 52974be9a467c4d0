"""prepare.py: NFC, short documents, exact and near duplicates across sources, statistics, resume, bad input."""

import json
import os
import shutil
import subprocess
import sys
import unicodedata

import numpy as np
import pytest
from hydra.utils import instantiate

from conftest import ROOT
from planted import make_planted, recall_precision
from slimpajama.data.prepare import EXACT, KEPT, NEAR, SHORT, CorpusPreparer, Sketcher, clean_text, shingles
from slimpajama.data.reader import CorpusError, read_corpus, read_file, write_jsonl_zst


def prep(**kw) -> CorpusPreparer:
    return CorpusPreparer(**{"num_workers": 0, "progress": False, **kw})


def statuses(stats) -> np.ndarray:
    return np.concatenate([stats.status[k] for k in sorted(stats.status)])


def words(seed: int, n: int) -> str:
    rng = np.random.default_rng(seed)
    return " ".join("".join(rng.choice(list("abcdefghij"), size=rng.integers(3, 8))) for _ in range(n))


# ------------------------------------------------------------------------------------ features
def test_cleaning_and_shingles_follow_slimpajama():
    assert clean_text("  Hello,\n\tWORLD!!  it's  ") == "hello world its"
    assert shingles("abcdefghijklmno", 13, "char") == {b"abcdefghijklm", b"bcdefghijklmn", b"cdefghijklmno"}
    assert shingles("a b c", 2, "word") == {b"a b", b"b c"}
    assert shingles("short", 13, "char") == {b"short"}  # shorter than n: the text is one shingle
    assert shingles("", 13, "char") == set()


def test_signature_agreement_estimates_jaccard():
    sk = Sketcher(num_perm=256)
    a = clean_text(words(0, 300))
    for k in (3, 10, 40):
        w = a.split(" ")
        for i in range(0, len(w), len(w) // k):
            w[i] = "zz" + w[i]
        b = " ".join(w)
        sa, sb = shingles(a, 13, "char"), shingles(b, 13, "char")
        exact = len(sa & sb) / len(sa | sb)
        estimate = float(np.mean(sk.signature(a) == sk.signature(b)))
        assert abs(estimate - exact) < 0.1, (k, exact, estimate)
    assert np.array_equal(sk.signature(a), Sketcher(num_perm=256).signature(a))  # deterministic


# ------------------------------------------------------------------------------------ the recipe
def test_planted_near_and_exact_duplicates_are_found(tmp_path):
    planted = make_planted(tmp_path / "in", n_originals=200)
    stats = prep().run([str(tmp_path / "in")], str(tmp_path / "out"))
    status = statuses(stats)
    assert len(status) == len(planted.texts)
    removed = [s in (EXACT, NEAR) for s in status]
    recall, precision, positives, _ = recall_precision(planted, removed, 0.8)
    assert positives >= 100
    assert recall >= 0.95 and precision >= 0.95, (recall, precision)
    # exact copies are removed as exact duplicates; copies with 10-15% of words changed are kept
    texts = planted.texts
    first = {}
    for i, t in enumerate(texts):
        if t in first:
            assert status[i] == EXACT
        first.setdefault(t, i)
    related = [i for i, r in enumerate(planted.rates) if r >= 0.10]
    assert related and all(status[i] == KEPT for i in related)
    # across sources: each source loses documents to the other's earlier copies
    assert stats.sources["web"].near > 0 and stats.sources["web"].exact > 0


def _small_case(root):
    """books: A (long), a short doc, A again in decomposed Unicode (exact after NFC); web: A with one word
    changed (near), B (long, kept). Texts are ASCII except the 'é' of A."""
    a = "Caf\u00e9 " + words(1, 60)
    b = words(2, 60)
    near = a.split(" ")
    near[10] = "changedword"
    for source in ("books", "web"):
        (root / source).mkdir(parents=True)
    write_jsonl_zst(str(root / "books" / "part-0.jsonl.zst"),
                    [(a, "books"), ("too short", "books"), (unicodedata.normalize("NFD", a), "books")])
    write_jsonl_zst(str(root / "web" / "part-0.jsonl.zst"), [(" ".join(near), "web"), (b, "web")])
    return a, b, " ".join(near)


def test_statistics_are_exact_on_a_constructed_case(tmp_path):
    a, b, near = _small_case(tmp_path / "in")
    def nb(text):
        return len(text.encode("utf-8"))

    stats = prep().run([str(tmp_path / "in")], str(tmp_path / "out"))
    assert statuses(stats).tolist() == [KEPT, SHORT, EXACT, NEAR, KEPT]
    books, web = stats.sources["books"], stats.sources["web"]
    nfd = unicodedata.normalize("NFD", a)
    assert (books.documents, books.bytes) == (3, nb(a) + nb("too short") + nb(nfd))
    assert (books.short, books.short_bytes, books.exact, books.exact_bytes) == (1, nb("too short"), 1, nb(nfd))
    assert (books.near, books.kept, books.kept_bytes) == (0, 1, nb(a))
    assert (web.documents, web.bytes, web.near, web.near_bytes, web.kept, web.kept_bytes) == (
        2, nb(near) + nb(b), 1, nb(near), 1, nb(b))
    saved = json.loads((tmp_path / "out" / "stats.json").read_text())
    total_in, total_kept = books.bytes + web.bytes, nb(a) + nb(b)
    assert saved["sources"]["books"]["share_before"] == pytest.approx(books.bytes / total_in)
    assert saved["sources"]["web"]["share_after"] == pytest.approx(nb(b) / total_kept)
    assert saved["total"]["kept"] == 2 and saved["total"]["documents"] == 5
    table = (tmp_path / "out" / "stats.md").read_text()
    assert "| books | 3 |" in table and "| web | 2 |" in table and "**total**" in table


def test_output_is_nfc_slimpajama_jsonl_zst_with_sources(tmp_path):
    a, b, _ = _small_case(tmp_path / "in")
    prep().run([str(tmp_path / "in")], str(tmp_path / "out"))
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.jsonl.zst")) == [
        "books/part-0.jsonl.zst", "web/part-0.jsonl.zst"]
    docs = list(read_corpus([str(tmp_path / "out")]))
    assert [(d.text, d.source) for d in docs] == [(a, "books"), (b, "web")]
    assert all(unicodedata.is_normalized("NFC", d.text) for d in docs)
    nfd_only = tmp_path / "nfd" / "x"
    nfd_only.mkdir(parents=True)
    (nfd_only / "d.txt").write_text(unicodedata.normalize("NFD", a))  # a .txt: its folder names the source
    prep().run([str(tmp_path / "nfd")], str(tmp_path / "out2"))
    (doc,) = read_file(str(tmp_path / "out2" / "x" / "d.jsonl.zst"))
    assert doc.text == a and doc.source == "x"


def test_same_result_with_workers_and_rerun_skips_finished_shards(tmp_path):
    make_planted(tmp_path / "in", n_originals=60)
    (tmp_path / "in" / "more").mkdir()
    write_jsonl_zst(str(tmp_path / "in" / "more" / "part-0.jsonl.zst"), [(words(5, 80), "more")])
    out = tmp_path / "out"
    p = prep()
    first = p.run([str(tmp_path / "in")], str(out))
    assert p.work_done == {"sketched": 3, "written": 3}
    written = {f: f.stat().st_mtime_ns for f in out.rglob("*.jsonl.zst")}
    shards = sorted((out / ".prepare" / "shards").glob("*.npz"))
    assert len(shards) == 3

    parallel = prep(num_workers=2)
    second = parallel.run([str(tmp_path / "in")], str(out))
    assert parallel.work_done == {}  # nothing redone
    assert np.array_equal(statuses(first), statuses(second))
    assert {f: f.stat().st_mtime_ns for f in out.rglob("*.jsonl.zst")} == written

    books = [s for s in shards if "books" in json.loads(str(np.load(s)["info"]))["fingerprint"]["path"]]
    books[0].unlink()  # as if interrupted before this shard was finished
    os.utime(tmp_path / "in" / "more" / "part-0.jsonl.zst", ns=(1, 1))  # a changed input is sketched again
    third = parallel.run([str(tmp_path / "in")], str(out))
    assert parallel.work_done["sketched"] == 2
    assert np.array_equal(statuses(first), statuses(third))
    assert prep(num_workers=2).run([str(tmp_path / "in")], str(tmp_path / "fresh")).to_dict()["total"] == \
        first.to_dict()["total"]  # workers do not change the result


def _files(folder) -> dict[str, bytes]:
    """Every file the run wrote beside its resume state: relative path -> bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and ".prepare" not in p.parts}


def test_a_rerun_after_an_input_is_edited_writes_what_a_fresh_run_writes(tmp_path):
    """Edits that keep a file's keep/remove decisions: a text replaced, only a source relabelled, and a text
    replaced by another input's (whose copy then is the exact duplicate). Each rerun's outputs, stats and
    manifest are a fresh run's, byte for byte."""
    x, y, z = words(11, 80), words(12, 80), words(13, 80)
    a, b = tmp_path / "in" / "a" / "part.jsonl", tmp_path / "in" / "b" / "part.jsonl"
    a.parent.mkdir(parents=True)
    b.parent.mkdir()

    def put(path, *records, mtime):
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        os.utime(path, ns=(mtime, mtime))  # a new fingerprint even within the clock's resolution

    put(a, {"text": x}, {"text": z}, mtime=1)
    put(b, {"text": y}, mtime=1)
    out = tmp_path / "out"
    prep().run([str(tmp_path / "in")], str(out))
    edits = [({"text": "edited " + x}, 1), ({"text": "edited " + x, "meta": {"redpajama_set_name": "news"}}, 1),
             ({"text": y}, 2)]  # y in a first: b's copy becomes an exact duplicate, b's output empty
    for k, (first, written) in enumerate(edits, start=2):
        put(a, first, {"text": z}, mtime=k)
        p = prep()
        p.run([str(tmp_path / "in")], str(out))
        assert p.work_done == {"sketched": 1, "written": written}
        prep().run([str(tmp_path / "in")], str(tmp_path / f"fresh-{k}"))
        assert _files(out) == _files(tmp_path / f"fresh-{k}")
    assert [(d.text, d.source) for d in read_corpus([str(out)])] == [(y, "a"), (z, "a")]
    assert json.loads((out / "stats.json").read_text())["total"]["kept_bytes"] == len(y) + len(z)


def test_an_input_edited_between_its_sketch_and_its_write_stops_the_run(tmp_path, monkeypatch):
    _small_case(tmp_path / "in")
    books = tmp_path / "in" / "books" / "part-0.jsonl.zst"
    index = CorpusPreparer._index

    def edit_then_index(self, files, *args):
        os.utime(books, ns=(1, 1))  # its shard no longer describes it
        return index(self, files, *args)

    monkeypatch.setattr(CorpusPreparer, "_index", edit_then_index)
    with pytest.raises(CorpusError, match=rf"{books}: the file changed while it was being prepared; rerun"):
        prep().run([str(tmp_path / "in")], str(tmp_path / "out"))
    monkeypatch.undo()
    p = prep()
    p.run([str(tmp_path / "in")], str(tmp_path / "out"))
    assert p.work_done == {"sketched": 1, "written": 2}


def test_an_input_with_nothing_kept_gets_an_empty_valid_output(tmp_path):
    (tmp_path / "in" / "chat").mkdir(parents=True)
    (tmp_path / "in" / "chat" / "short.jsonl").write_text(json.dumps({"text": "hi"}) + "\n")
    (tmp_path / "in" / "chat" / "long.jsonl").write_text(json.dumps({"text": words(1, 60)}) + "\n")
    out = tmp_path / "out"
    prep().run([str(tmp_path / "in")], str(out))
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(manifest["outputs"].values()) == ["chat/long.jsonl.zst", "chat/short.jsonl.zst"]
    assert all((out / name).stat().st_size > 0 for name in manifest["outputs"].values())  # a zstd frame
    assert list(read_file(str(out / "chat" / "short.jsonl.zst"))) == []
    assert [d.text for d in read_corpus([str(out)])] == [words(1, 60)]


@pytest.mark.parametrize("pattern", ["*", "*/", "c*", "*/*"])
def test_an_output_in_a_folder_a_glob_input_matches_is_refused_on_the_first_run(tmp_path, pattern):
    """A glob's folder matches are read recursively: input=[in/*] output=in/prepared would read the prepared
    copy back on the next run, as input=[in] would."""
    (tmp_path / "in" / "chat").mkdir(parents=True)
    (tmp_path / "in" / "chat" / "a.jsonl").write_text(json.dumps({"text": words(1, 60)}) + "\n")
    with pytest.raises(CorpusError, match=r"in/cprepared is inside the input .*in/c?\*"):
        prep().run([str(tmp_path / "in") + "/" + pattern], str(tmp_path / "in" / "cprepared"))
    assert not (tmp_path / "in" / "cprepared").exists()


def test_an_output_folder_holding_other_files_is_refused_unless_it_is_an_earlier_output(tmp_path):
    _small_case(tmp_path / "in")
    out = tmp_path / "out"
    (out / "old").mkdir(parents=True)
    (out / "old" / "raw.jsonl").write_text(json.dumps({"text": words(9, 60)}) + "\n")  # another corpus
    with pytest.raises(CorpusError, match=rf"output={out} is not empty .*holds {out}/old/raw.jsonl"):
        prep().run([str(tmp_path / "in")], str(out))
    assert sorted(p.name for p in out.iterdir()) == ["old"]  # nothing written
    with pytest.raises(CorpusError, match=rf"output={out / 'old' / 'raw.jsonl'} is a file"):  # was a raw FileExistsError
        prep().run([str(tmp_path / "in")], str(out / "old" / "raw.jsonl"))
    (out / "old" / "raw.jsonl").unlink()
    prep().run([str(tmp_path / "in")], str(out))  # a folder without files is fine
    prep().run([str(tmp_path / "in")], str(out))  # so is its own output: by its .prepare/ state
    shutil.rmtree(out / ".prepare")
    p = prep()
    p.run([str(tmp_path / "in")], str(out))  # or by its manifest.json
    assert p.work_done == {"sketched": 2, "written": 2}


def test_changed_min_chars_reuses_shards(tmp_path):
    _small_case(tmp_path / "in")
    prep().run([str(tmp_path / "in")], str(tmp_path / "out"))
    p = prep(min_chars=5)
    stats = p.run([str(tmp_path / "in")], str(tmp_path / "out"))
    assert p.work_done == {"written": 1}  # books/ changed (the short document is now kept); nothing sketched
    assert statuses(stats).tolist() == [KEPT, KEPT, EXACT, NEAR, KEPT]


def test_bad_input_errors_naming_file_and_line_or_is_skipped_and_counted(tmp_path):
    _small_case(tmp_path / "in")
    bad = tmp_path / "in" / "web" / "part-1.jsonl"
    bad.write_text(json.dumps({"text": words(3, 60)}) + "\n{not json\n")
    with pytest.raises(CorpusError, match=rf"{bad}:2: invalid JSON"):
        prep().run([str(tmp_path / "in")], str(tmp_path / "out"))
    with pytest.raises(CorpusError, match=rf"{bad}:2: invalid JSON"):
        prep(num_workers=2).run([str(tmp_path / "in")], str(tmp_path / "out"))  # raised from a worker too
    stats = prep(on_bad_record="skip").run([str(tmp_path / "in")], str(tmp_path / "out"))
    assert stats.skipped == {"invalid_json": 1}
    assert stats.sources["web"].kept == 2  # the good record of part-1 is kept (source: its folder)
    assert "invalid_json: 1" in (tmp_path / "out" / "stats.md").read_text()
    with pytest.raises(CorpusError, match="holds input files"):
        prep().run([str(tmp_path / "in")], str(tmp_path / "in" / "web"))
    with pytest.raises(CorpusError, match="is inside the input"):  # it would be read back as input later
        prep().run([str(tmp_path / "in")], str(tmp_path / "in" / "prepared"))
    assert not (tmp_path / "in" / "prepared").exists()
    # a glob that does not recurse never reads the folder back: allowed
    stats = prep(on_bad_record="skip").run([str(tmp_path / "in" / "web" / "*.jsonl")], str(tmp_path / "in" / "web-clean"))
    assert stats.sources["web"].kept >= 1 and list((tmp_path / "in" / "web-clean").rglob("*.jsonl.zst"))
    with pytest.raises(ValueError, match="prepare.ngram_unit"):
        prep(ngram_unit="token")
    with pytest.raises(ValueError, match="prepare.bands"):
        prep(bands=20, rows=13)


@pytest.mark.parametrize("key, value", [
    ("threshold", "high"), ("threshold", 0), ("threshold", 1.5), ("threshold", float("nan")), ("threshold", True),
    ("min_chars", "abc"), ("min_chars", -1), ("min_chars", 2.5), ("num_perm", 2.5), ("num_perm", 1),
    ("num_perm", "128"), ("ngram", 0), ("ngram", 1.0), ("ngram", False), ("seed", -1), ("seed", 2**32),
    ("seed", "1"), ("num_workers", -1), ("num_workers", 1.5), ("num_workers", True), ("compression_level", 99),
    ("compression_level", 23), ("compression_level", -(1 << 17) - 1), ("compression_level", 3.0),
    ("compression_level", "3"), ("lsh_weights", 0.5), ("lsh_weights", ["a", "b"]), ("lsh_weights", [0.5, 0.6]),
    ("lsh_weights", [float("nan"), 0.5]), ("lsh_weights", [False, True]),
    ("verify", "maybe"), ("exact_dedup", 1), ("near_dedup", None), ("progress", "no"),
])
def test_invalid_setting_errors_naming_the_key_before_reading(key, value):
    with pytest.raises(ValueError, match=rf"^prepare\.{key}: "):
        prep(**{key: value})


@pytest.mark.parametrize("bands, rows, key", [(2.5, 4, "bands"), (8, "4", "rows"), (8, 0, "rows"), (1, 4, "bands")])
def test_invalid_bands_rows_error_naming_the_key(bands, rows, key):
    with pytest.raises(ValueError, match=rf"^prepare\.{key}: "):
        prep(bands=bands, rows=rows)


def test_edge_settings_are_valid():
    # an int where a float is expected, zstd's negative (fast) levels down to -131072 and up to 22
    p = prep(threshold=1, lsh_weights=[0, 1], compression_level=-(1 << 17), num_workers=None)
    assert (p.threshold, p.lsh_weights) == (1, (0.0, 1.0))
    assert prep(compression_level=22, seed=2**32 - 1, bands=8, rows=16).compression_level == 22


def test_empty_input_errors_naming_the_input_key(tmp_path):
    with pytest.raises(CorpusError, match=r"^input=\[\]: "):
        prep().run([], str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------ the Hydra app
def _compose(overrides):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="prepare", overrides=overrides)


def test_prepare_config_composes_with_slimpajama_defaults(tmp_path):
    cfg = _compose([f"input=[{tmp_path}]", f"output={tmp_path / 'out'}", "prepare.threshold=0.7"])
    p = instantiate(cfg.prepare)
    assert isinstance(p, CorpusPreparer)
    assert (p.min_chars, p.ngram, p.ngram_unit, p.num_perm, p.threshold) == (200, 13, "char", 128, 0.7)


@pytest.mark.parametrize("override", ["prepare.threshold=high", "prepare.min_chars=abc", "prepare.num_perm=2.5",
                                      "prepare.compression_level=99", "prepare.lsh_weights=[a,b]"])
def test_invalid_override_errors_naming_the_key(tmp_path, override):
    cfg = _compose([f"input=[{tmp_path}]", f"output={tmp_path / 'out'}", override])
    with pytest.raises(Exception, match=rf"{override.split('=')[0]}: "):  # Hydra wraps the ValueError
        instantiate(cfg.prepare)


@pytest.mark.slow
def test_prepare_py_runs_as_a_hydra_app(tmp_path):
    _small_case(tmp_path / "in")
    out = tmp_path / "out"
    env = {**os.environ, "SLIMPAJAMA_ROOT": str(tmp_path)}  # Hydra's run folder under tmp_path/logs
    subprocess.run([sys.executable, str(ROOT / "prepare.py"), f"input=[{tmp_path / 'in'}]", f"output={out}",
                    "prepare.num_workers=2", "prepare.progress=false"], check=True, env=env, cwd=tmp_path,
                   timeout=300)
    saved = json.loads((out / "stats.json").read_text())
    assert (saved["total"]["documents"], saved["total"]["kept"]) == (5, 2)
    assert saved["settings"]["num_perm"] == 128
    assert list((tmp_path / "logs" / "prepare" / "runs").glob("*/prepare.log"))
