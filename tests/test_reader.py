"""Tests for the SlimPajama-format reader (src/slimpajama/data/reader.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import zstandard

from slimpajama.data.reader import (
    CorpusError,
    ReadStats,
    _zst_chunks,
    read_corpus,
    read_file,
    resolve_paths,
    write_jsonl_zst,
)


def record(text, source=None) -> str:
    rec = {"text": text}
    if source is not None:
        rec["meta"] = {"redpajama_set_name": source}
    return json.dumps(rec, ensure_ascii=False)


def docs_of(paths, **kwargs) -> list[tuple[str, str]]:
    return [(d.text, d.source) for d in read_corpus(paths, **kwargs)]


def generated_docs(n: int, source: str = "RedPajamaC4") -> list[tuple[str, str]]:
    return [(f"document {i} of {source}: " + "word " * (i % 7) + f"end {i}.", source) for i in range(n)]


def zst_frame(lines: list[str]) -> bytes:
    return zstandard.ZstdCompressor(level=3).compress("".join(line + "\n" for line in lines).encode("utf-8"))


# ----------------------------------------------------------------------------- formats
def test_jsonl_documents_lines_and_sources(tmp_path):
    folder = tmp_path / "books"
    folder.mkdir()
    path = folder / "part.jsonl"
    path.write_text(
        record("first", "RedPajamaBook") + "\n"
        + "\n"  # a blank line is not a document but still counts as a line
        + record("second") + "\n"  # no meta: the parent folder names the source
        + json.dumps({"text": "third", "meta": {"redpajama_set_name": ""}}) + "\n"  # empty name: folder
        + json.dumps({"text": "fourth", "meta": "not a dict"}) + "\n"
        + record("fifth", "RedPajamaArXiv"),  # no trailing newline
        encoding="utf-8",
    )
    docs = list(read_file(str(path)))
    assert [(d.text, d.source, d.line) for d in docs] == [
        ("first", "RedPajamaBook", 1),
        ("second", "books", 3),
        ("third", "books", 4),
        ("fourth", "books", 5),
        ("fifth", "RedPajamaArXiv", 6),
    ]
    assert all(d.path == str(path) for d in docs)
    # an explicit default source wins over the folder name, but never over the record's own meta
    docs = list(read_file(str(path), default_source="given"))
    assert [d.source for d in docs] == ["RedPajamaBook", "given", "given", "given", "RedPajamaArXiv"]


def test_jsonl_crlf_line_endings(tmp_path):
    path = tmp_path / "src" / "crlf.jsonl"
    path.parent.mkdir()
    path.write_bytes((record("a\r\nb", "S") + "\r\n" + record("c", "S") + "\r\n").encode())
    assert [(d.text, d.line) for d in read_file(str(path))] == [("a\r\nb", 1), ("c", 2)]


def test_jsonl_zst_single_frame(tmp_path):
    docs = generated_docs(40)
    path = tmp_path / "c4" / "part.jsonl.zst"
    path.parent.mkdir()
    path.write_bytes(zst_frame([record(t, s) for t, s in docs]))
    stats = ReadStats()
    read = list(read_file(str(path), stats=stats))
    assert [(d.text, d.source) for d in read] == docs
    assert [d.line for d in read] == list(range(1, 41))
    assert stats.documents == 40 and not stats.skipped


def test_jsonl_zst_multi_frame(tmp_path):
    """Two zstd frames concatenated (as `cat a.zst b.zst` or a multi-frame writer produces) read as one stream."""
    docs = generated_docs(50, "RedPajamaGithub")
    lines = [record(t, s) for t, s in docs]
    path = tmp_path / "github" / "part.jsonl.zst"
    path.parent.mkdir()
    path.write_bytes(zst_frame(lines[:20]) + zst_frame(lines[20:]))
    read = list(read_file(str(path)))
    assert [(d.text, d.source) for d in read] == docs
    assert [d.line for d in read] == list(range(1, 51))


def test_jsonl_zst_frame_boundary_inside_a_line_and_any_read_size(tmp_path):
    """A frame may end in the middle of a line, and the file may be read in blocks of any size: the
    decompressed stream is the same, byte for byte."""
    docs = generated_docs(30)
    raw = "".join(record(t, s) + "\n" for t, s in docs).encode()
    cut = len(raw) // 3 + 5  # inside a line
    assert raw[cut - 1 : cut] != b"\n"
    c = zstandard.ZstdCompressor()
    data = c.compress(raw[:cut]) + c.compress(raw[cut:]) + c.compress(b"")  # an empty third frame too
    path = tmp_path / "s" / "x.jsonl.zst"
    path.parent.mkdir()
    path.write_bytes(data)
    for chunk_size in [1, 2, 3, 7, 64, 100, len(data) // 2, len(data) - 1, len(data), 1 << 20]:
        assert b"".join(_zst_chunks(str(path), chunk_size)) == raw, chunk_size
    assert [(d.text, d.source) for d in read_file(str(path))] == docs


def test_compressed_empty_input_has_no_documents_and_a_0_byte_zst_file_raises(tmp_path):
    path = tmp_path / "s" / "empty.jsonl.zst"
    path.parent.mkdir()
    path.write_bytes(zstandard.ZstdCompressor().compress(b""))  # a frame header, no content
    assert list(read_file(str(path))) == []
    write_jsonl_zst(str(path), [])
    assert list(read_file(str(path))) == []
    # a 0-byte file is no zstd stream (a copy cut short, a failed download): its source would vanish
    path.write_bytes(b"")
    for on_bad_record in ("error", "skip"):
        with pytest.raises(CorpusError, match="empty file, not a zstd stream") as excinfo:
            list(read_corpus([str(tmp_path)], on_bad_record=on_bad_record))
        assert str(path) in str(excinfo.value)


def test_txt_is_one_document_from_its_folder(tmp_path):
    (tmp_path / "poems").mkdir()
    text = "Line one.\n\n  Line two,\twith a tab.\n写一篇正式的文章\n"
    (tmp_path / "poems" / "a.txt").write_text(text, encoding="utf-8")
    (tmp_path / "poems" / "blank.txt").write_text("  \n\n\t\n")  # whitespace only: no document
    (tmp_path / "poems" / "bom.txt").write_bytes(b"\xef\xbb\xbfWith a BOM.\n")  # as Windows editors save
    stats = ReadStats()
    docs = list(read_corpus([str(tmp_path / "poems")], stats=stats))
    assert [(d.text, d.source, d.line) for d in docs] == [(text, "poems", 0), ("With a BOM.\n", "poems", 0)]
    assert stats.documents == 2


def test_read_corpus_folder_recursive_sorted_and_mixed_formats(tmp_path):
    (tmp_path / "b" / "deep").mkdir(parents=True)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "1.jsonl").write_text(record("a1") + "\n" + record("a2", "Named") + "\n")
    write_jsonl_zst(str(tmp_path / "b" / "deep" / "2.jsonl.zst"), [("b1", "RedPajamaWikipedia")])
    (tmp_path / "b" / "3.txt").write_text("b3 text")
    (tmp_path / "b" / "notes.md").write_text("# not a corpus file")
    (tmp_path / "b" / "data.json").write_text(record("not jsonl either"))
    files = resolve_paths(str(tmp_path))  # a single str works like a list of one
    assert files == sorted(
        str(tmp_path / p) for p in ["a/1.jsonl", "b/deep/2.jsonl.zst", "b/3.txt"]
    )
    assert docs_of([str(tmp_path)]) == [
        ("a1", "a"), ("a2", "Named"), ("b3 text", "b"), ("b1", "RedPajamaWikipedia")
    ]


def test_resolve_paths_globs_dedup_and_pathlike(tmp_path):
    for name in ["x", "y"]:
        (tmp_path / name).mkdir()
        write_jsonl_zst(str(tmp_path / name / "p0.jsonl.zst"), [(f"{name}0", name)])
        (tmp_path / name / "p1.jsonl").write_text(record(f"{name}1", name) + "\n")
    everything = sorted(str(p) for p in tmp_path.rglob("p*.jsonl*"))
    assert resolve_paths([str(tmp_path / "*" / "*.jsonl.zst")]) == [
        str(tmp_path / "x" / "p0.jsonl.zst"), str(tmp_path / "y" / "p0.jsonl.zst")
    ]
    assert resolve_paths([str(tmp_path / "**" / "*.jsonl*")]) == everything
    # overlapping folder, glob and file paths give each file once
    assert resolve_paths([tmp_path, str(tmp_path / "x" / "*"), str(tmp_path / "x" / "p1.jsonl")]) == everything
    # a glob that also matches non-corpus files keeps only the corpus files
    (tmp_path / "x" / "p2.parquet").write_text("")
    assert resolve_paths([str(tmp_path / "x" / "p*")]) == everything[:2]
    assert docs_of([str(tmp_path / "y" / "p?.jsonl*")]) == [("y0", "y"), ("y1", "y")]


def test_resolve_paths_expands_user(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "h").mkdir()
    (tmp_path / "h" / "f.jsonl").write_text(record("home") + "\n")
    assert resolve_paths(["~/h"]) == [str(tmp_path / "h" / "f.jsonl")]


def test_glob_matching_folders_expands_them(tmp_path):
    for i in (1, 2):
        (tmp_path / f"chunk{i}").mkdir()
        write_jsonl_zst(str(tmp_path / f"chunk{i}" / "example_train_0.jsonl.zst"), [(f"doc{i}", "S")])
    assert resolve_paths([str(tmp_path / "chunk*")]) == [
        str(tmp_path / "chunk1" / "example_train_0.jsonl.zst"), str(tmp_path / "chunk2" / "example_train_0.jsonl.zst")
    ]


# ----------------------------------------------------------------------------- bad input
def _bad_jsonl(tmp_path: Path, name: str, bad_line: bytes, suffix: str = ".jsonl") -> Path:
    """A file whose 3rd line is bad; lines 1, 2 and 4 are good documents."""
    raw = b"\n".join(
        [record("good one", "S").encode(), record("good two", "S").encode(), bad_line, record("good four", "S").encode()]
    ) + b"\n"
    path = tmp_path / "src" / f"{name}{suffix}"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(zstandard.ZstdCompressor().compress(raw) if suffix.endswith(".zst") else raw)
    return path


BAD_LINES = {
    "invalid_json": (b'{"text": "unterminated', "invalid JSON"),
    "no_text": (json.dumps({"content": "x", "meta": {}}).encode(), "no string field 'text'"),
    "text_not_string": (json.dumps({"text": ["a", "list"]}).encode(), "no string field 'text'"),
    "text_null": (json.dumps({"text": None}).encode(), "no string field 'text'"),
    "not_an_object": (b'["text", "in a list"]', "no string field 'text'"),
    "invalid_utf8": (b'{"text": "caf\xe9 latin-1"}', "invalid UTF-8"),
    "lone_surrogate": (b'{"text": "half \\ud800 of a pair"}', "lone UTF-16 surrogate"),
    "source_escapes": (record("x", "../../outside").encode(), "not a plain folder name"),
    "source_with_slash": (record("x", "a/b").encode(), "not a plain folder name"),
    "source_not_string": (json.dumps({"text": "x", "meta": {"redpajama_set_name": 7}}).encode(), "is not a string"),
    "source_too_long": (record("x", "x" * 300).encode(), "is 300 bytes long in UTF-8: at most 200"),
}
REASON = {"text_not_string": "no_text", "text_null": "no_text", "not_an_object": "no_text",
          "lone_surrogate": "invalid_utf8", "source_escapes": "bad_source", "source_with_slash": "bad_source",
          "source_not_string": "bad_source", "source_too_long": "bad_source"}


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.zst"])
@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_record_raises_naming_file_and_line(tmp_path, case, suffix):
    bad_line, message = BAD_LINES[case]
    path = _bad_jsonl(tmp_path, case, bad_line, suffix)
    with pytest.raises(CorpusError, match=message) as excinfo:
        list(read_corpus([str(path)]))
    assert f"{path}:3:" in str(excinfo.value)


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.zst"])
@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_record_skipped_and_counted(tmp_path, case, suffix):
    bad_line, _ = BAD_LINES[case]
    path = _bad_jsonl(tmp_path, case, bad_line, suffix)
    stats = ReadStats()
    docs = list(read_corpus([str(path)], on_bad_record="skip", stats=stats))
    assert [(d.text, d.line) for d in docs] == [("good one", 1), ("good two", 2), ("good four", 4)]
    assert stats.documents == 3
    assert stats.skipped == {REASON.get(case, case): 1}


def test_source_names_up_to_200_bytes_are_read(tmp_path):
    """The limit is in UTF-8 bytes, as file systems count a folder name (255 at most)."""
    path = tmp_path / "s" / "names.jsonl"
    path.parent.mkdir()
    path.write_text("\n".join([record("a", "x" * 200), record("b", "中" * 66), record("c", "中" * 67)]) + "\n",
                    encoding="utf-8")
    with pytest.raises(CorpusError, match="is 201 bytes long") as excinfo:
        list(read_file(str(path)))
    assert f"{path}:3:" in str(excinfo.value)
    assert [(d.text, d.source) for d in read_file(str(path), on_bad_record="skip")] == [
        ("a", "x" * 200), ("b", "中" * 66)
    ]


def test_skip_counts_every_reason_across_files(tmp_path):
    for case in ["invalid_json", "no_text", "text_not_string", "invalid_utf8"]:
        _bad_jsonl(tmp_path, case, BAD_LINES[case][0])
    stats = ReadStats()
    docs = list(read_corpus([str(tmp_path)], on_bad_record="skip", stats=stats))
    assert len(docs) == 4 * 3 and stats.documents == 12
    assert stats.skipped == {"invalid_json": 1, "no_text": 2, "invalid_utf8": 1}
    other = ReadStats(documents=5)
    other.skipped["invalid_json"] += 2
    stats.merge(other)
    assert stats.documents == 17 and stats.skipped == {"invalid_json": 3, "no_text": 2, "invalid_utf8": 1}


def test_invalid_utf8_txt(tmp_path):
    path = tmp_path / "src" / "bad.txt"
    path.parent.mkdir()
    path.write_bytes(b"line one\nline two\nthird: " + b"\xff\xfe broken\nfour\n")
    with pytest.raises(CorpusError, match="invalid UTF-8") as excinfo:
        list(read_corpus([str(path)]))
    assert f"{path}:3:" in str(excinfo.value)
    # skipped: the whole file is the (one) bad record; a good .txt next to it is still read
    (tmp_path / "src" / "good.txt").write_text("fine text")
    stats = ReadStats()
    assert docs_of([str(tmp_path)], on_bad_record="skip", stats=stats) == [("fine text", "src")]
    assert stats.documents == 1 and stats.skipped == {"invalid_utf8": 1}


def test_invalid_utf8_split_across_lines_is_not_a_false_alarm(tmp_path):
    """A multi-byte character is never split by line handling (\\n is never part of a UTF-8 sequence)."""
    text = "中文" * 3000 + "\n" + "emoji 😀" * 2000
    path = tmp_path / "s" / "big.jsonl.zst"
    path.parent.mkdir()
    write_jsonl_zst(str(path), [(text, "S"), (text[::-1], "S")])
    assert [d.text for d in read_file(str(path))] == [text, text[::-1]]


@pytest.mark.parametrize("on_bad_record", ["error", "skip"])
@pytest.mark.parametrize("frames", [1, 2])
def test_truncated_zst_raises_never_returns_fewer_documents(tmp_path, on_bad_record, frames):
    docs = generated_docs(200)
    lines = [record(t, s) for t, s in docs]
    data = zst_frame(lines) if frames == 1 else zst_frame(lines[:100]) + zst_frame(lines[100:])
    path = tmp_path / "s" / "cut.jsonl.zst"
    path.parent.mkdir()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorpusError, match="truncated") as excinfo:
        list(read_corpus([str(path)], on_bad_record=on_bad_record))
    assert str(path) in str(excinfo.value)
    # the same at every read size: the end of the file is inside a frame whichever block it falls in
    for chunk_size in [1, 13, 4096]:
        with pytest.raises(CorpusError, match="truncated"):
            list(_zst_chunks(str(path), chunk_size))
    # cutting only the last byte is also caught
    path.write_bytes(data[:-1])
    with pytest.raises(CorpusError, match="truncated"):
        list(read_file(str(path)))


def test_corrupt_zst_raises(tmp_path):
    path = tmp_path / "s" / "garbage.jsonl.zst"
    path.parent.mkdir()
    path.write_bytes(b'{"text": "plain jsonl named .zst"}\n')
    with pytest.raises(CorpusError, match="corrupt zstd") as excinfo:
        list(read_file(str(path)))
    assert str(path) in str(excinfo.value)


def test_missing_path_raises(tmp_path):
    missing = tmp_path / "nope" / "part.jsonl"
    with pytest.raises(CorpusError, match="does not exist") as excinfo:
        resolve_paths([str(missing)])
    assert str(missing) in str(excinfo.value)
    with pytest.raises(CorpusError, match="does not exist"):
        list(read_corpus([str(missing)]))


def test_glob_matching_nothing_raises(tmp_path):
    (tmp_path / "a.jsonl").write_text(record("x") + "\n")
    pattern = str(tmp_path / "*.jsonl.zst")
    with pytest.raises(CorpusError, match="matches no file") as excinfo:
        resolve_paths([str(tmp_path / "a.jsonl"), pattern])
    assert pattern in str(excinfo.value)


def test_folder_without_corpus_files_raises(tmp_path):
    folder = tmp_path / "empty"
    (folder / "sub").mkdir(parents=True)
    (folder / "README.md").write_text("no corpus here")
    (folder / "sub" / "data.parquet").write_bytes(b"PAR1")
    with pytest.raises(CorpusError, match="holds no .jsonl, .jsonl.zst, .txt file") as excinfo:
        resolve_paths([str(folder)])
    assert str(folder) in str(excinfo.value)
    # beside an entry that has files too: a mistyped folder is not silently left out
    (tmp_path / "good").mkdir()
    (tmp_path / "good" / "a.jsonl").write_text(record("x") + "\n")
    with pytest.raises(CorpusError, match=f"'{folder}' holds no"):
        resolve_paths([str(tmp_path / "good"), str(folder)])
    with pytest.raises(CorpusError, match="holds no"):  # a glob that matches only other files
        resolve_paths([str(tmp_path / "good"), str(folder / "*.md")])


def test_file_with_wrong_suffix_raises(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(record("x"))
    with pytest.raises(CorpusError, match="not a corpus file") as excinfo:
        resolve_paths([str(path)])
    assert str(path) in str(excinfo.value)


def test_on_bad_record_must_be_error_or_skip(tmp_path):
    path = tmp_path / "s" / "a.jsonl"
    path.parent.mkdir()
    path.write_text(record("x") + "\n")
    with pytest.raises(ValueError, match="on_bad_record"):
        list(read_file(str(path), on_bad_record="ignore"))


# ----------------------------------------------------------------------------- writing
ROUND_TRIP = [
    ("Plain English, with punctuation!  Two spaces.\n\tA tab and a newline.", "RedPajamaC4"),
    ("写一篇正式的文章", "RedPajamaZh"),
    ("mixed 中文 and English 😀🎉 with emoji, ZWJ 👩\u200d💻 and flags 🇫🇷", "RedPajamaCommonCrawl"),
    ('quotes " and \\ backslashes, {"json": "inside"}', "RedPajamaGithub"),
    ("line\rseparators\u2028\u2029 and NEL\x85 inside one record", "RedPajamaStackExchange"),
    ("", "RedPajamaBook"),  # an empty text is still a record with a string 'text'
    ("\n\n", "RedPajamaBook"),
    ("x" * 100_000, "RedPajamaArXiv"),
]


def test_write_jsonl_zst_round_trip(tmp_path):
    path = tmp_path / "out" / "part-0.jsonl.zst"
    path.parent.mkdir()
    assert write_jsonl_zst(str(path), iter(ROUND_TRIP)) == len(ROUND_TRIP)
    assert [(d.text, d.source) for d in read_file(str(path))] == ROUND_TRIP
    assert not [p for p in path.parent.iterdir() if p != path]  # no temporary file left behind
    # the file is standard SlimPajama jsonl.zst: one JSON object per line, non-ASCII kept as UTF-8
    raw = zstandard.ZstdDecompressor().stream_reader(path.open("rb")).read()
    lines = raw.decode("utf-8").split("\n")
    assert lines[-1] == "" and len(lines) == len(ROUND_TRIP) + 1
    assert json.loads(lines[1]) == {"text": "写一篇正式的文章", "meta": {"redpajama_set_name": "RedPajamaZh"}}
    assert "写一篇正式的文章".encode() in raw


def test_write_jsonl_zst_overwrites_atomically(tmp_path):
    path = str(tmp_path / "p.jsonl.zst")
    write_jsonl_zst(path, [("old", "A")] * 3)
    assert write_jsonl_zst(path, [("new", "B")]) == 1
    assert [(d.text, d.source) for d in read_file(path)] == [("new", "B")]
    assert os.listdir(tmp_path) == ["p.jsonl.zst"]


def test_write_jsonl_zst_failure_leaves_no_temporary_file_and_keeps_the_old_file(tmp_path):
    path = str(tmp_path / "p.jsonl.zst")
    write_jsonl_zst(path, [("old", "A")])
    with pytest.raises(ValueError, match="level"):
        write_jsonl_zst(path, [("new", "B")], level=100)

    def documents():
        yield "new", "B"
        raise RuntimeError("the input ended badly")

    with pytest.raises(RuntimeError, match="ended badly"):
        write_jsonl_zst(path, documents())
    assert os.listdir(tmp_path) == ["p.jsonl.zst"]
    assert [(d.text, d.source) for d in read_file(path)] == [("old", "A")]


def test_conftest_corpus_sources(corpus_dir):
    """The shared fixture: three sources, two as .jsonl.zst and one as .jsonl, read with their names."""
    files = resolve_paths([str(corpus_dir)])
    assert [Path(f).relative_to(corpus_dir).as_posix() for f in files] == [
        "alpha/part-0.jsonl.zst", "beta/part-0.jsonl.zst", "gamma/part-0.jsonl"
    ]
    stats = ReadStats()
    docs = list(read_corpus([str(corpus_dir)], stats=stats))
    counts = {s: sum(d.source == s for d in docs) for s in ("alpha", "beta", "gamma")}
    assert counts == {"alpha": 60, "beta": 60, "gamma": 60} and stats.documents == 180
    assert all(d.text.endswith(".") for d in docs)
