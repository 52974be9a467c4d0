"""Test helpers importable by `python train.py` subprocesses (PYTHONPATH=tests): a callback that records
what each rank trained on, and a data module that replays recorded batches."""

from pathlib import Path

import lightning as L
import torch


class RecordBatches(L.Callback):
    """Saves `<out>/rank<r>.pt`: every training batch this rank took and its loss, in order."""

    def __init__(self, out: str):
        self.out, self.batches, self.losses = Path(out), [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batches.append(batch.detach().cpu().clone())
        self.losses.append(float(outputs["loss"]))

    def on_train_end(self, trainer, pl_module) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        torch.save({"batches": self.batches, "losses": self.losses, "world_size": trainer.world_size},
                   self.out / f"rank{trainer.global_rank}.pt")


class ReplayDataModule(L.LightningDataModule):
    """Trains on the global batches a recorded multi-rank run took: step k = the ranks' batches k, concatenated."""

    def __init__(self, recorded: str):
        super().__init__()
        files = sorted(Path(recorded).glob("rank*.pt"))
        ranks = [torch.load(f, weights_only=True)["batches"] for f in files]
        self.global_batches = [torch.cat(step) for step in zip(*ranks)]
        self.metrics, self.tokenizer = {}, None

    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.global_batches, batch_size=None, shuffle=False)
