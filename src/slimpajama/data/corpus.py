"""Corpora prepared into LitData's optimized token chunks, one folder per (split, source).

`TextCorpus` reads SlimPajama-format files (and .txt), splits documents deterministically into
train/validation by a hash of their text (so exact duplicates never straddle the split), trains a
SentencePiece tokenizer on a sample of the training split (or uses a given one), and tokenizes every
file in parallel. `MarkovCorpus` writes streams of a random Markov chain (tokens = states).

Everything lands in `cache_dir/<key>/`, where the key hashes the corpus files (path, size, mtime)
and every setting that changes the tokens: a changed file or tokenizer gives a new key, an unchanged
one reuses the cache. LitData's chunk format streams the same way from a local folder or an object
store (`s3://...`), which is why LitGPT and TinyLlama use it for SlimPajama.
"""

import concurrent.futures as cf
import functools
import glob
import hashlib
import json
import logging
import multiprocessing as mp
import os
import shutil
import socket
from collections import defaultdict
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from slimpajama.checks import is_finite_number
from slimpajama.data.reader import CorpusError, ReadStats, read_file, resolve_paths
from slimpajama.tokenizer import SlimPajamaTokenizer

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: documents that start with a space, or hold U+2581, encode as in transformers
MANIFEST = "manifest.json"
SPLITS = ("train", "val")


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def is_val(text: str, val_fraction: float) -> bool:
    """Deterministic split by content: the same text always lands in the same split."""
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")
    return h / 2**64 < val_fraction


def write_tokens(directory: Path, arrays: Sequence[np.ndarray], chunk_bytes: str = "32MB") -> int:
    """Write 1-D int32 token arrays as LitData chunks readable by `TokensLoader`; returns the token count."""
    from litdata.streaming.item_loader import TokensLoader
    from litdata.streaming.writer import BinaryWriter

    directory.mkdir(parents=True, exist_ok=True)
    from litdata.utilities.env import _DistributedEnv

    writer = BinaryWriter(str(directory), chunk_bytes=chunk_bytes, item_loader=TokensLoader())
    # one writer per folder, even inside a DDP job (prepare_data runs on one rank): otherwise merge()
    # waits forever for index files from every rank of the job
    writer._distributed_env = _DistributedEnv(world_size=1, global_rank=0, num_nodes=1)
    n = 0
    for i, a in enumerate(arrays):
        writer.add_item(i, torch.from_numpy(np.ascontiguousarray(a, dtype=np.int32)))
        n += len(a)
    writer.done()
    writer.merge()
    return n


class PreparedCorpus:
    """What `prepare()` wrote: token folders per split and source, the tokenizer, extra metrics."""

    def __init__(self, root: Path, manifest: dict, url: Optional[str] = None):
        """url: where the token folders are streamed from (`s3://...`, `gs://...`, `local:/...`): a copy
        of `root` in an object store; the manifest and tokenizer are read from `root`."""
        self.root, self.manifest, self.url = root, manifest, url

    def dirs(self, split: str) -> dict[str, str]:
        if self.url:
            return {s: f"{self.url.rstrip('/')}/tokens/{split}/{s}" for s in self.manifest["tokens"][split]}
        return {s: str(self.root / "tokens" / split / s) for s in self.manifest["tokens"][split]}

    def tokens(self, split: str) -> dict[str, int]:
        return self.manifest["tokens"][split]

    @property
    def metrics(self) -> dict:
        return self.manifest.get("metrics", {})

    @functools.cached_property
    def tokenizer(self) -> Optional[SlimPajamaTokenizer]:
        t = self.manifest.get("tokenizer_dir")
        return SlimPajamaTokenizer.from_pretrained(self.root / t) if t else None


