"""The fine-tuning DataModule: labeled tasks in the `{"control", "input", "output"}` format, mixed by weight.

A sibling of `SlimPajamaDataModule` with the same interface (`prepare_data`, `setup`, `tokenizer`,
`metrics`, the dataloaders). The tokenizer is the initial model's, grown by every control token the
tasks use (`SlimPajamaTokenizer.add_control_tokens`); the stage grows the model's embeddings to match.

An example becomes `bos, prompt, output, eos` with labels `-100` (`IGNORE_INDEX`) on bos and the
prompt, so the loss counts only the output tokens and the eos. The prompt is `prompt_template`
filled with the control (trusted: a control token stays one token) and the input (untrusted: a
control-token string in it is encoded as plain text, `split_special_tokens=True`); the output is
encoded as plain text too. Training batches draw tasks by `weights` (per task, normalised), as a
seeded `WeightedRandomSampler` would, from a loader that resumes mid-pass (`ResumableTaskLoader`);
validation runs over every task's validation split.
"""

import logging
import math
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from slimpajama.checks import is_finite_number, is_whole_number, refuse_changed_settings
from slimpajama.data.tasks import BUILT_IN, DEFAULT_TEMPLATE, TaskSet, build_tasks, user_task
from slimpajama.generation import check_template, encode_prompt
from slimpajama.losses import IGNORE_INDEX
from slimpajama.registry import INPUTS, latest_model, resolve_model
from slimpajama.tokenizer import CONTROL_SHAPE, SlimPajamaTokenizer

log = logging.getLogger(__name__)


def resolve_init(init_from: Optional[str], log_dir: Optional[str] = None) -> Path:
    """The model fine-tuning starts from: a folder or registered name, or the furthest finished stage."""
    if init_from is None:
        return latest_model(INPUTS["finetune"][1], log_dir=log_dir)
    return resolve_model(init_from, log_dir=log_dir)


def fit_prompt(tokenizer: SlimPajamaTokenizer, template: str, prompt: list[int], limit: int) -> list[int]:
    """At most `limit` ids of an encoded prompt: the input's end goes, the template's tail (what
    follows {input}) stays, so the model still sees where its output starts."""
    if len(prompt) <= limit:
        return prompt
    tail = tokenizer.encode_continuation(check_template(template)[1], split_special_tokens=False)  # after {input}
    return prompt[: len(prompt) - len(tail)][: limit - len(tail)] + tail


def encode_output(tokenizer: SlimPajamaTokenizer, text: str) -> list[int]:
    """An output's ids as fine-tuning trains on them: its text as plain text, then eos."""
    return tokenizer.encode_continuation(text, split_special_tokens=True) + [tokenizer.eos_token_id]


