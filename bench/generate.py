"""Decoding throughput: our `generate` vs transformers' `generate` on the identical saved folder.

    .venv/bin/python bench/generate.py --models micro small --batches 1 8 --prompt-len 128 --new-tokens 256

For each model (conf/model/<name>.yaml, vocabulary 8192, max_seq_len 512, random weights with a
fixed seed) the script saves one folder and loads it twice: `SlimPajamaModel.from_pretrained` and
`transformers.LlamaForCausalLM.from_pretrained` (sdpa attention). Both get the same random prompts
(batch x prompt-len tokens) and generate exactly --new-tokens tokens (no EOS stop), greedy and
sampled (temperature 0.8, top-k 50), taking turns rep by rep (ours, theirs, theirs, ours, ...) so
machine noise hits both alike. Reported: new tokens/s (median over reps), the ratio, the paired
ratio (median of per-rep ratios), and whether the greedy outputs are identical.

Our `generate` decodes on the kernel `generation.fastest_decode_kernel` races in its first call
(the warm-up here): row blocks or `F.linear`; the table names the pick. With --both-kernels the
same races also run ours on each kernel (`decode_kernel="blocks"` / `"gemm"`).

With --compile, the same races also run both libraries compiled, each its own way: our
`generate(compile=True)` and transformers' `cache_implementation="static"` with a `compile_config`
(the first call of each, which compiles, is the warm-up and is reported apart).

Also measured, at batch 1: our decoding without the KV cache (`use_cache=False`: the whole prefix
every step), and both libraries with bfloat16 weights.

Bandwidth share: decoding one token at batch 1 reads every weight once (the embedding table
excepted: one row), so tokens/s cannot exceed read bandwidth / weight bytes. The read bandwidth
is measured here: the fastest of three streaming reads of a 1 GiB float32 tensor (`torch.sum`, and
the two layouts of a matrix-vector product), best of 5 each (`read_bandwidths`); the table gives the
share of that limit each contender reaches.
"""

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
import warnings
from datetime import datetime
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from throughput import Clock, load_config, wait_quiet  # noqa: E402

from slimpajama.generation import fastest_decode_kernel  # noqa: E402
from slimpajama.model import DECODE_KERNELS  # noqa: E402
from slimpajama.pretrained import SlimPajamaModel  # noqa: E402

SAMPLED = {"do_sample": True, "temperature": 0.8, "top_k": 50}
GREEDY = {"do_sample": False}


def read_bandwidths(gib: float = 1.0, reps: int = 5) -> dict[str, float]:
    """Bytes/s of three streaming reads of one float32 tensor far larger than the caches, best of `reps`
    each: `torch.sum`, and the two matrix-vector products a decoding step's weight reads go through,
    a matrix times a vector (`torch.mv`, F.linear's layout) and a row vector times a matrix (the layout
    of `Linear`'s copied row blocks). Their rates differ by up to a third on one machine (the sum is
    the slowest here), and the bandwidth limit takes the fastest: a limit below what a kernel reads
    would overstate every share."""
    x = torch.ones(int(gib * 2**30) // 4)
    matrix, vector = x.view(-1, 2048), torch.ones(2048)
    row, wide = torch.ones(1, 2048), x.view(2048, -1)
    reads = {"sum": x.sum, "mv": lambda: torch.mv(matrix, vector), "vm": lambda: row @ wide}
    rates = {}
    for name, read in reads.items():
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            read()
            best = min(best, time.perf_counter() - t)
        rates[name] = x.numel() * 4 / best
    return rates


def weight_bytes_per_token(model: SlimPajamaModel) -> int:
    p = model.lm_head.weight
    n = model.num_params() - model.embed_tokens.weight.numel() * (not model.config.tie_embeddings)
    return n * p.element_size()


def ours_fn(model, ids, n, settings, use_cache=True, compile=False, kernel=None):
    return lambda: model.generate(ids, max_new_tokens=n, eos_token_id=-1, seed=0, use_cache=use_cache,
                                  compile=compile, decode_kernel=kernel, **settings)


def hf_fn(model, ids, n, settings, compile=False):
    if compile:  # transformers' own compiled decoding: a static cache and generate's compile_config
        from transformers import CompileConfig

        config = CompileConfig(mode="default")  # its default, "reduce-overhead", is CUDA graphs
        config._compile_all_devices = True  # transformers compiles on CUDA only unless told
        settings = {**settings, "cache_implementation": "static", "compile_config": config}

    def run():
        torch.manual_seed(0)
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                              pad_token_id=3, eos_token_id=None, **settings)
    return run


