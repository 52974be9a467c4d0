"""The kernel behind a decoding step: `F.linear` (MKL's gemm) vs our row blocks, per weight shape.

    .venv/bin/python bench/matvec.py --models micro small --rows 1 8

Decoding at batch B multiplies B rows by every weight of the model once per token, so its speed is
the rate the kernel reads weights at. For each distinct linear-layer shape of each model
(conf/model/<name>.yaml, vocabulary 8192), the script times four kernels on one input of `rows`
rows against enough distinct copies of the weight to fill 128 MB, so that every weight comes from
memory as it does in decoding (a single weight would sit in the cache):
- `F.linear`, MKL's gemm, which transformers uses;
- `slimpajama.model.row_block_linear` over the transposed view of the weight's row blocks
  (`row_blocks`): one `bmm`, a block of output rows per thread;
- the same over a contiguous copy of those blocks, which `Linear.prepare_decoding` keeps for a wide
  weight (more outputs per block than inputs) and one-row products read;
- oneDNN's inner product (`torch.ops.mkldnn._linear_pointwise`, what inductor emits for a CPU
  linear), for reference.
It reports GB/s of weight read, the ratios of the row-block kernels to F.linear, and which kernel
`Linear` picks for that shape and row count. Kernels take turns round by round, best of 7 rounds.
All four give the same products to float32 rounding (checked).
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

from slimpajama.model import Linear, Transformer, row_block_linear, row_blocks  # noqa: E402


def onednn(x, weight):
    return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")


ROUNDS = 7


def blocked(x, weight_and_blocks):
    weight, blocks = weight_and_blocks
    return row_block_linear(x, weight, blocks=blocks)


def seconds_per_product(kernels: dict, x) -> dict:
    """The best time of one product for each kernel, given as name: (fn, its operand for each weight
    of the pool), the kernels taking turns round by round."""
    best = dict.fromkeys(kernels, float("inf"))
    for fn, operands in kernels.values():
        fn(x, operands[0])
    for _ in range(ROUNDS):
        for name, (fn, operands) in kernels.items():
            t = time.perf_counter()
            for w in operands:
                fn(x, w)
            best[name] = min(best[name], (time.perf_counter() - t) / len(operands))
    return best


def picked(weight: torch.Tensor, x: torch.Tensor) -> str:
    """The kernel `Linear` runs for x with this weight during decoding (after `setup_kv_cache`)."""
    linear = Linear(weight.size(1), weight.size(0), bias=False)
    linear.weight = torch.nn.Parameter(weight, requires_grad=False)
    linear.prepare_decoding()
    if not linear.decodes(x) or linear.decode_blocks is None:
        return "F.linear"
    one_row = x.numel() == x.size(-1)
    return "blocks, copy" if one_row and linear.decode_blocks.is_contiguous() else "blocks, view"


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
    print("| model | layer | weight (out x in) | MB | rows | F.linear GB/s | blocks, view GB/s "
          "| blocks, copy GB/s | oneDNN GB/s | view / F.linear | copy / F.linear | Linear uses |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    n = torch.get_num_threads()
    with torch.inference_mode():
        for name in args.models:
            for (out, inp), layer in shapes(name, args.vocab_size).items():
                mb = out * inp * 4 / 1e6
                weights = [torch.randn(out, inp) * 0.02 for _ in range(max(4, int(args.pool_mb / mb)))]
                views = [row_blocks(w, n) for w in weights]
                if views[0] is None:
                    skipped = f"{n} blocks do not divide {out} rows"
                    print(f"| {name} | {layer} | {out} x {inp} | {mb:.1f} | - | {skipped} |")
                    continue
                kernels = {
                    "F.linear": (F.linear, weights),
                    "view": (blocked, list(zip(weights, views))),
                    "copy": (blocked, [(w, v.contiguous()) for w, v in zip(weights, views)]),
                    "oneDNN": (onednn, weights),
                }
                for rows in args.rows:
                    x = torch.randn(1, rows, inp)
                    expected = F.linear(x, weights[0])
                    for fn, operands in kernels.values():
                        torch.testing.assert_close(fn(x, operands[0]), expected, rtol=1e-4, atol=1e-5)
                    rate = {k: mb / 1e3 / s for k, s in seconds_per_product(kernels, x).items()}
                    mkl = rate["F.linear"]
                    print(f"| {name} | {layer} | {out} x {inp} | {mb:.1f} | {rows} | {mkl:.1f} "
                          f"| {rate['view']:.1f} | {rate['copy']:.1f} | {rate['oneDNN']:.1f} "
                          f"| {rate['view'] / mkl:.2f}x | {rate['copy'] / mkl:.2f}x "
                          f"| {picked(weights[0], x)} |", flush=True)


if __name__ == "__main__":
    main()
