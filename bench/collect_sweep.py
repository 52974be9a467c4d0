"""Turn a multirun folder into a table (sweep.csv, sweep.md) and a plot (sweep.png).

    python train.py -m stage=prune prune.method=magnitude,wanda prune.sparsity=0.3,0.5,0.7 prune.recovery=none
    python bench/collect_sweep.py logs/multiruns/prune/<time>      # or: latest (the newest prune multirun)
    python bench/collect_sweep.py <folder> --x prune.sparsity --y prune/ppl_pruned --line prune.method

The files are written into the multirun folder (or --out). A key a job did not override (a default)
is read from its `.hydra/config.yaml`. When --y is a perplexity, the dense model's (`prune/ppl_dense`,
the same in every job) is drawn as a dashed reference line.
"""

import argparse
import logging
import sys
from pathlib import Path

from slimpajama.sweep import DEFAULT_METRICS, collect, plot, write_table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="a multirun folder (logs/multiruns/<stage>/<time>) or 'latest'")
    p.add_argument("--log-dir", default="logs", help="where 'latest' looks for multiruns/prune/ (default: logs)")
    p.add_argument("--x", default="prune.sparsity")
    p.add_argument("--y", default="val/ppl")
    p.add_argument("--line", default="prune.method", help="one line per value of this key")
    p.add_argument("--linear", action="store_true", help="linear y axis (default: log)")
    p.add_argument("--out", default=None, help="output folder (default: the multirun folder)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    folder = Path(args.folder)
    if args.folder == "latest":
        runs = sorted(p for p in (Path(args.log_dir) / "multiruns" / "prune").glob("*") if p.is_dir())
        if not runs:
            sys.exit(f"no multirun folder under {Path(args.log_dir) / 'multiruns' / 'prune'}")
        folder = runs[-1]
    try:
        rows = collect(folder, keys=[k for k in (args.x, args.line) if k])
        out = Path(args.out or folder)
        out.mkdir(parents=True, exist_ok=True)
        csv_path, md_path = write_table(rows, out, metrics=tuple(dict.fromkeys([*DEFAULT_METRICS, args.y])))
    except (FileNotFoundError, KeyError, ValueError) as e:
        sys.exit(f"collect_sweep: error: {e.args[0] if isinstance(e, KeyError) else e}")
    dense = [r["prune/ppl_dense"] for r in rows if "prune/ppl_dense" in r]
    try:
        png = plot(rows, out / "sweep.png", x=args.x, y=args.y, line=args.line, logy=not args.linear,
                   reference=dense[0] if dense and "ppl" in args.y else None,
                   title=f"{folder.parent.name}/{folder.name}")
    except (KeyError, ValueError) as e:
        (out / "sweep.png").unlink(missing_ok=True)  # an older plot beside the new table would disagree with it
        sys.exit(f"collect_sweep: error: {e.args[0] if isinstance(e, KeyError) else e} "
                 f"({csv_path.name} and {md_path.name} were written; no plot)")
    print(md_path.read_text())
    print(f"wrote {csv_path}, {md_path}, {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
