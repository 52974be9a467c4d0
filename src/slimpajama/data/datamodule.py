"""The one LightningDataModule every stage shares.

`prepare_data` (rank 0 of each node) builds the token cache of a corpus; `setup` (every rank)
opens it as LitData `StreamingDataset`s of `seq_len + 1`-token blocks, one per source, mixed by
`weights` with `CombinedStreamingDataset` for training. Each rank and worker streams its own share
of the chunks, from a local folder or an object store alike.

The training loader's position is part of every checkpoint (Lightning stores `state_dict()` of a
stateful loader). Lightning fetches one batch ahead of the one it trains on, so a plain
`StreamingDataLoader` would save a position one batch too far and a resumed run would skip a batch;
`ResumableStreamingDataLoader` saves the position after the last batch actually trained on. That is
exact with `data.num_workers=0` (the default); with workers, LitData's combined dataset restores the
position only approximately (a few blocks of the resumed epoch repeat and as many are skipped), and a
resume says so in a warning.
"""

import logging
import math
from collections import deque
from collections.abc import Mapping
from copy import deepcopy
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import lightning as L
import torch
from litdata import CombinedStreamingDataset, StreamingDataLoader, StreamingDataset
from litdata.streaming.item_loader import TokensLoader

from slimpajama.checks import is_finite_number, is_whole_number, refuse_changed_settings
from slimpajama.data.corpus import MarkovCorpus, PreparedCorpus, TextCorpus
from slimpajama.data.reader import CorpusError

log = logging.getLogger(__name__)


class ResumableStreamingDataLoader(StreamingDataLoader):
    """A `StreamingDataLoader` whose `state_dict()` is the position after the last *consumed* batch.

    The loader snapshots its state as it yields each batch; the consumer calls `mark_consumed()`
    when it starts training on a batch (the data module does, in `on_before_batch_transfer`), and
    `state_dict()` returns the snapshot of the last consumed batch, however far the fetcher has read
    ahead. Resuming from it continues with the next unseen batch: none repeated, none skipped.
    With `track_consumed=False` it is a plain `StreamingDataLoader`.

    With `drop_last=True` an epoch's last, short batch is not yielded (LitData's `drop_last` only evens
    out the ranks' and workers' shares, and torch's loader would yield it): every optimizer step sees
    `batch_size` rows."""

    def __init__(self, *args, track_consumed: bool = True, drop_last: Optional[bool] = None, **kwargs):
        super().__init__(*args, drop_last=drop_last, **kwargs)
        self.track_consumed = track_consumed
        self.drop_short = bool(drop_last)
        self._consumed = 0  # batches of the current iteration the consumer has taken
        self._snapshots: deque[tuple[int, dict]] = deque()  # (batches yielded, state after them)
        self._start_state: Optional[dict] = None  # the state before the first batch of this iteration

    def _batches(self) -> Iterator[Any]:
        for batch in super().__iter__():
            if self.drop_short and len(batch) < self.batch_size:  # the epoch's last batch: nothing follows it
                continue
            yield batch

    def __iter__(self) -> Iterator[Any]:
        if not self.track_consumed:
            yield from self._batches()
            return
        restoring = self.restore
        before = (deepcopy(self._num_samples_yielded_wrapper), self._num_samples_yielded_streaming,
                  self._latest_worker_idx)
        self._consumed, self._start_state = 0, None
        self._snapshots.clear()
        for n, batch in enumerate(self._batches(), start=1):
            if n == 1:
                self._start_state = self._state_before_first_batch(restoring, before)
            self._snapshots.append((n, _detached(super().state_dict())))
            yield batch

    def _state_before_first_batch(self, restoring: bool, before: tuple) -> dict:
        # the counters as they stood when this iteration began (restored, or reset for a new epoch)
        current = (self._num_samples_yielded_wrapper, self._num_samples_yielded_streaming, self._latest_worker_idx)
        if restoring:
            start = before
        else:  # after `load_state_dict`, the worker index is advanced by one: store the one before 0
            start = ({}, 0, (self.num_workers or 1) - 1)
        self._num_samples_yielded_wrapper, self._num_samples_yielded_streaming, self._latest_worker_idx = start
        # without workers, a combined dataset's state comes from its live iterator, which has already
        # yielded this batch: hide it, so the state is built from the counters set above
        live = getattr(self.dataset, "_iterator", None)
        if isinstance(self.dataset, CombinedStreamingDataset):
            self.dataset._iterator = None
        try:
            if restoring:
                self._latest_worker_idx -= 1  # undo load_state_dict's advance: a reload advances it again
            return _detached(super().state_dict())
        finally:
            self._num_samples_yielded_wrapper, self._num_samples_yielded_streaming, self._latest_worker_idx = current
            if isinstance(self.dataset, CombinedStreamingDataset):
                self.dataset._iterator = live

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.num_workers:
            log.warning("resuming the data position with data.num_workers=%d: LitData restores it only "
                        "approximately across workers (some blocks of this epoch repeat, as many are "
                        "skipped); data.num_workers=0 resumes exactly", self.num_workers)
        super().load_state_dict(state)

    def mark_consumed(self) -> None:
        self._consumed += 1
        while len(self._snapshots) > 1 and self._snapshots[0][0] < self._consumed:
            self._snapshots.popleft()  # keep the consumed batch's snapshot and those read ahead

    def state_dict(self) -> dict[str, Any]:
        if not self._snapshots:  # not iterating (yet): the loader's own position is exact
            return super().state_dict()
        if self._consumed == 0:
            return self._start_state
        n, state = self._snapshots[0]
        assert n == self._consumed, (n, self._consumed)
        return state