def cut_prompt(tokenizer: SlimPajamaTokenizer, template: str, prompt: list[int], output_len: int, max_len: int) -> list[int]:
    """The prompt of an example whose output has `output_len` ids: whole when both fit in `max_len`, else
    cut to half of it (`fit_prompt`: its input's end goes)."""
    return prompt if len(prompt) + output_len <= max_len else fit_prompt(tokenizer, template, prompt, max_len // 2)


def encode_example(tokenizer: SlimPajamaTokenizer, template: str, ex: dict, max_len: int) -> tuple[list[int], list[int], bool]:
    """(ids, labels, truncated): labels are IGNORE_INDEX on the prompt. At most `max_len` ids: a long
    prompt is cut to half of them (its input's end goes), then the output's end."""
    prompt = encode_prompt(tokenizer, template, ex["control"], ex["input"])
    output = encode_output(tokenizer, ex["output"])
    truncated = len(prompt) + len(output) > max_len
    prompt = cut_prompt(tokenizer, template, prompt, len(output), max_len)
    output = output[: max_len - len(prompt)]
    return prompt + output, [IGNORE_INDEX] * len(prompt) + output, truncated


class _Examples(torch.utils.data.Dataset):
    def __init__(self, items: list[tuple[list[int], list[int]]]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[list[int], list[int]]:
        return self.items[i]


def collate(items: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest example: input_ids with pad, labels with IGNORE_INDEX."""
    width = max(len(ids) for ids, _ in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    for i, (ids, lab) in enumerate(items):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
    return {"input_ids": input_ids, "labels": labels}


def control_tokens_in(fields: Iterable[str]) -> list[str]:
    """The control tokens (`<|...|>`) in the control fields, sorted: "<|style:formal|><|lang:en|>" holds two,
    "<|style:formal|>Write politely" one beside plain words (an instruction alone, none)."""
    return sorted({token for field in fields for token in CONTROL_SHAPE.findall(field)})


CUSTOM_KEYS = ("kind", "path", "weight")


def _custom_spec(name: str, spec) -> dict:
    """A `data.custom.<name>` entry checked: its keys, a path, a kind (default generation) and a weight."""
    key = f"data.custom.{name}"
    if not isinstance(spec, Mapping):
        raise ValueError(f"{key} must be a mapping of {', '.join(CUSTOM_KEYS)}, got {spec!r}")
    spec = dict(spec)
    unknown = sorted(set(map(str, spec)) - set(CUSTOM_KEYS))
    if unknown:
        raise ValueError(f"{key}: unknown keys {unknown} (it takes {', '.join(CUSTOM_KEYS)})")
    if not spec.get("path"):
        raise ValueError(f"{key}.path is missing: the task's jsonl file, or a folder of train/val/test.jsonl")
    weight = spec.get("weight", 1.0)
    if not is_finite_number(weight) or weight < 0:
        raise ValueError(f"{key}.weight={weight!r} must be a finite number >= 0")
    return {"kind": spec.get("kind", "generation"), "path": str(spec["path"]), "weight": float(weight)}


class ResumableSampler(Sampler[int]):
    """`WeightedRandomSampler`'s draws (with replacement, every pass from one seeded generator) that can
    start a pass part-way: `resume` sets the generator back to the pass's start and skips the first
    indices of this sampler's share, so a resumed run draws what the uninterrupted one drew.

    Under data parallelism each rank's sampler is `shard(rank, num_replicas)`: every rank draws the same
    pass and takes its share as Lightning's `DistributedSamplerWrapper` without shuffling would (the pass
    padded with its first indices to a multiple of the replicas, then every `num_replicas`-th index from
    `rank`)."""

    def __init__(self, weights: Sequence[float], num_samples: int, seed: int, rank: int = 0, num_replicas: int = 1):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not one of {num_replicas} replicas")
        self.weights = torch.as_tensor(weights, dtype=torch.double)
        self.num_samples, self.seed, self.rank, self.num_replicas = num_samples, seed, rank, num_replicas
        self.generator = torch.Generator().manual_seed(seed)
        self.pass_start = self.generator.get_state()  # the generator's state when the current pass began
        self._resume: Optional[tuple[torch.Tensor, int]] = None
        self._indices: Optional[list[int]] = None

    def shard(self, rank: int, num_replicas: int) -> "ResumableSampler":
        """The sampler of one rank of `num_replicas`, from the same seed (an unstarted sampler only)."""
        return ResumableSampler(self.weights, self.num_samples, self.seed, rank, num_replicas)

    def resume(self, pass_start: torch.Tensor, skip: int) -> None:
        self._resume = (pass_start, skip)

    def start_pass(self) -> int:
        """Draw the next pass (or the resumed one, less the first indices of this share); returns how
        many it skips."""
        skip = 0
        if self._resume is not None:
            (state, skip), self._resume = self._resume, None
            self.generator.set_state(state)
            if skip >= len(self):  # the pass had ended: draw it to move on, then a new one
                self._draw()
                skip = 0
        self.pass_start = self.generator.get_state()
        self._indices = self._draw()[skip:]
        return skip

    def _draw(self) -> list[int]:
        """This rank's share of the next pass."""
        drawn = torch.multinomial(self.weights, self.num_samples, True, generator=self.generator).tolist()
        if self.num_replicas == 1:
            return drawn
        total = len(self) * self.num_replicas
        while len(drawn) < total:  # as DistributedSampler pads: with the pass's first indices
            drawn += drawn[: total - len(drawn)]
        return drawn[self.rank : total : self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        if self._indices is None:
            self.start_pass()
        indices, self._indices = self._indices, None
        return iter(indices)

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.num_replicas)


def _resumable(sampler: Sampler) -> Optional[ResumableSampler]:
    """The ResumableSampler behind `sampler`: itself, or the one Lightning wrapped for data parallelism
    (`DistributedSamplerWrapper`), sharded for its rank; None for any other sampler."""
    if isinstance(sampler, ResumableSampler):
        return sampler
    inner = getattr(getattr(sampler, "dataset", None), "_sampler", None)  # DistributedSamplerWrapper's sampler
    if isinstance(sampler, DistributedSampler) and isinstance(inner, ResumableSampler):
        # the wrapper's own shuffle (Lightning sets it for a training loader) would permute draws that are
        # already random and independent, so each rank takes its share of the pass in order
        return inner.shard(sampler.rank, sampler.num_replicas)
    return None


class ResumableTaskLoader(DataLoader):
    """The training loader, whose `state_dict()` is the position after the last *consumed* batch (the
    data module counts them in `on_before_batch_transfer`, however far the fetcher reads ahead), as
    the pretraining loader's is: a resume continues with the next unseen batch, on one device or under
    data parallelism (each rank's position is the same count of batches). A resume with other
    `settings` (batch size, task mix) is refused, naming them."""

    def __init__(self, dataset, batch_size: int, sampler: Sampler, settings: dict, **kwargs):
        # Lightning rebuilds the loader for data parallelism around a DistributedSamplerWrapper of our
        # sampler: each rank takes the same share from that rank's own ResumableSampler instead
        resumable = _resumable(sampler)
        super().__init__(dataset, batch_size=batch_size, sampler=resumable or sampler, drop_last=True, **kwargs)
        self.settings = settings
        self._resumable = resumable  # None for a sampler of another kind: no exact position then
        self._consumed = 0  # batches of the current pass the training loop has taken

    def __iter__(self):
        if self._resumable is not None:
            self._consumed = self._resumable.start_pass() // self.batch_size
        return super().__iter__()

    def mark_consumed(self) -> None:
        self._consumed += 1

    def state_dict(self) -> dict:
        state = {"settings": self.settings}
        if self._resumable is not None:
            state.update(pass_start=self._resumable.pass_start, consumed=self._consumed)
        return state

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("settings", {})
        changed = [f"{k} (was {saved[k]}, now {v})" for k, v in self.settings.items() if k in saved and saved[k] != v]
        refuse_changed_settings(changed)
        if self._resumable is None or "consumed" not in state:
            log.warning("resuming the fine-tuning data from the start of its pass: the checkpoint or the sampler "
                        "has no position in it")
            return
        consumed = state["consumed"]
        skip = len(self._resumable) if consumed >= len(self) else consumed * self.batch_size
        self._resumable.resume(state["pass_start"], skip)


class FinetuneDataModule(L.LightningDataModule):
    def __init__(
        self,
        tasks: dict,
        output_dir: str,
        init_from: Optional[str] = None,
        log_dir: Optional[str] = None,
        corpus_paths: Sequence[str] = (),
        custom: Optional[dict] = None,
        prompt_template: str = DEFAULT_TEMPLATE,
        seq_len: int = 256,
        batch_size: int = 16,
        val_batch_size: Optional[int] = None,
        per_source: int = 600,
        passage_words: int = 48,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        max_val_examples: Optional[int] = 200,
        num_workers: int = 0,
        seed: int = 42,
    ):
        """tasks: {built-in task name: weight} (see `slimpajama.data.tasks.BUILT_IN`); custom: {name:
        {kind, path, weight}} for the user's own jsonl files; output_dir: where built-in tasks are
        built once; init_from: the model whose tokenizer is grown (null: the newest finished model);
        max_val_examples: per task, for the validation loss (the test split is for evaluation): a seeded
          sample of the validation split, not its first rows (a built-in task's rows are grouped by label)."""
        super().__init__()
        for name, weight in (tasks or {}).items():  # as data.custom.<name>.weight: no NaN, inf, bool or string
            if not is_finite_number(weight) or weight < 0:
                raise ValueError(f"data.tasks.{name}={weight!r} must be a finite number >= 0")
        self.task_weights = {str(k): float(v) for k, v in (tasks or {}).items()}
        self.custom = {str(k): _custom_spec(str(k), v) for k, v in (custom or {}).items()}
        self.task_weights.update({k: v["weight"] for k, v in self.custom.items()})
        for name, value in (("data.val_fraction", val_fraction), ("data.test_fraction", test_fraction)):
            if not 0 <= value < 1:
                raise ValueError(f"{name}={value} must lie in [0, 1)")
        if max_val_examples is not None and (not is_whole_number(max_val_examples) or max_val_examples < 1):
            raise ValueError(f"data.max_val_examples={max_val_examples!r} must be a whole number >= 1, or null for all")
        if val_fraction + test_fraction >= 1:
            raise ValueError(f"data.val_fraction + data.test_fraction = {val_fraction + test_fraction:g} leaves no "
                             "training examples: their sum must be below 1")
        if not self.task_weights or any(w < 0 for w in self.task_weights.values()) or not any(self.task_weights.values()):
            raise ValueError(f"data.tasks must give at least one task a positive weight, got {self.task_weights}")
        unknown = sorted(set(tasks or {}) - set(BUILT_IN))
        if unknown:
            raise ValueError(f"data.tasks: unknown built-in tasks {unknown} (built-in: {', '.join(BUILT_IN)}; "
                             "your own data goes in data.custom)")
        check_template(prompt_template)
        self.output_dir, self.init_from, self.log_dir = Path(output_dir), init_from, log_dir
        self.corpus_paths = list(corpus_paths)
        self.prompt_template, self.seq_len = prompt_template, seq_len
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.per_source, self.passage_words = per_source, passage_words
        self.val_fraction, self.test_fraction, self.max_val_examples = val_fraction, test_fraction, max_val_examples
        self.num_workers, self.seed = num_workers, seed
        self.tasks: dict[str, TaskSet] = {}
        self._tokenizer: Optional[SlimPajamaTokenizer] = None
        self._metrics: dict[str, float] = {}

    # ---- building --------------------------------------------------------------------------
    def _load_tasks(self) -> dict[str, TaskSet]:
        built_in = [n for n, w in self.task_weights.items() if n not in self.custom and w > 0]
        tasks = build_tasks(built_in, self.output_dir, self.corpus_paths, self.per_source, self.passage_words,
                            self.val_fraction, self.test_fraction, self.seed)
        for name, spec in self.custom.items():
            if self.task_weights[name] > 0:
                tasks[name] = user_task(name, spec["kind"], spec["path"], self.val_fraction, self.test_fraction)
        if not tasks:
            raise ValueError("no task could be built (see the warnings above for what to install)")
        return tasks

    def prepare_data(self) -> None:
        self._load_tasks()  # builds the built-in tasks once (rank 0); setup reads them back

    def setup(self, stage: Optional[str] = None) -> None:
        if self._tokenizer is not None:
            return
        self.tasks = self._load_tasks()
        init = resolve_init(self.init_from, self.log_dir)
        tokenizer = SlimPajamaTokenizer.from_pretrained(init)
        before = len(tokenizer)
        controls = control_tokens_in(c for t in self.tasks.values() for c in t.controls)
        tokenizer.add_control_tokens(controls)
        log.info("tokenizer of %s: %d -> %d tokens (%d control tokens)", init, before, len(tokenizer), len(controls))
        self._tokenizer = tokenizer
        self.data: dict[str, dict[str, list]] = {}
        truncated = 0
        for name, task in self.tasks.items():
            self.data[name] = {}
            for split, rows in task.splits.items():
                encoded = [encode_example(tokenizer, self.prompt_template, ex, self.seq_len + 1) for ex in rows]
                truncated += sum(t for _, _, t in encoded)
                self.data[name][split] = [(ids, lab) for ids, lab, _ in encoded]
                self._metrics[f"data/{name}/{split}_examples"] = float(len(rows))
            val = self.data[name]["val"]
            if self.max_val_examples is not None and len(val) > self.max_val_examples:
                keep = sorted(random.Random(self.seed).sample(range(len(val)), self.max_val_examples))
                self.data[name]["val"] = [val[i] for i in keep]
            self._metrics[f"data/{name}/val_examples_used"] = float(len(self.data[name]["val"]))
        self._metrics["data/truncated_examples"] = float(truncated)
        active = {n: w for n, w in self.task_weights.items() if n in self.tasks and w > 0 and self.data[n]["train"]}
        total = sum(active.values())
        self.mix = {n: w / total for n, w in sorted(active.items())}
        log.info("task mix: %s", ", ".join(f"{n} {w:.1%}" for n, w in self.mix.items()))

    @property
    def tokenizer(self) -> Optional[SlimPajamaTokenizer]:
        return self._tokenizer

    @property
    def metrics(self) -> dict:
        return dict(self._metrics)

    # ---- loaders ---------------------------------------------------------------------------
    def _loader(self, items, batch_size: int) -> DataLoader:
        pad = self._tokenizer.pad_token_id
        return DataLoader(_Examples(items), batch_size=batch_size, num_workers=self.num_workers,
                          collate_fn=lambda b: collate(b, pad))

    def train_dataloader(self) -> "ResumableTaskLoader":
        items, weights = [], []
        for name, share in self.mix.items():
            rows = self.data[name]["train"]
            items += rows
            weights += [share / len(rows)] * len(rows)  # each task draws its share, whatever its size
        pad = self._tokenizer.pad_token_id
        return ResumableTaskLoader(
            _Examples(items), batch_size=self.batch_size, sampler=ResumableSampler(weights, len(items), self.seed),
            settings={"data.batch_size": self.batch_size, "data.tasks": dict(self.mix)},
            num_workers=self.num_workers, collate_fn=lambda b: collate(b, pad))

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        # called when the training loop takes a batch to train on (not when it reads ahead); the loader is
        # the trainer's, which under data parallelism is Lightning's rebuild of the one returned above
        loader = self.trainer.train_dataloader if self.trainer is not None and self.trainer.training else None
        if isinstance(loader, ResumableTaskLoader):
            loader.mark_consumed()
        return batch

    def val_dataloader(self) -> DataLoader:
        items = [ex for name in self.mix for ex in self.data[name]["val"]]  # at most max_val_examples each (setup)
        if not items:
            raise ValueError("no validation examples: raise data.val_fraction")
        return self._loader(items, self.val_batch_size)
