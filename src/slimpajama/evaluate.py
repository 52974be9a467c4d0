"""Evaluation of a fine-tuned model on the test split of each task; `python -m slimpajama.evaluate <model>`.

Per task kind (torchmetrics where it has the metric):

- classification: each label is scored by the log-likelihood of its tokens (and eos) after the
  prompt and the best one is the prediction (no free-form parsing); accuracy and macro F1
  (`MulticlassAccuracy`, `MulticlassF1Score`) beside the majority-class baseline of the training split.
- translation: greedy decoding to the first newline; corpus BLEU and chrF as sacreBLEU computes them
  with its defaults (`sacrebleu.corpus_bleu`: 13a tokens, exponential smoothing; `corpus_chrf`:
  character 6-grams, beta 2) beside the copy-the-input baseline.
- qa: greedy decoding; exact match and token F1 (`torchmetrics.text.SQuAD`: SQuAD's normalisation, and
  its v2 rule that a prediction and a reference that both normalise to nothing match).
- dialogue: perplexity of the reference replies (output tokens only).
- generation (control by source): for each control value, sampled generations with the control,
  without it (empty control), with a wrong one (the next value), and with classifier-free guidance
  against the no-control prompt. An independent classifier — multinomial naive Bayes on hashed
  character n-grams with a uniform prior, trained by `SourceClassifier` on held-out text of each
  source (the validation and test splits' reference passages, which fine-tuning never trains on;
  never model outputs) — assigns each generation to a value; adherence is the share assigned to the
  requested value (chance: 1 / number of values). Its own accuracy on held-out text (2-fold) is
  reported beside it as `classifier_accuracy`: adherence cannot be measured more precisely than that.

Each task is evaluated on at most `max_examples` test examples, drawn with a seeded shuffle; how many
is reported (`test/<task>/examples`; `control/<task>/per_value` generations per value and mode, with
each adherence's standard error, `adherence_<mode>_stderr`).

Metric names: `test/<task>/<metric>`, `control/<task>/<adherence_*>`. The standalone command
writes them to `<model>/metrics.json` (or `--output`).
"""

import argparse
import json
import logging
import math
import os
import random
import re
import string
import sys
import zlib
from collections import Counter
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from slimpajama.data.corpus import progress_bar
from slimpajama.data.finetune import cut_prompt, encode_example, encode_output, encode_prompt, fit_prompt
from slimpajama.data.tasks import DEFAULT_TEMPLATE, TaskSet, load_task
from slimpajama.losses import IGNORE_INDEX, lm_loss

log = logging.getLogger(__name__)


# ---- the independent control classifier ---------------------------------------------------------
class SourceClassifier:
    """Multinomial naive Bayes on hashed character n-grams (numpy): small, fast, and strong at telling
    registers apart (code, speeches, plays ...). Trained on reference text, never on model outputs."""

    def __init__(self, ngram: tuple[int, int] = (1, 4), buckets: int = 1 << 18, alpha: float = 0.1,
                 uniform_prior: bool = True):
        """uniform_prior: every value equally likely a priori (the adherence test asks for each value
        equally often), not in proportion to how much reference text each value has."""
        self.ngram, self.buckets, self.alpha, self.uniform_prior = ngram, buckets, alpha, uniform_prior
        self.labels: list[str] = []
        self.log_prob: Optional[np.ndarray] = None  # (labels, buckets)
        self.log_prior: Optional[np.ndarray] = None

    def features(self, text: str) -> np.ndarray:
        counts = np.zeros(self.buckets, dtype=np.float64)
        text = f" {text.lower()} "
        for n in range(self.ngram[0], self.ngram[1] + 1):
            for i in range(len(text) - n + 1):
                counts[zlib.crc32(text[i : i + n].encode("utf-8")) % self.buckets] += 1
        return counts

    def fit(self, texts: Sequence[str], labels: Sequence[str]) -> "SourceClassifier":
        self.labels = sorted(set(labels))
        index = {lab: i for i, lab in enumerate(self.labels)}
        counts = np.zeros((len(self.labels), self.buckets))
        docs = np.zeros(len(self.labels))
        for text, lab in zip(texts, labels):
            counts[index[lab]] += self.features(text)
            docs[index[lab]] += 1
        smoothed = counts + self.alpha
        self.log_prob = np.log(smoothed) - np.log(smoothed.sum(1, keepdims=True))
        self.log_prior = np.full(len(docs), -np.log(len(docs))) if self.uniform_prior else np.log(docs / docs.sum())
        return self

    def predict(self, texts: Sequence[str]) -> list[str]:
        if self.log_prob is None:
            raise RuntimeError("SourceClassifier.predict before fit")
        scores = np.stack([self.features(t) for t in texts]) @ self.log_prob.T + self.log_prior  # (N, labels)
        return [self.labels[i] for i in scores.argmax(1)]