def _mix(weights: dict[str, float]) -> str:
    return ", ".join(f"{s} {w:.1%}" for s, w in weights.items())


def _detached(state: dict[str, Any]) -> dict[str, Any]:
    """`state` with dataset parts of its own. A resumed StreamingDataset returns (and updates) one and the
    same dict from every `state_dict()` call, so a snapshot kept as it is would move on with the loader."""
    state = dict(state)
    dataset = state.get("dataset")
    if isinstance(dataset, dict):
        nested = dataset and all(isinstance(v, dict) for v in dataset.values())  # a combined dataset's parts
        state["dataset"] = {k: dict(v) for k, v in dataset.items()} if nested else dict(dataset)
    return state


class SlimPajamaDataModule(L.LightningDataModule):
    def __init__(
        self,
        corpus: Union[TextCorpus, MarkovCorpus],
        seq_len: int = 256,
        batch_size: int = 8,
        val_batch_size: Optional[int] = None,
        weights: Optional[dict[str, float]] = None,
        cache_dir: str = "data/cache",
        num_workers: int = 0,
        seed: int = 42,
        progress: bool = True,
        vocab_size: Optional[int] = None,
        remote_url: Optional[str] = None,
        stream_cache_dir: Optional[str] = None,
    ):
        """weights: per-source mixing weights (normalised; 0 drops a source); None mixes sources in
        proportion to their token counts. vocab_size: what the config promises the model (checked).
        remote_url: stream a prepared corpus from an object store (`s3://bucket/textcorpus-<key>`, a
        copy of a `cache_dir/<key>` folder) instead of preparing `corpus` locally; chunks are cached
        under stream_cache_dir (default `<cache_dir>/stream`) as they are read."""
        super().__init__()
        for key, value in (("seq_len", seq_len), ("batch_size", batch_size), ("val_batch_size", val_batch_size)):
            if not (value is None and key == "val_batch_size") and not (is_whole_number(value) and value >= 1):
                raise ValueError(f"data.{key} must be a whole number >= 1, got {value!r}")
        if weights is not None and not isinstance(weights, Mapping):
            raise ValueError(f"data.weights must map each source to its weight ({{source: weight, ...}}) or be "
                             f"null (to mix by token counts), got {weights!r}")
        self.corpus = corpus
        self.seq_len, self.batch_size = seq_len, batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.weights = None if weights is None else dict(weights)
        self.cache_dir, self.num_workers, self.seed, self.progress = cache_dir, num_workers, seed, progress
        self.expected_vocab_size = vocab_size
        self.remote_url = remote_url
        self.stream_cache_dir = stream_cache_dir or f"{cache_dir}/stream"
        self.prepared: Optional[PreparedCorpus] = None
        self.train_weights: dict[str, float] = {}
        self._train_loader: Optional[ResumableStreamingDataLoader] = None

    def prepare_data(self) -> None:
        if not self.remote_url:  # a remote corpus was prepared elsewhere
            self.corpus.prepare(self.cache_dir, progress=self.progress)

    def setup(self, stage: Optional[str] = None) -> None:
        if self.prepared is not None:
            return
        if self.remote_url:
            self.prepared = type(self.corpus).fetch(self.remote_url, self.stream_cache_dir)
        else:
            self.prepared = self.corpus.load(self.cache_dir)
        vocab = self.prepared.manifest["vocab_size"]
        if self.expected_vocab_size is not None and vocab != self.expected_vocab_size:
            raise ValueError(
                f"data.vocab_size={self.expected_vocab_size} but the prepared corpus has a vocabulary of {vocab}"
            )
        self.train_weights = self._resolve_weights(self.prepared.tokens("train"), set(self.prepared.tokens("val")))
        for name, value in self.prepared.metrics.items():
            log.info("%s = %.4f", name, value)

    def state_dict(self) -> dict[str, Any]:
        # what the training loader's position in a checkpoint depends on (Lightning stores it beside)
        return {"resume_settings": self._resume_settings()} if self.train_weights else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Refuse to resume training from a checkpoint saved with other data settings: LitData cannot
        restore the loader's position under another mix (it fails, or resumes at a wrong position)."""
        saved = state_dict.get("resume_settings")
        fitting = self.trainer is None or self.trainer.state.fn == "fit"
        if saved is None or not fitting or not self.train_weights:
            return
        now = self._resume_settings()
        changed = []
        if saved["weights"].keys() != now["weights"].keys() or not all(
            math.isclose(saved["weights"][s], w, rel_tol=1e-9) for s, w in now["weights"].items()
        ):
            changed.append(f"data.weights (the training mix was {_mix(saved['weights'])}, now {_mix(now['weights'])})")
        changed += [f"data.{key} (was {saved[key]}, now {now[key]})" for key in ("seq_len", "batch_size")
                    if saved[key] != now[key]]
        refuse_changed_settings(changed)

    def _resume_settings(self) -> dict[str, Any]:
        return {"weights": dict(self.train_weights), "seq_len": self.seq_len, "batch_size": self.batch_size}

    @property
    def tokenizer(self):
        return self.prepared.tokenizer if self.prepared else None

    @property
    def metrics(self) -> dict:
        return self.prepared.metrics if self.prepared else {}

    def _resolve_weights(self, tokens: dict[str, int], val_sources: set[str] = frozenset()) -> dict[str, float]:
        """tokens: the training tokens per source; val_sources: the sources with validation tokens (a
        source with none for training may be named, with weight 0)."""
        block = self.seq_len + 1
        if self.weights is None:
            weights = {s: float(n) for s, n in tokens.items()}
        else:
            unknown = sorted(set(self.weights) - set(tokens) - set(val_sources))
            missing = sorted(set(tokens) - set(self.weights))
            if unknown or missing:
                raise CorpusError(
                    f"data.weights must name every source of the corpus (or be null, to mix by token "
                    f"counts): sources {sorted(tokens)}; "
                    + (f"unknown {unknown}; " if unknown else "")
                    + (f"missing {missing}" if missing else "")
                )
            bad = {s: w for s, w in self.weights.items() if not is_finite_number(w) or w < 0}
            if bad:
                raise CorpusError(f"data.weights must be finite non-negative numbers, got {bad}")
            val_only = sorted(s for s, w in self.weights.items() if w > 0 and s not in tokens)
            if val_only:
                raise CorpusError(f"data.weights: {val_only} have validation documents only, no training "
                                  "tokens: give them weight 0")
            weights = {s: float(w) for s, w in self.weights.items() if w > 0}
        too_small = [s for s in weights if tokens[s] < block]
        if too_small:
            raise CorpusError(
                f"sources {too_small} have fewer training tokens than one block of data.seq_len + 1 = {block}"
            )
        total = sum(weights.values())
        if total <= 0:
            raise CorpusError(f"data.weights gives no source a positive weight: {self.weights}")
        weights = {s: w / total for s, w in sorted(weights.items())}
        log.info("training mix: %s", ", ".join(f"{s} {w:.1%}" for s, w in weights.items()))
        return weights

    def _dataset(self, directory: str, shuffle: bool) -> StreamingDataset:
        remote = self.prepared is not None and self.prepared.url is not None
        return StreamingDataset(
            directory,
            cache_dir=f"{self.stream_cache_dir}/{Path(directory).parent.name}-{Path(directory).name}" if remote else None,
            item_loader=TokensLoader(block_size=self.seq_len + 1),  # only whole blocks, never a partial one
            shuffle=shuffle,
            drop_last=shuffle,  # training: equal shares across ranks; validation: every block
            seed=self.seed,
        )

    def train_dataloader(self) -> StreamingDataLoader:
        dirs = self.prepared.dirs("train")
        sources = list(self.train_weights)
        dataset = CombinedStreamingDataset(
            [self._dataset(dirs[s], shuffle=True) for s in sources],
            seed=self.seed,
            weights=[self.train_weights[s] for s in sources],
            iterate_over_all=False,
        )
        self._train_loader = ResumableStreamingDataLoader(
            dataset, batch_size=self.batch_size, num_workers=self.num_workers, drop_last=True,
            pin_memory=torch.cuda.is_available()
        )
        return self._train_loader

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # called when the training loop takes a batch to train on (not when it reads ahead)
        if self.trainer is not None and self.trainer.training and self._train_loader is not None:
            self._train_loader.mark_consumed()
        return batch

    def val_dataloader(self) -> StreamingDataLoader:
        block = self.seq_len + 1
        tokens = self.prepared.tokens("val")
        dirs = {s: d for s, d in self.prepared.dirs("val").items() if tokens[s] >= block}
        sources = sorted(set(tokens) | set(self.prepared.tokens("train")))  # a source may have no validation tokens
        left_out = {s: tokens.get(s, 0) for s in sources if tokens.get(s, 0) < block}
        if left_out and dirs:
            log.warning("val/loss leaves out sources with fewer validation tokens than one block of "
                        "data.seq_len + 1 = %d: %s (raise data.val_fraction to include them)", block, left_out)
        if not dirs:
            raise CorpusError(
                f"the validation split has no source with a block of {block} tokens: raise data.val_fraction"
            )
        datasets = [self._dataset(d, shuffle=False) for d in dirs.values()]
        dataset = datasets[0] if len(datasets) == 1 else CombinedStreamingDataset(datasets, seed=self.seed)
        return StreamingDataLoader(dataset, batch_size=self.val_batch_size, num_workers=self.num_workers)
