"""The kernel behind a decoding step: `F.linear` (MKL's gemm) vs our row blocks, per weight shape.

    .venv/bin/python bench/matvec.py --models micro small --rows 1 8

Decoding at batch B multiplies B rows by every weight of the model once per token, so its speed is
the rate the kernel reads weights at. For each distinct linear-layer shape of each model
(conf/model/<name>.yaml, vocabulary 8192), the script times three kernels on one input of `rows`
rows against enough distinct copies of the weight to fill 128 MB, so that every weight comes from
memory as it does in decoding (a single weight would sit in the cache):
- `F.linear`, MKL's gemm, which transformers uses;
- `slimpajama.model.row_block_linear`, one `bmm` over a block of output rows per thread, which
  `Linear` uses for at most `Linear.max_rows` rows;
- oneDNN's inner product (`torch.ops.mkldnn._linear_pointwise`, what inductor emits for a CPU
  linear), for reference.
It reports GB/s of weight read and the row-block / F.linear speed ratio. Alternating kernels, best
of 7 rounds. All three give the same products to float32 rounding (checked).
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

from slimpajama.model import Linear, Transformer, row_block_linear  # noqa: E402


def onednn(x, weight):
    return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")


def seconds_per_product(fns, x, weights, rounds: int = 7) -> dict:
    """The best time of each kernel in fns for one product, the kernels taking turns round by round."""
    best = dict.fromkeys(fns, float("inf"))
    for fn in fns:
        fn(x, weights[0])
    for _ in range(rounds):
        for fn in fns:
            t = time.perf_counter()
            for w in weights:
                fn(x, w)
            best[fn] = min(best[fn], (time.perf_counter() - t) / len(weights))
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
    print("| model | layer | weight (out x in) | MB | rows | F.linear GB/s | row blocks GB/s | oneDNN GB/s "
          "| row blocks / F.linear | Linear uses |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    with torch.inference_mode():
        for name in args.models:
            for (out, inp), layer in shapes(name, args.vocab_size).items():
                mb = out * inp * 4 / 1e6
                weights = [torch.randn(out, inp) * 0.02 for _ in range(max(4, int(args.pool_mb / mb)))]
                for rows in args.rows:
                    x = torch.randn(1, rows, inp)
                    for fn in (onednn, row_block_linear):
                        torch.testing.assert_close(fn(x, weights[0]), F.linear(x, weights[0]), rtol=1e-4, atol=1e-5)
                    seconds = seconds_per_product((F.linear, row_block_linear, onednn), x, weights)
                    mkl, blocks, dnn = (mb / 1e3 / seconds[fn] for fn in (F.linear, row_block_linear, onednn))
                    linear = Linear(inp, out, bias=False)
                    linear.weight = torch.nn.Parameter(weights[0], requires_grad=False)
                    uses = "row blocks" if linear.decodes(x) else "F.linear"
                    print(f"| {name} | {layer} | {out} x {inp} | {mb:.1f} | {rows} | {mkl:.1f} | {blocks:.1f} | {dnn:.1f} "
                          f"| {blocks / mkl:.2f}x | {uses} |", flush=True)


if __name__ == "__main__":
    main()
