"""The pipeline report: one row per model (teacher, student, pruned, fine-tuned), plots, generations.

    python -m slimpajama.report                       # the newest finished run of every stage
    python -m slimpajama.report --runs logs/pipeline/runs/<time> --out report/

Per model: parameters, file size, validation perplexity (on the stage's own validation data: the
corpus for pretrain/distill/prune, the task sets for finetune), greedy generation tokens/s (measured
here, batch 1, the same prompt for every model), task metrics and control adherence (fine-tuned).
Writes `report.md` beside PNG plots: the loss curves of every stage (from the CSV logger: the
training cross-entropy on the labels beside val/loss, and the KD objective where one is trained),
size vs perplexity, sparsity vs perplexity when a prune sweep exists, control adherence per control
value; and prints the same summary table.
"""

import argparse
import functools
import json
import logging
from pathlib import Path
from typing import Optional

from slimpajama.generation import tokens_per_sec
from slimpajama.registry import PIPELINE, default_log_dir

log = logging.getLogger(__name__)

ROLES = {"pretrain": "teacher", "distill": "student", "prune": "pruned", "finetune": "fine-tuned"}


def stage_runs(log_dir: Optional[Path] = None, runs: Optional[Path] = None) -> dict[str, Path]:
    """The run folder of every finished stage: the stage folders of a pipeline run (`runs`), else
    `<log_dir>/latest/<stage>`."""
    if runs is not None:
        found = {s: Path(runs) / s for s in PIPELINE if (Path(runs) / s / "metrics.json").is_file()}
    else:
        root = Path(log_dir) if log_dir else default_log_dir()
        found = {s: (root / "latest" / s).resolve() for s in PIPELINE if (root / "latest" / s / "metrics.json").is_file()}
    if not found:
        where = f"--runs {runs}" if runs is not None else f"{Path(log_dir or default_log_dir()) / 'latest'}"
        raise FileNotFoundError(f"{where}: no finished stage runs (a <stage>/metrics.json for one of "
                                f"{', '.join(PIPELINE)}); run `python train.py experiment=pipeline_demo`, or pass "
                                "--runs or --log-dir")
    return found


@functools.lru_cache(maxsize=None)
def load(folder: Path):
    """(model, tokenizer) of a saved folder, loaded once per report."""
    from slimpajama.pretrained import SlimPajamaModel
    from slimpajama.tokenizer import SlimPajamaTokenizer

    return SlimPajamaModel.from_pretrained(folder), SlimPajamaTokenizer.from_pretrained(folder)


def model_row(stage: str, run: Path, prompt: str, new_tokens: int) -> dict:
    metrics = json.loads((run / "metrics.json").read_text())
    folder = run / "model"
    model, tokenizer = load(folder)
    ids = tokenizer.encode(prompt, return_tensors="pt")
    row = {
        "stage": stage, "model": ROLES[stage], "folder": str(folder),
        "params": model.num_params(),
        "file_mb": sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 1e6,
        "val_ppl": metrics.get("val/ppl"),
        "gen_tokens_per_s": tokens_per_sec(model, ids, new_tokens, repeats=3) if new_tokens else None,
        "sparsity": metrics.get("prune/sparsity"),
        "tasks": {k: v for k, v in metrics.items() if k.startswith("test/")},
        "control": {k: v for k, v in metrics.items() if k.startswith("control/")},
    }
    return row


def control_samples(run: Path, per_control: int = 2, max_new_tokens: int = 40, seed: int = 0) -> dict[str, list[str]]:
    """A few sampled generations per control token of a fine-tuned model, from its prompt template."""
    model, tokenizer = load(run / "model")
    template = (model.generation_config or {}).get("prompt_template", "{control}{input}")
    out = {}
    for i, control in enumerate(tokenizer.control_tokens):
        ids = tokenizer.encode(template.format(control=control, input=""), return_tensors="pt")
        gen = model.generate(ids, max_new_tokens=max_new_tokens, temperature=0.8, top_k=50, seed=seed + i,
                             num_return_sequences=per_control)
        out[control] = [tokenizer.decode(g[ids.size(1):], skip_special_tokens=True).strip() for g in gen]
    return out


# ---- plots ------------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# the curves of a stage's CSV log: the label cross-entropy in training (the distillation stages log it
# as distill/ce_loss; their train/loss is the KD objective, on another scale), the objective, val/loss
CURVES = {"train/ce": ("distill/ce_loss", "train/loss"), "train/objective": ("train/loss",), "val/loss": ("val/loss",)}


