"""Fine-tuning with control signals: next-token cross-entropy on the output tokens of labeled tasks.

The model starts from a saved folder (`init_from`, default the newest finished model of the
pipeline: prune, then distill, then pretrain). Before the first step its embedding and output
layers grow to the data module's tokenizer, which carries the tasks' control tokens (new rows start
at the mean embedding; old rows are unchanged). The labels are -100 on the prompt, so
`linear_cross_entropy` averages over output tokens only.

With `lora` enabled the model is frozen and trains through low-rank adapters on its projections
(`slimpajama.lora`) plus the control tokens' embedding and head rows; the adapters are merged into
the weights when fitting ends, so what is evaluated and saved is an ordinary dense model.

After fitting, `extra_metrics` evaluates the final model on every task's test split
(`slimpajama.evaluate`) — the pipeline writes the result into metrics.json — and the prompt
template is saved into generation_config.json so `slimpajama-generate` builds prompts as training did.
"""

import inspect
import logging
from typing import Callable, Optional

import lightning as L
import torch
from torchmetrics import MeanMetric

from slimpajama.checks import is_finite_number, is_whole_number
from slimpajama.data.finetune import resolve_init
from slimpajama.lora import (apply_lora, check_lora_settings, check_lora_targets, has_lora, merge_lora,
                             row_trainable_weights)
from slimpajama.losses import linear_cross_entropy
from slimpajama.optim import FusedOptimizerClipping, lightning_optimizers
from slimpajama.pretrained import SlimPajamaModel

log = logging.getLogger(__name__)

EVAL_FLAGS = ("enabled", "explain")  # read by the module, not passed to evaluate_tasks
EVAL_MINIMUM = {"max_examples": 1, "max_new_tokens": 1, "per_control": 1, "control_max_new_tokens": 1, "top_k": 0,
                "batch_size": 1, "temperature": 0}  # the least value each numeric setting takes


