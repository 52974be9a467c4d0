"""SlimPajama's corpus recipe: NFC, short-document filter, exact and near-duplicate removal, statistics.

`CorpusPreparer(...).run(inputs, output)` (the engine of `python prepare.py`) works in three passes:

1. **sketch** (worker processes, one input file each): read the file with the reader, NFC-normalise
   every document, and store per document its line, source, byte counts, cleaned length, a 64-bit
   hash of its text and its MinHash signature: never its text. Each file gives one shard under
   `<output>/.prepare/shards/`, written atomically; a rerun skips files whose shard matches their
   size, mtime and the sketch settings (resume after an interruption).
2. **index** (main process, files in sorted path order, lines in file order): a document is removed
   as *short* if its cleaned text has fewer than `min_chars` characters; as an *exact duplicate* if
   its hash was kept before; as a *near duplicate* if a `datasketch.MinHashLSH` query over the
   documents kept so far returns a candidate whose signatures agree on at least `threshold` of their
   permutations (estimated Jaccard). Otherwise it is kept and inserted. So the first copy in that
   order is kept, and every removed document has a kept near-twin: the result does not depend on
   the number of workers.
3. **write** (worker processes): re-read each file and write its kept documents (NFC text, source in
   `meta.redpajama_set_name`) to `<output>/<path relative to the inputs' common folder>.jsonl.zst`
   (a file with none kept gives a valid empty one); a file is not rewritten when its fingerprint (as
   its shard's) and its decisions are those its output was written with, so a rerun leaves the same
   bytes as a fresh run into an empty folder.

The cleaning before shingling and the length filter are SlimPajama's (Cerebras modelzoo,
`slimpajama/dedup/to_hash.py` and `preprocessing/filter.py`): lower-case, ASCII punctuation removed,
runs of whitespace collapsed to one space; shingles are character 13-grams of that string.
"""

from __future__ import annotations

import fnmatch
import functools
import glob
import hashlib
import json
import logging
import multiprocessing as mp
import numbers
import os
import re
import string
import unicodedata
import zipfile
import zlib
from bisect import bisect_right
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import zstandard

from slimpajama.data.reader import SUFFIXES, CorpusError, ReadStats, read_file, resolve_paths, write_jsonl_zst

log = logging.getLogger(__name__)

KEPT, SHORT, EXACT, NEAR = 0, 1, 2, 3  # the status of a document after the index pass
STATE_DIR = ".prepare"  # under the output folder: shards, write markers (resume state)
SHARD_VERSION = 1
_BATCH = 8192  # shingles per MinHash.update_batch call: bounds its (batch, num_perm) temporary to 4 MB
# zstd's ZSTD_minCLevel() (-(1 << 17)); zstandard does not export it and clamps lower levels to it silently
MIN_COMPRESSION_LEVEL = -(1 << 17)

_PUNCTUATION = str.maketrans("", "", string.punctuation)
_WHITESPACE = re.compile(r"\s+")


# --------------------------------------------------------------------------------------- features
def clean_text(text: str) -> str:
    """SlimPajama's normalisation for filtering and hashing: lower case, no ASCII punctuation,
    whitespace runs collapsed to one space, stripped."""
    return _WHITESPACE.sub(" ", text.lower().translate(_PUNCTUATION).strip())


def shingles(clean: str, ngram: int, unit: str) -> set[bytes]:
    """The set of n-grams of `clean`: characters (SlimPajama) or words (joined by a space).

    A text with fewer than `ngram` units is one shingle (itself); an empty text has none.
    """
    if unit == "char":
        units, sep = clean, ""
    else:
        units, sep = clean.split(" "), " "
        if units == [""]:
            units = []
    if not units:
        return set()
    if len(units) <= ngram:
        return {sep.join(units).encode("utf-8")}
    if unit == "char":
        return {clean[i : i + ngram].encode("utf-8") for i in range(len(clean) - ngram + 1)}
    return {" ".join(units[i : i + ngram]).encode("utf-8") for i in range(len(units) - ngram + 1)}


