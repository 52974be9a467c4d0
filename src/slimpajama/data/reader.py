"""Read corpora in SlimPajama's own format (`*.jsonl`, `*.jsonl.zst`) and plain `.txt`.

A jsonl line is one document: `{"text": "...", "meta": {"redpajama_set_name": "RedPajamaBook"}}`.
A `.txt` file is one document whose source is its parent folder's name.
Bad input raises `CorpusError` naming the file and line, or, with `on_bad_record="skip"`,
is skipped and counted in `ReadStats`; nothing is ever silently truncated.
"""

import codecs
import glob
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional

import zstandard

SUFFIXES = (".jsonl", ".jsonl.zst", ".txt")
MAX_SOURCE_BYTES = 200  # a source names folders (`tokens/train/<source>`, `train-<source>`): 255 bytes at most


class CorpusError(ValueError):
    """Bad corpus input; the message names the file and, where there is one, the line."""


@dataclass
class Document:
    text: str
    source: str
    path: str
    line: int  # 1-based line of a jsonl record; 0 for a whole .txt file


@dataclass
class ReadStats:
    documents: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count

    def merge(self, other: "ReadStats") -> None:
        self.documents += other.documents
        self.skipped.update(other.skipped)


def source_problem(source) -> Optional[str]:
    """Why `source` cannot name a source (it names folders of the token cache), or None if it can."""
    if not isinstance(source, str):
        return f"the source name {source!r} is not a string"
    if source in (".", "..") or any(c in source for c in "/\\\0"):
        return f"the source name {source!r} is not a plain folder name (no '/', '\\', NUL, '.' or '..')"
    if (n := len(source.encode("utf-8", "surrogatepass"))) > MAX_SOURCE_BYTES:
        return (f"the source name {source[:40]!r}... is {n} bytes long in UTF-8: at most {MAX_SOURCE_BYTES} "
                "fit a folder name")
    return None


def _walk(folder: str) -> list[str]:
    return glob.glob(os.path.join(glob.escape(folder), "**", "*"), recursive=True)


