"""Tests for the prepared corpora and the data module (src/slimpajama/data/{corpus,datamodule,markov}.py)."""

from __future__ import annotations

import concurrent.futures as cf
import json
import math
import os
import random
import shutil
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from litdata import StreamingDataset
from litdata.streaming.item_loader import TokensLoader

from conftest import TINY, compose_cfg
from slimpajama.data import corpus as corpus_module
from slimpajama.data.corpus import MANIFEST, MarkovCorpus, TextCorpus, is_val
from slimpajama.data.datamodule import SlimPajamaDataModule
from slimpajama.data.markov import MarkovChain
from slimpajama.data.reader import CorpusError, read_corpus, write_jsonl_zst
from slimpajama.data.tasks import read_examples
from slimpajama.tokenizer import SlimPajamaTokenizer

# LitData's TokensLoader reads read-only chunk buffers; harmless here
pytestmark = pytest.mark.filterwarnings("ignore:The given buffer is not writable:UserWarning")

SEQ_LEN, BATCH = 32, 8
BLOCK = SEQ_LEN + 1
CONTROL = ["<|style:formal|>"]


def text_corpus(paths, **kwargs) -> TextCorpus:
    settings = {"vocab_size": 384, "control_tokens": CONTROL, "val_fraction": 0.1, "num_proc": 1}  # 1 spawn: fastest
    settings.update(kwargs)
    return TextCorpus([str(p) for p in paths], **settings)


def datamodule(corpus, cache_dir, **kwargs) -> SlimPajamaDataModule:
    return SlimPajamaDataModule(corpus, seq_len=SEQ_LEN, batch_size=BATCH, cache_dir=str(cache_dir), progress=False,
                                **kwargs)


def read_stream(directory: str, n_tokens: int) -> np.ndarray:
    """The whole token stream of one (split, source) folder, in order, as one LitData block."""
    ds = StreamingDataset(directory, item_loader=TokensLoader(block_size=n_tokens), shuffle=False)
    assert len(ds) == 1
    return ds[0].numpy()


def split_documents(stream: np.ndarray, bos: int, eos: int) -> list[list[int]]:
    """<s> doc </s> <s> doc </s> ... -> the documents' ids; fails on any other framing."""
    docs, i = [], 0
    ids = stream.tolist()
    while i < len(ids):
        assert ids[i] == bos, f"token {i} is {ids[i]}, expected <s>"
        j = ids.index(eos, i)
        docs.append(ids[i + 1 : j])
        i = j + 1
    return docs


def draw_blocks(dm: SlimPajamaDataModule, n_blocks: int) -> torch.Tensor:
    blocks, n = [], 0
    for batch in dm.train_dataloader():
        blocks.append(batch)
        n += len(batch)
        if n >= n_blocks:
            break
    out = torch.cat(blocks)
    assert len(out) >= n_blocks, f"the training stream ended after {len(out)} blocks"
    return out[:n_blocks]


def no_spawn(monkeypatch):
    """Tokenize in threads instead of spawned processes (a spawned worker costs seconds of imports)."""
    monkeypatch.setattr(cf, "ProcessPoolExecutor", lambda max_workers, mp_context=None: cf.ThreadPoolExecutor(max_workers))


# ----------------------------------------------------------------------------- the conftest corpus
@pytest.fixture(scope="module")
def prepared(tmp_path_factory, corpus_dir):
    """The conftest corpus prepared once: 3 sources x 60 documents, a trained 384-token tokenizer."""
    cache = tmp_path_factory.mktemp("cache")
    corpus = text_corpus([corpus_dir])
    dm = datamodule(corpus, cache)
    dm.prepare_data()
    root = corpus.root(str(cache))
    manifest = json.loads((root / MANIFEST).read_text())
    docs = [(d.text, d.source) for d in read_corpus([str(corpus_dir)])]
    return SimpleNamespace(corpus=corpus, cache=cache, root=root, manifest=manifest, docs=docs,
                           corpus_dir=corpus_dir, mtime=(root / MANIFEST).stat().st_mtime_ns)


@pytest.mark.slow
def test_prepare_writes_manifest_tokenizer_and_token_folders(prepared):
    m, root = prepared.manifest, prepared.root
    assert root.parent == prepared.cache and root.name.startswith("textcorpus-")
    assert sorted(os.listdir(prepared.cache)) == [root.name]  # no temporary build folder left behind
    assert m["documents"] == 180 and m["files"] == 3 and m["skipped"] == {}
    assert m["vocab_size"] == 384
    assert m["tokenizer_dir"] == "tokenizer"  # relative to the cache root
    assert sorted(m["tokens"]["train"]) == ["alpha", "beta", "gamma"]
    for split in ("train", "val"):
        for source in m["tokens"][split]:
            assert (root / "tokens" / split / source / "index.json").is_file()
    tok = SlimPajamaTokenizer.from_pretrained(root / "tokenizer")
    assert tok.vocab_size == 384 and tok.control_tokens == CONTROL
    ids = tok.encode("<|style:formal|>", add_special_tokens=False)  # the symbol, after sentencepiece's '▁' prefix
    assert [i for i in ids if tok.convert_ids_to_tokens(i) != "▁"] == tok.control_token_ids
    assert tok.convert_ids_to_tokens(tok.control_token_ids) == CONTROL
    # token counts: every document is <s> + its ids + </s>, in its split and source
    expected = {"train": Counter(), "val": Counter()}
    for text, source in prepared.docs:
        expected["val" if is_val(text, 0.1) else "train"][source] += len(tok.encode(text, add_special_tokens=False)) + 2
    assert m["tokens"] == {split: dict(c) for split, c in expected.items()}


