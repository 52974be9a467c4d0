"""Callbacks shared by every stage."""

import logging
import time
from typing import Optional

import lightning as L
import torch

log = logging.getLogger(__name__)


def measure_peak_flops(device: torch.device, dtype: torch.dtype = torch.float32, size: int = 2048, iters: int = 8) -> float:
    """Achieved FLOP/s of a large square matmul: the practical peak MFU is measured against."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 2 * size**3 / sorted(times)[len(times) // 2]


class ThroughputMonitor(L.Callback):
    """Logs `train/tokens_per_sec` and `train/mfu` (model FLOPs utilisation) every `log_every_n_steps`.
    The first batch of a fit (or of a resume) is left out of the windows: it waits for `torch.compile`.

    MFU = tokens/s * training FLOPs per token / (peak FLOP/s * devices); the peak is `peak_flops`
    per device or, when null, measured once with a matmul in the training precision."""

    def __init__(self, peak_flops: Optional[float] = None, log_every_n_steps: int = 10):
        self.peak_flops = peak_flops
        self.every = log_every_n_steps
        self._t0: Optional[float] = None  # the start of the window, moved on by validation time
        self._val_t0: Optional[float] = None
        self._tokens = self._batches = 0
        self._warm = False  # past the fit's first batch

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t0, self._warm = None, False
        if self.peak_flops is None:
            dtype = torch.bfloat16 if "bf16" in str(trainer.precision) else torch.float32
            self.peak_flops = measure_peak_flops(pl_module.device, dtype)
            log.info("measured matmul peak: %.0f GFLOP/s per device (%s)", self.peak_flops / 1e9, dtype)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._t0 is None:
            self._t0, self._tokens, self._batches = time.perf_counter(), 0, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._warm:  # the first window starts after the first batch
            self._warm, self._t0 = True, None
            return
        if isinstance(batch, dict):  # fine-tuning batches: {"input_ids", "labels"} (padded tokens count too)
            batch = batch["input_ids"]
        self._tokens += batch.shape[0] * (batch.shape[1] - 1)
        self._batches += 1
        if self._batches < self.every * trainer.accumulate_grad_batches:
            return
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        tokens_per_sec = self._tokens * trainer.world_size / (time.perf_counter() - self._t0)
        flops = pl_module.model.flops_per_token(batch.shape[1] - 1) * tokens_per_sec
        pl_module.log("train/tokens_per_sec", tokens_per_sec, prog_bar=True)
        pl_module.log("train/mfu", flops / (self.peak_flops * trainer.world_size))
        self._t0 = None

    def on_validation_start(self, trainer, pl_module) -> None:
        self._val_t0 = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        # validation time is not training time: the window goes on without it (restarting it instead
        # dropped the batches before validation, and Lightning logged the previous window's rate again)
        if self._t0 is not None and self._val_t0 is not None:
            self._t0 += time.perf_counter() - self._val_t0
        self._val_t0 = None