def resolve_paths(paths: Iterable[str]) -> list[str]:
    """Expand files, folders (recursively) and globs into a sorted list of corpus files."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: set[str] = set()
    for entry in paths:
        p = os.path.expanduser(str(entry))
        if glob.has_magic(p):
            matches = glob.glob(p, recursive=True)
            if not matches:
                raise CorpusError(f"data.paths: the glob {p!r} matches no file")
            candidates = [f for m in matches for f in (_walk(m) if os.path.isdir(m) else [m])]
        elif os.path.isdir(p):
            candidates = _walk(p)
        elif os.path.isfile(p):
            if not p.endswith(SUFFIXES):
                raise CorpusError(f"data.paths: {p} is not a corpus file (expected one of {', '.join(SUFFIXES)})")
            candidates = [p]
        else:
            raise CorpusError(f"data.paths: {p} does not exist")
        found = {os.path.abspath(c) for c in candidates if os.path.isfile(c) and c.endswith(SUFFIXES)}
        if not found:  # a mistyped entry beside good ones would silently leave its data out
            raise CorpusError(f"data.paths: {entry!r} holds no {', '.join(SUFFIXES)} file")
        files |= found
    return sorted(files)


def _zst_chunks(path: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
    """Decompress a (possibly multi-frame) .zst file; an empty file or a truncated last frame raises CorpusError."""
    with open(path, "rb") as f:
        dec = zstandard.ZstdDecompressor().decompressobj()
        seen_input = False
        empty = True
        while True:
            block = f.read(chunk_size)
            if not block:
                break
            empty = False
            seen_input = True
            while block:
                try:
                    out = dec.decompress(block)
                except zstandard.ZstdError as e:
                    raise CorpusError(f"{path}: corrupt zstd data ({e})") from e
                if out:
                    yield out
                block = b""
                if dec.eof:  # a frame ended: the rest belongs to the next frame
                    block = dec.unused_data
                    dec = zstandard.ZstdDecompressor().decompressobj()
                    if not block:
                        seen_input = False
        if empty:  # even an empty input compresses to a frame header: this file was never written whole
            raise CorpusError(f"{path}: empty file, not a zstd stream (a compressed empty file still has a frame)")
        if seen_input and not dec.eof:
            raise CorpusError(f"{path}: truncated zstd stream (the file ends inside a frame)")


def _lines(path: str) -> Iterator[bytes]:
    if path.endswith(".zst"):
        pending = b""
        for chunk in _zst_chunks(path):
            pending += chunk
            *complete, pending = pending.split(b"\n")
            yield from complete
        if pending:
            yield pending
    else:
        with open(path, "rb") as f:
            for line in f:
                yield line.rstrip(b"\n")


def read_file(
    path: str,
    default_source: Optional[str] = None,
    on_bad_record: str = "error",
    stats: Optional[ReadStats] = None,
) -> Iterator[Document]:
    """Yield the documents of one corpus file.

    The source of a jsonl record is `meta.redpajama_set_name`, else `default_source`, else the name of
    the file's parent folder.
    """
    if on_bad_record not in ("error", "skip"):
        raise ValueError(f"data.on_bad_record must be 'error' or 'skip', got {on_bad_record!r}")
    stats = stats if stats is not None else ReadStats()
    folder_source = default_source or Path(path).parent.name
    if problem := source_problem(folder_source):
        raise CorpusError(f"{path}: {problem}")

    def bad(reason: str, message: str):
        if on_bad_record == "error":
            raise CorpusError(message)
        stats.skipped[reason] += 1

    if path.endswith(".txt"):
        with open(path, "rb") as f:
            raw = f.read().removeprefix(codecs.BOM_UTF8)  # Windows editors start text files with one
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw[: e.start].count(b"\n") + 1
            bad("invalid_utf8", f"{path}:{line}: invalid UTF-8 ({e.reason} at byte {e.start})")
            return
        if text.strip():
            stats.documents += 1
            yield Document(text, folder_source, path, 0)
        return

    for lineno, raw in enumerate(_lines(path), start=1):
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            bad("invalid_utf8", f"{path}:{lineno}: invalid UTF-8 ({e.reason} at byte {e.start})")
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            bad("invalid_json", f"{path}:{lineno}: invalid JSON ({e.msg}, column {e.colno})")
            continue
        text = record.get("text") if isinstance(record, dict) else None
        if not isinstance(text, str):
            bad("no_text", f"{path}:{lineno}: the record has no string field 'text'")
            continue
        if "\\u" in line and _has_surrogate(text):  # JSON can escape half of a UTF-16 pair, "\\ud800"
            bad("invalid_utf8", f"{path}:{lineno}: the text holds a lone UTF-16 surrogate (an escape such as "
                                "\\ud800 without its pair): not valid Unicode")
            continue
        meta = record.get("meta") or {}
        source = meta.get("redpajama_set_name") if isinstance(meta, dict) else None
        source = folder_source if source in (None, "") else source
        if problem := source_problem(source):
            bad("bad_source", f"{path}:{lineno}: {problem} (meta.redpajama_set_name)")
            continue
        stats.documents += 1
        yield Document(text, source, path, lineno)


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def read_corpus(
    paths: Iterable[str], on_bad_record: str = "error", stats: Optional[ReadStats] = None
) -> Iterator[Document]:
    """Yield every document of every file that `paths` (files, folders, globs) resolve to."""
    stats = stats if stats is not None else ReadStats()
    files = resolve_paths(paths)
    for path in files:
        yield from read_file(path, on_bad_record=on_bad_record, stats=stats)


def write_jsonl_zst(path: str, documents: Iterable[tuple[str, str]], level: int = 3) -> int:
    """Write (text, source) pairs in SlimPajama's format; returns the number of documents."""
    n = 0
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f, zstandard.ZstdCompressor(level=level).stream_writer(f) as z:
            for text, source in documents:
                record = {"text": text, "meta": {"redpajama_set_name": source}}
                z.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
                n += 1
        os.replace(tmp, path)
    except BaseException:  # no half-written file left behind; `path` keeps what it held
        Path(tmp).unlink(missing_ok=True)
        raise
    return n
