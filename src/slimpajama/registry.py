"""The local model index: where a model name points.

Every finished stage run publishes its model as `<log_dir>/latest/<stage>/model` (a symlink to the
run folder, replaced atomically, so it only ever points at a finished run). A name resolves as:

- a folder holding `config.json`, or a run folder holding `model/config.json`: that folder;
- `slimpajama` (or `latest`): the model of the furthest stage of the pipeline that has finished,
  finetune > prune > distill > pretrain;
- `slimpajama/<stage>` or just `<stage>`: the newest finished model of that stage.

`<log_dir>` is `$SLIMPAJAMA_LOG_DIR`, else `$SLIMPAJAMA_ROOT/logs` (set by train.py), else `./logs`.
"""

import os
from pathlib import Path
from typing import Iterable, Optional, Union

PIPELINE = ("pretrain", "distill", "prune", "finetune")
ALIASES = ("slimpajama", "latest")
# the stages whose model a stage starts from when it names none (the first finished one, in this order),
# and the config key that names one: the pipeline passes its own previous stage's model through it
INPUTS = {"distill": ("teacher", ("pretrain",)),
          "prune": ("stage.module.init_from", ("distill", "pretrain")),
          "finetune": ("init_from", ("prune", "distill", "pretrain"))}


def default_log_dir() -> Path:
    if os.environ.get("SLIMPAJAMA_LOG_DIR"):
        return Path(os.environ["SLIMPAJAMA_LOG_DIR"])
    return Path(os.environ.get("SLIMPAJAMA_ROOT", ".")) / "logs"


def latest_model(stages: Iterable[str] = tuple(reversed(PIPELINE)), log_dir: Optional[Union[str, Path]] = None) -> Path:
    """The model folder of the first of `stages` that has a finished run."""
    root = Path(log_dir) if log_dir else default_log_dir()
    stages = list(stages)
    for stage in stages:
        folder = root / "latest" / stage / "model"
        if (folder / "config.json").is_file():
            return folder.resolve()
    looked = ", ".join(str(root / "latest" / s / "model") for s in stages)
    raise FileNotFoundError(f"no finished model found (looked in {looked}): run `python train.py stage={stages[-1]}` first")


def resolve_model(name_or_path: Union[str, os.PathLike], log_dir: Optional[Union[str, Path]] = None) -> Path:
    """A model folder for a folder path or a registered name (see the module docstring)."""
    path = Path(name_or_path)
    if (path / "config.json").is_file():
        return path
    if (path / "model" / "config.json").is_file():
        return path / "model"
    name = str(name_or_path)
    if name in ALIASES:
        return latest_model(log_dir=log_dir)
    stage = name.removeprefix("slimpajama/")
    if stage in PIPELINE:
        return latest_model([stage], log_dir=log_dir)
    raise FileNotFoundError(
        f"{name}: not a model folder (no config.json there) and not a registered name "
        f"({', '.join(ALIASES)}, or slimpajama/<stage> with a stage in {', '.join(PIPELINE)})"
    )
