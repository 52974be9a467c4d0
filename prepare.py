"""python prepare.py input='[dir_or_glob, ...]' output=<dir>: SlimPajama's cleaning and deduplication
(see docs/prepare.md and conf/prepare.yaml)."""

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

os.environ.setdefault("SLIMPAJAMA_ROOT", str(Path(__file__).resolve().parent))


@hydra.main(version_base="1.3", config_path="conf", config_name="prepare")
def main(cfg: DictConfig) -> float:
    from hydra.utils import instantiate  # imported here so that --help stays fast

    inputs = OmegaConf.to_container(cfg.input) if OmegaConf.is_list(cfg.input) else [cfg.input]
    stats = instantiate(cfg.prepare).run(inputs, cfg.output)
    total = stats.total()
    return total.kept_bytes / max(1, total.bytes)  # the share of bytes kept


if __name__ == "__main__":
    main()