@pytest.mark.slow
def test_token_streams_hold_exactly_the_documents_of_their_split(prepared):
    """Decode the cache back: each (split, source) stream is its documents, in file order, and nothing else."""
    tok = SlimPajamaTokenizer.from_pretrained(prepared.root / "tokenizer")
    for split in ("train", "val"):
        for source, n in prepared.manifest["tokens"][split].items():
            stream = read_stream(str(prepared.root / "tokens" / split / source), n)
            assert stream.dtype == np.int32 and len(stream) == n
            decoded = [tok.decode(ids) for ids in split_documents(stream, tok.bos_token_id, tok.eos_token_id)]
            expected = [t for t, s in prepared.docs if s == source and (split == "val") == is_val(t, 0.1)]
            assert decoded == expected


@pytest.mark.slow
def test_split_is_disjoint_deterministic_and_near_val_fraction(prepared):
    val = {t for t, _ in prepared.docs if is_val(t, 0.1)}
    train = {t for t, _ in prepared.docs if not is_val(t, 0.1)}
    assert not val & train
    n = len(prepared.docs)
    sd = math.sqrt(n * 0.1 * 0.9)
    assert abs(len(val) - 0.1 * n) <= 3 * sd, len(val)
    assert sum(prepared.manifest["tokens"]["val"].values()) < sum(prepared.manifest["tokens"]["train"].values())


def test_is_val_same_text_same_split_and_fraction():
    rng = random.Random(1)
    texts = [f"doc {i} {rng.random()}" for i in range(20_000)]
    for fraction in (0.01, 0.1, 0.5):
        flags = [is_val(t, fraction) for t in texts]
        assert flags == [is_val(t, fraction) for t in list(texts)]  # deterministic
        p = sum(flags) / len(texts)
        assert abs(p - fraction) <= 4 * math.sqrt(fraction * (1 - fraction) / len(texts)), (fraction, p)
    # nested: a document in validation at 1% is in validation at 10% (growing the split only adds documents)
    assert all(is_val(t, 0.1) for t in texts if is_val(t, 0.01))
    assert is_val("写一篇正式的文章", 0.5) == is_val("写一篇正式的文章", 0.5)
    assert is_val("lone surrogate \ud800", 0.5) in (True, False)  # never raises on odd strings


@pytest.mark.slow
def test_second_prepare_reuses_the_cache(prepared, monkeypatch):
    def no_rebuild(self, root, progress):
        raise AssertionError("prepare() rebuilt a cached corpus")

    monkeypatch.setattr(TextCorpus, "_build", no_rebuild)
    corpus = text_corpus([prepared.corpus_dir])  # a new object with the same settings: the same key
    assert corpus.root(str(prepared.cache)) == prepared.root
    again = corpus.prepare(str(prepared.cache), progress=False)
    assert again.root == prepared.root and again.manifest == prepared.manifest
    datamodule(corpus, prepared.cache).prepare_data()
    assert (prepared.root / MANIFEST).stat().st_mtime_ns == prepared.mtime
    assert sorted(os.listdir(prepared.cache)) == [prepared.root.name]


def test_load_before_prepare_raises(tmp_path, corpus_dir):
    dm = datamodule(text_corpus([corpus_dir]), tmp_path)
    with pytest.raises(FileNotFoundError, match="call prepare"):
        dm.setup()


