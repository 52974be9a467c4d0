"""python train.py stage=pretrain|... model=... data=... trainer=... (see README.md and conf/)."""

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

os.environ.setdefault("SLIMPAJAMA_ROOT", str(Path(__file__).resolve().parent))


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    if cfg.get("pipeline"):  # experiment=pipeline_*: every stage in turn, then the report
        from slimpajama.lifecycle import run_lifecycle

        run_lifecycle(cfg)
        return None
    from slimpajama.pipeline import run  # imported here so that --help and tab completion stay fast

    return run(cfg)


if __name__ == "__main__":
    main()