def read_curves(run: Path) -> dict[str, list[tuple[int, float]]]:
    """Loss curves by step from the CSV logger (`<run>/csv/metrics.csv`); {} without it. `train/ce`
    is the cross-entropy on the labels, comparable with `val/loss`; `train/objective` is kept only
    where it differs (distillation)."""
    import csv

    path = run / "csv" / "metrics.csv"
    if not path.is_file():
        return {}
    with open(path) as f:
        records = [r for r in csv.DictReader(f) if r.get("step") not in (None, "")]
    curves: dict[str, list] = {}
    for name, sources in CURVES.items():
        key = next((k for k in sources if any(r.get(k) not in (None, "") for r in records)), None)
        if key is not None:
            curves[name] = [(int(float(r["step"])), float(r[key])) for r in records if r.get(key) not in (None, "")]
    if curves.get("train/objective") == curves.get("train/ce"):  # no distillation: one training curve
        curves.pop("train/objective", None)
    return curves


def plot_losses(runs: dict[str, Path], path: Path) -> Optional[Path]:
    curves = {s: read_curves(r) for s, r in runs.items()}
    curves = {s: c for s, c in curves.items() if c}
    if not curves:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 3.4), squeeze=False)
    style = {"train/ce": dict(label="train CE (labels)", color="C0"),
             "val/loss": dict(label="val loss", marker="o", markersize=3, color="C1"),
             "train/objective": dict(label="train objective (KD)", linestyle=":", linewidth=1, color="C2")}
    for ax, (stage, c) in zip(axes[0], curves.items()):
        for key, pts in c.items():
            ax.plot(*zip(*pts), **style[key])
        ax.set_title(f"{stage} ({ROLES[stage]})")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_size_vs_ppl(rows: list[dict], path: Path) -> Optional[Path]:
    rows = [r for r in rows if r["val_ppl"] is not None and r["stage"] != "finetune"]  # same validation corpus
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for r in rows:
        ax.scatter(r["params"] / 1e6, r["val_ppl"], s=40)
        ax.annotate(r["model"], (r["params"] / 1e6, r["val_ppl"]), textcoords="offset points", xytext=(5, 5))
    ax.set_xlabel("parameters (M)")
    ax.set_ylabel("validation perplexity")
    ax.set_title("size vs perplexity (corpus validation split)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def adherence_by_value(control: dict) -> dict[str, dict[str, dict[str, float]]]:
    """{task: {value: {mode: share}}} from the `control/<task>/<value>/adherence_<mode>` metrics."""
    out: dict = {}
    for k, v in control.items():
        parts = k.split("/")
        if len(parts) == 4 and parts[3].startswith("adherence_"):
            out.setdefault(parts[1], {}).setdefault(parts[2], {})[parts[3].removeprefix("adherence_")] = v
    return out


def plot_adherence(row: dict, path: Path, modes: tuple = ("with", "without", "wrong")) -> Optional[Path]:
    """Per control value: the share of generations assigned to it with its control, without one, and
    with the wrong one; chance as a line. One panel per controlled task."""
    by_task = adherence_by_value(row["control"])
    if not by_task:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(by_task), figsize=(1.3 * sum(len(v) for v in by_task.values()) + 2.5, 3.6),
                             squeeze=False)
    width = 0.8 / len(modes)
    for ax, (task, values) in zip(axes[0], by_task.items()):
        names = sorted(values)
        for j, mode in enumerate(modes):
            ax.bar([i + (j - (len(modes) - 1) / 2) * width for i in range(len(names))],
                   [values[n].get(mode, 0.0) for n in names], width, label=f"{mode} control")
        chance = row["control"].get(f"control/{task}/chance")
        if chance is not None:
            ax.axhline(chance, color="gray", linestyle="--", linewidth=1, label="chance")
        ax.set_xticks(range(len(names)), names, rotation=20)
        ax.set_ylim(0, 1)
        ax.set_ylabel("share assigned to the value")
        ax.set_title(f"control adherence per value ({task})")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_prune_sweep(log_dir: Path, path: Path) -> Optional[Path]:
    """Sparsity vs perplexity of the newest prune multirun, when one exists."""
    sweeps = sorted((log_dir / "multiruns" / "prune").glob("*/"), key=lambda p: p.stat().st_mtime)
    if not sweeps:
        return None
    from slimpajama import sweep

    try:
        rows = sweep.collect(sweeps[-1])
        return sweep.plot(rows, path)
    except (FileNotFoundError, KeyError, ValueError) as e:
        log.warning("prune sweep %s not plotted: %s", sweeps[-1], e)
        return None