def test_cache_key_changes_with_files_and_settings(tmp_path, corpus_dir):
    data = tmp_path / "corpus"
    shutil.copytree(corpus_dir, data)
    cache = str(tmp_path / "cache")

    def root(**kwargs):
        return text_corpus([data], **kwargs).root(cache)

    base = root()
    assert root() == base  # a fresh object, same files and settings
    assert text_corpus([data / "*" / "part-0*"]).root(cache) == base  # the same files named differently
    keys = {base}

    def assert_new(r):
        assert r not in keys
        keys.add(r)

    assert_new(root(vocab_size=512))
    assert_new(root(control_tokens=["<|style:formal|>", "<|task:translate|>"]))
    assert_new(root(val_fraction=0.2))
    assert_new(root(on_bad_record="skip"))
    assert_new(root(tokenizer_sample_chars=1000))
    assert root(num_proc=1) == base  # does not change the tokens
    # appending a document: new size and mtime
    gamma = data / "gamma" / "part-0.jsonl"
    with gamma.open("a") as f:
        f.write(json.dumps({"text": "一个新的文件", "meta": {"redpajama_set_name": "gamma"}}) + "\n")
    assert_new(root())
    # only a new mtime (same size): still a new key
    st = os.stat(gamma)
    os.utime(gamma, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    assert_new(root())
    # a new file in a folder
    write_jsonl_zst(str(data / "alpha" / "part-1.jsonl.zst"), [("ka lo mi", "alpha")])
    assert_new(root())
    # markov corpora key on their parameters
    m = MarkovCorpus(n_states=8, train_tokens=1000, val_tokens=100)
    assert m.root(cache) == MarkovCorpus(n_states=8, train_tokens=1000, val_tokens=100).root(cache)
    assert m.root(cache) != MarkovCorpus(n_states=8, train_tokens=1001, val_tokens=100).root(cache)
    assert m.root(cache) != MarkovCorpus(n_states=8, chain_seed=1, train_tokens=1000, val_tokens=100).root(cache)


@pytest.mark.slow
def test_train_and_val_dataloaders(prepared):
    dm = datamodule(prepared.corpus, prepared.cache, vocab_size=384)
    dm.setup()
    tokens = prepared.manifest["tokens"]["train"]
    total = sum(tokens.values())
    assert dm.train_weights == pytest.approx({s: n / total for s, n in sorted(tokens.items())})
    assert dm.tokenizer.vocab_size == 384 and dm.metrics == {}
    batches = list(dm.train_dataloader())
    assert batches and all(b.shape == (BATCH, BLOCK) and b.dtype == torch.int32 for b in batches)
    allb = torch.cat(batches)
    assert 0 <= allb.min() and allb.max() < 384
    # blocks are contiguous windows of the source streams: a bos is followed by its document, never by pad
    assert not (allb == dm.tokenizer.pad_token_id).any()
    # the mix stops when the first source runs out: at most every source's blocks, and most of them
    max_blocks = sum(n // BLOCK for n in tokens.values())
    assert 0.5 * max_blocks <= len(allb) <= max_blocks
    val = list(dm.val_dataloader())
    assert val and all(b.shape == (BATCH, BLOCK) for b in val[:-1]) and val[-1].shape[1] == BLOCK
    assert 0 <= torch.cat(val).min() and torch.cat(val).max() < 384
    assert torch.equal(torch.cat(list(dm.train_dataloader())), allb)  # seeded: the same blocks again


def test_an_epochs_short_last_batch_is_not_trained_on(prepared):
    """LitData's drop_last only evens out the ranks' shares, and torch's loader would yield the epoch's
    last, short batch: a full optimizer step on a few rows. The training loader drops it, and only it."""
    short_seen = False
    for batch_size in (3, 5, 7):
        def loader(drop_short=True):
            dm = SlimPajamaDataModule(prepared.corpus, seq_len=SEQ_LEN, batch_size=batch_size,
                                      cache_dir=str(prepared.cache), progress=False)
            dm.setup()
            loader = dm.train_dataloader()
            loader.drop_short = drop_short
            return loader

        batches, every = list(loader()), list(loader(drop_short=False))
        short_seen |= len(every[-1]) < batch_size
        assert len(every) - len(batches) == (len(every[-1]) < batch_size)
        assert all(torch.equal(a, b) for a, b in zip(batches, every))
        assert all(len(b) == batch_size for b in batches)
    assert short_seen  # the case arose


@pytest.mark.slow
def test_val_dataloader_covers_every_block(prepared):
    dm = datamodule(prepared.corpus, prepared.cache, val_batch_size=16)
    dm.setup()
    blocks = {s: n // BLOCK for s, n in prepared.manifest["tokens"]["val"].items()}
    assert sorted(blocks) == ["alpha", "beta", "gamma"] and sum(blocks.values()) > 16
    assert sum(len(b) for b in dm.val_dataloader()) == sum(blocks.values())


@pytest.mark.slow
def test_vocab_size_mismatch_raises(prepared):
    dm = datamodule(prepared.corpus, prepared.cache, vocab_size=512)
    with pytest.raises(ValueError, match="data.vocab_size=512"):
        dm.setup()


@pytest.mark.slow
@pytest.mark.parametrize(
    "weights, message",
    [
        ({"alpha": 1.0, "beta": 1.0, "gamma": 1.0, "delta": 1.0}, r"unknown \['delta'\]"),
        ({"alpha": 1.0, "beta": 1.0}, r"missing \['gamma'\]"),
        ({"alpha": 1.0, "beta": -0.5, "gamma": 1.0}, "non-negative"),
        ({"alpha": 0.0, "beta": 0, "gamma": 0.0}, "no source a positive weight"),
        ({"alpha": float("nan"), "beta": 1.0, "gamma": 1.0}, "finite non-negative numbers"),  # was: alpha dropped
        ({"alpha": float("inf"), "beta": 1.0, "gamma": 1.0}, "finite non-negative numbers"),
        ({"alpha": "2", "beta": 1.0, "gamma": 1.0}, "finite non-negative numbers"),
        ({}, r"or be null.*missing \['alpha', 'beta', 'gamma'\]"),  # was: read as null
    ],
)
def test_weight_errors(prepared, weights, message):
    dm = datamodule(prepared.corpus, prepared.cache, weights=weights)
    with pytest.raises(CorpusError, match=message) as excinfo:
        dm.setup()
    assert "data.weights" in str(excinfo.value)


def test_a_source_with_validation_documents_only_may_be_named_with_weight_zero():
    dm = SlimPajamaDataModule(corpus=None, seq_len=SEQ_LEN, weights={"alpha": 1, "beta": 3, "rare": 0})
    train = {"alpha": 1000, "beta": 1000}
    assert dm._resolve_weights(train, {"alpha", "beta", "rare"}) == {"alpha": 0.25, "beta": 0.75}
    dm.weights["rare"] = 1
    with pytest.raises(CorpusError, match=r"\['rare'\] have validation documents only"):
        dm._resolve_weights(train, {"alpha", "beta", "rare"})
    with pytest.raises(CorpusError, match=r"unknown \['rare'\]"):
        dm._resolve_weights(train, {"alpha", "beta"})


def test_a_validation_source_under_one_block_is_named_in_a_warning(prepared, caplog):
    val = prepared.manifest["tokens"]["val"]
    small = min(val, key=val.get)
    assert val[small] < max(val.values())
    dm = SlimPajamaDataModule(prepared.corpus, seq_len=val[small], batch_size=BATCH, cache_dir=str(prepared.cache),
                              progress=False)
    dm.setup()
    dm.val_dataloader()
    assert "val/loss leaves out sources" in caplog.text and repr(small) in caplog.text


def test_a_source_without_validation_documents_is_named_in_a_warning(tmp_path, monkeypatch, prepared, caplog):
    no_spawn(monkeypatch)
    data = tmp_path / "corpus"
    shutil.copytree(prepared.corpus_dir, data)
    texts = [t for t in (f"rare document {i} " + "ka lo mi re su " * 12 for i in range(40)) if not is_val(t, 0.1)][:3]
    (data / "rare").mkdir()
    write_jsonl_zst(str(data / "rare" / "part-0.jsonl.zst"), [(t, "rare") for t in texts])
    corpus = text_corpus([data], tokenizer_path=str(prepared.root / "tokenizer"))
    dm = datamodule(corpus, tmp_path / "cache")
    dm.prepare_data()
    dm.setup()
    assert "rare" in dm.prepared.tokens("train") and "rare" not in dm.prepared.tokens("val")
    dm.val_dataloader()
    assert "val/loss leaves out sources" in caplog.text and "{'rare': 0}" in caplog.text


@pytest.mark.parametrize("stops", [(0, 0), (1, 0), (4, 2)])
def test_a_checkpointed_loader_resumes_with_the_next_unseen_batch(prepared, stops):
    """Checkpoints after `stops` trained batches, one run resumed from the other, each with one batch
    more read ahead (as Lightning's fetcher does): the batches trained on are those of one uninterrupted
    epoch. 0: a checkpoint before the first batch was trained on (it used to skip a batch's worth), and
    a resumed loader's checkpoints (they used to move on with the loader: LitData hands out one dict)."""
    def loader():
        dm = datamodule(prepared.corpus, prepared.cache, weights={"alpha": 1, "beta": 1, "gamma": 1})
        dm.setup()
        return dm.train_dataloader()

    reference = list(loader())
    trained, state = [], None
    for consumed in stops:
        run = loader()
        if state is not None:
            run.load_state_dict(state)
        it = iter(run)
        trained += [next(it) for _ in range(consumed + 1)][:consumed]
        for _ in range(consumed):
            run.mark_consumed()
        state = run.state_dict()
    last = loader()
    last.load_state_dict(state)
    trained += list(last)
    assert len(trained) == len(reference)
    assert all(torch.equal(a, b) for a, b in zip(trained, reference))


def test_resuming_with_other_data_settings_raises_naming_the_key(prepared):
    """Lightning gives the data module its checkpointed state before the loader's position: a changed mix
    used to fail inside LitData ("The provided state doesn't match the current number of datasets")."""
    def loaded(state, **kwargs):
        settings = {"seq_len": SEQ_LEN, "batch_size": BATCH, "weights": {"alpha": 1, "beta": 1, "gamma": 1}, **kwargs}
        dm = SlimPajamaDataModule(prepared.corpus, cache_dir=str(prepared.cache), progress=False, **settings)
        dm.setup()
        dm.load_state_dict(state)
        return dm

    dm = datamodule(prepared.corpus, prepared.cache, weights={"alpha": 1, "beta": 1, "gamma": 1})
    assert dm.state_dict() == {}  # before setup there is no mix to save
    dm.setup()
    state = dm.state_dict()
    loaded(state)
    loaded(state, weights={"alpha": 2, "beta": 2, "gamma": 2})  # the same mix
    loaded({})  # a checkpoint of an older version: nothing to check
    with pytest.raises(ValueError, match=r"data.weights \(the training mix was alpha 33.3%, beta 33.3%, gamma "
                                         r"33.3%, now alpha 50.0%, gamma 50.0%\)") as excinfo:
        loaded(state, weights={"alpha": 1, "beta": 0, "gamma": 1})
    assert "Resume with the original data settings, or start a new run" in str(excinfo.value)
    with pytest.raises(ValueError, match=r"data.weights \(the training mix was .*now alpha 25.0%"):
        loaded(state, weights={"alpha": 1, "beta": 1, "gamma": 2})
    with pytest.raises(ValueError, match=r"other data settings: data.batch_size \(was 8, now 4\)\."):
        loaded(state, batch_size=4)
    with pytest.raises(ValueError, match=r"data.seq_len \(was 32, now 16\); data.batch_size \(was 8, now 2\)"):
        loaded(state, seq_len=16, batch_size=2)


def test_the_tokenizer_sample_takes_an_even_share_of_every_source_in_a_shared_folder(tmp_path, monkeypatch):
    """SlimPajama's own layout: chunk folders whose files mix every source. Each source gets its share of
    tokenizer_sample_chars, not only the sources whose documents come first."""
    (tmp_path / "chunk1").mkdir()
    docs = [(f"alpha {i} " + "a" * 90, "alpha") for i in range(200)] + [(f"beta {i} " + "b" * 90, "beta") for i in range(50)]
    write_jsonl_zst(str(tmp_path / "chunk1" / "part-0.jsonl.zst"), docs)
    seen = {}

    def train(texts, *args, **kwargs):
        seen["texts"] = list(texts)
        raise InterruptedError

    monkeypatch.setattr(SlimPajamaTokenizer, "train", train)
    corpus = text_corpus([tmp_path], tokenizer_sample_chars=4000)
    with pytest.raises(InterruptedError):
        corpus._train_tokenizer(corpus.files())
    chars = Counter()
    for text in seen["texts"]:
        chars[text.split()[0]] += len(text)
    assert chars == {"alpha": 2000, "beta": 2000}
    # one file per source in one folder, and a folder whose first file is empty
    flat = tmp_path / "flat"
    flat.mkdir()
    for source in ("arxiv", "github", "wiki"):
        write_jsonl_zst(str(flat / f"{source}.jsonl.zst"), [(f"{source} {i} " + "x" * 90, source) for i in range(100)])
    (tmp_path / "books").mkdir()
    (tmp_path / "books" / "000.jsonl").write_text("")
    write_jsonl_zst(str(tmp_path / "books" / "001.jsonl.zst"), [(f"books {i} " + "y" * 90, "books") for i in range(100)])
    corpus = text_corpus([flat, tmp_path / "books"], tokenizer_sample_chars=4000)
    with pytest.raises(InterruptedError):
        corpus._train_tokenizer(corpus.files())
    chars = Counter()
    for text in seen["texts"]:
        chars[text.split()[0]] += len(text)
    assert chars == {"arxiv": 1000, "github": 1000, "wiki": 1000, "books": 1000}


def test_the_tokenizer_sample_finds_a_source_that_only_appears_inside_later_files(tmp_path, monkeypatch):
    """A chunk folder whose files mix alpha and beta; gamma is in the middle of files 3-5 only, never a file's
    first document, and alpha and beta have their shares from file 0: gamma still gets its share."""
    (tmp_path / "chunk1").mkdir()
    for f in range(6):
        docs = [(f"{s} {f}-{i} " + s[0] * 90, s) for i in range(40) for s in ("alpha", "beta")]
        if f >= 3:
            docs[10:10] = [(f"gamma {f}-{i} " + "c" * 90, "gamma") for i in range(20)]
        write_jsonl_zst(str(tmp_path / "chunk1" / f"part-{f}.jsonl.zst"), docs)
    seen = []

    def train(texts, *args, **kwargs):
        seen.append(list(texts))
        raise InterruptedError

    monkeypatch.setattr(SlimPajamaTokenizer, "train", train)
    corpus = text_corpus([tmp_path], tokenizer_sample_chars=3000)
    for _ in range(2):
        with pytest.raises(InterruptedError):
            corpus._train_tokenizer(corpus.files())
    chars = Counter()
    for text in seen[0]:
        chars[text.split()[0]] += len(text)
    assert chars == {"alpha": 1000, "beta": 1000, "gamma": 1000}
    assert seen[0] == seen[1]  # deterministic


@pytest.mark.slow
def test_source_smaller_than_a_block_raises(prepared):
    dm = SlimPajamaDataModule(prepared.corpus, seq_len=100_000, cache_dir=str(prepared.cache), progress=False)
    with pytest.raises(CorpusError, match="fewer training tokens than one block"):
        dm.setup()


# ----------------------------------------------------------------------------- mixing
HANZI = "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可也你"
ALPHABETS = {"alpha": set("abcdefghij"), "beta": set("klmnopqrst"), "gamma": set(HANZI)}


def _words(rng, letters, n, lo, hi):
    return " ".join("".join(rng.choice(letters) for _ in range(rng.randint(lo, hi))) for _ in range(n))


def source_of(text: str) -> str:
    chars = set(text) - {" ", "\n"}
    found = [s for s, alphabet in ALPHABETS.items() if chars and chars <= alphabet]
    assert len(found) == 1, f"a block mixes sources or is unrecognisable: {text!r}"
    return found[0]


@pytest.fixture(scope="module")
def mix(tmp_path_factory):
    """Three sources of about equal size (~170k tokens each, so that token-proportional mixing is 1/3 each)
    written with disjoint alphabets (a block's characters name its source), tokenized with a tokenizer
    trained here and passed as `tokenizer_path`."""
    rng = random.Random(0)
    texts = {
        "alpha": [_words(rng, "abcdefghij", 100, 2, 6) for _ in range(450)],
        "beta": [_words(rng, "klmnopqrst", 100, 2, 6) for _ in range(450)],
        "gamma": [_words(rng, HANZI, 100, 1, 4) for _ in range(700)],
    }
    data = tmp_path_factory.mktemp("mix")
    with pytest.MonkeyPatch.context() as mp:
        no_spawn(mp)  # the conftest corpus above goes through the real process pool
        return _prepare_mix(data, texts)


def _prepare_mix(data: Path, texts: dict[str, list[str]]) -> SimpleNamespace:
    for source, docs in texts.items():
        (data / source).mkdir()
        write_jsonl_zst(str(data / source / "part-0.jsonl.zst"), [(t, source) for t in docs])
    tok = SlimPajamaTokenizer.train([t for docs in texts.values() for t in docs[:100]], 384, ["<|task:translate|>"])
    tok_dir = data.parent / (data.name + "-tokenizer")
    tok.save_pretrained(tok_dir)
    cache = data.parent / (data.name + "-cache")
    corpus = TextCorpus([str(data)], vocab_size=9999, tokenizer_path=str(tok_dir), val_fraction=0.02, num_proc=1)
    prepared = corpus.prepare(str(cache), progress=False)
    return SimpleNamespace(corpus=corpus, cache=cache, prepared=prepared, tok=tok, tok_dir=tok_dir)


def shares_of(dm, n_blocks: int) -> dict[str, float]:
    blocks = draw_blocks(dm, n_blocks)
    tok = dm.tokenizer
    counts = Counter(source_of(tok.decode(b.tolist(), skip_special_tokens=True)) for b in blocks)
    return {s: counts[s] / n_blocks for s in ALPHABETS}


@pytest.mark.slow
def test_tokenizer_path_is_used_as_is(mix):
    prepared = mix.prepared
    assert prepared.manifest["vocab_size"] == 384  # the given tokenizer's, not vocab_size=9999
    tok = prepared.tokenizer
    assert tok._proto == mix.tok._proto and tok.fingerprint() == mix.tok.fingerprint()
    assert tok.control_tokens == ["<|task:translate|>"]
    sample = "abc klm 的一是 <|task:translate|>"
    assert tok.encode(sample) == mix.tok.encode(sample)
    # the key follows the tokenizer file, not vocab_size
    assert TextCorpus([str(p) for p in mix.corpus.paths], vocab_size=1, tokenizer_path=str(mix.tok_dir),
                      val_fraction=0.02).root(str(mix.cache)) == prepared.root


@pytest.mark.slow
def test_mixing_weights_give_the_observed_shares(mix):
    tokens = mix.prepared.tokens("train")
    total = sum(tokens.values())
    assert all(0.25 < n / total < 0.42 for n in tokens.values()), tokens  # about equal: weights must do the work
    weights = {"alpha": 0.6, "beta": 0.3, "gamma": 0.1}
    dm = datamodule(mix.corpus, mix.cache, weights={"alpha": 6, "beta": 3, "gamma": 1})  # normalised
    dm.setup()
    assert dm.train_weights == pytest.approx(weights)
    n = 6000
    assert min(tokens[s] // BLOCK / w for s, w in weights.items()) > 1.1 * n  # no source runs out first
    shares = shares_of(dm, n)
    for s, p in weights.items():
        tol = 3 * math.sqrt(p * (1 - p) / n)  # 3 binomial standard errors: 0.019 / 0.018 / 0.012
        assert abs(shares[s] - p) <= tol, (s, shares[s], p, tol)
    # token-proportional mixing (1/3 each) is far outside these tolerances
    assert shares["alpha"] > 1 / 3 + 0.2 and shares["gamma"] < 1 / 3 - 0.2


@pytest.mark.slow
def test_default_mix_follows_token_counts(mix):
    tokens = mix.prepared.tokens("train")
    total = sum(tokens.values())
    dm = datamodule(mix.corpus, mix.cache)
    dm.setup()
    n = 3000
    shares = shares_of(dm, n)
    for s, count in tokens.items():
        p = count / total
        assert dm.train_weights[s] == pytest.approx(p)
        assert abs(shares[s] - p) <= 3 * math.sqrt(p * (1 - p) / n), (s, shares[s], p)


@pytest.mark.slow
def test_zero_weight_drops_a_source(mix):
    dm = datamodule(mix.corpus, mix.cache, weights={"alpha": 1.0, "beta": 0.0, "gamma": 1.0})
    dm.setup()
    assert dm.train_weights == {"alpha": 0.5, "gamma": 0.5}
    n = 2000
    shares = shares_of(dm, n)
    assert shares["beta"] == 0
    assert abs(shares["alpha"] - 0.5) <= 3 * math.sqrt(0.25 / n)


# ----------------------------------------------------------------------------- empty corpora and paths
def test_empty_corpus_raises(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "empty.jsonl").write_text("\n\n   \n\n")
    dm = datamodule(text_corpus([tmp_path / "src"]), tmp_path / "cache")
    with pytest.raises(CorpusError, match="no training documents"):
        dm.prepare_data()
    assert not (tmp_path / "cache").exists() or not os.listdir(tmp_path / "cache")  # no build folder left


def test_a_failed_build_leaves_no_folder_and_a_later_build_removes_stale_ones(tmp_path, monkeypatch):
    corpus = MarkovCorpus(n_states=4, train_tokens=256 * 8, val_tokens=256 * 2)
    cache = tmp_path / "cache"
    write_tokens = corpus_module.write_tokens

    def disk_full(directory, arrays, **kwargs):
        if directory.parent.name == "val":  # the training tokens are written: the folder is half built
            raise OSError(28, "No space left on device")
        return write_tokens(directory, arrays, **kwargs)

    monkeypatch.setattr(corpus_module, "write_tokens", disk_full)
    with pytest.raises(OSError, match="No space left"):
        corpus.prepare(str(cache), progress=False)
    assert os.listdir(cache) == []
    monkeypatch.undo()
    # folders of killed builds: this host's with a pid that has ended, and one named by the pid alone (older
    # versions) are removed; a live process's, and another host's (it may be building there), are kept
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead, alive, host = int(ended.stdout), os.getppid(), socket.gethostname()
    name = corpus.root(str(cache)).name
    stale = [f"{name}.tmp-{host}-{dead}", f"{name}.tmp-{dead}"]
    kept = [f"{name}.tmp-{host}-{alive}", f"{name}.tmp-{alive}", f"{name}.tmp-other-host-{dead}",
            f"{MarkovCorpus(n_states=5).root(str(cache)).name}.tmp-{host}-{dead}"]  # another corpus: its own build
    for folder in stale + kept:
        (cache / folder / "tokens").mkdir(parents=True)
    prepared = corpus.prepare(str(cache), progress=False)
    assert prepared.tokens("train") == {"markov": 256 * 8}
    assert sorted(os.listdir(cache)) == sorted([name] + kept)


def test_empty_corpus_with_a_given_tokenizer_raises(tmp_path, monkeypatch, prepared):
    no_spawn(monkeypatch)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "empty.jsonl").write_text("\n\n")
    (tmp_path / "src" / "blank.txt").write_text(" \n")
    corpus = text_corpus([tmp_path / "src"], tokenizer_path=str(prepared.root / "tokenizer"), num_proc=1)
    with pytest.raises(CorpusError, match="holds no documents"):
        corpus.prepare(str(tmp_path / "cache"), progress=False)
    assert not list((tmp_path / "cache").glob(f"*/{MANIFEST}"))


def test_corpus_argument_errors(tmp_path):
    with pytest.raises(CorpusError, match="data.paths is empty"):
        TextCorpus([])
    with pytest.raises(ValueError, match="val_fraction"):
        TextCorpus([str(tmp_path)], val_fraction=0)
    with pytest.raises(ValueError, match="on_bad_record"):
        TextCorpus([str(tmp_path)], on_bad_record="drop")
    with pytest.raises(CorpusError, match="does not exist"):
        TextCorpus([str(tmp_path / "missing")]).root(str(tmp_path))


@pytest.mark.parametrize("kwargs, message", [
    ({"weights": [1, 2, 3]}, r"data.weights must map each source to its weight .* got \[1, 2, 3\]"),
    ({"weights": 1}, "data.weights must map each source to its weight"),
    ({"batch_size": 0}, "data.batch_size must be a whole number >= 1, got 0"),
    ({"batch_size": -1}, "data.batch_size must be a whole number >= 1, got -1"),
    ({"batch_size": 2.5}, "data.batch_size must be a whole number >= 1, got 2.5"),
    ({"batch_size": True}, "data.batch_size must be a whole number >= 1, got True"),
    ({"seq_len": "abc"}, "data.seq_len must be a whole number >= 1, got 'abc'"),
    ({"seq_len": 0}, "data.seq_len must be a whole number >= 1, got 0"),
    ({"val_batch_size": 0.5}, "data.val_batch_size must be a whole number >= 1, got 0.5"),
])
def test_data_settings_of_the_wrong_type_raise_naming_the_key(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SlimPajamaDataModule(corpus=None, **kwargs)


@pytest.mark.parametrize("override, message", [
    ("data.weights=[1,2,3]", "data.weights must map each source to its weight"),
    ("data.weights=1", "data.weights must map each source to its weight"),
    ("data.batch_size=2.5", "data.batch_size must be a whole number >= 1, got 2.5"),
    ("data.seq_len=abc", "data.seq_len must be a whole number >= 1, got 'abc'"),
    ("data.val_fraction=abc", r"data.val_fraction must be a number in \(0, 1\), got 'abc'"),
])
def test_config_values_of_the_wrong_type_raise_before_any_corpus_work(override, message, tmp_path, corpus_dir):
    cfg = compose_cfg(TINY + [f"data.paths=[{corpus_dir}]", override], tmp_path)
    with pytest.raises(InstantiationException, match=message):
        instantiate(cfg.data.module)
    assert not (tmp_path / "data").exists()
    # the right types still instantiate, weights from the config's mapping too
    cfg = compose_cfg(TINY + [f"data.paths=[{corpus_dir}]", "data.weights={alpha: 1, beta: 1, gamma: 2}"], tmp_path)
    assert instantiate(cfg.data.module).weights == {"alpha": 1, "beta": 1, "gamma": 2}


def test_skip_bad_records_when_preparing(tmp_path, monkeypatch, prepared):
    no_spawn(monkeypatch)
    (tmp_path / "src").mkdir()
    lines = [json.dumps({"text": f"good document number {i}"}) for i in range(20)]
    lines[3] = '{"text": broken'
    lines[7] = json.dumps({"no": "text"})
    (tmp_path / "src" / "a.jsonl").write_text("\n".join(lines) + "\n")
    tok_dir = str(prepared.root / "tokenizer")
    with pytest.raises(CorpusError, match=r"a.jsonl:4: invalid JSON"):
        text_corpus([tmp_path / "src"], tokenizer_path=tok_dir).prepare(str(tmp_path / "c1"), progress=False)
    p = text_corpus([tmp_path / "src"], tokenizer_path=tok_dir, on_bad_record="skip").prepare(
        str(tmp_path / "c2"), progress=False)
    assert p.manifest["documents"] == 18 and p.manifest["skipped"] == {"invalid_json": 1, "no_text": 1}


def test_non_ascii_cache_dir(tmp_path, monkeypatch, prepared):
    no_spawn(monkeypatch)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.jsonl").write_text(json.dumps({"text": "ka lo mi re " * 20}) + "\n")
    corpus = text_corpus([tmp_path / "src"], tokenizer_path=str(prepared.root / "tokenizer"), val_fraction=0.01)
    cache = tmp_path / "données-缓存"
    p = corpus.prepare(str(cache), progress=False)
    assert (p.root / p.manifest["tokenizer_dir"]).is_dir()
    assert p.tokenizer.vocab_size == 384


def test_a_task_file_with_invalid_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "mine.jsonl"
    good = json.dumps({"control": "<|x|>", "input": "a", "output": "b"}).encode()
    path.write_bytes(good + b"\n\n" + b'{"input": "caf\xe9", "output": "latin-1"}\n' + good + b"\n")
    with pytest.raises(CorpusError, match="invalid UTF-8") as excinfo:
        read_examples(path)
    assert f"{path}:3:" in str(excinfo.value)
    path.write_bytes(good + b"\r\n\n" + '{"output": "中文"}\n'.encode())  # CRLF, blank lines and UTF-8 still read
    assert read_examples(path) == [{"control": "<|x|>", "input": "a", "output": "b"},
                                   {"control": "", "input": "", "output": "中文"}]
    path.write_bytes(good + b"\r" + '{"output": "中文"}\r'.encode())  # old Mac line ends, as text mode read them
    assert len(read_examples(path)) == 2


# ----------------------------------------------------------------------------- markov
def entropy_nats(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def test_markov_two_state_entropy_rate_by_hand():
    chain = MarkovChain(2, seed=0)
    chain.transition = np.array([[0.9, 0.1], [0.5, 0.5]])
    chain.stationary = MarkovChain._stationary(chain.transition)
    # pi P = pi:  pi_1 * 0.1 = pi_2 * 0.5  ->  pi = (5/6, 1/6)
    assert chain.stationary == pytest.approx([5 / 6, 1 / 6], abs=1e-12)
    def h(q):
        return -(q * math.log(q) + (1 - q) * math.log(1 - q))

    assert chain.entropy_rate == pytest.approx(5 / 6 * h(0.1) + 1 / 6 * h(0.5), abs=1e-12)
    assert chain.entropy_rate == pytest.approx(0.38643, abs=1e-5)  # 5/6 * 0.32508 + 1/6 * 0.69315 nats
    # a zero transition (0 log 0 = 0) and a deterministic row: pi = (1/3, 2/3), H = 2/3 ln 2
    chain.transition = np.array([[0.0, 1.0], [0.5, 0.5]])
    chain.stationary = MarkovChain._stationary(chain.transition)
    assert chain.stationary == pytest.approx([1 / 3, 2 / 3], abs=1e-12)
    assert chain.entropy_rate == pytest.approx(2 / 3 * math.log(2), abs=1e-12)


@pytest.mark.parametrize("n_states, concentration", [(8, 0.1), (64, 1.0), (16, 100.0)])
def test_markov_entropy_rate_matches_numpy(n_states, concentration):
    chain = MarkovChain(n_states, concentration, seed=3)
    p = chain.transition
    assert p.shape == (n_states, n_states) and np.allclose(p.sum(1), 1) and (p >= 0).all()
    pi = np.full(n_states, 1 / n_states)
    for _ in range(10_000):  # power iteration, independent of the eigen-decomposition
        pi = pi @ p
    assert chain.stationary == pytest.approx(pi, abs=1e-9)
    expected = sum(pi[i] * entropy_nats(p[i]) for i in range(n_states))
    assert chain.entropy_rate == pytest.approx(expected, rel=1e-9)
    assert 0 < chain.entropy_rate < math.log(n_states)
    if concentration >= 100:
        assert chain.entropy_rate > 0.99 * math.log(n_states)  # near-uniform rows


def test_markov_sample_bigrams_match_the_transition_matrix():
    chain = MarkovChain(4, concentration=1.0, seed=5)
    streams = chain.sample(400_000, seed=0, n_chains=200)
    assert streams.shape == (200, 2000) and streams.dtype == np.int32
    assert streams.min() >= 0 and streams.max() < 4
    counts = np.zeros((4, 4))
    np.add.at(counts, (streams[:, :-1].ravel(), streams[:, 1:].ravel()), 1)
    rows = counts.sum(1, keepdims=True)
    freq = counts / rows
    se = np.sqrt(chain.transition * (1 - chain.transition) / rows)
    assert (np.abs(freq - chain.transition) <= 4 * se + 1e-12).all(), (freq, chain.transition)
    # chains start from pi and stay there: the first column and all states follow pi
    first = np.bincount(streams[:, 0], minlength=4) / 200
    assert np.abs(first - chain.stationary).max() < 4 * math.sqrt(0.25 / 200)
    states = np.bincount(streams.ravel(), minlength=4) / streams.size
    assert np.abs(states - chain.stationary).max() < 0.01
    # the empirical conditional entropy is the entropy rate
    joint = counts / counts.sum()
    cond = -(joint[joint > 0] * np.log(freq[counts > 0])).sum()
    assert cond == pytest.approx(chain.entropy_rate, abs=0.01)
    assert np.array_equal(chain.sample(400_000, seed=0, n_chains=200), streams)  # seeded


def test_markov_argument_errors():
    with pytest.raises(ValueError, match="n_states"):
        MarkovChain(1)
    with pytest.raises(ValueError, match="concentration"):
        MarkovChain(4, concentration=0)


def test_markov_datamodule(tmp_path):
    corpus = MarkovCorpus(n_states=8, concentration=0.5, chain_seed=2, train_tokens=256 * 200, val_tokens=256 * 20)
    dm = datamodule(corpus, tmp_path, vocab_size=8)
    dm.prepare_data()
    dm.setup()
    assert dm.tokenizer is None
    assert dm.metrics == pytest.approx({"data/entropy_rate": corpus.chain.entropy_rate})
    assert dm.metrics["data/entropy_rate"] == pytest.approx(MarkovChain(8, 0.5, 2).entropy_rate)
    assert dm.prepared.tokens("train") == {"markov": 256 * 200} and dm.prepared.tokens("val") == {"markov": 256 * 20}
    assert dm.train_weights == {"markov": 1.0}
    batches = list(dm.train_dataloader())
    assert len(batches) == (256 * 200 // BLOCK) // BATCH
    blocks = torch.cat(batches)
    assert blocks.shape[1] == BLOCK and blocks.dtype == torch.int32
    assert blocks.min() >= 0 and blocks.max() < 8
    # the stream is the chain's: state frequencies follow the stationary distribution
    freq = np.bincount(blocks.ravel().numpy(), minlength=8) / blocks.numel()
    assert np.abs(freq - corpus.chain.stationary).max() < 0.02
    val = torch.cat(list(dm.val_dataloader()))
    n_val = 256 * 20 // BLOCK  # 155; all of them once test_val_dataloader_covers_every_block passes
    assert n_val - BATCH < len(val) <= n_val and val.shape[1] == BLOCK and val.max() < 8
    # the cached streams are exactly the chain's samples, chain after chain
    stream = read_stream(str(dm.prepared.root / "tokens" / "val" / "markov"), 256 * 20)
    assert np.array_equal(stream, corpus.chain.sample(256 * 20, seed=1001).ravel())
