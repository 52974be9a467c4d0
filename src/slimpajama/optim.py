"""Optimizer parameter groups and the learning-rate schedule shared by every stage."""

import logging
import math

import torch
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.utilities.enums import GradClipAlgorithmType
from torch.optim.lr_scheduler import LambdaLR

log = logging.getLogger(__name__)


def param_groups(model: torch.nn.Module, weight_decay: float, never_decay: tuple = ()) -> list[dict]:
    """Weight decay only on >= 2-D weights (matmuls, embeddings), not on norms, biases or `never_decay`."""
    params = [p for p in model.parameters() if p.requires_grad]
    seen, decay, no_decay = {id(p) for p in never_decay}, [], [p for p in never_decay if p.requires_grad]
    for p in params:
        if id(p) in seen:  # tied weights appear once
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(optimizer, warmup_steps: int, max_steps: int, min_lr_ratio: float = 0.1) -> LambdaLR:
    """Linear warm-up over `warmup_steps` (step t at (t + 1) / (warmup_steps + 1) of the base lr), then
    cosine decay to `min_lr_ratio * lr` at `max_steps` (held there after). A warm-up as long as the run
    never reaches the base lr: that is warned about."""
    if max_steps is None or max_steps <= 0:
        raise ValueError(f"warmup_cosine needs a positive max_steps (trainer.max_steps), got {max_steps}")
    if warmup_steps >= max_steps:
        log.warning("scheduler.warmup_steps=%d >= max_steps=%d: the learning rate only warms up, to %.2g of its "
                    "base value, and never decays", warmup_steps, max_steps, max_steps / (warmup_steps + 1))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


def lightning_optimizers(model: torch.nn.Module, optimizer_factory, scheduler_factory=None, never_decay: tuple = ()):
    """What a stage's `configure_optimizers` returns: the optimizer partial from config completed with
    `param_groups(model)` (its own weight_decay), and the scheduler partial stepped every optimizer step."""
    weight_decay = getattr(optimizer_factory, "keywords", {}).get("weight_decay", 0.0)
    optimizer = optimizer_factory(params=param_groups(model, weight_decay=weight_decay, never_decay=never_decay))
    if scheduler_factory is None:
        return optimizer
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler_factory(optimizer), "interval": "step"}}


class FusedOptimizerClipping:
    """Mixed into every stage's LightningModule: gradient clipping that works with fused AdamW under
    `bf16-mixed`.

    Lightning refuses to clip (a RuntimeError at the first step) whenever a mixed-precision run uses an
    optimizer that unscales gradients itself, such as fused AdamW. Only float16's GradScaler needs
    unscaling before clipping; under bf16 there is no scaler and the gradients are ready to clip, so
    this clips them as Lightning does in full precision. float16 keeps Lightning's own rule."""

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        plugin = self.trainer.precision_plugin
        if isinstance(plugin, MixedPrecision) and plugin.scaler is None:
            algorithm = GradClipAlgorithmType(gradient_clip_algorithm or GradClipAlgorithmType.NORM)
            Precision.clip_gradients(plugin, optimizer, gradient_clip_val or 0.0, algorithm)
        else:
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
