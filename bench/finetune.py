"""Does the model follow its control signals? Fine-tune the demo model on the built-in tasks and measure.

    .venv/bin/python bench/finetune.py --init /work/benchlogs/latest/pretrain/model --steps 300

One `python train.py stage=finetune` run (the real config and pipeline) from `--init` on the
built-in tasks of `data=tasks` (source-controlled generation, topic, sentiment, translation,
dialogue, QA; a task whose package is missing is skipped and listed). The stage's own end-of-fit
evaluation on the test splits gives every figure (see `slimpajama.evaluate`):

- control adherence: the share of sampled generations that the independent n-gram classifier
  assigns to the requested source, with the control token, without it (chance), with a wrong one,
  and with classifier-free guidance against the no-control prompt;
- classification accuracy / macro F1 beside the majority-class baseline;
- translation BLEU / chrF beside the copy-the-input baseline; QA exact match / F1; dialogue perplexity.

`--init-ckpt` exports a pretrain checkpoint (e.g. of a teacher still training) as the initial model
first. The run goes to <runs-dir>/<tag>; a finished one (metrics.json) is reused unless --force.
Prints a markdown table; a JSON record goes to bench/results/.
"""

import argparse
import json
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_finetune(args) -> dict:
    run_dir = Path(args.runs_dir) / args.tag
    metrics_file = run_dir / "metrics.json"
    if metrics_file.is_file() and not args.force:
        print(f"[reuse] {run_dir}", flush=True)
        return {**json.loads(metrics_file.read_text()), "wall_s": None}
    cmd = [
        sys.executable, str(ROOT / "train.py"), "stage=finetune", f"init_from={args.init}", f"seed={args.seed}",
        f"trainer.max_steps={args.steps}", f"trainer.val_check_interval={args.steps}", "trainer.limit_val_batches=20",
        "logger=csv", f"paths.log_dir={args.log_dir}", f"hydra.run.dir={run_dir}", "~callbacks.progress_bar",
        "trainer.enable_progress_bar=false", "sample.max_new_tokens=0",
        f"stage.module.evaluation.per_control={args.per_control}",
        f"stage.module.evaluation.guidance_scale={args.guidance_scale}",
        f"stage.module.evaluation.max_examples={args.max_examples}", *args.extra,
    ]
    print("$", " ".join(cmd[1:]), flush=True)
    start = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT)
    return {**json.loads(metrics_file.read_text()), "wall_s": round(time.time() - start)}


def table(m: dict) -> str:
    rows = ["| measure | value | baseline |", "|---|---|---|"]
    for task in sorted({k.split("/")[1] for k in m if k.startswith("control/")}):
        c = lambda name: m.get(f"control/{task}/{name}", float("nan"))  # noqa: E731
        rows += [
            f"| {task}: adherence with control ({int(c('values'))} values) | {c('adherence_with'):.1%} | chance {c('chance'):.1%} |",
            f"| {task}: adherence without control | {c('adherence_without'):.1%} | chance {c('chance'):.1%} |",
            f"| {task}: adherence with a wrong control (requested value) | {c('adherence_wrong'):.1%} | follows the wrong one {c('follows_wrong'):.1%} |",
            f"| {task}: adherence with guidance (scale {c('guidance_scale'):g}) | {c('adherence_guided'):.1%} | |",
            f"| {task}: classifier accuracy on held-out text | {c('classifier_accuracy'):.1%} | |",
        ]
    for key in sorted(k for k in m if k.startswith("test/")):
        _, task, name = key.split("/")
        if name in ("accuracy", "bleu", "chrf", "exact_match", "f1", "ppl", "f1_macro"):
            base = {"accuracy": m.get(f"test/{task}/majority_accuracy"), "bleu": m.get(f"test/{task}/copy_bleu"),
                    "chrf": m.get(f"test/{task}/copy_chrf")}.get(name)
            label = {"accuracy": "majority", "bleu": "copy", "chrf": "copy"}.get(name, "")
            pct = name in ("accuracy", "f1_macro")
            value = f"{m[key]:.1%}" if pct else f"{m[key]:.2f}"
            base_s = "" if base is None else (f"{label} {base:.1%}" if pct else f"{label} {base:.2f}")
            rows.append(f"| {task}: {name} | {value} | {base_s} |")
    if "val/loss" in m:
        rows.append(f"| validation loss (output tokens) | {m['val/loss']:.3f} | |")
    return "\n".join(rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--init", default="/work/benchlogs/latest/pretrain/model", help="the model to fine-tune")
    p.add_argument("--init-ckpt", default=None, help="export this pretrain checkpoint to --init first")
    p.add_argument("--tokenizer", default=None, help="with --init-ckpt: a folder holding the tokenizer")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--per-control", type=int, default=24)
    p.add_argument("--guidance-scale", type=float, default=2.0)
    p.add_argument("--max-examples", type=int, default=200)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--log-dir", default="/work/benchlogs")
    p.add_argument("--runs-dir", default="/work/benchlogs/finetune-bench")
    p.add_argument("--tag", default="demo")
    p.add_argument("--force", action="store_true")
    p.add_argument("extra", nargs="*", help="more train.py overrides")
    args = p.parse_args()
    if args.init_ckpt:
        sys.path.insert(0, str(Path(__file__).parent))
        from distill import export_checkpoint

        export_checkpoint(Path(args.init_ckpt), Path(args.tokenizer), Path(args.init))
    metrics = run_finetune(args)
    print(table(metrics))
    out = ROOT / "bench" / "results" / f"finetune-{datetime.now():%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "metrics": metrics}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