def _check_flag(value, key: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{key}={value!r} must be true or false")
    return value


def check_evaluation_settings(settings: dict, key: str = "evaluation") -> None:
    """Refuse end-of-fit evaluation settings before training, naming `key`.<setting>: keys that neither the
    module nor `evaluate_tasks` takes, flags that are not bools, numbers of the wrong type or range."""
    from slimpajama.evaluate import evaluate_tasks

    params = dict(list(inspect.signature(evaluate_tasks).parameters.items())[4:])  # after model, tokenizer, tasks, template
    unknown = sorted(set(map(str, settings)) - set(params) - set(EVAL_FLAGS))
    if unknown:
        raise ValueError(f"{key}: unknown keys {unknown} (it takes {', '.join(EVAL_FLAGS + tuple(params))})")
    for name, value in settings.items():
        if value is None and name == "top_k":  # as generate takes it: the whole vocabulary
            continue
        kind = bool if name in EVAL_FLAGS else params[name].annotation
        if kind is bool:
            _check_flag(value, f"{key}.{name}")
        elif kind is int and not is_whole_number(value):
            raise ValueError(f"{key}.{name}={value!r} must be a whole number")
        elif kind is float and not is_finite_number(value):
            raise ValueError(f"{key}.{name}={value!r} must be a finite number")
        if name in EVAL_MINIMUM and value < EVAL_MINIMUM[name]:
            raise ValueError(f"{key}.{name}={value!r} must be >= {EVAL_MINIMUM[name]}")


class FinetuneModule(FusedOptimizerClipping, L.LightningModule):
    def __init__(
        self,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Optional[Callable[[torch.optim.Optimizer], object]] = None,
        init_from: Optional[str] = None,
        log_dir: Optional[str] = None,
        evaluation: Optional[dict] = None,
        lora: Optional[dict] = None,
    ):
        """init_from: a model folder or registered name (null: the newest finished model);
        evaluation: keyword arguments of `slimpajama.evaluate.evaluate_tasks` for the end-of-fit
        evaluation (null or {enabled: false} skips it); lora: {enabled, rank, alpha, dropout,
        targets} (`slimpajama.lora.apply_lora`), null or enabled false: full fine-tuning."""
        super().__init__()
        self.init_dir = resolve_init(init_from, log_dir)
        self.save_hyperparameters({"init_from": str(self.init_dir)})
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.model = SlimPajamaModel.from_pretrained(self.init_dir).train()
        log.info("fine-tuning %s", self.init_dir)
        self.evaluation = dict(evaluation or {})
        check_evaluation_settings(self.evaluation, "stage.module.evaluation")
        lora = dict(lora or {})
        enabled = _check_flag(lora.pop("enabled", False), "stage.module.lora.enabled")
        check_lora_settings(lora, "stage.module.lora")  # checked even when off: nothing is silently ignored
        self.lora = lora if enabled else None
        if self.lora is not None:
            if "targets" in self.lora:
                self.lora["targets"] = [str(t) for t in self.lora["targets"]]
            check_lora_targets(self.model, self.lora.get("targets"), "stage.module.lora.targets")
        self.trainable_params = None  # counted at the first setup (LoRA applied, nothing merged yet)
        self.val_loss = MeanMetric()
        self.generation_config: dict = {}  # saved into generation_config.json by the pipeline

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule
        if not hasattr(dm, "tasks"):
            raise TypeError(f"stage=finetune trains on labeled tasks (data=tasks), not on {type(dm).__name__}: "
                            "drop the data= override (your own tasks go in data.custom)")
        if dm.seq_len > self.model.config.max_seq_len:
            raise ValueError(f"data.seq_len={dm.seq_len} exceeds the max_seq_len {self.model.config.max_seq_len} "
                             f"of {self.init_dir}")
        new_size = len(dm.tokenizer)
        if new_size > self.model.config.vocab_size:
            log.info("embeddings: %d -> %d rows (new rows = the mean embedding)", self.model.config.vocab_size, new_size)
            self.model.resize_token_embeddings(new_size)
        self.generation_config = {"prompt_template": dm.prompt_template}
        if self.trainable_params is not None:  # a later validate() also calls setup
            return
        if self.lora is not None:
            wrapped = apply_lora(self.model, **self.lora, trainable_rows=dm.tokenizer.control_token_ids)
            log.info("LoRA (rank %d) on %d projections; the control tokens' embedding/head rows train too",
                     self.lora.get("rank", 8), len(wrapped))
            # the adapters, and the embedding/head rows of the control tokens
            self.trainable_params = sum(p.numel() for n, p in self.model.named_parameters() if ".lora_" in n) + len(
                dm.tokenizer.control_token_ids) * sum(w.size(1) for w in row_trainable_weights(self.model))
        else:
            self.trainable_params = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        log.info("trainable parameters: %.3fM of %.3fM", self.trainable_params / 1e6, self.model.num_params() / 1e6)

    def on_fit_end(self) -> None:
        if has_lora(self.model):
            log.info("merged %d LoRA adapters into the weights", merge_lora(self.model))

    def _loss(self, batch: dict) -> tuple[torch.Tensor, int]:
        ids, labels = batch["input_ids"], batch["labels"]
        x, y = ids[:, :-1], labels[:, 1:]  # (B, T): position t predicts token t + 1; -100 on the prompt
        h = self.model(x, apply_head=False)  # (B, T, d); padding sits after each example: causal, harmless
        return linear_cross_entropy(h, self.model.lm_head.weight, y), int((y != -100).sum())

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, n = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/output_tokens", float(n))
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss, n = self._loss(batch)
        self.val_loss.update(loss, weight=n)  # mean over output tokens, not batches

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.val_loss.reset()
        self.log("val/loss", loss, prog_bar=True)
        self.log("val/ppl", torch.exp(loss), prog_bar=True)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        optimizer.zero_grad(set_to_none=True)

    def configure_optimizers(self):
        # with LoRA the embedding/head train only in their control-token rows: never decay the frozen rest
        never_decay = row_trainable_weights(self.model) if has_lora(self.model) else ()
        return lightning_optimizers(self.model, self.optimizer_factory, self.scheduler_factory, never_decay)

    def _log_explanation(self, dm) -> None:
        """With a W&B logger: the explain report (HTML, lens and attention images) of one generation
        under the first control token, attributed against the second (or no control)."""
        from slimpajama.pipeline import wandb_loggers

        loggers = wandb_loggers(self.trainer.loggers)
        controls = dm.tokenizer.control_tokens
        if not loggers or not controls:
            return
        from slimpajama.explain import explain, log_to_wandb

        ex = explain(self.model, dm.tokenizer, prompt="", control=controls[0],
                     alt_control=controls[1] if len(controls) > 1 else "", max_new_tokens=24,
                     template=dm.prompt_template)
        for lg in loggers:
            log_to_wandb(ex, lg, key="explain")

    def extra_metrics(self) -> dict:
        """The trainable parameter count and the end-of-fit evaluation on the test splits (see
        `slimpajama.evaluate`), rank 0 only."""
        counts = {"model/trainable_params": float(self.trainable_params)} if self.trainable_params else {}
        if not self.evaluation.get("enabled", True) or not self.trainer.is_global_zero:
            return counts
        from slimpajama.evaluate import evaluate_tasks, log_sample_tables

        options = {k: v for k, v in self.evaluation.items() if k not in ("enabled", "explain")}
        dm = self.trainer.datamodule  # its seq_len was checked against the model in setup
        metrics, samples = evaluate_tasks(self.model, dm.tokenizer, dm.tasks, dm.prompt_template, **options)
        log_sample_tables(self.trainer.loggers, samples)
        if self.evaluation.get("explain", True):
            self._log_explanation(dm)
        for lg in self.trainer.loggers:
            lg.log_metrics(metrics, self.trainer.global_step)
        return {**counts, **metrics}
