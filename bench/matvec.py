"""The kernel behind a decoding step: MKL's gemm (`F.linear`) vs oneDNN's inner product, per weight shape.

    .venv/bin/python bench/matvec.py --models micro small --rows 1 8

Decoding at batch B multiplies B rows by every weight of the model once per token, so its speed is
the rate the kernel reads weights at. For each distinct linear-layer shape of each model
(conf/model/<name>.yaml, vocabulary 8192), the script times both kernels on one input of `rows`
rows against enough distinct copies of the weight to fill 128 MB, so that every weight comes from
memory as it does in decoding (a single weight would sit in the cache). It reports GB/s of weight
read, the oneDNN/MKL speed ratio, and which kernel `slimpajama.model.Linear` picks for that shape.
Alternating kernels, best of 7 rounds. Both give the same products to float32 rounding (checked).
"""

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from throughput import load_config  # noqa: E402

from slimpajama.model import Linear, Transformer  # noqa: E402
from slimpajama.model import onednn_inner_product as onednn  # noqa: E402


def seconds_per_product(fn, x, weights, rounds: int = 7) -> float:
    fn(x, weights[0])
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        for w in weights:
            fn(x, w)
        best = min(best, (time.perf_counter() - t) / len(weights))
    return best


def shapes(name: str, vocab_size: int) -> dict:
    with torch.device("meta"):
        model = Transformer(load_config(name, vocab_size, 256))
    found = {}
    for layer, module in model.named_modules():
        if isinstance(module, Linear):
            found.setdefault(tuple(module.weight.shape), layer.split(".")[-1])
    return found


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["micro", "small"])
    p.add_argument("--rows", nargs="+", type=int, default=[1, 8])
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--pool-mb", type=float, default=128.0, help="MB of distinct weights per shape (beyond the caches)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}")
    print("| model | layer | weight (out x in) | MB | rows | MKL GB/s | oneDNN GB/s | oneDNN / MKL | Linear picks |")
    print("|---|---|---|---|---|---|---|---|---|")
    with torch.inference_mode():
        for name in args.models:
            for (out, inp), layer in shapes(name, args.vocab_size).items():
                mb = out * inp * 4 / 1e6
                weights = [torch.randn(out, inp) * 0.02 for _ in range(max(4, int(args.pool_mb / mb)))]
                for rows in args.rows:
                    x = torch.randn(1, rows, inp)
                    torch.testing.assert_close(onednn(x, weights[0]), F.linear(x, weights[0]), rtol=1e-4, atol=1e-5)
                    mkl = seconds_per_product(F.linear, x, weights)
                    dnn = seconds_per_product(onednn, x, weights)
                    linear = Linear(inp, out, bias=False)
                    linear.weight = torch.nn.Parameter(weights[0], requires_grad=False)
                    uses = linear.picks_onednn(x)
                    print(f"| {name} | {layer} | {out} x {inp} | {mb:.1f} | {rows} | {mb / 1e3 / mkl:.1f} | "
                          f"{mb / 1e3 / dnn:.1f} | {mkl / dnn:.2f}x | {'oneDNN' if uses else 'MKL'} |", flush=True)


if __name__ == "__main__":
    main()
