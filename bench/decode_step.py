"""Where a batch-1 decoding step's time goes, and what a tiny op costs once the weights have streamed past.

    .venv/bin/python bench/decode_step.py --models micro small

For each model (conf/model/<name>.yaml, vocabulary 8192, random weights, seed 0), after a 128-token
prefill the script runs greedy one-token steps (`Transformer.decode_step`: forward over one position,
head; then argmax) and reports:
- the ops dispatched per step (every aten call, views included), through decode_step's own path and
  through its fallback, `forward`; and the step time;
- the time inside each kind of linear layer, the norms and attention, per step and per call, and the
  rest (the other ops and Python), timed in place with `perf_counter` around each call;
- the step through decode_step's own path against through `forward`, and with `RMSNorm`'s pair form
  (what `setup_kv_cache` gives decoding) against `F.rms_norm`, each race taking turns round by round:
  medians and the paired ratio.
Then, for a few tiny ops at `micro`'s width, the median time of one call right after another (hot)
against one call right after a 64 MB sweep has pushed its code and data out of the caches (cold), as
happens to every op between a decoding step's weight reads.
"""

import argparse
import statistics
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from throughput import load_config  # noqa: E402

from slimpajama import model as M  # noqa: E402


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def rms_norm_decode(x, pair_weight, signs, eps):
    """`model.pair_rms_norm`'s signature, through F.rms_norm."""
    return F.rms_norm(x, pair_weight.shape[-1:], pair_weight[0], eps)


def steps(model, prompt, n, pair=True, own_path=True) -> float:
    """Milliseconds per greedy step over n steps after the prefill: `decode_step` (own_path=False: its
    fallback, lm_head(forward(...))); pair=False: norms through F.rms_norm instead of the pair form."""
    decode = M.pair_rms_norm
    if not pair:
        M.pair_rms_norm = rms_norm_decode
    try:
        with torch.inference_mode():
            model.setup_kv_cache(prompt.size(0), prompt.size(1) + n + 1)
            model._decodes = own_path
            logits = model.lm_head(model(prompt, input_pos=0, apply_head=False)[:, -1])
            start = time.perf_counter()
            for pos in range(prompt.size(1), prompt.size(1) + n):
                nxt = logits.argmax(-1, keepdim=True)
                logits = model.decode_step(nxt, pos)
            ms = (time.perf_counter() - start) / n * 1e3
            model.clear_kv_cache()
    finally:
        M.pair_rms_norm = decode
    return ms


def race(model, prompt, n, rounds, **variant) -> tuple[float, float, float]:
    """Medians of `steps` as it is and with `variant`, taking turns round by round, and the paired ratio."""
    times = {True: [], False: []}
    for r in range(rounds):
        for as_is in (True, False) if r % 2 == 0 else (False, True):
            times[as_is].append(steps(model, prompt, n, **({} if as_is else variant)))
    paired = statistics.median(a / b for a, b in zip(times[True], times[False]))
    return statistics.median(times[True]), statistics.median(times[False]), paired


def timed_parts(model, prompt, n) -> tuple[dict, dict, float]:
    """Seconds and calls per part over n steps, timed around each call; and the step time."""
    seconds, calls = defaultdict(float), Counter()
    linears = ((name, m) for name, m in model.named_modules() if isinstance(m, M.Linear))
    names = {id(m.weight): name.split(".")[-1] for name, m in linears}

    def timed(label, fn):
        def call(*args, **kwargs):
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            seconds[label(args)] += time.perf_counter() - t
            calls[label(args)] += 1
            return out
        return call

    linear, norm, sdpa = M.decode_linear, M.pair_rms_norm, M.F.scaled_dot_product_attention
    M.decode_linear = timed(lambda a: names[id(a[1])], linear)
    M.pair_rms_norm = timed(lambda a: "norms", norm)
    M.F.scaled_dot_product_attention = timed(lambda a: "attention (sdpa)", sdpa)
    try:
        steps(model, prompt, 10)  # warm-up
        seconds.clear()
        calls.clear()
        ms = steps(model, prompt, n)
    finally:
        M.decode_linear, M.pair_rms_norm, M.F.scaled_dot_product_attention = linear, norm, sdpa
    return seconds, calls, ms


def hot_and_cold(reps: int = 300) -> list[tuple[str, float, float]]:
    d = 256
    x, w = torch.randn(1, 1, d), torch.randn(d)
    pair_w, signs = torch.stack([w, w]), torch.tensor([[1.0], [-1.0]])
    weight, sweep = torch.randn(d, d), torch.ones(64 * 2**20 // 4)
    ops = {
        "x + x": lambda: x + x,
        "F.rms_norm": lambda: F.rms_norm(x, (d,), w, 1e-5),
        "pair form (mul, layer_norm)": lambda: F.layer_norm(x.unsqueeze(-2) * signs, (2, d), pair_w, None,
                                                            1e-5),
        "F.linear 256 x 256": lambda: F.linear(x, weight),
    }
    rows = []
    with torch.inference_mode():
        for name, fn in ops.items():
            hot, cold = [], []
            for _ in range(reps):
                fn()
                t = time.perf_counter()
                fn()
                hot.append(time.perf_counter() - t)
                sweep.sum()
                t = time.perf_counter()
                fn()
                cold.append(time.perf_counter() - t)
            rows.append((name, statistics.median(hot) * 1e6, statistics.median(cold) * 1e6))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["micro", "small"])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--rounds", type=int, default=11, help="rounds of the pair-form vs F.rms_norm race")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name in args.models:
        torch.manual_seed(0)
        model = M.Transformer(load_config(name, 8192, 512)).eval()
        prompt = torch.randint(0, 8192, (1, 128))
        with torch.inference_mode():
            model.setup_kv_cache(1, 130)
            model(prompt, input_pos=0, apply_head=False)
            with CountOps() as counter:
                model.decode_step(prompt[:, :1], 128).argmax(-1)
            model._decodes = False
            with CountOps() as through_forward:
                model.decode_step(prompt[:, :1], 128).argmax(-1)
            model.clear_kv_cache()
        seconds, calls, ms = timed_parts(model, prompt, args.steps)
        print(f"\n{name}: {counter.n} ops per step ({through_forward.n} through forward), "
              f"{ms:.2f} ms per step (parts timed in place)\n")
        print("| part | µs per step | calls per step | µs per call |\n|---|---|---|---|")
        for part in sorted(seconds, key=seconds.get, reverse=True):
            per_step, per_call = seconds[part] / args.steps * 1e6, seconds[part] / calls[part] * 1e6
            print(f"| {part} | {per_step:.0f} | {calls[part] // args.steps} | {per_call:.1f} |")
        rest = ms * 1e3 - sum(seconds.values()) / args.steps * 1e6
        print(f"| rest (other ops, Python) | {rest:.0f} | | |")
        own, through_forward, paired = race(model, prompt, args.steps, args.rounds, own_path=False)
        print(f"\nstep through decode_step's own path {own:.2f} ms, through forward "
              f"{through_forward:.2f} ms: {paired:.3f} paired ({args.rounds} rounds)")
        pair, rms_norm, paired = race(model, prompt, args.steps, args.rounds, pair=False)
        print(f"step with the pair form {pair:.2f} ms, with F.rms_norm {rms_norm:.2f} ms: "
              f"{paired:.3f} paired")
    print("\n| op (width 256) | hot µs | after a 64 MB sweep µs |\n|---|---|---|")
    for op, hot, cold in hot_and_cold():
        print(f"| {op} | {hot:.1f} | {cold:.1f} |")


if __name__ == "__main__":
    main()
