"""prepare.py's deduplication: recall/precision vs threshold, index memory, and throughput.

    .venv/bin/python bench/dedup.py                      # all three parts, ~5 minutes on 2 CPUs
    .venv/bin/python bench/dedup.py --parts curve memory # skip the throughput part

curve     A generated two-source set (tests/planted.py) with planted near copies whose share of
          changed words runs evenly from 0.5% to 12% (true Jaccard of character 13-grams ~0.55-0.98),
          exact copies and unrelated documents. For each threshold t the recipe runs with that
          threshold and recall/precision are measured against the exact Jaccard similarity of the
          shingle sets: positives are documents whose similarity to an earlier copy is >= t. Four
          settings: ours (bands x rows from datasketch with weights (0.1, 0.9), candidates verified),
          LSH only (same bands, no verification), SlimPajama's (9 bands x 13 rows at every threshold,
          no verification), ours with 256 permutations instead of 128.
memory    Bytes per document the index holds (the exact-hash set + datasketch's MinHashLSH with
          int keys), measured with tracemalloc while inserting N random signatures.
throughput  The demo corpus (data/demo) cut to 25%, 50% and 100% of each file's documents; the
          whole recipe (sketch, index, write) in MB/s of input text and documents/s, with the time of
          each pass.

Prints markdown tables and writes a JSON record to bench/results/ (git-ignored).
"""

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import tracemalloc
from datetime import datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # tests/planted.py: the generated set with its ground truth

from planted import make_planted, recall_precision
from slimpajama.data.prepare import EXACT, NEAR, CorpusPreparer, DuplicateIndex
from slimpajama.data.reader import read_file, resolve_paths, write_jsonl_zst

THRESHOLDS = (0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)
SETTINGS = {
    "ours (verified)": {},
    "LSH only": {"verify": False},
    "SlimPajama 9x13": {"bands": 9, "rows": 13, "verify": False},
    "ours, 256 perms": {"num_perm": 256},  # last: its shards differ, the others' are reused
}


