"""Why Wanda and magnitude pruning tie (or not) on a model: the input feature norms Wanda weighs by.

    .venv/bin/python bench/wanda_features.py --teacher /work/benchlogs/pretrain/demo-teacher/model

Wanda's score |W_ij| * ||X_j|| differs from magnitude's |W_ij| only through the L2 norms of the input
features X_j over the calibration tokens. Large LLMs have a few input features orders of magnitude
above the rest (Dettmers et al., 2022), which is where Wanda wins. For every prunable linear layer this
prints max / median of ||X_j||, how many features exceed 6x the median, and the share of weights on
which Wanda's 50% per-row mask agrees with magnitude's. Statistics come from `pruning.input_sq_sums`
(the function the prune stage uses) on blocks of the model's own context length, read from the corpus
given (default: the demo corpus).
"""

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from slimpajama import SlimPajamaModel, SlimPajamaTokenizer  # noqa: E402
from slimpajama import pruning  # noqa: E402
from slimpajama.data.reader import read_corpus  # noqa: E402


def calibration_blocks(tokenizer, paths: list[str], n_blocks: int, block: int) -> torch.Tensor:
    """(n_blocks, block + 1) token ids: documents concatenated in corpus order, cut into blocks."""
    ids: list[int] = []
    for doc in read_corpus(paths):
        ids += tokenizer.encode(doc.text)
        if len(ids) >= n_blocks * (block + 1):
            break
    if len(ids) < n_blocks * (block + 1):
        raise SystemExit(f"{paths}: only {len(ids)} tokens, need {n_blocks * (block + 1)}")
    return torch.tensor(ids[: n_blocks * (block + 1)]).view(n_blocks, block + 1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", required=True, help="a saved model folder")
    p.add_argument("--data", nargs="+", default=[str(ROOT / "data" / "demo")], help="corpus files, folders or globs")
    p.add_argument("--blocks", type=int, default=16)
    p.add_argument("--sparsity", type=float, default=0.5)
    args = p.parse_args(argv)
    model = SlimPajamaModel.from_pretrained(args.teacher).eval()
    tokenizer = SlimPajamaTokenizer.from_pretrained(args.teacher)
    blocks = calibration_blocks(tokenizer, args.data, args.blocks, model.config.max_seq_len)
    modules = pruning.prunable_modules(model)
    sums = pruning.input_sq_sums(model, blocks.split(4), modules)
    print(f"{args.blocks} blocks of {model.config.max_seq_len} tokens; masks at {args.sparsity:.0%}, per output row\n")
    print("| linear layer | max / median of ‖X_j‖ | features above 6x the median | mask agreement with magnitude |")
    print("|---|---|---|---|")
    for name, module in modules.items():
        norm, w = sums[name].sqrt(), module.weight.detach()
        magnitude = pruning.masks_from_scores({name: pruning.magnitude_scores(w)}, args.sparsity, "row")[name]
        wanda = pruning.masks_from_scores({name: pruning.wanda_scores(w, norm)}, args.sparsity, "row")[name]
        median = norm.median()
        print(f"| {name} | {norm.max() / median:.1f} | {int((norm > 6 * median).sum())} of {norm.numel()} | "
              f"{(magnitude == wanda).float().mean():.1%} |")


if __name__ == "__main__":
    main()
