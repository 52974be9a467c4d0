"""Pretraining throughput on this machine: our Lightning stage vs a bare PyTorch loop vs the peer.

    .venv/bin/python bench/throughput.py --models micro small --batch 8 --seq-len 256 [--no-compile] [--compile-hf]

Three contenders train the same architecture, from IDENTICAL initial weights, on the same random
token batches, with the same AdamW settings (every keyword of conf/stage/pretrain.yaml's
optimizer: lr, betas, eps, weight decay, fused..., with decay only on >= 2-D weights via
`slimpajama.optim.param_groups`), the same gradient clipping (conf/trainer/cpu.yaml:
gradient_clip_val) and, as the Trainer sets them for the whole process, the same deterministic
algorithms (conf/trainer/cpu.yaml: deterministic; --no-deterministic turns them off):

  lightning  `LanguageModelModule` (our pretraining stage) driven by a real `lightning.Trainer`
             (cpu, 32-true, no logger, no checkpointing, no progress bar, only a timing callback).
  bare       `SlimPajamaModel` in a plain loop: zero_grad, forward, `linear_cross_entropy` (the
             stage's chunked head + loss), backward,
             clip_grad_norm_, AdamW step.
  hf         `transformers.LlamaForCausalLM` built from `config_to_hf(config)` with
             attn_implementation="sdpa" and our weights loaded through `state_dict_to_hf`; the loss
             comes from its own `labels=` path (labels = input_ids, shifted inside the model, so it
             averages over T-1 targets per row instead of T: a negligible difference in work);
             use_cache=False, as in training.

No learning-rate schedule for any of them (constant lr): the schedule is a scalar per step and
would only blur the comparison.

Interleaving: the Trainer drives the run. A timing callback records the wall time of each
Lightning step (from the end of the previous step's callback to the end of this one, so
everything Lightning does per step is inside: batch fetch, hooks, logging, closure, clipping,
optimizer) and then, between two Lightning steps, runs one step of `bare` and one of `hf`
(alternating their order every round). So the rounds go L,B,H,L,H,B,... and machine noise hits
all three alike. The first `--warmup` steps of each are dropped; the rest are summarised by their
median. Ratios are ratios of medians; the paired ratio (median over rounds of the per-round
ratio) is printed next to them as a noise check.

The machine may be shared: for every step the script records the share of the CPUs that OTHER
processes used meanwhile (from /proc/stat) and the minor page faults of our process. Before each
model it waits (up to --wait-quiet seconds) for the CPUs to be free; rounds where another
process took >= --quiet-threshold of the CPUs are dropped when enough quiet rounds remain (the
table says how many rounds were used), and a warning is printed when even those were busy.

MFU = tokens/s * model.flops_per_token(seq_len) / peak, with the same FLOPs formula for all three
(6 N + 12 L d T, embedding lookups excluded) and the peak measured in this run with
`slimpajama.callbacks.measure_peak_flops` (a 2048^3 fp32 matmul; several measurements, the highest
is used, so MFU is not flattered by one slow measurement).
"""

import argparse
import functools
import json
import logging
import os
import platform
import statistics
import sys
import time
import warnings
from datetime import datetime
from pathlib import Path
from typing import Union

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # runs from a checkout without `pip install -e .` too

from slimpajama.callbacks import measure_peak_flops
from slimpajama.losses import linear_cross_entropy
from slimpajama.model import SlimPajamaConfig
from slimpajama.optim import param_groups
from slimpajama.pretrained import SlimPajamaModel, config_to_hf, state_dict_to_hf

DEFAULT_STEPS = {"micro": 24, "small": 8}  # timed steps per contender when --steps is not given
DEFAULT_WARMUP = {"micro": 3, "small": 2}
CONTENDERS = ("lightning", "bare", "hf")


def load_config(name: str, vocab_size: int, seq_len: int) -> SlimPajamaConfig:
    """conf/model/<name>.yaml with the data-dependent keys filled in."""
    from omegaconf import OmegaConf

    node = OmegaConf.create({"data": {"vocab_size": vocab_size, "seq_len": seq_len},
                             "model": OmegaConf.load(ROOT / "conf" / "model" / f"{name}.yaml")})
    d = OmegaConf.to_container(node.model, resolve=True)
    d.pop("_target_", None)
    return SlimPajamaConfig(**d)


