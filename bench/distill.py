"""Does distillation pay? The same student architecture trained from scratch vs distilled from a teacher.

    .venv/bin/python bench/distill.py --teacher /work/benchlogs/latest/pretrain/model --student nano \
        --steps 400 --variants "forward_kl:2.0:0.5"

Both students are trained by `train.py` (the real config and pipeline) on the same data (the `data`
group, default demo), for the same number of steps, with the same seed (so the same batches in the
same order), the same optimizer and schedule, and validated on the same validation split:

  scratch   python train.py stage=pretrain model=<student> ...
  distill   python train.py stage=distill  model=<student> teacher=<teacher> stage.module.kind=... ...

A variant is `kind:temperature:kd_ratio`; each is one distill run. The teacher's perplexity is the
one the distill run measures on the same validation batches (`teacher/val_ppl`). Reported: the
validation perplexity of teacher, scratch and distilled students, and the fraction of the
scratch-to-teacher gap that distillation closes, in perplexity and in loss (nats/token):

    closed = (scratch - distilled) / (scratch - teacher)

Runs go to <runs-dir>/<tag>-scratch and <runs-dir>/<tag>-<variant>; a finished run (metrics.json
present) is reused unless --force. Their `logs/latest/*` links go to --log-dir, never next to the
teacher's, so the teacher's `latest/pretrain` link is left alone. A JSON record goes to bench/results/.
"""

import argparse
import json
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def train(name: str, overrides: list[str], args) -> dict:
    run_dir = Path(args.runs_dir) / name
    metrics_file = run_dir / "metrics.json"
    if metrics_file.is_file() and not args.force:
        print(f"[reuse] {run_dir}", flush=True)
        return {**json.loads(metrics_file.read_text()), "run_dir": str(run_dir), "wall_s": None}
    common = [
        f"model={args.student}", f"seed={args.seed}", f"trainer.max_steps={args.steps}",
        f"trainer.val_check_interval={args.steps}", "logger=csv", f"paths.log_dir={args.log_dir}",
        f"hydra.run.dir={run_dir}", "~callbacks.progress_bar", "trainer.enable_progress_bar=false", "sample.max_new_tokens=0",
        *args.extra,
    ]
    cmd = [sys.executable, str(ROOT / "train.py"), *overrides, *common]
    print("$", " ".join(cmd[1:]), flush=True)
    start = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT)
    return {**json.loads(metrics_file.read_text()), "run_dir": str(run_dir), "wall_s": round(time.time() - start)}


def export_checkpoint(ckpt: Path, tokenizer_dir: Path, out: Path) -> Path:
    """A pretrain stage's Lightning checkpoint (e.g. a teacher still training) as a model folder in
    the Llama layout, with the tokenizer of `tokenizer_dir`: usable as `teacher=<out>`."""
    import torch

    from slimpajama import SlimPajamaConfig, SlimPajamaModel, SlimPajamaTokenizer

    state = torch.load(ckpt, weights_only=True, map_location="cpu")
    model = SlimPajamaModel(SlimPajamaConfig.from_dict(state["hyper_parameters"]["model"]))
    model.load_state_dict({k.removeprefix("model."): v for k, v in state["state_dict"].items()})
    model.save_pretrained(out)
    SlimPajamaTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    (out / "exported_from.json").write_text(json.dumps({"checkpoint": str(ckpt), "global_step": state["global_step"]}) + "\n")
    print(f"exported {ckpt} (step {state['global_step']}) to {out}", flush=True)
    return out


def teacher_params(folder: Path) -> int:
    import torch

    from slimpajama import SlimPajamaModel
    from slimpajama.pretrained import config_from_hf

    with torch.device("meta"):
        return SlimPajamaModel(config_from_hf(json.loads((folder / "config.json").read_text()))).num_params()