def _remove_stale_builds(root: Path) -> None:
    """Remove the build folders `<root>.tmp-<host>-<pid>` of this host whose process has ended (a build
    that was killed). Another host's folders may belong to a build running there (a cache shared by the
    nodes of a job), so they are kept; so are folders named by a pid alone, unless that pid has ended here."""
    host = socket.gethostname()
    for tmp in root.parent.glob(glob.escape(root.name) + ".tmp-*"):
        owner = tmp.name[len(root.name) + len(".tmp-"):]
        tmp_host, _, pid = owner.rpartition("-")
        if tmp_host not in (host, "") or not pid.isdigit() or _alive(int(pid)):
            continue
        log.info("removing %s, left by a build that did not finish", tmp)
        shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class _Corpus:
    """Shared cache handling: subclasses define `key()` and `_build(root, progress)`."""

    def key(self) -> dict:
        raise NotImplementedError

    def _build(self, root: Path, progress: bool) -> dict:
        raise NotImplementedError

    def root(self, cache_dir: str) -> Path:
        return Path(cache_dir) / f"{type(self).__name__.lower()}-{_hash(self.key())}"

    def prepare(self, cache_dir: str, progress: bool = True) -> PreparedCorpus:
        """Build the token cache once (atomically: a killed build leaves no manifest); reuse it after."""
        root = self.root(cache_dir)
        if (root / MANIFEST).is_file():
            return self.load(cache_dir)
        _remove_stale_builds(root)
        tmp = root.with_name(f"{root.name}.tmp-{socket.gethostname()}-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            manifest = {"format_version": FORMAT_VERSION, **self._build(tmp, progress)}  # paths relative to root
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
            shutil.rmtree(root, ignore_errors=True)
            os.replace(tmp, root)
        except BaseException:  # a failed build leaves no folder behind
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("prepared corpus in %s", root)
        return PreparedCorpus(root, manifest)

    @staticmethod
    def fetch(url: str, local_dir: str) -> PreparedCorpus:
        """A prepared corpus in an object store (a copy of a `cache_dir/<key>` folder, e.g.
        `s3://bucket/textcorpus-<key>`): downloads its manifest and tokenizer into `local_dir`; the
        token chunks stay remote and are streamed by LitData. Any URL LitData reads works (`local:` too)."""
        from litdata.streaming.downloader import get_downloader

        from slimpajama.tokenizer import CONFIG_FILE, MODEL_FILE

        url = url.rstrip("/")
        root = Path(local_dir) / f"remote-{_hash(url)}"
        root.mkdir(parents=True, exist_ok=True)
        downloader = get_downloader(url, str(root), [])

        def download(name: str) -> None:
            # afresh each time, into a file of this process, then replaced whole: LitData's downloaders
            # keep a file that is already there (a corpus uploaded again to the URL would be read with the
            # old manifest and tokenizer), and every rank of a job fetches at once
            local = root / name
            part = local.with_name(f"{local.name}.fetch-{os.getpid()}")
            part.unlink(missing_ok=True)
            downloader.download_file(f"{url}/{name}", str(part))
            os.replace(part, local)

        try:
            download(MANIFEST)
        except Exception as e:
            raise FileNotFoundError(f"data.remote_url={url}: cannot read {url}/{MANIFEST} ({e})") from e
        manifest = json.loads((root / MANIFEST).read_text())
        if (version := manifest.get("format_version")) != FORMAT_VERSION:
            made = f"format {version}" if version else "an older format (the manifest names none)"
            raise CorpusError(
                f"data.remote_url={url}: {url}/{MANIFEST} was prepared in {made}, and this version of "
                f"slimpajama reads format {FORMAT_VERSION} (its tokens would not match what the tokenizer "
                f"gives now). Run the job once without data.remote_url to build the corpus folder under "
                f"data.cache_dir again (data/cache/textcorpus-<key>/ by default), and copy it to the bucket.")
        if t := manifest.get("tokenizer_dir"):
            (root / t).mkdir(exist_ok=True)
            for name in (MODEL_FILE, CONFIG_FILE):
                download(f"{t}/{name}")
        return PreparedCorpus(root, manifest, url=url)

    def load(self, cache_dir: str) -> PreparedCorpus:
        root = self.root(cache_dir)
        if not (root / MANIFEST).is_file():
            raise FileNotFoundError(f"{root / MANIFEST} not found: call prepare() first")
        return PreparedCorpus(root, json.loads((root / MANIFEST).read_text()))


# ---------------------------------------------------------------------------------------------
# text corpora


def _first_chars(texts: list[str], n: int) -> list[str]:
    """The texts up to `n` characters in all, the last one cut."""
    out = []
    for t in texts:
        if n <= 0:
            break
        out.append(t[:n])
        n -= len(out[-1])
    return out


def _tokenize_file(args) -> tuple[str, dict, ReadStats]:
    """Worker: read one file and return {(split, source): int32 tokens} with <s> ... </s> per document."""
    path, proto, val_fraction, on_bad_record = args
    tok = SlimPajamaTokenizer(proto)
    stats = ReadStats()
    texts: dict = defaultdict(list)
    for doc in read_file(path, on_bad_record=on_bad_record, stats=stats):
        texts[("val" if is_val(doc.text, val_fraction) else "train", doc.source)].append(doc.text)
    out = {}
    for key, docs in texts.items():
        ids = tok.encode_batch(docs, add_bos=True, add_eos=True, num_threads=1)
        out[key] = np.concatenate([np.asarray(x, dtype=np.int32) for x in ids])
    return path, out, stats


class TextCorpus(_Corpus):
    def __init__(
        self,
        paths: Sequence[str],
        vocab_size: int = 8192,
        control_tokens: Sequence[str] = (),
        tokenizer_path: Optional[str] = None,
        tokenizer_sample_chars: int = 20_000_000,
        val_fraction: float = 0.01,
        on_bad_record: str = "error",
        num_proc: Optional[int] = None,
        build: Optional[Callable[[], object]] = None,
        tokenizer_sample_bytes: Optional[int] = None,
    ):
        """paths: files, folders, globs. tokenizer_path: a saved tokenizer (e.g. a pretrained model's
        folder) instead of training one. build: called first when the paths do not exist yet (the
        demo corpus builder)."""
        if tokenizer_sample_bytes is not None:  # its old name: it always counted characters
            log.warning("TextCorpus(tokenizer_sample_bytes=) is now tokenizer_sample_chars (it counts characters)")
            tokenizer_sample_chars = tokenizer_sample_bytes
        if isinstance(paths, str):
            paths = [paths]
        if not paths:
            raise CorpusError("data.paths is empty: give files, folders or globs of *.jsonl, *.jsonl.zst, *.txt")
        if not is_finite_number(val_fraction) or not 0 < val_fraction < 1:
            raise ValueError(f"data.val_fraction must be a number in (0, 1), got {val_fraction!r}")
        if on_bad_record not in ("error", "skip"):
            raise ValueError(f"data.on_bad_record must be 'error' or 'skip', got {on_bad_record!r}")
        self.paths, self.vocab_size, self.control_tokens = list(paths), vocab_size, list(control_tokens)
        self.tokenizer_path, self.sample_chars = tokenizer_path, tokenizer_sample_chars
        self.val_fraction, self.on_bad_record = val_fraction, on_bad_record
        self.num_proc = num_proc or os.cpu_count() or 1
        self.build = build
        self._files: Optional[list[str]] = None

    def files(self) -> list[str]:
        if self._files is None:
            if self.build is not None:
                self.build()
            self._files = resolve_paths(self.paths)
        return self._files

    def key(self) -> dict:
        files = [(f, st.st_size, st.st_mtime_ns) for f in self.files() for st in [os.stat(f)]]
        tokenizer = (
            SlimPajamaTokenizer.from_pretrained(self.tokenizer_path).fingerprint()
            if self.tokenizer_path
            else {"vocab_size": self.vocab_size, "control_tokens": self.control_tokens, "sample": self.sample_chars}
        )
        return {"v": FORMAT_VERSION, "files": files, "tokenizer": tokenizer,
                "val_fraction": self.val_fraction, "on_bad_record": self.on_bad_record}

    def _train_tokenizer(self, files: list[str]) -> SlimPajamaTokenizer:
        """Train on an even share of `sample_chars` characters from each source's training documents.

        A document's source is its record's (`meta.redpajama_set_name`), so this holds for a folder per
        source and for SlimPajama's own layout (chunk folders whose files mix every source) alike, also for
        a source met only in the middle of a later file. Since a source can first appear in any document,
        every file is read through, in order (one pass over the corpus, as the tokenizing after it); what
        is kept is bounded: a source takes training documents while it lacks its share as the sources met
        so far split `sample_chars` (the share shrinks as sources appear), and keeps its first documents
        up to the final share. The sample is deterministic."""
        texts: dict[str, list[str]] = defaultdict(list)  # source -> its documents, in file order
        chars: dict[str, int] = defaultdict(int)
        def room(source: str) -> int:  # what the source may still take of its share, as the sources met so far split it
            return self.sample_chars // len(chars.keys() | {source}) - chars[source]

        for f in files:
            for doc in read_file(f, on_bad_record=self.on_bad_record):
                if not is_val(doc.text, self.val_fraction) and (n := room(doc.source)) > 0:  # room() counts it as met
                    texts[doc.source].append(doc.text[:n])
                    chars[doc.source] += len(texts[doc.source][-1])
        share = self.sample_chars // max(1, len(texts))
        sample = [t for docs in texts.values() for t in _first_chars(docs, share)]
        if not sample:
            raise CorpusError(f"data.paths={self.paths}: no training documents to train the tokenizer on")
        log.info("training a %d-token SentencePiece BPE tokenizer on %.1fM characters of %d sources",
                 self.vocab_size, sum(map(len, sample)) / 1e6, len(texts))
        return SlimPajamaTokenizer.train(sample, self.vocab_size, self.control_tokens)

    def _build(self, root: Path, progress: bool) -> dict:
        files = self.files()
        if self.tokenizer_path:
            tokenizer = SlimPajamaTokenizer.from_pretrained(self.tokenizer_path)
        else:
            tokenizer = self._train_tokenizer(files)
        tokenizer.save_pretrained(root / "tokenizer")

        arrays: dict = defaultdict(list)
        stats = ReadStats()
        jobs = [(f, tokenizer._proto, self.val_fraction, self.on_bad_record) for f in files]
        with progress_bar(progress) as bar, cf.ProcessPoolExecutor(
            max_workers=min(self.num_proc, len(jobs)), mp_context=mp.get_context("spawn")
        ) as pool:
            task = bar.add_task("tokenizing", total=sum(os.path.getsize(f) for f in files))
            for path, out, file_stats in pool.map(_tokenize_file, jobs):  # in file order: deterministic
                for key, a in out.items():
                    arrays[key].append(a)
                stats.merge(file_stats)
                bar.advance(task, os.path.getsize(path))
        if stats.documents == 0:
            raise CorpusError(f"data.paths={self.paths}: the corpus holds no documents ({len(files)} files read)")
        if stats.skipped:
            log.warning("skipped bad records (data.on_bad_record=skip): %s", dict(stats.skipped))

        tokens: dict = {split: {} for split in SPLITS}
        for (split, source), chunks in sorted(arrays.items()):
            tokens[split][source] = write_tokens(root / "tokens" / split / source, chunks)
        _log_table(tokens)
        return {
            "tokens": tokens,
            "documents": stats.documents,
            "skipped": dict(stats.skipped),
            "tokenizer_dir": "tokenizer",
            "vocab_size": tokenizer.vocab_size,
            "files": len(files),
        }


# ---------------------------------------------------------------------------------------------
# the Markov source


class MarkovCorpus(_Corpus):
    def __init__(self, n_states: int = 64, concentration: float = 0.1, chain_seed: int = 0,
                 train_tokens: int = 4_000_000, val_tokens: int = 200_000):
        from slimpajama.data.markov import MarkovChain

        self.chain = MarkovChain(n_states, concentration, chain_seed)
        self.params = dict(n_states=n_states, concentration=concentration, chain_seed=chain_seed,
                           train_tokens=train_tokens, val_tokens=val_tokens)

    def key(self) -> dict:
        return {"v": FORMAT_VERSION, **self.params}

    def _build(self, root: Path, progress: bool) -> dict:
        tokens = {}
        for i, split in enumerate(SPLITS):
            streams = self.chain.sample(self.params[f"{split}_tokens"], seed=1000 + i)  # (chains, length)
            tokens[split] = {"markov": write_tokens(root / "tokens" / split / "markov", list(streams))}
        return {
            "tokens": tokens,
            "tokenizer_dir": None,
            "vocab_size": self.chain.n_states,
            "metrics": {"data/entropy_rate": self.chain.entropy_rate},
        }


# ---------------------------------------------------------------------------------------------


def progress_bar(enabled: bool):
    """A rich progress bar (description, bar, done of total, time left); `enabled=False` shows nothing."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        disable=not enabled, transient=False,
    )


def _log_table(tokens: dict) -> None:
    total = {split: sum(tokens[split].values()) for split in SPLITS}
    for source in sorted(set(tokens["train"]) | set(tokens["val"])):
        t, v = tokens["train"].get(source, 0), tokens["val"].get(source, 0)
        log.info("  %-20s train %12d tokens (%5.1f%%)   val %10d", source, t, 100 * t / max(1, total["train"]), v)
    log.info("  %-20s train %12d tokens            val %10d", "total", total["train"], total["val"])