def training_settings() -> tuple[dict, float, Union[bool, str]]:
    """AdamW keyword arguments, the clipping value and the `deterministic` flag our training config uses."""
    from omegaconf import OmegaConf

    opt = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "stage" / "pretrain.yaml").module.optimizer)
    if opt.pop("_target_", "torch.optim.AdamW") != "torch.optim.AdamW":
        raise ValueError("conf/stage/pretrain.yaml: this benchmark expects torch.optim.AdamW")
    opt.pop("_partial_", None)
    opt["betas"] = tuple(opt["betas"])
    trainer = OmegaConf.load(ROOT / "conf" / "trainer" / "cpu.yaml")
    # every AdamW keyword of the config (lr, betas, eps, fused...)
    return opt, float(trainer.gradient_clip_val), trainer.deterministic  # true, false or "warn"


class BareContender:
    """Our model in a plain PyTorch loop."""

    def __init__(self, config, state_dict, adamw, clip, compile=False):
        self.model = SlimPajamaModel(config)
        self.model.load_state_dict(state_dict)
        self.model.train()
        self.forward = torch.compile(self.model.forward) if compile else self.model  # as the stage's compile=true
        self.opt = torch.optim.AdamW(param_groups(self.model, adamw["weight_decay"]), **adamw)
        self.clip = clip

    def step(self, batch: torch.Tensor) -> float:
        batch = batch.long()
        x, y = batch[:, :-1], batch[:, 1:]
        self.opt.zero_grad(set_to_none=True)
        # the same loss path as our stage (stages/lm.py): head + cross-entropy in chunks
        loss = linear_cross_entropy(self.forward(x, apply_head=False), self.model.lm_head.weight, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        return loss.item()


class HFContender:
    """transformers.LlamaForCausalLM with our weights."""

    def __init__(self, config, state_dict, adamw, clip, compile=False):
        from transformers import LlamaConfig, LlamaForCausalLM

        hf_config = LlamaConfig(**config_to_hf(config), attn_implementation="sdpa")
        self.model = LlamaForCausalLM(hf_config)
        self.model.load_state_dict(state_dict_to_hf(state_dict, config), strict=True)
        self.model.train()
        self.attn_implementation = self.model.config._attn_implementation
        self.forward = torch.compile(self.model) if compile else self.model  # as transformers' Trainer(torch_compile=True)
        self.opt = torch.optim.AdamW(param_groups(self.model, adamw["weight_decay"]), **adamw)
        self.clip = clip

    def step(self, batch: torch.Tensor) -> float:
        x = batch.long()[:, :-1]
        self.opt.zero_grad(set_to_none=True)
        loss = self.forward(input_ids=x, labels=x, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        return loss.item()


def _busy_cpu_s() -> float:
    """CPU seconds (all cores, all processes) spent busy since boot, from /proc/stat; 0 where absent."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
    except OSError:
        return 0.0
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait


def _minor_faults() -> int:
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    except (ImportError, OSError):
        return 0


class Clock:
    """Wall time plus the share of the machine's CPUs that OTHER processes used meanwhile.

    The machine is shared: when another process keeps a core busy, every OpenMP parallel region
    of ours waits for its descheduled thread and steps slow down several-fold. `foreign` makes
    that visible per measured step (0 = nobody else ran, 1 = all cores busy with others)."""

    def __init__(self):
        self.ncpu = os.cpu_count() or 1
        self.start()

    def start(self):
        self.w, self.p, self.b, self.f = time.perf_counter(), time.process_time(), _busy_cpu_s(), _minor_faults()

    def stop(self) -> tuple[float, float]:
        w, p, b = time.perf_counter(), time.process_time(), _busy_cpu_s()
        self.faults = _minor_faults() - self.f  # fresh pages the allocator got from the kernel meanwhile
        dt = w - self.w
        foreign = max(0.0, (b - self.b) - (p - self.p)) / (dt * self.ncpu) if dt > 0 and b else float("nan")
        return dt, min(foreign, 1.0)


def timed(fn, *args):
    clock = Clock()
    out = fn(*args)
    dt, foreign = clock.stop()
    return dt, foreign, clock.faults, out


def tune_malloc() -> bool:
    """glibc: keep freed memory in the heap (no trimming back to the OS) and serve blocks up to 32 MiB
    from it, so a step's activations reuse pages instead of faulting fresh zeroed ones from the
    kernel. Same effect as GLIBC_TUNABLES=glibc.malloc.trim_threshold=...:glibc.malloc.mmap_threshold=..."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        return bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1) and libc.mallopt(M_MMAP_THRESHOLD, 32 * 2**20))
    except (OSError, AttributeError):
        return False


def wait_quiet(max_wait_s: float, threshold: float = 0.1, window_s: float = 1.0, need: int = 3) -> float:
    """Wait (at most max_wait_s) until other processes use < threshold of the CPUs for `need`
    consecutive windows; returns the seconds waited."""
    t0, quiet = time.perf_counter(), 0
    while time.perf_counter() - t0 < max_wait_s and quiet < need:
        clock = Clock()
        time.sleep(window_s)
        quiet = quiet + 1 if clock.stop()[1] < threshold else 0
    return time.perf_counter() - t0


def bench_model(name: str, args, adamw: dict, clip: float, peaks: list) -> dict:
    import lightning as L
    from torch.utils.data import DataLoader

    from slimpajama.stages.lm import LanguageModelModule

    steps = args.steps if args.steps is not None else DEFAULT_STEPS.get(name, 8)
    warmup = args.warmup if args.warmup is not None else DEFAULT_WARMUP.get(name, 2)
    total = warmup + steps
    config = load_config(name, args.vocab_size, args.seq_len)

    torch.manual_seed(args.seed)
    module = LanguageModelModule(config, optimizer=functools.partial(torch.optim.AdamW, **adamw), scheduler=None,
                                 compile=args.compile)
    init = {k: v.detach().clone() for k, v in module.model.state_dict().items()}
    others = {"bare": BareContender(config, init, adamw, clip, compile=args.compile),
              "hf": HFContender(config, init, adamw, clip, compile=args.compile_hf)}
    del init

    # identical weights -> identical logits (a cheap check that the peer computes the same model)
    gen = torch.Generator().manual_seed(args.seed)
    batches = [torch.randint(0, config.vocab_size, (args.batch, args.seq_len + 1), generator=gen) for _ in range(total)]
    with torch.no_grad():
        x = batches[0][:2, :-1]
        ref = module.model(x)
        max_diff = {"bare": (others["bare"].model(x) - ref).abs().max().item(),
                    "hf": (others["hf"].model(input_ids=x, use_cache=False).logits - ref).abs().max().item()}
        del ref

    times = {c: [] for c in CONTENDERS}
    foreign = {c: [] for c in CONTENDERS}
    faults = {c: [] for c in CONTENDERS}
    losses = {c: [] for c in CONTENDERS}

    def run_others(i: int):
        order = ("bare", "hf") if i % 2 == 0 else ("hf", "bare")
        for c in order:
            dt, fg, nf, loss = timed(others[c].step, batches[i])
            times[c].append(dt)
            foreign[c].append(fg)
            faults[c].append(nf)
            losses[c].append(loss)

    class StepTimer(L.Callback):
        """Per-step wall time of the Lightning loop; runs the other contenders between its steps."""

        def __init__(self):
            self.clock = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if self.clock is None:
                self.clock = Clock()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            dt, fg = self.clock.stop()
            times["lightning"].append(dt)
            foreign["lightning"].append(fg)
            faults["lightning"].append(self.clock.faults)
            losses["lightning"].append(outputs["loss"].item())
            run_others(batch_idx)
            self.clock.start()  # Lightning's work after this hook counts to its next step

    threads = torch.get_num_threads()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, precision="32-true", max_steps=total, max_epochs=1,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[StepTimer()], gradient_clip_val=clip, num_sanity_val_steps=0, limit_val_batches=0,
        log_every_n_steps=10, deterministic=args.deterministic, benchmark=False,
    )
    loader = DataLoader(batches, batch_size=None, shuffle=False)  # (B, T+1) int64 tensors, as they are
    waited = wait_quiet(args.wait_quiet) if args.wait_quiet > 0 else 0.0
    peaks.extend(measure_peak_flops(torch.device("cpu")) for _ in range(3))
    t_fit = time.perf_counter()
    trainer.fit(module, loader)
    t_fit = time.perf_counter() - t_fit
    peaks.extend(measure_peak_flops(torch.device("cpu")) for _ in range(3))
    if torch.get_num_threads() != threads:
        warnings.warn(f"thread count changed during fit: {threads} -> {torch.get_num_threads()}")

    tokens = args.batch * args.seq_len
    fpt = module.model.flops_per_token(args.seq_len)
    # rounds = (Lightning step i, bare step i, hf step i), run back to back. Where enough rounds were
    # quiet (other processes under --quiet-threshold of the CPUs during all three steps) only those
    # count: a busy neighbour slows OpenMP steps several-fold and would swamp the comparison.
    rounds = list(range(warmup, total))
    quiet = [i for i in rounds if max(foreign[c][i] for c in CONTENDERS) < args.quiet_threshold]
    used = quiet if len(quiet) >= max(3, (steps + 1) // 2) else rounds
    res = {"model": name, "params": module.model.num_params(), "non_embedding_params": module.model.num_params(True),
           "flops_per_token": fpt, "steps": steps, "warmup": warmup, "tokens_per_step": tokens,
           "rounds_used": len(used), "quiet_rounds": len(quiet), "only_quiet_rounds": used is quiet,
           "logit_max_abs_diff_vs_ours": max_diff, "hf_attn_implementation": others["hf"].attn_implementation,
           "fit_wall_s": t_fit, "waited_for_quiet_s": waited, "contenders": {}}
    for c in CONTENDERS:
        assert len(times[c]) == total, (c, len(times[c]))
        t = [times[c][i] for i in used]
        med = statistics.median(t)
        res["contenders"][c] = {
            "step_s_median": med, "step_s_min": min(t), "step_s_max": max(t), "tokens_per_s": tokens / med,
            "foreign_cpu_median": statistics.median(foreign[c][i] for i in used),
            "minor_page_faults_median": statistics.median(faults[c][i] for i in used),
            "step_s_all": times[c], "foreign_cpu_all": foreign[c], "loss_first": losses[c][0], "loss_last": losses[c][-1],
        }

    def paired(a, b):  # median over rounds of the per-round throughput ratio a/b
        return statistics.median(times[b][i] / times[a][i] for i in used)

    cs = res["contenders"]
    res["ratio_lightning_vs_hf"] = cs["lightning"]["tokens_per_s"] / cs["hf"]["tokens_per_s"]
    res["ratio_bare_vs_hf"] = cs["bare"]["tokens_per_s"] / cs["hf"]["tokens_per_s"]
    res["lightning_overhead"] = 1 - cs["lightning"]["tokens_per_s"] / cs["bare"]["tokens_per_s"]
    res["paired_ratio_lightning_vs_hf"] = paired("lightning", "hf")
    res["paired_ratio_bare_vs_hf"] = paired("bare", "hf")
    res["paired_lightning_overhead"] = 1 - paired("lightning", "bare")
    return res


def markdown(results: list, peak: float, args, adamw: dict, clip: float) -> str:
    lines = [
        f"fp32, batch {args.batch} x seq {args.seq_len} = {args.batch * args.seq_len} tokens/step, "
        f"vocab {args.vocab_size}, {torch.get_num_threads()} threads, matmul peak {peak / 1e9:.0f} GFLOP/s (measured)"
        + (", glibc malloc tuned (--mallopt)" if args.mallopt else "")
        + (", ours with torch.compile (compile=true, the default)" if args.compile else ", ours eager (compile=false)")
        + (", transformers with torch.compile" if args.compile_hf else "")
        + f"; AdamW {', '.join(f'{k}={v}' for k, v in adamw.items())}, clip {clip}"
        + f"; deterministic algorithms {'on' if args.deterministic else 'off'} (all three, Trainer deterministic="
        + f"{args.deterministic!r})",
        "",
        ("| model | params | GFLOP/token | rounds used / timed (warm-up) | Lightning tok/s | bare tok/s | HF tok/s "
         "| Lightning/HF | bare/HF | Lightning overhead | MFU Lightning | MFU bare | MFU HF |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        c = r["contenders"]
        mfu = {k: c[k]["tokens_per_s"] * r["flops_per_token"] / peak for k in CONTENDERS}
        lines.append(
            f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['flops_per_token'] / 1e9:.3f} | {r['rounds_used']}/{r['steps']} ({r['warmup']}) "
            f"| {c['lightning']['tokens_per_s']:,.0f} | {c['bare']['tokens_per_s']:,.0f} | {c['hf']['tokens_per_s']:,.0f} "
            f"| {r['ratio_lightning_vs_hf']:.2f}x | {r['ratio_bare_vs_hf']:.2f}x | {100 * r['lightning_overhead']:.1f}% "
            f"| {100 * mfu['lightning']:.0f}% | {100 * mfu['bare']:.0f}% | {100 * mfu['hf']:.0f}% |"
        )
    lines += ["", "Per-step wall time after warm-up, median [min, max], and a noise check (paired ratios: median over rounds):", ""]
    lines += [("| model | Lightning s | bare s | HF s | paired Lightning/HF | paired bare/HF | paired overhead "
               "| page faults/step L / bare / HF | other processes' CPU share |"),
              "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        c = r["contenders"]
        steps = {k: f"{c[k]['step_s_median']:.3f} [{c[k]['step_s_min']:.3f}, {c[k]['step_s_max']:.3f}]" for k in CONTENDERS}
        faults = " / ".join(f"{c[k]['minor_page_faults_median'] / 1e3:.0f}k" for k in CONTENDERS)
        lines.append(f"| {r['model']} | {steps['lightning']} | {steps['bare']} | {steps['hf']} "
                     f"| {r['paired_ratio_lightning_vs_hf']:.2f}x | {r['paired_ratio_bare_vs_hf']:.2f}x "
                     f"| {100 * r['paired_lightning_overhead']:.1f}% | {faults} "
                     f"| {100 * max(c[k]['foreign_cpu_median'] for k in CONTENDERS):.0f}% |")
    if any(c["foreign_cpu_median"] > 0.1 for r in results for c in r["contenders"].values()):
        lines += ["", ("WARNING: other processes used more than 10% of the CPUs during the timed steps; absolute "
                       "tokens/s and MFU are depressed (same-run ratios are less affected). Rerun on a quiet machine.")]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["micro", "small"], help="presets from conf/model/")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--vocab-size", type=int, default=8192, help="conf/data/demo.yaml's vocabulary")
    p.add_argument("--steps", type=int, default=None, help=f"timed steps per contender (default {DEFAULT_STEPS})")
    p.add_argument("--warmup", type=int, default=None, help=f"untimed steps per contender (default {DEFAULT_WARMUP})")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="our stage with compile=true, the stage's default (conf/train.yaml), and the bare loop's "
                        "forward compiled the same way; --no-compile: both eager")
    p.add_argument("--compile-hf", action="store_true", help="torch.compile the transformers model too")
    p.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=None,
                   help="torch's deterministic algorithms, set by the Trainer for the whole process, so for all "
                        "three (default: conf/trainer/cpu.yaml's `deterministic`, as the stage ships)")
    p.add_argument("--mallopt", action="store_true",
                   help="tune glibc malloc (no trimming, 32 MiB mmap threshold) for all contenders; off by default")
    p.add_argument("--quiet-threshold", type=float, default=0.1,
                   help="a round is quiet when other processes used less than this share of the CPUs")
    p.add_argument("--wait-quiet", type=float, default=60.0,
                   help="before each model, wait up to this many seconds for other processes to leave the CPUs")
    p.add_argument("--json", default=str(ROOT / "bench" / "results"), help="folder for a JSON record ('' for none)")
    args = p.parse_args(argv)

    if args.mallopt and not tune_malloc():
        warnings.warn("--mallopt: glibc mallopt not available here; running with the default allocator settings")
    torch.set_flush_denormal(True)  # the denormals trap (docs: /work/shared/STACK.md), for every contender
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=r".*(num_workers|does not have many workers|LeafSpec).*")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)

    adamw, clip, deterministic = training_settings()
    if args.deterministic is None:
        args.deterministic = deterministic
    peaks, results = [], []
    t0 = time.perf_counter()
    for name in args.models:
        r = bench_model(name, args, adamw, clip, peaks)
        results.append(r)
        c = r["contenders"]
        print(f"[{name}] " + ", ".join(f"{k} {c[k]['tokens_per_s']:,.0f} tok/s" for k in CONTENDERS)
              + "; losses first/last " + ", ".join(f"{k} {c[k]['loss_first']:.4f}/{c[k]['loss_last']:.4f}" for k in CONTENDERS)
              + f"; logit diff vs ours {r['logit_max_abs_diff_vs_ours']}"
              + "; minor page faults/step " + ", ".join(f"{k} {c[k]['minor_page_faults_median']:.0f}" for k in CONTENDERS),
              flush=True)
    peak = max(peaks)
    wall = time.perf_counter() - t0
    print()
    print(markdown(results, peak, args, adamw, clip))
    print(f"\nmatmul peak measurements (GFLOP/s): {', '.join(f'{p / 1e9:.0f}' for p in peaks)}; total {wall:.0f} s")

    if args.json:
        out = Path(args.json)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"throughput-{datetime.now():%Y%m%d-%H%M%S}.json"
        record = {
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
                        "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
                        "torch": torch.__version__},
            "args": vars(args), "adamw": adamw, "clip": clip, "peak_flops": peak, "peak_measurements": peaks,
            "wall_s": wall, "results": results,
        }
        try:
            import lightning
            import transformers

            record["machine"].update(lightning=lightning.__version__, transformers=transformers.__version__)
        except ImportError:
            pass
        path.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")


if __name__ == "__main__":
    main()