# ---- text metrics -----------------------------------------------------------------------------
def _normalize_answer(text: str) -> str:
    text = "".join(c for c in text.lower() if c not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def qa_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Exact match and token F1 in percent (SQuAD's definitions, via torchmetrics.text.SQuAD: with v2's
    rule that two answers that both normalise to nothing, e.g. "the" and "", match with F1 100)."""
    from torchmetrics.text import SQuAD

    preds = [{"prediction_text": p, "id": str(i)} for i, p in enumerate(predictions)]
    target = [{"answers": {"answer_start": [0], "text": [r]}, "id": str(i)} for i, r in enumerate(references)]
    out = SQuAD()(preds, target)
    return {"exact_match": float(out["exact_match"]), "f1": float(out["f1"])}


def translation_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Corpus BLEU-4 and chrF (0-100) from sacreBLEU itself, with its defaults, as papers quote them:
    BLEU on 13a tokens (punctuation split from words, so "station?" is two tokens) with exponential
    smoothing, chrF on character 6-grams with beta 2 (signatures `nrefs:1|case:mixed|eff:no|tok:13a|
    smooth:exp` and `nrefs:1|case:mixed|eff:yes|nc:6|nw:0|space:no`). An empty prediction scores 0 and
    keeps its reference in the totals."""
    import sacrebleu

    hyps, refs = list(predictions), [list(references)]
    return {"bleu": float(sacrebleu.corpus_bleu(hyps, refs).score), "chrf": float(sacrebleu.corpus_chrf(hyps, refs).score)}


def classification_scores(predictions: Sequence[int], targets: Sequence[int], num_classes: int) -> dict[str, float]:
    from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

    p, t = torch.tensor(list(predictions)), torch.tensor(list(targets))
    return {"accuracy": float(MulticlassAccuracy(num_classes, average="micro")(p, t)),
            "f1_macro": float(MulticlassF1Score(num_classes, average="macro")(p, t))}


# ---- model helpers ----------------------------------------------------------------------------
def _device(model) -> torch.device:
    return model.lm_head.weight.device


def _left_pad(rows: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :], mask[i, width - len(r) :] = torch.tensor(r), 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def generate_texts(model, tokenizer, prompts: list[list[int]], batch_size: int = 16, stop_at_newline: bool = True,
                   **kwargs) -> list[str]:
    """Decode each prompt (ids with bos), batched and left-padded; the new text up to eos (or a newline)."""
    texts = []
    for s in range(0, len(prompts), batch_size):
        ids, mask = _left_pad(prompts[s : s + batch_size], tokenizer.pad_token_id, _device(model))
        out = model.generate(ids, attention_mask=mask, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id, **kwargs)
        for row in out[:, ids.size(1) :]:
            text = tokenizer.decode(row, skip_special_tokens=True)
            texts.append(text.split("\n")[0].strip() if stop_at_newline else text)
    return texts


@torch.no_grad()
def output_losses(model, items: list[tuple[list[int], list[int]]], pad: int, batch_size: int = 16) -> tuple[float, int]:
    """Sum of the cross-entropy over output tokens (labels != -100) and their count."""
    total, count = 0.0, 0
    for s in range(0, len(items), batch_size):
        chunk = items[s : s + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        labels = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)
        for i, (x, y) in enumerate(chunk):
            ids[i, : len(x)], labels[i, : len(y)] = torch.tensor(x), torch.tensor(y)
        ids, labels = ids.to(_device(model)), labels.to(_device(model))
        logits = model(ids[:, :-1])
        n = int((labels[:, 1:] != IGNORE_INDEX).sum())
        total += float(lm_loss(logits, labels[:, 1:])) * n
        count += n
    return total, count


@torch.no_grad()
def label_scores(model, tokenizer, template: str, ex: dict, labels: Sequence[str], max_len: int) -> list[float]:
    """Total log-likelihood of each label (its tokens and eos) as the output for example `ex`, every label
    after the same prompt: when prompt and the longest label exceed `max_len`, cut to half of it as
    `encode_example` cuts a prompt (the input's end goes)."""
    outputs = [encode_output(tokenizer, lab) for lab in labels]
    prompt = encode_prompt(tokenizer, template, ex["control"], ex["input"])
    prompt = cut_prompt(tokenizer, template, prompt, max(map(len, outputs)), max_len)  # one prompt for every label
    kept = [out[: max_len - len(prompt)] for out in outputs]
    items = [(prompt + out, [IGNORE_INDEX] * len(prompt) + out) for out in kept]
    scores = []
    for x, y in items:
        total, _ = output_losses(model, [(x, y)], tokenizer.pad_token_id, batch_size=1)
        scores.append(-total)
    return scores


# ---- per-kind evaluations -------------------------------------------------------------------------
def evaluate_classification(model, tokenizer, task: TaskSet, template: str, rows: list[dict], max_len: int) -> dict:
    labels = task.labels
    index = {lab: i for i, lab in enumerate(labels)}
    preds = [int(np.argmax(label_scores(model, tokenizer, template, ex, labels, max_len))) for ex in rows]
    targets = [index[ex["output"]] for ex in rows]
    out = classification_scores(preds, targets, len(labels))
    majority = Counter(ex["output"] for ex in task.splits["train"]).most_common(1)[0][0]
    out["majority_accuracy"] = sum(ex["output"] == majority for ex in rows) / len(rows)
    return out


def evaluate_generation_task(model, tokenizer, task: TaskSet, template: str, rows: list[dict], batch_size: int,
                             kind: str, max_new_tokens: int) -> tuple[dict, list]:
    limit = model.config.max_seq_len // 2  # as in training (encode_example): a long input's end goes
    prompts = [fit_prompt(tokenizer, template, encode_prompt(tokenizer, template, ex["control"], ex["input"]), limit)
               for ex in rows]
    preds = generate_texts(model, tokenizer, prompts, batch_size, max_new_tokens=max_new_tokens, do_sample=False)
    refs = [ex["output"] for ex in rows]
    if kind == "translation":
        out = translation_scores(preds, refs)
        copy = translation_scores([ex["input"] for ex in rows], refs)
        out.update({"copy_bleu": copy["bleu"], "copy_chrf": copy["chrf"]})
    else:
        out = qa_scores(preds, refs)
    samples = [[task.name, ex["control"], ex["input"], p, r] for ex, p, r in list(zip(rows, preds, refs))[:8]]
    return out, samples


def evaluate_control(
    model, tokenizer, task: TaskSet, template: str, per_control: int, max_new_tokens: int, guidance_scale: float,
    temperature: float, top_k: int, seed: int, batch_size: int,
) -> tuple[dict, list]:
    """Adherence of sampled generations to each control value, by an independent classifier.

    Keys: `adherence_<mode>` over every value and `<value>/adherence_<mode>` per value, for the modes
    with (the control given), without (no control), wrong (the next value's control), guided."""
    label_of = {}
    for rows in task.splits.values():
        for ex in rows:
            label_of[ex["control"]] = ex.get("label") or ex["control"].removeprefix("<|").removesuffix("|>").split(":")[-1]
    controls = sorted(label_of)
    held_out = (task.splits.get("val") or []) + (task.splits.get("test") or [])
    texts, labels = [ex["output"] for ex in held_out], [label_of[ex["control"]] for ex in held_out]
    # the classifier's own accuracy on held-out text: 2-fold, each half predicted by a fit on the other
    half = [zlib.crc32(t.encode()) % 2 for t in texts]
    out: dict[str, float] = {}
    hits = []
    for fold in (0, 1):
        fit = [(t, lab) for t, lab, h in zip(texts, labels, half) if h != fold]
        probe = [(t, lab) for t, lab, h in zip(texts, labels, half) if h == fold]
        if not probe or {lab for _, lab in fit} != set(labels):
            break
        predicted = SourceClassifier().fit(*zip(*fit)).predict([t for t, _ in probe])
        hits += [p == lab for p, (_, lab) in zip(predicted, probe)]
    else:
        out["classifier_accuracy"] = float(np.mean(hits))
    classifier = SourceClassifier().fit(texts, labels)

    sampling = {"do_sample": True, "temperature": temperature, "top_k": top_k, "max_new_tokens": max_new_tokens}
    plain = encode_prompt(tokenizer, template, "", "")
    modes = {"with": {}, "without": {}, "wrong": {}, "guided": {}}
    samples = []
    for i, control in enumerate(controls):
        wrong = controls[(i + 1) % len(controls)]
        prompts = {"with": encode_prompt(tokenizer, template, control, ""), "without": plain,
                   "wrong": encode_prompt(tokenizer, template, wrong, "")}
        for mode in modes:
            prompt = prompts.get(mode, prompts["with"])
            kwargs = dict(sampling, seed=seed + i)
            if mode == "guided":
                neg = torch.tensor([plain] * per_control, device=_device(model))
                kwargs.update(guidance_scale=guidance_scale, negative_prompt_ids=neg)
            gens = generate_texts(model, tokenizer, [prompt] * per_control, batch_size=per_control,
                                  stop_at_newline=False, **kwargs)
            modes[mode][control] = gens
            samples += [[task.name, label_of[control], mode, g] for g in gens[:3]]
    out.update({"chance": 1.0 / len(controls), "values": float(len(controls)), "per_value": float(per_control)})
    for mode, by_control in modes.items():
        hits = []
        for control, gens in by_control.items():
            preds = classifier.predict(gens)
            value_hits = [p == label_of[control] for p in preds]
            out[f"{label_of[control]}/adherence_{mode}"] = float(np.mean(value_hits))  # per control value
            hits += value_hits
            if mode == "wrong":  # how often the generation follows the wrong control it was given
                wrong = controls[(controls.index(control) + 1) % len(controls)]
                out.setdefault("_follows_wrong", []).extend(p == label_of[wrong] for p in preds)
        out[f"adherence_{mode}"] = p = float(np.mean(hits))
        out[f"adherence_{mode}_stderr"] = math.sqrt(p * (1 - p) / len(hits))  # binomial, over every generation
    out["follows_wrong"] = float(np.mean(out.pop("_follows_wrong")))
    out["guidance_scale"] = float(guidance_scale)
    return out, samples


def evaluate_tasks(
    model, tokenizer, tasks: dict[str, TaskSet], template: str = DEFAULT_TEMPLATE, max_examples: int = 200,
    max_new_tokens: int = 32, per_control: int = 24, control_max_new_tokens: int = 48, guidance_scale: float = 2.0,
    temperature: float = 0.8, top_k: int = 50, seed: int = 0, batch_size: int = 16, progress: bool = True,
) -> tuple[dict[str, float], dict[str, list]]:
    """Metrics of `model` on each task's test split (at most `max_examples` each) and sample rows
    per table (`controls`: task, value, mode, text; `outputs`: task, control, input, prediction, reference)."""
    was_training = model.training
    model.eval()
    max_len = model.config.max_seq_len
    metrics, samples = {}, {"controls": [], "outputs": []}
    bar = progress_bar(progress)
    try:
        with bar:
            for name, task in bar.track(tasks.items(), total=len(tasks), description="evaluating the tasks"):
                test = task.splits.get("test") or []
                rows = random.Random(seed).sample(test, min(max_examples, len(test)))  # not the file's order
                if not rows:
                    log.warning("task %s has no test examples: not evaluated", name)
                    continue
                if task.kind == "generation":  # control adherence
                    out, rows_out = evaluate_control(model, tokenizer, task, template, per_control,
                                                     control_max_new_tokens, guidance_scale, temperature, top_k, seed,
                                                     batch_size)
                    samples["controls"] += rows_out
                    metrics.update({f"control/{name}/{k}": v for k, v in out.items()})
                    continue
                out, rows_out = _evaluate_task(model, tokenizer, task, template, rows, max_len, batch_size,
                                               max_new_tokens)
                out["examples"] = len(rows)  # of the test split's data/<task>/test_examples
                samples["outputs"] += rows_out
                metrics.update({f"test/{name}/{k}": float(v) for k, v in out.items()})
                log.info("test/%s: %s", name, ", ".join(f"{k} {v:.4g}" for k, v in out.items()))
    finally:
        model.train(was_training)
    for k, v in metrics.items():
        if k.startswith("control/"):
            log.info("%s = %.4g", k, v)
    return metrics, samples


def _evaluate_task(model, tokenizer, task: TaskSet, template: str, rows: list[dict], max_len: int, batch_size: int,
                   max_new_tokens: int) -> tuple[dict, list]:
    """The metrics of one labelled task (classification, translation, qa, dialogue) and its sample rows."""
    if task.kind == "classification":
        return evaluate_classification(model, tokenizer, task, template, rows, max_len), []
    if task.kind in ("translation", "qa"):
        return evaluate_generation_task(model, tokenizer, task, template, rows, batch_size, task.kind, max_new_tokens)
    if task.kind == "dialogue":
        items = [encode_example(tokenizer, template, ex, max_len)[:2] for ex in rows]
        total, count = output_losses(model, items, tokenizer.pad_token_id, batch_size)
        return {"loss": total / count, "ppl": math.exp(total / count)}, []
    raise ValueError(f"task {task.name!r}: unknown kind {task.kind!r}")


TABLE_COLUMNS = {"controls": ["task", "value", "mode", "generation"],
                 "outputs": ["task", "control", "input", "prediction", "reference"]}


def log_sample_tables(loggers, samples: dict[str, list]) -> None:
    """A W&B table of sample generations per control value (and of task outputs) when a logger is W&B."""
    from slimpajama.pipeline import wandb_loggers

    for lg in wandb_loggers(loggers):
        for key, rows in samples.items():
            if rows:
                lg.log_table(key=f"samples/{key}", columns=TABLE_COLUMNS[key], data=rows)


# ---- the command --------------------------------------------------------------------------------
def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m slimpajama.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="a saved model folder or a registry name (slimpajama/finetune)")
    p.add_argument("--tasks-dir", default="data/tasks", help="folder of task folders (built by the finetune stage)")
    p.add_argument("--tasks", nargs="*", default=None, help="task names (default: every task folder there)")
    p.add_argument("--output", default=None,
                   help="metrics.json to write, its folder made when missing (default: <model>/metrics.json)")
    p.add_argument("--max-examples", type=int, default=200, help="test examples per task, at most (>= 1)")
    p.add_argument("--per-control", type=int, default=24, help="generations per control value and mode (>= 1)")
    p.add_argument("--guidance-scale", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from slimpajama.cli import run_command

    return run_command("python -m slimpajama.evaluate", _evaluate, args)


def checked_output(path: Path) -> Path:
    """`path` if a file can be written there once the evaluation is done: not a folder, and its folder a
    folder or one that can be made (no file in the way, a writable folder above it); else an error naming
    --output."""
    if path.is_dir():
        raise IsADirectoryError(f"--output {path}: is a folder; give the file to write, e.g. {path / 'metrics.json'}")
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise NotADirectoryError(f"--output {path}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"--output {path}: cannot write in {folder}")
    return path


def _evaluate(args: argparse.Namespace) -> int:
    from slimpajama.cli import checked_device
    from slimpajama.pretrained import SlimPajamaModel
    from slimpajama.tokenizer import SlimPajamaTokenizer

    for flag, value in (("--max-examples", args.max_examples), ("--per-control", args.per_control)):
        if value < 1:
            raise ValueError(f"{flag} {value} must be >= 1")
    output = checked_output(Path(args.output)) if args.output else None
    model = SlimPajamaModel.from_pretrained(args.model, device=checked_device(args.device))
    tokenizer = SlimPajamaTokenizer.from_pretrained(args.model)
    template = (model.generation_config or {}).get("prompt_template", DEFAULT_TEMPLATE)
    root = Path(args.tasks_dir)
    names = args.tasks or (sorted(d.name for d in root.iterdir() if (d / "task.json").is_file()) if root.is_dir() else [])
    if not names:
        raise FileNotFoundError(f"no task folders in {root} (run `python train.py stage=finetune` to build them)")
    unknown = [n for n in names if not (root / n / "task.json").is_file()]
    if unknown:
        known = sorted(d.name for d in root.iterdir() if (d / "task.json").is_file()) if root.is_dir() else []
        raise FileNotFoundError(f"--tasks {unknown}: no such task folders in {root} (there: {', '.join(known) or 'none'})")
    tasks = {n: load_task(root / n) for n in names}
    missing = sorted({c for t in tasks.values() for c in t.controls if c.startswith("<|")} - set(tokenizer.control_tokens))
    if missing:
        raise ValueError(f"{args.model}: its tokenizer lacks the control tokens {missing}: not fine-tuned on these tasks")
    metrics, _ = evaluate_tasks(model, tokenizer, tasks, template, max_examples=args.max_examples,
                                per_control=args.per_control, guidance_scale=args.guidance_scale, seed=args.seed)
    out = output or Path(model_dir(args.model)) / "metrics.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(out.read_text()) if out.is_file() else {}
    out.write_text(json.dumps({**previous, **metrics}, indent=2, sort_keys=True) + "\n")
    print(json.dumps(metrics, indent=2, sort_keys=True))
    return 0


def model_dir(name: str) -> Path:
    from slimpajama.registry import resolve_model

    return resolve_model(name)


if __name__ == "__main__":
    sys.exit(main())