def race(fns: dict, reps: int, tokens: int) -> dict:
    """Alternate the contenders rep by rep; tokens/s medians, the foreign CPU share, last outputs."""
    names = list(fns)
    times = {k: [] for k in names}
    foreign, outs, first = [], {}, {}
    for name in names:  # warm-up: first calls pay for lazy initialisation (and compilation)
        t = time.perf_counter()
        fns[name]()
        first[name] = time.perf_counter() - t
    for r in range(reps):
        for name in (names if r % 2 == 0 else names[::-1]):
            clock = Clock()
            outs[name] = fns[name]()
            dt, f = clock.stop()
            times[name].append(dt)
            foreign.append(f)
    result = {k: {"tokens_per_s": tokens / statistics.median(v), "times": v, "first_call_s": first[k]} for k, v in times.items()}
    result["foreign_cpu"] = statistics.median(foreign)
    result["outputs"] = outs
    return result


def bench_model(name: str, args, bandwidth: float) -> list[dict]:
    import transformers

    transformers.logging.set_verbosity_error()
    config = load_config(name, args.vocab_size, args.prompt_len + args.new_tokens)
    torch.manual_seed(0)
    dtypes = [torch.float32] + ([torch.bfloat16] if args.bf16 else [])
    with tempfile.TemporaryDirectory(prefix=f"bench-generate-{name}-") as folder:  # removed once both have loaded it
        SlimPajamaModel(config).save_pretrained(folder)
        models = [(dtype, SlimPajamaModel.from_pretrained(folder, torch_dtype=dtype),
                   transformers.LlamaForCausalLM.from_pretrained(folder, attn_implementation="sdpa", dtype=dtype).eval())
                  for dtype in dtypes]
    rows = []
    for dtype, ours, hf in models:
        batches = args.batches if dtype == torch.float32 else [1]
        for batch in batches:
            ids = torch.randint(4, args.vocab_size, (batch, args.prompt_len), generator=torch.Generator().manual_seed(1))
            for mode, settings in (("greedy", GREEDY), ("sampled", SAMPLED)):
                if dtype != torch.float32 and mode == "sampled":
                    continue
                fns = {"ours": ours_fn(ours, ids, args.new_tokens, settings), "hf": hf_fn(hf, ids, args.new_tokens, settings)}
                if args.no_cache and batch == 1 and mode == "greedy" and dtype == torch.float32:
                    fns["ours_no_cache"] = ours_fn(ours, ids, args.new_tokens, settings, use_cache=False)
                if args.both_kernels and dtype == torch.float32:
                    for kernel in DECODE_KERNELS:
                        fns[f"ours_{kernel}"] = ours_fn(ours, ids, args.new_tokens, settings, kernel=kernel)
                if args.compile and dtype == torch.float32:
                    fns["ours_compiled"] = ours_fn(ours, ids, args.new_tokens, settings, compile=True)
                    fns["hf_compiled"] = hf_fn(hf, ids, args.new_tokens, settings, compile=True)
                wait_quiet(args.wait_quiet)
                r = race(fns, args.reps, batch * args.new_tokens)
                paired = statistics.median(h / o for o, h in zip(r["ours"]["times"], r["hf"]["times"]))
                limit = bandwidth / weight_bytes_per_token(ours)
                row = {
                    "model": name, "params": ours.num_params(), "dtype": str(dtype).removeprefix("torch."),
                    "batch": batch, "mode": mode,
                    "ours": r["ours"]["tokens_per_s"], "hf": r["hf"]["tokens_per_s"],
                    "ratio": r["ours"]["tokens_per_s"] / r["hf"]["tokens_per_s"], "paired_ratio": paired,
                    "bandwidth_limit": limit,
                    "ours_share": r["ours"]["tokens_per_s"] / batch / limit,
                    "hf_share": r["hf"]["tokens_per_s"] / batch / limit,
                    "identical": torch.equal(r["outputs"]["ours"], r["outputs"]["hf"]) if mode == "greedy" else None,
                    "foreign_cpu": r["foreign_cpu"],
                    # what the race in our first call picked (raced once per process: this reads it back)
                    "kernel": fastest_decode_kernel(ours, batch) if dtype == torch.float32 else "-",
                }
                for kernel in DECODE_KERNELS:
                    if f"ours_{kernel}" in r:
                        row[f"ours_{kernel}"] = r[f"ours_{kernel}"]["tokens_per_s"]
                if "ours_compiled" in r:
                    oc, hc = r["ours_compiled"], r["hf_compiled"]
                    row.update({
                        "ours_compiled": oc["tokens_per_s"], "hf_compiled": hc["tokens_per_s"],
                        "compiled_ratio": oc["tokens_per_s"] / hc["tokens_per_s"],
                        "compiled_paired_ratio": statistics.median(h / o for o, h in zip(oc["times"], hc["times"])),
                        "ours_compiled_share": oc["tokens_per_s"] / batch / limit,
                        "hf_compiled_share": hc["tokens_per_s"] / batch / limit,
                        "ours_compile_s": oc["first_call_s"] - r["ours"]["first_call_s"],
                        "hf_compile_s": hc["first_call_s"] - r["hf"]["first_call_s"],
                        "compiled_identical": (torch.equal(r["outputs"]["ours_compiled"], r["outputs"]["ours"])
                                               and torch.equal(r["outputs"]["hf_compiled"], r["outputs"]["hf"]))
                        if mode == "greedy" else None,
                    })
                if "ours_no_cache" in r:
                    row["ours_no_cache"] = r["ours_no_cache"]["tokens_per_s"]
                    row["cache_speedup"] = row["ours"] / row["ours_no_cache"]
                rows.append(row)
                print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    return rows


