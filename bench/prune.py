"""Pruning on the demo teacher: unstructured quality, and structured pruning's size and speed.

    python bench/prune.py --teacher /work/benchlogs/latest/pretrain/model --log-dir /work/benchlogs

Part 1 (the Wanda paper's table, on our teacher): 50% unstructured sparsity, no recovery; validation
perplexity of the dense model vs magnitude (per layer) vs Wanda (per output row).
Part 2 (Minitron): structured pruning to about half the parameters (`--structured` fractions), then
`--steps` of recovery by distillation from the dense model; file size, greedy generation speed
(batch 1, `--new-tokens` tokens after the same prompt, best of `--repeats`) and perplexity against the
dense teacher, and against the same small shape pretrained from scratch for the same number of steps
(the same token budget).

Every run is `python train.py ...` (the commands are printed and stored); the results go to
bench/results/prune-<time>.json and a markdown table is printed for docs/benchmarks.md.
"""

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from slimpajama import SlimPajamaModel
from slimpajama.generation import tokens_per_sec

COMMON = ["logger=csv", "callbacks=none", "trainer.enable_progress_bar=false", "sample.max_new_tokens=0"]


def train(args, name: str, overrides: list[str], log_dir: Path) -> dict:
    run_dir = Path(args.log_dir) / "prune-bench" / args.stamp / name
    cmd = [sys.executable, str(ROOT / "train.py"), *overrides, *COMMON, f"paths.log_dir={log_dir}",
           f"hydra.run.dir={run_dir}"]
    print("$", shlex.join(cmd[1:]), flush=True)
    start = time.time()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode:
        print(done.stdout[-3000:], done.stderr[-3000:], sep="\n")
        raise SystemExit(f"{name} failed (exit {done.returncode})")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics["_seconds"] = time.time() - start
    metrics["_command"] = "python " + shlex.join(cmd[1:]).replace(str(ROOT) + "/", "")
    metrics["_dir"] = str(run_dir)
    return metrics