# ---- the report -------------------------------------------------------------------------------------
def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def summary_table(rows: list[dict]) -> str:
    lines = ["| model | stage | parameters | file (MB) | val ppl | generation tok/s | sparsity | task metrics | control adherence (with / without) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        tasks = ", ".join(f"{k.removeprefix('test/')} {v:.3g}" for k, v in r["tasks"].items()
                          if k.rsplit("/", 1)[-1] in ("accuracy", "f1", "f1_macro", "bleu", "chrf", "exact_match", "ppl"))
        with_ = {k: v for k, v in r["control"].items() if k.endswith("/adherence_with") and k.count("/") == 2}
        adher = ", ".join(
            f"{k.split('/')[1]} {v:.0%} / {r['control'].get(k.removesuffix('_with') + '_without', float('nan')):.0%}"
            for k, v in with_.items())
        lines.append(
            f"| {r['model']} | {r['stage']} | {r['params'] / 1e6:.2f}M | {r['file_mb']:.1f} | {_fmt(r['val_ppl'], '.1f')} | "
            f"{_fmt(r['gen_tokens_per_s'], '.0f')} | {_fmt(r['sparsity'], '.0%')} | {tasks or '-'} | {adher or '-'} |")
    return "\n".join(lines)


def write_report(runs: dict[str, Path], out: Path, log_dir: Optional[Path] = None, prompt: str = "The",
                 gen_tokens: int = 64, samples_per_control: int = 2) -> dict:
    """Measure every model, draw the plots, write `<out>/report.md` and `<out>/report.json`."""
    out.mkdir(parents=True, exist_ok=True)
    rows = [model_row(s, r, prompt, gen_tokens) for s, r in runs.items()]
    plots = {
        "loss curves": plot_losses(runs, out / "losses.png"),
        "size vs perplexity": plot_size_vs_ppl(rows, out / "size_vs_ppl.png"),
        "sparsity vs perplexity (prune sweep)": plot_prune_sweep(Path(log_dir or default_log_dir()), out / "sparsity_vs_ppl.png"),
    }
    samples = {}
    if "finetune" in runs:
        plots["control adherence"] = plot_adherence(rows[-1], out / "adherence.png")
        samples = control_samples(runs["finetune"], samples_per_control)
    table = summary_table(rows)
    md = ["# SlimPajama pipeline report", "", table, ""]
    md += ["Validation perplexity is measured on each stage's own validation data: the corpus for teacher, "
           "student and pruned; the task sets for the fine-tuned model. Generation: greedy, batch 1, "
           f"{gen_tokens} new tokens after {prompt!r}, best of 3, on this machine.", ""]
    for title, p in plots.items():
        if p is not None:
            md += [f"## {title}", "", f"![{title}]({Path(p).name})", ""]
    for task, values in adherence_by_value(rows[-1]["control"]).items():  # the fine-tuned model's, when there is one
        md += [f"## Control adherence per value ({task})", "",
               "| value | with its control | without a control | with the wrong control |", "|---|---|---|---|"]
        md += [f"| {v} | {m.get('with', 0):.0%} | {m.get('without', 0):.0%} | {m.get('wrong', 0):.0%} |"
               for v, m in sorted(values.items())] + [""]
    if samples:
        md += ["## Generations per control value", ""]
        for control, texts in samples.items():
            md += [f"**`{control}`**", ""] + [f"> {t.replace(chr(10), ' ')}" for t in texts] + [""]
    (out / "report.md").write_text("\n".join(md))
    record = {"rows": rows, "plots": {k: str(v) for k, v in plots.items() if v}, "samples": samples}
    (out / "report.json").write_text(json.dumps(record, indent=2, ensure_ascii=False))
    load.cache_clear()
    print(table)
    for control, texts in samples.items():
        print(f"{control}: {texts[0][:120]!r}")
    log.info("report: %s", out / "report.md")
    return record


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m slimpajama.report", description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default=None, help="a pipeline run folder (stage sub-folders); default: logs/latest/*")
    p.add_argument("--log-dir", default=None, help="default: $SLIMPAJAMA_LOG_DIR or ./logs")
    p.add_argument("--out", default=None, help="default: the --runs folder, else logs/report")
    p.add_argument("--prompt", default="The")
    p.add_argument("--gen-tokens", type=int, default=64, help="new tokens of the tokens/s measurement (0: not measured)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from slimpajama.cli import run_command

    return run_command("python -m slimpajama.report", _report, args)


def _report(args: argparse.Namespace) -> int:
    """The report of `main`'s arguments; each is checked before any model is loaded."""
    if args.gen_tokens < 0:
        raise ValueError(f"--gen-tokens {args.gen_tokens} must be >= 0 (0: no tokens/s measurement)")
    if args.runs and not Path(args.runs).is_dir():
        raise FileNotFoundError(f"--runs {args.runs}: no such folder")
    log_dir = Path(args.log_dir) if args.log_dir else default_log_dir()
    if args.log_dir and not log_dir.is_dir():
        raise FileNotFoundError(f"--log-dir {args.log_dir}: no such folder")
    runs = stage_runs(log_dir, Path(args.runs) if args.runs else None)
    out = Path(args.out or args.runs or log_dir / "report")
    write_report(runs, out, log_dir, args.prompt, args.gen_tokens)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
