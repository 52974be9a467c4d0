"""Language modelling (pretraining): next-token cross-entropy on packed token blocks."""

import logging
from pathlib import Path
from typing import Callable, Optional

import lightning as L
from lightning.pytorch.strategies import FSDPStrategy
import torch
from torchmetrics import MeanMetric

from slimpajama.generation import inductor_compiler
from slimpajama.losses import linear_cross_entropy
from slimpajama.model import SlimPajamaConfig
from slimpajama.optim import FusedOptimizerClipping, lightning_optimizers
from slimpajama.pretrained import SlimPajamaModel

log = logging.getLogger(__name__)


class LanguageModelModule(FusedOptimizerClipping, L.LightningModule):
    def __init__(
        self,
        model: SlimPajamaConfig,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Optional[Callable[[torch.optim.Optimizer], object]] = None,
        init_from: Optional[str] = None,
        compile: bool = False,
    ):
        """model: the architecture; optimizer/scheduler: partials completed in configure_optimizers;
        init_from: a saved model folder to start from instead of random weights;
        compile: run the training forward pass through `torch.compile` (validation, sampling and the
        saved model stay eager; the parameters and their names are the model's own)."""
        super().__init__()
        # plain types only: checkpoints load with torch.load(weights_only=True)
        self.save_hyperparameters({"model": model.to_dict(), "init_from": init_from, "compile": compile})
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.compile_forward = compile
        self._train_forward: Optional[Callable] = None  # the compiled forward, built when fitting starts
        if init_from:
            self.model = SlimPajamaModel.from_pretrained(init_from).train()
            log.info("initialised from %s", init_from)
        else:
            self.model = SlimPajamaModel(model)
        self.val_loss = MeanMetric()

    def setup(self, stage: str) -> None:
        """A model from init_from keeps its own max_seq_len (config.json), which the data must fit."""
        seq_len = getattr(self.trainer.datamodule, "seq_len", None)
        init_from = self.hparams.init_from
        if init_from and seq_len is not None and seq_len > self.model.config.max_seq_len:
            raise ValueError(f"data.seq_len={seq_len} exceeds the max_position_embeddings="
                             f"{self.model.config.max_seq_len} of {Path(init_from) / 'config.json'} "
                             "(stage.module.init_from): lower data.seq_len")

    def on_fit_start(self) -> None:
        if not self.compile_forward:
            return
        if isinstance(self.trainer.strategy, FSDPStrategy):
            log.warning("compile=true is not supported with trainer=fsdp here (untested): training eagerly")
            return
        compiler = inductor_compiler()
        if compiler is None:
            log.warning("compile=true needs a C++ compiler for torch.compile's generated kernels and none was "
                        "found (set CXX, or install g++/clang++): training eagerly; compile=false hides this")
            return
        # a compiled function, not a compiled module: the model keeps its own forward for
        # validation and decoding, and its state_dict keys (no `_orig_mod.` prefix)
        self._train_forward = torch.compile(self.model.forward)
        log.info("training forward compiled with torch.compile (C++ compiler %s); the first step waits for it",
                 compiler)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def _loss(self, batch: torch.Tensor) -> tuple[torch.Tensor, int]:
        batch = batch.long()
        x, y = batch[:, :-1], batch[:, 1:]  # (B, T) inputs and next-token targets
        forward = self._train_forward if self.training and self._train_forward is not None else self.model
        h = forward(x, apply_head=False)  # (B, T, d): the loss applies the head chunk by chunk
        return linear_cross_entropy(h, self.model.lm_head.weight, y), y.numel()

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss, _ = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], prog_bar=False)
        return loss

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        loss, n = self._loss(batch)
        self.val_loss.update(loss, weight=n)  # mean over tokens, not batches

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.val_loss.reset()
        self.log("val/loss", loss, prog_bar=True, sync_dist=False)
        self.log("val/ppl", torch.exp(loss), prog_bar=True, sync_dist=False)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        # free the gradients now: Lightning would zero them only inside the next step's closure,
        # keeping a model-sized buffer alive through the next forward pass
        optimizer.zero_grad(set_to_none=True)

    def configure_optimizers(self):
        return lightning_optimizers(self.model, self.optimizer_factory, self.scheduler_factory)