def text_hash(text: str) -> int:
    """64-bit hash of the NFC text, for exact duplicates (collision odds ~ n^2 / 2^65)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


_PRIME = np.uint64(0x100000001B3)  # FNV-64 prime: the multiplier of the polynomial shingle hash


def shingle_hashes(clean: str, ngram: int, unit: str) -> np.ndarray:
    """32-bit hashes of the distinct shingles of `clean` (the units as `shingles()`), vectorised.

    Each unit becomes a number (a character its code point, a word the CRC-32 of its UTF-8 bytes,
    plus one), a shingle the polynomial h = sum_j code[i+j] * P^(n-1-j) mod 2^64 of its units, and its
    hash the top 32 bits of fmix64(h) (datasketch mixes them again with fmix32 before permuting).
    """
    if unit == "char":
        codes = np.frombuffer(clean.encode("utf-32-le"), np.uint32).astype(np.uint64)
    else:
        codes = np.array([zlib.crc32(w.encode("utf-8")) + 1 for w in clean.split(" ") if w], np.uint64)
    if len(codes) == 0:
        return np.zeros(0, np.uint32)
    n = min(ngram, len(codes))
    h = np.zeros(len(codes) - n + 1, np.uint64)
    for j in range(n):  # n vectorised multiply-adds over shifted views (uint64 arithmetic wraps)
        h = h * _PRIME + codes[j : len(codes) - n + 1 + j]
    # murmur3's fmix64: neighbouring shingles' polynomials are related (h' = h * P + c - c0 * P^n);
    # mixing all 64 bits before keeping 32 removes that correlation (without it the MinHash estimate
    # of the Jaccard similarity is biased upwards by ~0.01)
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xFF51AFD7ED558CCD)
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xC4CEB9FE1A85EC53)
    h ^= h >> np.uint64(33)
    return np.unique((h >> np.uint64(32)).astype(np.uint32))


class Sketcher:
    """MinHash signatures of cleaned texts: `datasketch.MinHash` (affine32 scheme, `num_perm` uint32
    values) updated in batches with the shingle hashes of `shingle_hashes()`."""

    def __init__(self, num_perm: int = 128, seed: int = 1, ngram: int = 13, unit: str = "char"):
        from datasketch import MinHash

        self.ngram, self.unit = ngram, unit
        # hashfunc=int: the values given to update_batch are already 32-bit hashes
        self._template = MinHash(num_perm=num_perm, seed=seed, hashfunc=int)  # permutations drawn once

    def signature(self, clean: str) -> np.ndarray:
        m = self._template.copy()
        hashes = shingle_hashes(clean, self.ngram, self.unit)
        for i in range(0, len(hashes), _BATCH):
            m.update_batch(hashes[i : i + _BATCH].tolist())
        return m.hashvalues  # (num_perm,) uint32


# --------------------------------------------------------------------------------------- statistics
@dataclass
class SourceStats:
    documents: int = 0
    bytes: int = 0  # UTF-8 bytes of the text as read
    short: int = 0
    short_bytes: int = 0
    exact: int = 0
    exact_bytes: int = 0
    near: int = 0
    near_bytes: int = 0
    kept: int = 0
    kept_bytes: int = 0  # UTF-8 bytes of the NFC text written


@dataclass
class PrepareStats:
    sources: dict[str, SourceStats] = field(default_factory=dict)
    skipped: Counter = field(default_factory=Counter)  # bad records skipped (on_bad_record=skip), by reason
    files: int = 0
    # per input file, the status of each of its documents in order: KEPT, SHORT, EXACT or NEAR
    status: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def total(self) -> SourceStats:
        t = SourceStats()
        for s in self.sources.values():
            for k, v in asdict(s).items():
                setattr(t, k, getattr(t, k) + v)
        return t

    def to_dict(self) -> dict:
        total = self.total()
        rows = {}
        for name, s in sorted(self.sources.items()):
            rows[name] = {**asdict(s), "share_before": s.bytes / max(1, total.bytes),
                          "share_after": s.kept_bytes / max(1, total.kept_bytes)}
        return {"sources": rows, "total": asdict(total), "skipped_records": dict(self.skipped), "files": self.files}

    def to_markdown(self) -> str:
        """The per-source table SlimPajama's paper reports: removals, and each source's byte share."""
        head = ("| source | docs in | MB in | short | exact dup | near dup | kept docs | MB kept | "
                "bytes removed | share before | share after |")
        lines = [head, "|" + "---|" * 11]
        total = self.total()

        def row(name, s: SourceStats) -> str:
            removed = 1 - s.kept_bytes / s.bytes if s.bytes else 0.0
            return (f"| {name} | {s.documents:,} | {s.bytes / 1e6:.2f} | {s.short:,} | {s.exact:,} | {s.near:,} | "
                    f"{s.kept:,} | {s.kept_bytes / 1e6:.2f} | {100 * removed:.1f}% | "
                    f"{100 * s.bytes / max(1, total.bytes):.1f}% | {100 * s.kept_bytes / max(1, total.kept_bytes):.1f}% |")

        lines += [row(name, s) for name, s in sorted(self.sources.items())]
        lines.append(row("**total**", total))
        if self.skipped:
            lines.append("")
            lines.append("Bad records skipped (on_bad_record=skip): "
                         + ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items())))
        return "\n".join(lines)


# --------------------------------------------------------------------------------------- files
def _atomic_json(path: Path, obj) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _key(path: str) -> str:
    return hashlib.blake2b(path.encode("utf-8"), digest_size=10).hexdigest()


def _fingerprint(path: str, settings: dict) -> dict:
    st = os.stat(path)
    return {"version": SHARD_VERSION, "path": path, "size": st.st_size, "mtime_ns": st.st_mtime_ns, **settings}


def _input_root(arg: str) -> str:
    """The folder an input argument names: itself, a file's folder, or a glob's fixed leading folders."""
    path = os.path.abspath(os.path.expanduser(str(arg)))
    if glob.has_magic(path):
        parts = Path(path).parts
        path = os.path.join(*parts[: next(i for i, p in enumerate(parts) if glob.has_magic(p))])
    return path if os.path.isdir(path) else os.path.dirname(path)


def _glob_matches(pattern: str, path: str) -> bool:
    """Whether `glob.glob(pattern, recursive=True)` returns `path` once it exists (both absolute): `*`, `?`
    and `[...]` match within one name, `**` any number of names, and neither a hidden name unless written."""
    def match(pp: tuple, qq: tuple) -> bool:
        if not pp:
            return not qq
        if pp[0] == "**":
            return match(pp[1:], qq) or (bool(qq) and not qq[0].startswith(".") and match(pp, qq[1:]))
        if not qq:
            return False
        if glob.has_magic(pp[0]):
            ok = fnmatch.fnmatchcase(qq[0], pp[0]) and (pp[0].startswith(".") or not qq[0].startswith("."))
        else:
            ok = qq[0] == pp[0]
        return ok and match(pp[1:], qq[1:])

    return match(Path(pattern).parts, Path(path).parts)


def _reads_back(arg: str, output: str, names: Iterable[str]) -> bool:
    """Whether the input `arg`, given again (a rerun, `data.paths`), would read what is written to `output`
    (the files `names` in it): a folder, or a `**` glob, walks its folder; any other glob walks the
    folders it matches (as `reader.resolve_paths`) and reads the files it matches."""
    path = os.path.abspath(os.path.expanduser(str(arg)))
    if os.path.isdir(path) or "**" in str(arg):
        folder = _input_root(arg)
        return output == folder or output.startswith(folder + os.sep)
    if not glob.has_magic(path):
        return False
    depth = len(Path(output).parts)
    written = {d for n in names for d in (Path(output, n), *Path(output, n).parents) if len(d.parts) > depth}
    return any(_glob_matches(path, str(p)) for p in (Path(output), *Path(output).parents, *written))


def _foreign_file(output: str) -> str | None:
    """A file under `output` when it is a folder that holds files but no earlier run of this tool (its
    `.prepare/` state or its `manifest.json`); None otherwise (also for a folder of empty folders)."""
    out = Path(output)
    if not out.is_dir() or (out / STATE_DIR).is_dir():
        return None
    try:
        if "outputs" in json.loads((out / "manifest.json").read_text()):
            return None
    except (OSError, ValueError, TypeError):
        pass
    return next((str(p) for p in out.rglob("*") if not p.is_dir()), None)


def _output_name(path: str, root: str) -> str:
    rel = os.path.relpath(path, root)
    for suffix in sorted(SUFFIXES, key=len, reverse=True):
        if rel.endswith(suffix):
            return rel[: -len(suffix)] + ".jsonl.zst"
    raise AssertionError(rel)


@functools.lru_cache(maxsize=1)
def _worker_sketcher(num_perm: int, seed: int, ngram: int, unit: str) -> Sketcher:
    return Sketcher(num_perm, seed, ngram, unit)


def _sketch_file(job: tuple) -> tuple[str, int, int]:
    """Pass 1 for one file: write <shards>/<key>.sig.npy (signatures) then <key>.npz (the rest).

    The .npz is renamed into place last: its presence with a matching fingerprint marks the shard done.
    Returns (path, documents, bytes read).
    """
    path, shard_dir, settings = job
    sketcher = _worker_sketcher(settings["num_perm"], settings["seed"], settings["ngram"], settings["unit"])
    fingerprint = _fingerprint(path, settings)
    stats = ReadStats()
    lines, sources, nbytes, nfc_bytes, clean_chars, hashes, sigs = [], [], [], [], [], [], []
    source_ids: dict[str, int] = {}
    for doc in read_file(path, on_bad_record=settings["on_bad_record"], stats=stats):
        text = unicodedata.normalize("NFC", doc.text)
        clean = clean_text(text)
        lines.append(doc.line)
        sources.append(source_ids.setdefault(doc.source, len(source_ids)))
        nbytes.append(len(doc.text.encode("utf-8")))
        nfc_bytes.append(len(text.encode("utf-8")))
        clean_chars.append(len(clean))
        hashes.append(text_hash(text))
        sigs.append(sketcher.signature(clean))
    sig = np.stack(sigs) if sigs else np.zeros((0, settings["num_perm"]), np.uint32)
    key = _key(path)
    pid = os.getpid()
    tmp_sig, tmp_meta = Path(shard_dir) / f"{key}.sig.tmp-{pid}.npy", Path(shard_dir) / f"{key}.tmp-{pid}.npz"
    np.save(tmp_sig, sig)
    np.savez(
        tmp_meta,
        info=np.array(json.dumps({"fingerprint": fingerprint, "sources": list(source_ids),
                                  "skipped": dict(stats.skipped)})),
        line=np.array(lines, np.int64), source=np.array(sources, np.int32), bytes=np.array(nbytes, np.int64),
        nfc_bytes=np.array(nfc_bytes, np.int64), clean_chars=np.array(clean_chars, np.int64),
        hash=np.array(hashes, np.uint64),
    )
    os.replace(tmp_sig, Path(shard_dir) / f"{key}.sig.npy")
    os.replace(tmp_meta, Path(shard_dir) / f"{key}.npz")
    return path, len(lines), sum(nbytes)


def _write_file(job: tuple) -> tuple[str, int]:
    """Pass 3 for one file: re-read it and write the documents whose status is KEPT (none: an empty
    .jsonl.zst, still one zstd frame)."""
    path, out_path, status, lines, fingerprint, on_bad_record, level = job
    st = os.stat(path)
    if (st.st_size, st.st_mtime_ns) != (fingerprint["size"], fingerprint["mtime_ns"]):
        raise CorpusError(f"{path}: the file changed while it was being prepared; rerun")
    docs = read_file(path, on_bad_record=on_bad_record)

    def kept():
        n = 0
        for i, doc in enumerate(docs):
            if i >= len(lines) or doc.line != lines[i]:
                raise CorpusError(f"{path}:{doc.line}: the file changed while it was being prepared; rerun")
            n += 1
            if status[i] == KEPT:
                yield unicodedata.normalize("NFC", doc.text), doc.source
        if n != len(lines):
            raise CorpusError(f"{path}: the file changed while it was being prepared; rerun")

    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    return path, write_jsonl_zst(out_path, kept(), level=level)


# --------------------------------------------------------------------------------------- the index
class DuplicateIndex:
    """Exact-hash set + `datasketch.MinHashLSH` over the documents kept so far.

    It holds hashes and LSH band keys, never texts; the signatures themselves stay in the shard
    files on disk (memory-mapped) and are read only to verify LSH candidates.
    """

    def __init__(self, num_perm: int, seed: int, threshold: float, bands: int | None, rows: int | None,
                 weights: Sequence[float], verify: bool):
        from datasketch import MinHashLSH

        params = (bands, rows) if bands is not None else None
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=tuple(weights), params=params)
        self.threshold, self.verify, self.seed = threshold, verify, seed
        self.hashes: set[int] = set()
        self._sig_paths: list[Path] = []
        self._offsets: list[int] = []  # global key of each shard's first row
        self._signatures = functools.lru_cache(maxsize=256)(self._load)  # open memory maps

    @property
    def bands_rows(self) -> tuple[int, int]:
        return self.lsh.b, self.lsh.r

    def add_shard(self, sig_path: Path, first_key: int) -> None:
        self._sig_paths.append(sig_path)
        self._offsets.append(first_key)

    def _load(self, shard: int) -> np.ndarray:
        return np.load(self._sig_paths[shard], mmap_mode="r")

    def signature(self, key: int) -> np.ndarray:
        shard = bisect_right(self._offsets, key) - 1
        return self._signatures(shard)[key - self._offsets[shard]]

    def near_duplicate(self, sig: np.ndarray) -> bool:
        from datasketch import LeanMinHash

        mh = LeanMinHash(seed=self.seed, hashvalues=sig, scheme="affine32")
        candidates = self.lsh.query(mh)
        if not self.verify:
            return bool(candidates)
        return any(np.mean(self.signature(k) == sig) >= self.threshold for k in candidates)

    def insert(self, key: int, sig: np.ndarray) -> None:
        from datasketch import LeanMinHash

        self.lsh.insert(key, LeanMinHash(seed=self.seed, hashvalues=sig, scheme="affine32"), check_duplication=False)


# --------------------------------------------------------------------------------------- the recipe
class CorpusPreparer:
    """SlimPajama's recipe for a corpus of many sources; every setting comes from `conf/prepare.yaml`.

    Args (the config keys under `prepare:`):
        min_chars: documents whose cleaned text is shorter are removed (SlimPajama: 200).
        exact_dedup, near_dedup: switch the two duplicate filters.
        ngram, ngram_unit: shingle size and unit, "char" (SlimPajama: 13 characters) or "word".
        num_perm, seed: MinHash permutations and their seed.
        threshold: Jaccard similarity above which two documents are near duplicates (SlimPajama: 0.8).
        bands, rows: LSH bands x rows (bands * rows <= num_perm); null: datasketch picks them for
            `threshold`, weighing false positives against false negatives by `lsh_weights`.
        lsh_weights: (false positive, false negative) weights of that choice; they sum to 1.
        verify: a candidate counts only if the signatures' estimated Jaccard is >= threshold.
        num_workers: processes for the sketch and write passes; null: all CPUs; 0: in this process.
        on_bad_record: error | skip, as the reader.
        compression_level: zstd level of the output, from MIN_COMPRESSION_LEVEL (-131072, fastest) to
            zstandard.MAX_COMPRESSION_LEVEL (22); 0 is zstd's default (3).
        progress: show a progress bar.
    """

    def __init__(self, min_chars: int = 200, exact_dedup: bool = True, near_dedup: bool = True, ngram: int = 13,
                 ngram_unit: str = "char", num_perm: int = 128, seed: int = 1, threshold: float = 0.8,
                 bands: int | None = None, rows: int | None = None, lsh_weights: Sequence[float] = (0.1, 0.9),
                 verify: bool = True, num_workers: int | None = None, on_bad_record: str = "error",
                 compression_level: int = 3, progress: bool = True):
        def bad(key: str, why: str):
            raise ValueError(f"prepare.{key}: {why}")

        def real(value) -> bool:  # bool is an int subclass, but not a number here
            return isinstance(value, numbers.Real) and not isinstance(value, bool)

        def integer(key: str, value, low: int, high: int | None = None) -> None:
            if not real(value) or not isinstance(value, numbers.Integral):
                bad(key, f"must be an integer, got {value!r}")
            if value < low or (high is not None and value > high):
                bad(key, f"must be >= {low}, got {value}" if high is None else
                    f"must be in [{low}, {high}], got {value}")

        for key, value in (("exact_dedup", exact_dedup), ("near_dedup", near_dedup), ("verify", verify),
                           ("progress", progress)):
            if not isinstance(value, bool):  # a YAML typo such as `maybe` would count as true
                bad(key, f"must be true or false, got {value!r}")
        if ngram_unit not in ("char", "word"):
            bad("ngram_unit", f"must be 'char' or 'word', got {ngram_unit!r}")
        integer("ngram", ngram, 1)
        integer("num_perm", num_perm, 2)
        integer("seed", seed, 0, 2**32 - 1)  # datasketch's range
        if not real(threshold) or not 0.0 < threshold <= 1.0:  # also rejects NaN
            bad("threshold", f"must be a number in (0, 1], got {threshold!r}")
        if (bands is None) != (rows is None):
            bad("bands", "set both prepare.bands and prepare.rows, or neither")
        if bands is not None:
            integer("bands", bands, 2)
            integer("rows", rows, 1)
            if bands * rows > num_perm:
                bad("bands", f"bands * rows must be <= num_perm ({num_perm}); got {bands} x {rows}")
        try:
            weights = tuple(lsh_weights)
        except TypeError:
            weights = ()
        if len(weights) != 2 or not all(real(w) and w >= 0 for w in weights) or not abs(sum(weights) - 1.0) <= 1e-9:
            bad("lsh_weights", f"two non-negative weights that sum to 1, got {lsh_weights!r}")
        weights = tuple(float(w) for w in weights)
        if num_workers is not None:
            integer("num_workers", num_workers, 0)
        if on_bad_record not in ("error", "skip"):
            bad("on_bad_record", f"must be 'error' or 'skip', got {on_bad_record!r}")
        integer("min_chars", min_chars, 0)
        integer("compression_level", compression_level, MIN_COMPRESSION_LEVEL, zstandard.MAX_COMPRESSION_LEVEL)
        self.min_chars, self.exact_dedup, self.near_dedup = min_chars, exact_dedup, near_dedup
        self.ngram, self.ngram_unit, self.num_perm, self.seed = ngram, ngram_unit, num_perm, seed
        self.threshold, self.bands, self.rows = threshold, bands, rows
        self.lsh_weights = (weights[0], 1.0 - weights[0])  # exactly 1.0: datasketch compares with ==
        self.verify, self.num_workers, self.on_bad_record = verify, num_workers, on_bad_record
        self.compression_level, self.progress = compression_level, progress
        self.work_done: Counter = Counter()  # files sketched / written by the last run (tests, logs)

    # the settings a shard depends on: change one and every shard is recomputed
    def sketch_settings(self) -> dict:
        return {"ngram": self.ngram, "unit": self.ngram_unit, "num_perm": self.num_perm, "seed": self.seed,
                "on_bad_record": self.on_bad_record}

    def run(self, inputs: Iterable[str] | str, output: str) -> PrepareStats:
        inputs = [inputs] if isinstance(inputs, (str, os.PathLike)) else [str(i) for i in inputs]
        if not inputs:
            raise CorpusError("input=[]: give at least one file, folder or glob of corpus files")
        files = resolve_paths(inputs)
        output = os.path.abspath(os.path.expanduser(str(output)))
        if os.path.exists(output) and not os.path.isdir(output):
            raise CorpusError(f"output={output} is a file: give a folder to write the prepared corpus into")
        inside = [f for f in files if f == output or f.startswith(output + os.sep)]
        if inside:
            raise CorpusError(f"output={output} holds input files ({inside[0]}, ...): choose another output folder")
        root = os.path.commonpath([_input_root(i) for i in inputs])
        names = {f: _output_name(f, root) for f in files}
        for i in inputs:  # a folder, or a glob matching a folder above the output, would read the output back
            if _reads_back(i, output, names.values()):
                raise CorpusError(f"output={output} is inside the input {i}: a later run, or data.paths={i}, would "
                                  "read the prepared copy as input too. Choose an output folder outside it")
        clashes = [n for n, c in Counter(names.values()).items() if c > 1]
        if clashes:
            raise CorpusError(f"two inputs would both be written to {output}/{clashes[0]} (e.g. x.jsonl and x.jsonl.zst)")
        foreign = _foreign_file(output)
        if foreign:  # data.paths=[output] would read it as corpus too, and a clashing name would be overwritten
            raise CorpusError(f"output={output} is not empty and is not an earlier output of prepare.py (it holds "
                              f"{foreign}): choose an empty or new output folder")
        state = Path(output) / STATE_DIR
        (state / "shards").mkdir(parents=True, exist_ok=True)
        (state / "written").mkdir(exist_ok=True)
        for leftover in list(state.glob("*/*.tmp-*")):  # from an interrupted run
            leftover.unlink()
        self.work_done = Counter()

        with self._pool(len(files)) as pool, _progress(self.progress) as bar:
            self._sketch(files, state / "shards", pool, bar)
            stats, decisions = self._index(files, state / "shards", bar)
            self._write(files, names, output, state, decisions, pool, bar)

        self._finish(output, files, names, stats)
        return stats

    # ---------------------------------------------------------------- passes
    def _pool(self, n_files: int):
        workers = (os.cpu_count() or 1) if self.num_workers is None else self.num_workers
        workers = min(workers, n_files)
        if workers <= 0:
            return _InProcess()
        # fork: workers start without re-importing torch (seconds each); created before any progress thread
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        return mp.get_context(method).Pool(workers)

    def _shard_done(self, path: str, shard_dir: Path) -> bool:
        meta = shard_dir / f"{_key(path)}.npz"
        if not meta.exists() or not (shard_dir / f"{_key(path)}.sig.npy").exists():
            return False
        try:
            with np.load(meta) as z:
                info = json.loads(str(z["info"]))
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):  # a damaged shard is recomputed
            return False
        return info["fingerprint"] == _fingerprint(path, self.sketch_settings())

    def _sketch(self, files: list[str], shard_dir: Path, pool, bar) -> None:
        todo = [f for f in files if not self._shard_done(f, shard_dir)]
        if len(todo) < len(files):
            log.info("resuming: %d of %d files already sketched", len(files) - len(todo), len(files))
        task = bar.add_task("sketch (MinHash)", total=sum(os.path.getsize(f) for f in todo) or 1)
        jobs = [(f, str(shard_dir), self.sketch_settings()) for f in todo]
        for path, _, _ in pool.imap_unordered(_sketch_file, jobs):
            self.work_done["sketched"] += 1
            bar.advance(task, os.path.getsize(path))
        bar.update(task, completed=bar.tasks[task].total)

    def _index(self, files: list[str], shard_dir: Path, bar) -> tuple[PrepareStats, list[np.ndarray]]:
        index = DuplicateIndex(self.num_perm, self.seed, self.threshold, self.bands, self.rows, self.lsh_weights,
                               self.verify)
        b, r = index.bands_rows
        log.info("near duplicates: MinHash %d perms of %d-%s shingles; LSH %d bands x %d rows (a pair at "
                 "Jaccard %.2f becomes a candidate with p=%.2f)%s", self.num_perm, self.ngram, self.ngram_unit, b, r,
                 self.threshold, 1 - (1 - self.threshold**r) ** b, "; candidates verified" if self.verify else "")
        stats = PrepareStats(files=len(files))
        decisions = []
        key = 0
        task = bar.add_task("index (dedup)", total=sum(os.path.getsize(f) for f in files))
        for path in files:
            meta = np.load(shard_dir / f"{_key(path)}.npz")
            sig = np.load(shard_dir / f"{_key(path)}.sig.npy", mmap_mode="r")
            info = json.loads(str(meta["info"]))
            stats.skipped.update(info["skipped"])
            index.add_shard(shard_dir / f"{_key(path)}.sig.npy", key)
            names = info["sources"]
            status = np.zeros(len(meta["line"]), np.uint8)
            for i, (src, nbytes, nfc_bytes, chars, h) in enumerate(zip(
                    meta["source"].tolist(), meta["bytes"].tolist(), meta["nfc_bytes"].tolist(),
                    meta["clean_chars"].tolist(), meta["hash"].tolist())):
                s = stats.sources.setdefault(names[src], SourceStats())
                s.documents += 1
                s.bytes += nbytes
                if chars < self.min_chars:
                    status[i] = SHORT
                    s.short += 1
                    s.short_bytes += nbytes
                elif self.exact_dedup and h in index.hashes:
                    status[i] = EXACT
                    s.exact += 1
                    s.exact_bytes += nbytes
                elif self.near_dedup and index.near_duplicate(np.asarray(sig[i])):
                    status[i] = NEAR
                    s.near += 1
                    s.near_bytes += nbytes
                else:
                    s.kept += 1
                    s.kept_bytes += nfc_bytes
                    if self.exact_dedup:
                        index.hashes.add(h)
                    if self.near_dedup:
                        index.insert(key + i, np.asarray(sig[i]))
            key += len(status)
            decisions.append(status)
            stats.status[path] = status
            bar.advance(task, os.path.getsize(path))
        if not stats.sources:
            raise CorpusError(f"input={files[:3]}...: the corpus holds no documents ({len(files)} files read)")
        return stats, decisions

    def _write(self, files, names, output, state: Path, decisions, pool, bar) -> None:
        """Write each file's output unless its marker shows it was written from this very input (the
        fingerprint its shard was sketched from: path, size, mtime, settings) with these decisions."""
        jobs, markers = [], {}
        for path, status in zip(files, decisions):
            out_path = os.path.join(output, names[path])
            shard = state / "shards" / f"{_key(path)}.npz"
            with np.load(shard) as z:
                fingerprint = json.loads(str(z["info"]))["fingerprint"]
            marker = {"input": path, "fingerprint": fingerprint, "output": names[path],
                      "kept": int((status == KEPT).sum()), "level": self.compression_level,
                      "decisions": hashlib.blake2b(status.tobytes(), digest_size=16).hexdigest()}
            marker_path = state / "written" / f"{_key(path)}.json"
            try:
                done = json.loads(marker_path.read_text()) == marker and os.path.exists(out_path)
            except (OSError, ValueError):  # none yet, or a damaged one: write
                done = False
            if done:
                continue
            markers[path] = (marker_path, marker)
            with np.load(shard) as z:
                lines = z["line"]
            jobs.append((path, out_path, status, lines, fingerprint, self.on_bad_record, self.compression_level))
        task = bar.add_task("write (jsonl.zst)", total=sum(os.path.getsize(j[0]) for j in jobs) or 1)
        for path, _ in pool.imap_unordered(_write_file, jobs):
            marker_path, marker = markers[path]
            _atomic_json(marker_path, marker)
            self.work_done["written"] += 1
            bar.advance(task, os.path.getsize(path))
        bar.update(task, completed=bar.tasks[task].total)

    def _finish(self, output: str, files: list[str], names: dict, stats: PrepareStats) -> None:
        manifest_path = Path(output) / "manifest.json"
        if manifest_path.exists():  # outputs of inputs that are gone would still be read as corpus
            try:
                previous = json.loads(manifest_path.read_text()).get("outputs", {})
            except json.JSONDecodeError:
                previous = {}
            for name in set(previous.values()) - set(names.values()):
                if os.path.exists(os.path.join(output, name)):
                    os.remove(os.path.join(output, name))
        table = stats.to_markdown()
        (Path(output) / "stats.md").write_text(table + "\n")
        _atomic_json(Path(output) / "stats.json", {**stats.to_dict(), "settings": self.settings()})
        _atomic_json(manifest_path, {"inputs": files, "outputs": names, "settings": self.settings()})
        log.info("prepared %d files into %s\n%s", len(files), output, table)

    def settings(self) -> dict:
        return {**self.sketch_settings(), "min_chars": self.min_chars, "exact_dedup": self.exact_dedup,
                "near_dedup": self.near_dedup, "threshold": self.threshold, "bands": self.bands, "rows": self.rows,
                "lsh_weights": list(self.lsh_weights), "verify": self.verify}


class _InProcess:
    """A Pool look-alike that runs jobs here (num_workers=0: debugging, tests)."""

    def imap_unordered(self, fn, jobs):
        return map(fn, jobs)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _progress(enabled: bool):
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn("{task.description:<18}"), BarColumn(), DownloadColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), disable=not enabled, transient=False)
