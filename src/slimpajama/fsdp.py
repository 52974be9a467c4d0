"""FSDP: one ordinary model folder out of a sharded model or checkpoint.

Under `trainer=fsdp` every rank holds a shard of each transformer block, so `module.model` cannot be
saved as it stands. `full_model` gathers the full state dict onto rank 0 (a collective: every rank
calls it) and loads it into an unsharded CPU copy for `save_pretrained`; `consolidate` turns a sharded
Lightning checkpoint folder (`state_dict_type: sharded`) into a single `.ckpt` and a model folder.
"""

import logging
from pathlib import Path
from typing import Optional

import lightning as L
import torch

log = logging.getLogger(__name__)


def _strip(key: str) -> str:
    for prefix in ("_forward_module.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module."):
        key = key.replace(prefix, "")
    return key


def full_model(trainer: L.Trainer, module: L.LightningModule):
    """`module.model`, unsharded: itself without FSDP; with FSDP a CPU copy on rank 0 (None elsewhere)."""
    from lightning.pytorch.strategies import FSDPStrategy

    if not isinstance(trainer.strategy, FSDPStrategy):
        return module.model
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    wrapped = trainer.strategy.model
    with FSDP.state_dict_type(wrapped, StateDictType.FULL_STATE_DICT,
                              FullStateDictConfig(offload_to_cpu=True, rank0_only=True)):
        state = wrapped.state_dict()  # every rank takes part; rank 0 receives the whole state
    if not trainer.is_global_zero:
        return None
    return _model_from_module_state(type(module.model), module.model.config,
                                    {_strip(k): v for k, v in state.items()})


def _model_from_module_state(cls, config, state: dict):
    """An unsharded `cls(config)` on the CPU loaded from a LightningModule state dict (`model.*` keys)."""
    prefix = "model."
    weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    with torch.device("cpu"):
        full = cls(config)
    missing, unexpected = full.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not k.endswith(("cos", "sin"))]  # rope buffers are recomputed
    if missing or unexpected:
        raise RuntimeError(f"consolidated state does not match {cls.__name__}: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    return full


def consolidate(ckpt_dir: str, output: Optional[str] = None, model_dir: Optional[str] = None) -> Path:
    """A sharded checkpoint folder -> one `.ckpt` (Lightning's consolidation) and, with `model_dir`,
    a `save_pretrained` folder. Runs on one CPU process, no GPU needed:
    `python -m slimpajama.fsdp logs/pretrain/runs/<time>/checkpoints/last.ckpt --model-dir out/`."""
    from lightning.fabric.utilities.load import _load_distributed_checkpoint
    from lightning.pytorch.utilities.consolidate_checkpoint import _format_checkpoint

    from slimpajama.checkpointing import MODEL_CONFIG_KEY
    from slimpajama.model import SlimPajamaConfig
    from slimpajama.pretrained import SlimPajamaModel

    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"{ckpt_dir} is not a sharded checkpoint folder")
    checkpoint = _format_checkpoint(_load_distributed_checkpoint(ckpt_dir))  # "model" -> "state_dict", ...
    out = Path(output or f"{ckpt_dir}.consolidated")
    torch.save(checkpoint, out)
    log.info("consolidated %s -> %s", ckpt_dir, out)
    if model_dir:
        saved = checkpoint.get(MODEL_CONFIG_KEY) or checkpoint.get("hyper_parameters", {}).get("model")
        if not isinstance(saved, dict):
            raise ValueError(f"{ckpt_dir}: the checkpoint holds no model config (checkpoints written before "
                             f"{MODEL_CONFIG_KEY} only have one for the pretrain and distill stages)")
        config = SlimPajamaConfig.from_dict(saved)
        _model_from_module_state(SlimPajamaModel, config, checkpoint["state_dict"]).save_pretrained(model_dir)
        log.info("saved the model to %s", model_dir)
    return out


if __name__ == "__main__":
    import argparse

    logging.basicConfig(level=logging.INFO)
    p = argparse.ArgumentParser(description="Consolidate a sharded FSDP checkpoint folder")
    p.add_argument("ckpt_dir")
    p.add_argument("--output", help="the single .ckpt to write (default <ckpt_dir>.consolidated)")
    p.add_argument("--model-dir", help="also write a save_pretrained model folder here")
    a = p.parse_args()
    consolidate(a.ckpt_dir, a.output, a.model_dir)