def speed(folders: dict[str, Path], prompt: torch.Tensor, new_tokens: int, repeats: int) -> dict[str, float]:
    """tokens/s of greedy decoding for each model, measured in interleaved rounds (shared-CPU noise
    hits all models alike); the best round of each."""
    models = {k: SlimPajamaModel.from_pretrained(v) for k, v in folders.items()}
    best = {k: 0.0 for k in models}
    for _ in range(repeats):
        for k, m in models.items():
            best[k] = max(best[k], tokens_per_sec(m, prompt, new_tokens))
    return best


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="/work/benchlogs/latest/pretrain/model")
    p.add_argument("--log-dir", default="/work/benchlogs")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--eval-batches", type=int, default=50, help="validation batches (the demo has 45)")
    p.add_argument("--calibration-batches", type=int, default=16)
    p.add_argument("--structured", default="heads=0.5,channels=0.5,hidden=0.375,layers=0.0",
                   help="prune.structured fractions for part 2")
    p.add_argument("--steps", type=int, default=200, help="recovery (and from-scratch) training steps")
    p.add_argument("--lr", type=float, default=1e-3, help="recovery learning rate")
    p.add_argument("--scratch-steps", default=None, help="comma-separated step budgets of the same shape trained "
                   "from scratch (default: --steps), e.g. 200,1000 for the recovery's and teacher + recovery's tokens")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--parts", default="1,2")
    args = p.parse_args()
    args.stamp = time.strftime("%Y%m%d-%H%M%S")
    teacher = Path(args.teacher).resolve()
    log_dir = Path(args.log_dir)
    result = {"teacher": str(teacher), "args": vars(args), "runs": {}}
    base = ["stage=prune", f"stage.module.init_from={teacher}", f"prune.eval_batches={args.eval_batches}",
            f"prune.calibration_batches={args.calibration_batches}", f"trainer.limit_val_batches={args.eval_batches}"]

    if "1" in args.parts:
        for method in ("magnitude", "wanda"):
            m = train(args, f"{method}-{args.sparsity}", base + [
                f"prune.method={method}", f"prune.sparsity={args.sparsity}", "prune.recovery=none",
                "prune.generation_tokens=0"], log_dir)
            result["runs"][method] = m
        mag, wan = result["runs"]["magnitude"], result["runs"]["wanda"]
        print(f"\n| model | val ppl | achieved sparsity |\n|---|---|---|\n| dense | {mag['prune/ppl_dense']:.2f} | 0 |")
        for k, m in (("magnitude (per layer)", mag), ("Wanda (per output row)", wan)):
            print(f"| {k} | {m['val/ppl']:.2f} | {m['prune/sparsity']:.4f} |")

    if "2" in args.parts:
        fractions = [f"prune.structured.{kv}" for kv in args.structured.split(",") if kv]
        recovery = [f"trainer.max_steps={args.steps}", f"trainer.val_check_interval={args.steps}",
                    f"stage.module.optimizer.lr={args.lr}", "stage.module.scheduler.warmup_steps=10"]
        s = train(args, "structured-distill", base + [
            "prune.method=structured", f"prune.sparsity={args.sparsity}", "prune.recovery=distill",
            "prune.generation_tokens=0", *fractions, *recovery], log_dir)
        result["runs"]["structured_distill"] = s
        small = SlimPajamaModel.from_pretrained(Path(s["_dir"]) / "model").config
        shape = [f"model.n_layer={small.n_layer}", f"model.n_head={small.n_head}", f"model.n_kv_head={small.n_kv_head}",
                 f"model.d_model={small.d_model}", f"model.intermediate_size={small.intermediate_size}",
                 f"+model.head_dim={small.head_dim}"]
        scratch = {}  # the same shape pretrained from scratch, for each budget of --scratch-steps
        for n in [int(x) for x in (args.scratch_steps or str(args.steps)).split(",")]:
            scratch[n] = train(args, f"scratch-same-shape-{n}", [
                "stage=pretrain", *shape, f"trainer.max_steps={n}", f"trainer.val_check_interval={n}",
                f"trainer.limit_val_batches={args.eval_batches}"],
                log_dir / "prune-bench-scratch")  # its own log_dir: latest/pretrain stays the teacher
        result["runs"]["scratch"] = scratch
        # the same prompt for every model: the first 16 tokens of the teacher's tokenizer on a fixed text
        from slimpajama import SlimPajamaTokenizer

        tok = SlimPajamaTokenizer.from_pretrained(teacher)
        prompt = tok.encode("The Congress shall have power to lay and collect taxes", return_tensors="pt")[:, :16]
        folders = {"dense": teacher, "structured": Path(s["_dir"]) / "model"}
        tps = speed(folders, prompt, args.new_tokens, args.repeats)
        sizes = {k: (Path(v) / "model.safetensors").stat().st_size for k, v in folders.items()}
        result["speed"], result["sizes"] = tps, sizes
        print(f"\nshape {small}")
        print("\n| model | params | file MB | val ppl | greedy tokens/s (128 new, batch 1) |\n|---|---|---|---|---|")
        print(f"| dense teacher | {s['prune/params_dense'] / 1e6:.2f}M | {sizes['dense'] / 1e6:.1f} | "
              f"{s['prune/ppl_dense']:.2f} | {tps['dense']:.0f} |")
        print(f"| structured, before recovery | {s['model/params'] / 1e6:.2f}M | {sizes['structured'] / 1e6:.1f} | "
              f"{s['prune/ppl_pruned']:.2f} | |")
        print(f"| structured + {args.steps} distill steps | {s['model/params'] / 1e6:.2f}M | "
              f"{sizes['structured'] / 1e6:.1f} | {s['val/ppl']:.2f} | {tps['structured']:.0f} |")
        for n, m in scratch.items():
            print(f"| same shape from scratch, {n} steps | {m['model/params'] / 1e6:.2f}M | | {m['val/ppl']:.2f} | |")
        print(f"\nfile ratio {sizes['structured'] / sizes['dense']:.3f} (target <= 0.55), speed-up "
              f"{tps['structured'] / tps['dense']:.2f}x (target >= 1.6), ppl ratio "
              f"{s['val/ppl'] / s['prune/ppl_dense']:.3f} (target <= 1.15)")

    out = ROOT / "bench" / "results" / f"prune-{args.stamp}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