SAME = {True: "yes", False: "NO", None: "-"}


def shares(r: dict, ours: str = "ours_share", hf: str = "hf_share") -> str:
    """Both contenders' share of the bandwidth limit (batch 1 only: a batch reads each weight once for B tokens)."""
    return f"{r[ours]:.0%} / {r[hf]:.0%}" if r["batch"] == 1 else "-"


def compile_s(r: dict) -> str:
    """Seconds the compiled first call took over the eager one; only the greedy race (the first one of
    a model and batch size) compiles, the sampled race reuses its graphs."""
    return f"{r['ours_compile_s']:.0f} / {r['hf_compile_s']:.0f}" if r["mode"] == "greedy" else "-"


def markdown(rows: list[dict], reads: dict[str, float], args) -> str:
    rates = ", ".join(f"{name} {rate / 1e9:.1f}" for name, rate in reads.items())
    lines = [
        f"read bandwidth {max(reads.values()) / 1e9:.1f} GB/s (the fastest of {rates}); "
        f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, "
        f"median of {args.reps} alternating reps",
        "",
        "| model | dtype | batch | mode | our kernel | ours tok/s | transformers tok/s | ratio (paired) "
        "| share of bandwidth limit, ours / theirs | identical | others' CPU |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['model']} ({r['params'] / 1e6:.1f}M) | {r['dtype']} | {r['batch']} | {r['mode']} | {r['kernel']} | "
        f"{r['ours']:.0f} | "
        f"{r['hf']:.0f} | {r['ratio']:.2f}x ({r['paired_ratio']:.2f}x) | {shares(r)} | {SAME[r['identical']]} | "
        f"{r['foreign_cpu']:.0%} |"
        for r in rows
    ]
    compiled = [r for r in rows if "ours_compiled" in r]
    if compiled:
        lines += [
            "",
            "Both compiled: ours `generate(compile=True)`, transformers `cache_implementation=\"static\"` with a "
            "`compile_config`; compile s = first call minus the eager first call",
            "",
            "| model | batch | mode | ours tok/s | transformers tok/s | ratio (paired) | share of bandwidth limit, ours / theirs "
            "| compile s, ours / theirs | outputs = eager |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['model']} | {r['batch']} | {r['mode']} | {r['ours_compiled']:.0f} | {r['hf_compiled']:.0f} | "
            f"{r['compiled_ratio']:.2f}x ({r['compiled_paired_ratio']:.2f}x) | "
            f"{shares(r, 'ours_compiled_share', 'hf_compiled_share')} | "
            f"{compile_s(r)} | {SAME[r['compiled_identical']]} |"
            for r in compiled
        ]
    kernels = [r for r in rows if "ours_blocks" in r]
    if kernels:
        lines += ["", "Ours on each kernel (`decode_kernel=`), in the same race", "",
                  "| model | batch | mode | raced pick | pick tok/s | blocks tok/s | gemm tok/s |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['batch']} | {r['mode']} | {r['kernel']} | {r['ours']:.0f} | "
                  f"{r['ours_blocks']:.0f} | {r['ours_gemm']:.0f} |" for r in kernels]
    cached = [r for r in rows if "cache_speedup" in r]
    if cached:
        lines += ["", "| model | ours with KV cache tok/s | without (whole prefix each step) tok/s | speed-up |", "|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['ours']:.0f} | {r['ours_no_cache']:.0f} | {r['cache_speedup']:.1f}x |" for r in cached]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["micro", "small"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--no-bf16", dest="bf16", action="store_false")
    p.add_argument("--no-no-cache", dest="no_cache", action="store_false", help="skip the run without KV cache")
    p.add_argument("--both-kernels", action="store_true",
                   help="also race ours on each decoding kernel (decode_kernel='blocks' and 'gemm'), float32")
    p.add_argument("--compile", action="store_true",
                   help="also race both libraries compiled: generate(compile=True) vs transformers' static cache + compile_config")
    p.add_argument("--wait-quiet", type=float, default=30.0, help="seconds to wait for idle CPUs before each race")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    reads = read_bandwidths()
    bandwidth = max(reads.values())
    rows = []
    for name in args.models:
        rows += bench_model(name, args, bandwidth)
    table = markdown(rows, reads, args)
    print(table)
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    record = {"when": datetime.now().isoformat(timespec="seconds"), "host": platform.node(), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "args": vars(args), "bandwidth": bandwidth, "reads": reads,
              "rows": rows}
    (out / f"generate-{datetime.now():%Y%m%d-%H%M%S}.json").write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
