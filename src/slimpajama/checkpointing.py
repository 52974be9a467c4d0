"""Surviving kills and preemption: atomic checkpoints, periodic and on-SIGTERM saves, a non-finite
loss guard, and the W&B run id carried over on resume.

- `AtomicCheckpointIO` (a Trainer plugin, `conf/trainer/cpu.yaml`): a checkpoint is streamed to a
  temporary file beside its target, fsync'ed, then renamed over it with `os.replace`. A kill at any
  moment leaves either the previous complete checkpoint or the new complete one, never a torn file.
- `ResumeCheckpoint` (a `ModelCheckpoint`, `conf/callbacks/default.yaml`): `last.ckpt` every
  `every_n_train_steps`, and when the run is preempted (SIGTERM: Lightning stops after the current
  batch and raises `SIGTERMException`), but not after other errors such as a non-finite loss.
- `FiniteLossCheck`: stops at the first NaN/inf training loss, before the optimizer step, with an
  error naming the step and the last good checkpoint (which is left untouched).
- `RunIdentity` (added by the pipeline): stores the W&B run id in every checkpoint, and
  `logger_ids(ckpt_path)` reads it back, so a resumed run continues the same W&B run.
- `RngState` (added by the pipeline): stores the random generators' states in every checkpoint and
  puts them back before a resumed run's first training batch, so dropout draws what it would have.
"""

import logging
import os
import random
from pathlib import Path
from typing import Any, Optional, Union

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)

MODEL_CONFIG_KEY = "slimpajama_model_config"
RUN_IDS_KEY = "slimpajama_logger_ids"  # checkpoint key: {"wandb": "<run id>"}
RNG_KEY = "slimpajama_rng_states"


class AtomicCheckpointIO(TorchCheckpointIO):
    """`torch.save` to `<path>.tmp-<pid>`, fsync, `os.replace` onto `<path>`, fsync the folder.

    The previous checkpoint at `path` stays complete until the rename, which is atomic on POSIX;
    a failed save removes its temporary file. Remote paths (`s3://...`) go through Lightning's
    fsspec transaction as before."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options, got {storage_options!r}")
        if "://" in str(path) and not str(path).startswith("file://"):
            return super().save_checkpoint(checkpoint, path)  # object stores: fsspec's transaction
        path = str(path).removeprefix("file://")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)  # the rename itself survives a power loss
        finally:
            os.close(fd)


class ResumeCheckpoint(ModelCheckpoint):
    """`last.ckpt` every `every_n_train_steps` and on preemption (SIGTERM), for `ckpt_path=last`.

    Keeps no other files (`save_top_k=0`); the best-by-validation checkpoint is another callback's job.
    Unlike `ModelCheckpoint(save_on_exception=True)` it saves only for `SIGTERMException`: after a
    NaN loss or a crash, the last good checkpoint must stay as it is."""

    def __init__(self, dirpath: Optional[_PATH] = None, every_n_train_steps: int = 100, **kwargs):
        super().__init__(dirpath=dirpath, every_n_train_steps=every_n_train_steps, save_top_k=0, save_last=True,
                         monitor=None, **kwargs)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        # the final step too, here rather than in on_train_end: Lightning resumes a checkpoint written
        # at the end of fit one step too far (seen with 2.6.6), one written at a batch end exactly
        final = 0 < trainer.max_steps <= trainer.global_step
        if final and self._last_global_step_saved != trainer.global_step and not trainer.fast_dev_run:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.fast_dev_run:  # a debug=fdr run's one step must not become the stage's last.ckpt
            super().on_train_end(trainer, pl_module)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.sanity_checking or trainer.fast_dev_run:
            return
        if self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        log.warning("preempted (SIGTERM) after step %d: saved %s; rerun the same command with ckpt_path=last",
                    trainer.global_step, self.last_model_path)


class NonFiniteLossError(FloatingPointError):
    pass


class FiniteLossCheck(L.Callback):
    """Stops the run at the first NaN/inf training loss, before the optimizer step that would spread it
    into the weights. Every rank takes the same decision (any rank's non-finite loss stops all)."""

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        bad = not bool(torch.isfinite(loss.detach()).all())
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if not bad:
            return
        step = trainer.global_step
        cbs = trainer.checkpoint_callbacks
        good = [p for p in [c.last_model_path for c in cbs] + [c.best_model_path for c in cbs] if p]
        raise NonFiniteLossError(
            f"training loss is {loss.item() if loss.numel() == 1 else 'non-finite'} at step {step} "
            f"(batch {trainer.fit_loop.epoch_loop.batch_idx} of epoch {trainer.current_epoch}); stopped before "
            f"the optimizer step. Last good checkpoint: {good[0] if good else 'none saved yet'}. "
            "Lower the learning rate, check the data, or use trainer.precision=bf16-mixed instead of 16-mixed."
        )


def rng_states() -> dict:
    """Python's, NumPy's, torch's CPU and every CUDA device's generator states, as plain lists and tuples
    (no tensors: a sharded checkpoint keeps them with its metadata)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    states = {"python": random.getstate(), "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
              "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return states


def set_rng_states(states: dict) -> None:
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(states["torch"], dtype=torch.uint8))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in states["cuda"]])


class RngState(L.Callback):
    """The generators' states (`rng_states`) in every checkpoint, put back just before the first training
    batch of a run resumed from it: after a restore Lightning, the data loaders and the sanity check draw
    numbers of their own, and `seed_everything` alone would replay the first steps' dropout masks. With
    dropout, a resumed run then gives the uninterrupted run's losses, as without it."""

    def __init__(self):
        self._restore: Optional[dict] = None

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint[RNG_KEY] = rng_states()

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self._restore = checkpoint.get(RNG_KEY)  # a checkpoint from before this callback has none

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if self._restore is not None:
            set_rng_states(self._restore)
            self._restore = None


class RunIdentity(L.Callback):
    """Writes the loggers' run ids into every checkpoint (`RUN_IDS_KEY`), so a resume continues them, and
    the config of the model being trained (`MODEL_CONFIG_KEY`: after pruning or a grown vocabulary it is
    not the `model` group's), so a checkpoint alone makes a model folder (`slimpajama.fsdp.consolidate`)."""

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        model = getattr(pl_module, "model", None)
        if hasattr(model, "config"):
            checkpoint[MODEL_CONFIG_KEY] = model.config.to_dict()
        ids = {}
        for lg in trainer.loggers:
            if type(lg).__name__ == "WandbLogger":
                ids["wandb"] = str(lg.version)
        if ids:
            checkpoint[RUN_IDS_KEY] = ids


def checkpoint_state(ckpt_path: _PATH) -> dict:
    """A checkpoint file's contents, memory-mapped (tensors are read only when touched), or a sharded
    checkpoint folder's non-tensor state (meta.pt; {} without one)."""
    path = Path(ckpt_path)
    if path.is_dir():  # FSDP sharded: the non-tensor state lives in meta.pt
        path = path / "meta.pt"
        if not path.is_file():
            return {}
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def logger_ids(ckpt: Union[_PATH, dict]) -> dict[str, str]:
    """The run ids stored by `RunIdentity` in a checkpoint (a file, a sharded checkpoint folder, or its
    `checkpoint_state`)."""
    state = ckpt if isinstance(ckpt, dict) else checkpoint_state(ckpt)
    return dict(state.get(RUN_IDS_KEY, {}))