def curve(work: Path, n_originals: int) -> dict:
    rates = tuple(np.round(np.linspace(0.005, 0.12, 24), 4))
    planted = make_planted(work / "planted", n_originals=n_originals, rates=rates, exact=n_originals // 20,
                           n_related=n_originals // 10)
    sim = planted.true_similarity()
    rows = {}
    for name, kw in SETTINGS.items():
        rows[name] = {}
        for t in THRESHOLDS:
            p = CorpusPreparer(threshold=t, num_workers=0, progress=False, **kw)
            stats = p.run([str(work / "planted")], str(work / "planted-out"))  # shards reused after the 1st run
            status = np.concatenate([stats.status[k] for k in sorted(stats.status)])
            removed = [s in (EXACT, NEAR) for s in status]
            r, pr, pos, rem = recall_precision(planted, removed, t, sim)
            rows[name][t] = {"recall": r, "precision": pr, "positives": pos, "removed": int(rem)}
    # recall of our setting at 0.8 by similarity bin
    p = CorpusPreparer(threshold=0.8, num_workers=0, progress=False)
    stats = p.run([str(work / "planted")], str(work / "planted-out"))
    status = np.concatenate([stats.status[k] for k in sorted(stats.status)])
    bins = {}
    for lo, hi in ((0.5, 0.7), (0.7, 0.75), (0.75, 0.8), (0.8, 0.82), (0.82, 0.85), (0.85, 0.9), (0.9, 1.01)):
        idx = [i for i, s in enumerate(sim) if lo <= s < hi]
        bins[f"{lo:.2f}-{min(hi, 1):.2f}"] = {"docs": len(idx), "removed": int(sum(status[i] in (EXACT, NEAR)
                                                                                  for i in idx))}
    return {"documents": len(planted.texts), "positives_at_0.8": sum(s >= 0.8 for s in sim), "rows": rows,
            "bins_at_0.8": bins}


def memory(n: int) -> dict:
    rng = np.random.default_rng(0)
    out = {}
    for name, (b, r) in {"ours 14x9": (None, None), "SlimPajama 9x13": (9, 13)}.items():
        sigs = rng.integers(0, 2**32, size=(n, 128), dtype=np.uint64).astype(np.uint32)
        hashes = rng.integers(0, 2**63, size=n).tolist()
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        index = DuplicateIndex(128, 1, 0.8, b, r, (0.1, 0.9), verify=True)
        for i in range(n):
            index.hashes.add(hashes[i])
            index.insert(i, sigs[i])
        used = tracemalloc.get_traced_memory()[0] - base
        tracemalloc.stop()
        out[name] = {"bands_rows": list(index.bands_rows), "documents": n, "bytes_per_doc": used / n}
        del index
    return out


def subset(src: Path, dst: Path, share: float) -> None:
    """The first `share` of the documents of every file of src, as jsonl.zst under dst."""
    for f in resolve_paths([str(src)]):
        docs = list(read_file(f))
        keep = docs[: max(1, round(share * len(docs)))]
        out = dst / os.path.relpath(f, src)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_jsonl_zst(str(out), [(d.text, d.source) for d in keep])


def throughput(work: Path, demo: Path, shares, workers: int) -> dict:
    out = {}
    for share in shares:
        corpus = work / f"demo-{int(share * 100)}"
        subset(demo, corpus, share)
        p = CorpusPreparer(num_workers=workers, progress=False)
        times, t0 = {}, time.perf_counter()
        for name in ("_sketch", "_index", "_write"):  # time each pass
            fn = getattr(p, name)

            def timed(*a, _fn=fn, _name=name, _times=times, **k):
                s = time.perf_counter()
                try:
                    return _fn(*a, **k)
                finally:
                    _times[_name.strip("_")] = time.perf_counter() - s

            setattr(p, name, timed)
        stats = p.run([str(corpus)], str(work / f"demo-{int(share * 100)}-out"))
        wall = time.perf_counter() - t0
        total = stats.total()
        out[share] = {"documents": total.documents, "mb": total.bytes / 1e6, "wall_s": wall,
                      "mb_per_s": total.bytes / 1e6 / wall, "docs_per_s": total.documents / wall,
                      "passes_s": times, "kept": total.kept, "kept_mb": total.kept_bytes / 1e6,
                      "load_avg": os.getloadavg()[0]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", nargs="+", default=["curve", "memory", "throughput"])
    ap.add_argument("--originals", type=int, default=1000, help="originals of the generated set")
    ap.add_argument("--memory-docs", type=int, default=20000)
    ap.add_argument("--demo", default=str(ROOT / "data" / "demo"))
    ap.add_argument("--shares", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    args = ap.parse_args()
    record = {"time": datetime.now().isoformat(timespec="seconds"), "cpus": os.cpu_count(),
              "python": platform.python_version(), "args": vars(args)}
    work = Path(tempfile.mkdtemp(prefix="bench-dedup-"))
    try:
        if "curve" in args.parts:
            c = record["curve"] = curve(work, args.originals)
            print(f"\n### Recall / precision vs threshold ({c['documents']} documents, "
                  f"{c['positives_at_0.8']} above 0.8)\n")
            print("| threshold | " + " | ".join(f"{n} recall | {n} precision" for n in SETTINGS) + " |")
            print("|---|" + "---|---|" * len(SETTINGS))
            for t in THRESHOLDS:
                cells = [f"{c['rows'][n][t]['recall']:.3f} | {c['rows'][n][t]['precision']:.3f}" for n in SETTINGS]
                print(f"| {t} | " + " | ".join(cells) + " |")
            print("\n| true Jaccard | docs | removed at threshold 0.8 (ours) |\n|---|---|---|")
            for k, v in c["bins_at_0.8"].items():
                print(f"| {k} | {v['docs']} | {v['removed']} ({v['removed'] / max(1, v['docs']):.0%}) |")
        if "memory" in args.parts:
            m = record["memory"] = memory(args.memory_docs)
            print("\n| index | bands x rows | bytes per document |\n|---|---|---|")
            for k, v in m.items():
                print(f"| {k} | {v['bands_rows'][0]} x {v['bands_rows'][1]} | {v['bytes_per_doc']:.0f} |")
        if "throughput" in args.parts:
            tp = record["throughput"] = throughput(work, Path(args.demo), args.shares, args.workers)
            print("\n| share of demo | docs | MB | wall s | MB/s | docs/s | sketch s | index s | write s | load |\n"
                  "|---|---|---|---|---|---|---|---|---|---|")
            for share, v in tp.items():
                ps = v["passes_s"]
                print(f"| {share:.0%} | {v['documents']:,} | {v['mb']:.1f} | {v['wall_s']:.1f} | {v['mb_per_s']:.2f} | "
                      f"{v['docs_per_s']:.0f} | {ps['sketch']:.1f} | {ps['index']:.1f} | {ps['write']:.1f} | "
                      f"{v['load_avg']:.1f} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"dedup-{record['time'].replace(':', '')}.json"
    path.write_text(json.dumps(record, indent=1, default=str))
    print(f"\nwritten {path}")


if __name__ == "__main__":
    main()