def closed(scratch: float, distilled: float, teacher: float) -> float:
    return (scratch - distilled) / (scratch - teacher)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="/work/benchlogs/latest/pretrain/model")
    p.add_argument("--teacher-ckpt", default=None, help="instead of --teacher: a pretrain checkpoint, exported to "
                   "<runs-dir>/teacher-<name of its run>-step<N> with the tokenizer of --tokenizer")
    p.add_argument("--tokenizer", default=None, help="a tokenizer folder for --teacher-ckpt (the data's)")
    p.add_argument("--student", default="nano", help="a `model` group option: the student's architecture")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--variants", nargs="+", default=["forward_kl:2.0:0.5"], help="kind:temperature:kd_ratio")
    p.add_argument("--runs-dir", default="/work/benchlogs/distill")
    p.add_argument("--log-dir", default="/work/benchlogs/distill-bench")
    p.add_argument("--tag", default=None, help="run-name prefix (default: <student>-<steps>-s<seed>)")
    p.add_argument("--scratch-only", action="store_true", help="train only the scratch baseline")
    p.add_argument("--no-scratch", action="store_true", help="train only the distill runs; the scratch run "
                   "(from --scratch-only in another process) is read when they finish")
    p.add_argument("--force", action="store_true", help="retrain runs that already finished")
    p.add_argument("extra", nargs="*", help="more Hydra overrides for every run, e.g. data.batch_size=8")
    args = p.parse_args()
    tag = args.tag or f"{args.student}-{args.steps}-s{args.seed}"

    if args.no_scratch:  # the baseline trains in another process (bench/distill.py --scratch-only): read it after
        scratch = None
    else:
        scratch = train(f"{tag}-scratch", ["stage=pretrain"], args)
    if args.scratch_only:
        print(json.dumps({k: scratch[k] for k in ("val/loss", "val/ppl")}))
        return
    teacher = Path(args.teacher).resolve()
    if args.teacher_ckpt:
        import torch

        ckpt = Path(args.teacher_ckpt)
        step = torch.load(ckpt, weights_only=True, map_location="cpu")["global_step"]
        teacher = Path(args.runs_dir) / f"teacher-{ckpt.parents[1].name}-step{step}"
        if not (teacher / "config.json").is_file():
            export_checkpoint(ckpt, Path(args.tokenizer), teacher)
    rows = []
    for variant in args.variants:
        kind, temperature, kd_ratio = variant.split(":")
        overrides = ["stage=distill", f"teacher={teacher}", f"stage.module.kind={kind}",
                     f"stage.module.temperature={temperature}", f"stage.module.kd_ratio={kd_ratio}"]
        name = f"{tag}-{kind}-T{temperature}-r{kd_ratio}"
        rows.append((variant, train(name, overrides, args)))

    if scratch is None:
        metrics_file = Path(args.runs_dir) / f"{tag}-scratch" / "metrics.json"
        if not metrics_file.is_file():
            sys.exit(f"{metrics_file} missing: run with --scratch-only (same --steps, --seed, --student) first")
        scratch = {**json.loads(metrics_file.read_text()), "run_dir": str(metrics_file.parent), "wall_s": None}
    t_ppl, t_loss = rows[0][1]["teacher/val_ppl"], rows[0][1]["teacher/val_loss"]
    s_ppl, s_loss = scratch["val/ppl"], scratch["val/loss"]
    lines = [
        f"teacher {teacher} | student `model={args.student}` | {args.steps} steps, seed {args.seed}",
        "",
        "| model | params | val loss | val ppl | gap closed (ppl) | gap closed (loss) | wall |",
        "|---|---|---|---|---|---|---|",
        f"| teacher | {teacher_params(teacher) / 1e6:.2f}M | {t_loss:.4f} | {t_ppl:.1f} | | | |",
        f"| scratch student | {scratch['model/params'] / 1e6:.2f}M | {s_loss:.4f} | {s_ppl:.1f} | 0% | 0% | "
        f"{scratch['wall_s'] or '-'} s |",
    ]
    for variant, m in rows:
        lines.append(
            f"| distilled `{variant}` | {m['model/params'] / 1e6:.2f}M | {m['val/loss']:.4f} | {m['val/ppl']:.1f} | "
            f"{closed(s_ppl, m['val/ppl'], t_ppl):.0%} | {closed(s_loss, m['val/loss'], t_loss):.0%} | {m['wall_s'] or '-'} s |"
        )
    print("\n".join(lines))
    record = {
        "time": datetime.now().isoformat(timespec="seconds"), "teacher": str(teacher), "student": args.student,
        "steps": args.steps, "seed": args.seed, "extra": args.extra,
        "teacher_val": {"loss": t_loss, "ppl": t_ppl},
        "scratch": {k: scratch[k] for k in ("val/loss", "val/ppl", "model/params", "run_dir", "wall_s")},
        "distilled": {v: {**{k: m[k] for k in ("val/loss", "val/ppl", "run_dir", "wall_s")},
                          "gap_closed_ppl": closed(s_ppl, m["val/ppl"], t_ppl),
                          "gap_closed_loss": closed(s_loss, m["val/loss"], t_loss)} for v, m in rows},
    }
    out = ROOT / "bench" / "results" / f"distill-{datetime.now():%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
