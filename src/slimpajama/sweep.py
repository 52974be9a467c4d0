"""Collect a Hydra multirun folder into a table and a plot.

`python train.py -m stage=prune prune.method=magnitude,wanda prune.sparsity=0.3,0.5,0.7` writes one
job folder per combination under `logs/multiruns/prune/<time>/<n>/`, each with `.hydra/overrides.yaml`
(the swept values) and `metrics.json`. `collect` reads them into rows; `write_table` writes
`sweep.csv` and `sweep.md`; `plot` draws one line per value of `line` (e.g. the method) of `y` against
`x` (perplexity against sparsity) into `sweep.png`. CLI: `bench/collect_sweep.py`.
"""

import csv
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import yaml

log = logging.getLogger(__name__)

DEFAULT_METRICS = ("val/ppl", "prune/sparsity", "prune/ppl_dense", "prune/ppl_pruned", "model/params",
                   "model/file_bytes", "prune/gen_tokens_per_sec")


def _value(text: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def expected_jobs(folder: Path) -> int | None:
    """How many jobs the multirun of `folder` launches, from its multirun.yaml: the product of the swept
    values' counts for Hydra's basic sweeper (its `params` and the command line's sweeps), `n_trials` for
    Optuna's; None when the file is missing or the sweep cannot be counted (e.g. a glob over a group)."""
    from omegaconf import OmegaConf

    try:
        hydra = OmegaConf.load(folder / "multirun.yaml").hydra
        sweeper = OmegaConf.to_container(hydra.sweeper, resolve=False)
        if "n_trials" in sweeper:
            return int(sweeper["n_trials"])
        if not str(sweeper.get("_target_", "")).endswith("BasicSweeper"):
            return None
        from hydra.core.override_parser.overrides_parser import OverridesParser

        params = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()]
        swept = {}
        for o in OverridesParser.create().parse_overrides(params + list(hydra.overrides.task)):
            swept[o.key_or_group] = len(list(o.sweep_string_iterator())) if o.is_sweep_override() else 1
        return math.prod(swept.values())
    except Exception:  # noqa: BLE001 - an uncountable sweep, or no multirun.yaml: only gaps are found then
        return None


def collect(folder: str | Path, keys: Sequence[str] = ()) -> list[dict]:
    """One row per finished job of a multirun folder: its overrides (key -> value) and metrics.
    Jobs without a readable metrics.json (failed or running) are skipped with a warning, and so are named
    the job folders that are missing: the numbers below the highest one, and those the sweep in
    multirun.yaml implies (`expected_jobs`). `keys`: config keys a job did not override (e.g.
    `prune.sparsity` at its default) are read from its `.hydra/config.yaml`."""
    folder = Path(folder)
    jobs = sorted((p for p in folder.iterdir() if (p / ".hydra" / "overrides.yaml").is_file()),
                  key=lambda p: int(p.name) if p.name.isdigit() else p.name) if folder.is_dir() else []
    if not jobs:
        raise FileNotFoundError(f"{folder}: no job folders with .hydra/overrides.yaml (is it a multirun folder?)")
    numbers = {int(p.name) for p in jobs if p.name.isdigit()}
    expected = expected_jobs(folder)
    missing = sorted(set(range(max(expected or 0, max(numbers, default=-1) + 1))) - numbers)
    if missing:
        log.warning("%s: no job folder %s (never started, or removed): %d of %s job folders are there", folder,
                    ", ".join(map(str, missing)), len(jobs), expected or "more")
    rows = []
    for job in jobs:
        if not (job / "metrics.json").is_file():
            log.warning("%s: no metrics.json (failed or unfinished job), skipped", job)
            continue
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()) or []
        row = {"job": job.name}
        for o in overrides:
            key, _, value = o.partition("=")
            row[key.lstrip("+~")] = _value(value)
        try:
            metrics = json.loads((job / "metrics.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:  # a job killed mid-write by an older version
            log.warning("%s: unreadable metrics.json (%s), skipped", job, e)
            continue
        row.update(metrics)
        unset = [k for k in keys if k not in row and "/" not in k]
        if unset and (job / ".hydra" / "config.yaml").is_file():
            from omegaconf import OmegaConf

            config = OmegaConf.load(job / ".hydra" / "config.yaml")
            row.update({k: v for k in unset if (v := OmegaConf.select(config, k)) is not None})
        rows.append(row)
    if not rows:
        raise FileNotFoundError(f"{folder}: none of its {len(jobs)} jobs has a readable metrics.json")
    return rows


def swept_keys(rows: Sequence[dict]) -> list[str]:
    """Override keys whose value differs between jobs."""
    keys = [k for k in rows[0] if k != "job" and "/" not in k]
    return [k for k in keys if len({json.dumps(r.get(k), default=str) for r in rows}) > 1]


def write_table(rows: Sequence[dict], out_dir: str | Path, metrics: Sequence[str] = DEFAULT_METRICS) -> tuple[Path, Path]:
    """sweep.csv (every column) and sweep.md (the swept keys and `metrics` that any job has)."""
    out_dir = Path(out_dir)
    columns = list(dict.fromkeys(k for r in rows for k in r))
    csv_path = out_dir / "sweep.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    keys = swept_keys(rows)
    shown = keys + [m for m in metrics if any(m in r for r in rows)]

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}" if math.isfinite(v) else str(v)
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(fmt(r.get(k)) for k in shown) + " |" for r in sorted(rows, key=lambda r: [str(r.get(k)) for k in keys])]
    md_path = out_dir / "sweep.md"
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def plot(rows: Sequence[dict], path: str | Path, x: str = "prune.sparsity", y: str = "val/ppl",
         line: str | None = "prune.method", logy: bool = True, title: str | None = None,
         reference: float | None = None, reference_label: str = "dense") -> Path:
    """One line per value of `line`: `y` against `x`, points sorted by x. `reference`: a horizontal line
    (e.g. the dense model's perplexity)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    missing = [k for k in (x, y) if not any(k in r for r in rows)]
    if missing:
        raise KeyError(f"no job has {missing}; columns are {sorted({k for r in rows for k in r})}")
    if line and not any(line in r for r in rows):
        line = None  # nothing to tell the lines apart by: one line
    groups: dict = {}
    for r in rows:
        if x in r and y in r:
            try:
                point = (float(r[x]), float(r[y]))
            except (TypeError, ValueError):
                raise ValueError(f"job {r.get('job')}: {x}={r[x]!r}, {y}={r[y]!r}: the plot needs numbers "
                                 "(choose --x and --y among the numeric keys)") from None
            groups.setdefault(r.get(line) if line else y, []).append(point)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in sorted(groups.items(), key=lambda kv: str(kv[0])):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=str(name))
    if reference is not None:
        ax.axhline(reference, color="gray", linestyle="--", label=reference_label)
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    if logy:
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(title=line)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
