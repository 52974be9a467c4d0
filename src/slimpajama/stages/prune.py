"""Pruning: prune a saved model on calibration batches, then recover by fine-tuning or distillation.

`setup` (before the optimizer exists) loads calibration and evaluation batches from the shared
DataModule, measures the dense model (validation perplexity, generation tokens/s), and prunes:

- `magnitude` / `wanda`: keep-masks of the configured sparsity (pure maths in `slimpajama.pruning`);
  the weights keep their shapes, pruned entries are exact zeros. `schedule=gradual` raises the
  sparsity during training along Zhu & Gupta's cubic schedule, recomputing the masks every
  `gradual.every` steps (already pruned weights stay pruned).
- `structured`: Minitron-style width (and optional depth) pruning into a new, smaller dense model.

Recovery: `finetune` (next-token loss; masked weights and their gradients are held at zero after
every optimizer step), `distill` (the unpruned model as teacher, `losses.linear_distill_loss`), or
`none` (no training step runs). The saved model has the masks applied, so its zeros are permanent.

metrics.json gets (`extra_metrics`, `saved_model_metrics`): target and achieved sparsity per
prunable matrix (`prune/target_sparsity/<module>`, `prune/sparsity/<module>`, named as in the dense
model) and overall counted on the saved safetensors, parameters and file size before and after,
validation perplexity dense / pruned / recovered, and generation tokens/s dense / pruned.
"""

import copy
import itertools
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import lightning as L
import torch
from safetensors import safe_open
from torchmetrics import MeanMetric

from slimpajama import pruning
from slimpajama.checks import is_whole_number
from slimpajama.generation import tokens_per_sec
from slimpajama.losses import check_kd_settings, linear_cross_entropy, linear_distill_loss
from slimpajama.optim import FusedOptimizerClipping, lightning_optimizers
from slimpajama.pretrained import CONFIG_FILE, WEIGHTS_FILE, SlimPajamaModel, folder_dtype, weight_files
from slimpajama.registry import INPUTS, latest_model, resolve_model

log = logging.getLogger(__name__)

METHODS = ("magnitude", "wanda", "structured")
SCHEDULES = ("oneshot", "gradual")
RECOVERIES = ("finetune", "distill", "none")
DEFAULT_SCOPE = {"magnitude": "layer", "wanda": "row"}  # prune.scope=null: each method's usual comparison group
DISTILL = {"kd_ratio": 1.0, "temperature": 1.0, "kind": "forward_kl"}  # prune.distill: losses.linear_distill_loss
# our fused modules -> the Llama tensors saved for them
_SAVED_NAMES = {"self_attn.qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                "mlp.gate_up": ("mlp.gate_proj", "mlp.up_proj")}


def saved_tensor_names(module_name: str, tied: bool = False) -> list[str]:
    """Names in the saved safetensors of the weights of one of our modules (`layers.0.mlp.gate_up` ->
    `model.layers.0.mlp.gate_proj.weight`, `model.layers.0.mlp.up_proj.weight`). With tied embeddings
    the head's weight is saved once, as the embedding's."""
    if module_name == "lm_head":
        return ["model.embed_tokens.weight" if tied else "lm_head.weight"]
    for fused, parts in _SAVED_NAMES.items():
        if module_name.endswith(fused):
            base = module_name.removesuffix(fused)
            return [f"model.{base}{p}.weight" for p in parts]
    return [f"model.{module_name}.weight"]


def check_distill(distill: dict, prefix: str = "prune.distill") -> None:
    """The KD settings as `stage=distill` checks them (`losses.check_kd_settings`), each error naming
    `<prefix>.<key>`, and no key but those of DISTILL."""
    unknown = sorted(set(distill) - set(DISTILL))
    if unknown:
        raise ValueError(f"{prefix}.{unknown[0]}: not a setting (the keys are {', '.join(DISTILL)})")
    check_kd_settings(distill["temperature"], distill["kd_ratio"], distill["kind"], prefix)


def structured_fractions(structured: dict, sparsity: float) -> tuple[dict[str, float], dict[str, str]]:
    """The fractions `pruning.structured_prune` removes (heads and channels: prune.sparsity when null),
    and the config key each came from where that is not prune.structured.<part>."""
    fractions = {k: structured[k] for k in ("heads", "channels", "hidden", "layers")}
    keys = {k: "prune.sparsity" for k in ("heads", "channels") if fractions[k] is None}
    return {k: sparsity if v is None else v for k, v in fractions.items()}, keys


def source_dtype(folder: Path) -> torch.dtype:
    """The dtype of a model folder's weights (`folder_dtype`: as config.json records it, else as stored)."""
    return folder_dtype(Path(folder), json.loads((Path(folder) / CONFIG_FILE).read_text()))


@torch.no_grad()
def mean_loss(model: torch.nn.Module, batches: Iterable[torch.Tensor]) -> float:
    """Mean next-token cross-entropy per token over (B, T+1) token blocks."""
    device = next(model.parameters()).device
    total, n = 0.0, 0
    was_training = model.training
    model.eval()
    for batch in batches:
        batch = batch.to(device=device, dtype=torch.long)
        h = model(batch[:, :-1], apply_head=False)
        total += float(linear_cross_entropy(h, model.lm_head.weight, batch[:, 1:])) * batch[:, 1:].numel()
        n += batch[:, 1:].numel()
    model.train(was_training)
    return total / max(n, 1)


class PruneModule(FusedOptimizerClipping, L.LightningModule):
    def __init__(
        self,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[[torch.optim.Optimizer], object] | None = None,
        init_from: str | None = None,
        log_dir: str | None = None,
        method: str = "magnitude",
        sparsity: float = 0.5,
        scope: str | None = None,
        prunable: Sequence[str] = pruning.DEFAULT_PRUNABLE,
        schedule: str = "oneshot",
        gradual: dict | None = None,
        recovery: str = "finetune",
        distill: dict | None = None,
        structured: dict | None = None,
        sequential: bool = True,
        calibration_batches: int = 16,
        eval_batches: int = 16,
        generation_tokens: int = 64,
    ):
        """init_from: the model to prune (a folder or registry name; None: the newest distilled, else
        pretrained, model under log_dir). See conf/stage/prune.yaml for every other key."""
        super().__init__()
        for key, value, allowed in (("method", method, METHODS), ("schedule", schedule, SCHEDULES),
                                    ("recovery", recovery, RECOVERIES)):
            if value not in allowed:
                raise ValueError(f"prune.{key}={value!r}: expected one of {', '.join(allowed)}")
        pruning.check_sparsity(sparsity)
        if scope is not None and scope not in pruning.SCOPES:  # structured pruning has no scope, but a typo is a typo
            raise ValueError(f"prune.scope={scope!r}: expected one of {', '.join(pruning.SCOPES)}")
        scope = scope or DEFAULT_SCOPE.get(method)
        if isinstance(prunable, str):  # prune.prunable=layers.0.mlp.down_proj: one pattern, not its characters
            prunable = [prunable]
        prunable = list(prunable)
        if method == "structured" and sorted(prunable) != sorted(pruning.DEFAULT_PRUNABLE):
            raise ValueError(f"prune.prunable={prunable}: structured pruning removes whole query groups, MLP channels, "
                             "hidden channels and blocks (prune.structured.*), not listed modules; leave "
                             "prune.prunable at its default and set a fraction to 0 to keep that part whole")
        for key, value in (("calibration_batches", calibration_batches), ("eval_batches", eval_batches),
                           ("generation_tokens", generation_tokens)):
            if not is_whole_number(value) or value < 0:
                raise ValueError(f"prune.{key}={value!r} must be a whole number >= 0")
        if method != "magnitude" and calibration_batches < 1:
            raise ValueError(f"prune.calibration_batches=0: prune.method={method} ranks weights by their activations "
                             "on calibration batches; give at least 1")
        structured = {"heads": None, "channels": None, "hidden": 0.0, "layers": 0.0, "layer_metric": "cosine",
                      **(structured or {})}
        for key in ("heads", "channels", "hidden", "layers"):  # before the data and the dense measurements
            if structured[key] is not None:
                pruning.check_sparsity(structured[key], f"prune.structured.{key}")
        if method == "structured":
            pruning.check_layer_metric(structured["layer_metric"])
        distill = {**DISTILL, **(distill or {})}
        check_distill(distill)  # whatever prune.recovery is: a typo is still a typo
        if method == "structured" and schedule != "oneshot":
            raise ValueError("prune.schedule=gradual needs an unstructured method (magnitude or wanda): "
                             "structured pruning changes the shapes once, before recovery")
        # the folder itself, for a registry name or a run folder too: its config and weight files are read below
        if init_from:
            self.source = resolve_model(init_from, log_dir)
        else:
            self.source = latest_model(INPUTS["prune"][1], log_dir=log_dir)
        self.model = SlimPajamaModel.from_pretrained(self.source).train()  # float32 to prune and recover
        self.save_dtype = source_dtype(self.source)  # saved as the source was: a bfloat16 model stays bfloat16
        log.info("pruning %s (%.2fM parameters) by %s to sparsity %s", self.source, self.model.num_params() / 1e6,
                 method, sparsity)
        if method == "structured":  # the config is enough: a shape that removes everything fails before any work
            fractions, keys = structured_fractions(structured, sparsity)
            pruning.structured_counts(self.model.config, **fractions, keys=keys)
        self.method, self.sparsity, self.scope, self.prunable = method, sparsity, scope, prunable
        self.schedule = schedule
        self.gradual = {"initial_sparsity": 0.0, "start_step": 0, "end_step": None, "every": 10, **(gradual or {})}
        self.recovery, self.distill = recovery, distill
        self.structured = structured
        self.kept_layers: list[int] | None = None  # structured: the dense blocks kept, in the saved order
        self.sequential, self.calibration_batches, self.eval_batches = sequential, calibration_batches, eval_batches
        self.generation_tokens = generation_tokens
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.save_hyperparameters({"init_from": str(self.source), "method": method, "sparsity": sparsity, "scope": scope,
                                   "schedule": schedule, "recovery": recovery,
                                   "source_dir": str(self.source.resolve())})  # not latest/: a resume keeps it
        modules = pruning.prunable_modules(self.model, self.prunable)  # bad patterns fail here, not after calibration
        if not modules:
            raise ValueError("prune.prunable is empty: list the modules to prune, e.g. 'layers.*.mlp.down_proj'")
        embeddings = [n for n, m in modules.items() if isinstance(m, torch.nn.Embedding)]
        if method == "wanda" and embeddings:
            raise ValueError(f"prune.prunable: {embeddings[0]} is an embedding, whose inputs are token ids, not the "
                             "activations Wanda scores; prune it with prune.method=magnitude, or list lm_head "
                             "instead (the same weight when the embeddings are tied)")
        if schedule == "gradual":
            initial, every = self.gradual["initial_sparsity"], self.gradual["every"]
            pruning.check_sparsity(initial, "prune.gradual.initial_sparsity")
            start, end = self.gradual["start_step"], self.gradual["end_step"]
            for key, value in (("start_step", start), ("end_step", end)):
                if value is not None and (not is_whole_number(value) or value < 0):
                    raise ValueError(f"prune.gradual.{key}={value!r} must be a whole number of steps >= 0")
            if start is None:
                raise ValueError("prune.gradual.start_step=None: give the step the schedule starts at (e.g. 0)")
            if end is not None and end <= start:
                raise ValueError(f"prune.gradual.end_step={end} must be after prune.gradual.start_step={start}")
            if not 0.0 <= initial <= sparsity:
                raise ValueError(f"prune.gradual.initial_sparsity={initial} must be in [0, prune.sparsity={sparsity}]: "
                                 "masks only grow")
            if not isinstance(every, int) or every < 1:
                raise ValueError(f"prune.gradual.every={every} must be a whole number of steps >= 1")
        self.dense_params = self.model.num_params()
        # saved tensor name -> its size in the dense model, per prunable module
        self.dense_prunable = {n: self._saved_sizes(n, m) for n, m in modules.items()}
        self.dense_shapes = {n: tuple(m.weight.shape) for n, m in modules.items()}
        self.masks: dict[str, torch.Tensor] = {}
        self.input_norms: dict[str, torch.Tensor] = {}
        self.current_sparsity = 0.0
        self.report: dict[str, float] = {}
        self.pruned = False
        self.val_loss = MeanMetric()

    def _saved_sizes(self, name: str, module: torch.nn.Module) -> dict[str, int]:
        c = self.model.config
        parts = saved_tensor_names(name, c.tie_embeddings)
        if name.endswith("self_attn.qkv"):
            rows = [c.n_head * c.head_dim, c.n_kv_head * c.head_dim, c.n_kv_head * c.head_dim]
        else:
            rows = [module.weight.shape[0] // len(parts)] * len(parts)
        return {part: r * module.weight.shape[1] for part, r in zip(parts, rows)}

    # ------------------------------------------------------------------ pruning (before the optimizer exists)

    def setup(self, stage: str) -> None:
        if self.pruned:  # validate() after fit calls setup again
            return
        dm = self.trainer.datamodule
        dm.setup("fit")
        tokenizer = getattr(dm, "tokenizer", None)
        if tokenizer is not None and tokenizer.vocab_size != self.model.config.vocab_size:
            raise ValueError(f"{self.source / 'config.json'}: vocab_size {self.model.config.vocab_size} != the data's "
                             f"tokenizer ({tokenizer.vocab_size}): prune with the corpus and tokenizer the model was "
                             "trained on (data.tokenizer_path)")
        seq_len = getattr(dm, "seq_len", None)
        if seq_len is not None and seq_len > self.model.config.max_seq_len:
            raise ValueError(f"data.seq_len={seq_len} exceeds the max_position_embeddings={self.model.config.max_seq_len} "
                             f"of {self.source / 'config.json'}: lower data.seq_len")
        device = self.trainer.strategy.root_device
        self.model.to(device)
        self.model.eval()  # the statistics and measurements below without dropout; fit switches back to train
        calibration = list(itertools.islice(iter(dm.train_dataloader()), self.calibration_batches))
        evaluation = list(itertools.islice(iter(dm.val_dataloader()), self.eval_batches))
        if self.generation_tokens and not (evaluation or calibration):
            raise ValueError("prune.generation_tokens > 0 times generation from a prompt of the data, but "
                             "prune.eval_batches and prune.calibration_batches are both 0: set one, or "
                             "prune.generation_tokens=0")
        self.prompt = (evaluation or calibration)[0][:1, :16] if (evaluation or calibration) else None
        if self.eval_batches:
            self.report["prune/ppl_dense"] = math.exp(mean_loss(self.model, evaluation))
        if self.generation_tokens:
            self.report["prune/gen_tokens_per_sec_dense"] = tokens_per_sec(
                self.model, self.prompt, self.generation_tokens)
        if self.recovery == "distill":  # the unpruned model, outside the module's children: not in
            # state_dict, checkpoints or the optimizer, and never switched to train mode
            self.__dict__["teacher"] = copy.deepcopy(self.model).eval().requires_grad_(False)
        start = time.perf_counter()
        if self.method == "structured":
            self._prune_structured(calibration)
        else:
            if self.method == "wanda" and self.schedule == "gradual":  # scores are |W| * these fixed norms
                sums = pruning.input_sq_sums(self.model, calibration, self._prunable())
                self.input_norms = {n: s.sqrt() for n, s in sums.items()}
            target = self.sparsity if self.schedule == "oneshot" else self._scheduled(0)
            self._update_masks(target, calibration)
        self.report["prune/seconds"] = time.perf_counter() - start
        self.model.train()
        if self.eval_batches and self.schedule == "oneshot":
            self.report["prune/ppl_pruned"] = math.exp(mean_loss(self.model, evaluation))
            log.info("validation perplexity: dense %.2f, pruned %.2f", self.report["prune/ppl_dense"],
                     self.report["prune/ppl_pruned"])
        self.pruned = True

    def _prunable(self) -> dict[str, torch.nn.Module]:
        return pruning.prunable_modules(self.model, self.prunable)

    def _prune_structured(self, calibration: list[torch.Tensor]) -> None:
        fractions, _ = structured_fractions(self.structured, self.sparsity)
        self.model, kept = pruning.structured_prune(self.model, calibration, **fractions,
                                                    layer_metric=self.structured["layer_metric"])
        self.kept_layers = kept["layers"]
        self.model.train()
        c = self.model.config
        log.info("structured: kept layers %s, %d query groups, %d MLP channels, %d hidden channels -> %.2fM parameters",
                 kept["layers"], c.n_kv_head, c.intermediate_size, c.d_model, self.model.num_params() / 1e6)

    def _scheduled(self, step: int) -> float:
        g = self.gradual
        end = g["end_step"] if g["end_step"] is not None else max(g["start_step"] + 1, int(0.75 * self.trainer.max_steps))
        return pruning.cubic_sparsity(step, self.sparsity, g["initial_sparsity"], g["start_step"], end, g["every"])

    @torch.no_grad()
    def _update_masks(self, sparsity: float, calibration: list | None = None) -> None:
        modules = self._prunable()
        if self.method == "wanda" and not self.input_norms:  # one-shot Wanda: block by block on calibration data
            self.masks, _ = pruning.wanda_prune(self.model, calibration, modules, sparsity, self.scope, self.sequential)
        else:
            scores = {}
            for name, m in modules.items():
                s = (pruning.wanda_scores(m.weight, self.input_norms[name]) if self.method == "wanda"
                     else pruning.magnitude_scores(m.weight))
                if name in self.masks:  # pruned weights stay pruned as the sparsity rises
                    s = s.masked_fill(~self.masks[name].view_as(s), -1.0)
                scores[name] = s
            self.masks = pruning.masks_from_scores(scores, sparsity, self.scope)
            pruning.apply_masks(modules, self.masks)
        self.masks = {n: m.view_as(modules[n].weight) for n, m in self.masks.items()}
        self.current_sparsity = sparsity

    # ------------------------------------------------------------------ recovery

    def on_train_start(self) -> None:
        # masks restored from a checkpoint were saved from the CPU: beside their weights again
        self.masks = {n: m.to(self._prunable()[n].weight.device) for n, m in self.masks.items()}
        if self.recovery == "none":
            log.info("prune.recovery=none: no training steps")
            self.trainer.should_stop = True

    def on_train_batch_start(self, batch, batch_idx):
        if self.recovery == "none":
            return -1  # skip the rest of the epoch
        if self.schedule == "gradual":
            target = self._scheduled(self.global_step)
            if target > self.current_sparsity:
                self._update_masks(target)
            self.log("prune/scheduled_sparsity", target)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        batch = batch.long()
        x, y = batch[:, :-1], batch[:, 1:]
        h = self.model(x, apply_head=False)  # (B, T, d)
        if self.recovery == "distill":
            with torch.no_grad():
                teacher_h = self.teacher(x, apply_head=False)
            out = linear_distill_loss(h, self.model.lm_head.weight, teacher_h, self.teacher.lm_head.weight, y,
                                      **self.distill)
            self.log("distill/kd_loss", out.kd)
            self.log("distill/ce_loss", out.ce)
            loss = out.loss
        else:
            loss = linear_cross_entropy(h, self.model.lm_head.weight, y)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        if self.masks:  # no update reaches a pruned weight (nor AdamW's moments)
            modules = self._prunable()
            for name, mask in self.masks.items():
                grad = modules[name].weight.grad
                if grad is not None:
                    grad.mul_(mask.to(grad.dtype))

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        optimizer.zero_grad(set_to_none=True)
        if self.masks:  # held exactly at zero whatever the optimizer does (weight decay, momentum)
            pruning.apply_masks(self._prunable(), self.masks)

    def on_train_end(self) -> None:
        if self.schedule == "gradual" and self.current_sparsity < self.sparsity:
            log.warning("training ended before the schedule reached sparsity %s (at %.3f): pruning to it now",
                        self.sparsity, self.current_sparsity)
            self._update_masks(self.sparsity)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["prune_masks"] = {n: m.cpu() for n, m in self.masks.items()}
        checkpoint["prune_sparsity"] = self.current_sparsity

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.masks = dict(checkpoint.get("prune_masks", {}))
        self.current_sparsity = checkpoint.get("prune_sparsity", self.current_sparsity)

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        batch = batch.long()
        h = self.model(batch[:, :-1], apply_head=False)
        self.val_loss.update(linear_cross_entropy(h, self.model.lm_head.weight, batch[:, 1:]), weight=batch[:, 1:].numel())

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.val_loss.reset()
        self.log("val/loss", loss, prog_bar=True)
        self.log("val/ppl", torch.exp(loss), prog_bar=True)

    def configure_optimizers(self):
        return lightning_optimizers(self.model, self.optimizer_factory, self.scheduler_factory)

    # ------------------------------------------------------------------ what the pipeline records

    def extra_metrics(self) -> dict[str, float]:
        """Merged into metrics.json by the pipeline after the final validation."""
        m = {"prune/target_sparsity": self.sparsity, "prune/params_dense": self.dense_params,
             "model/params": self.model.num_params(), **self.report}
        m["prune/params_ratio"] = m["model/params"] / self.dense_params
        if "val/ppl" in self.trainer.callback_metrics:
            m["prune/ppl_recovered" if self.recovery != "none" else "prune/ppl_final"] = float(
                self.trainer.callback_metrics["val/ppl"])
        if self.generation_tokens and hasattr(self, "prompt"):
            tps = tokens_per_sec(self.model, self.prompt, self.generation_tokens)
            m["prune/gen_tokens_per_sec"] = tps
            if "prune/gen_tokens_per_sec_dense" in m:
                m["prune/gen_speedup"] = tps / m["prune/gen_tokens_per_sec_dense"]
        for lg in self.trainer.loggers:
            lg.log_metrics(m, self.trainer.global_step)
            lg.save()  # after fit: nothing else flushes them
        return m

    def saved_model_metrics(self, model_dir: Path) -> dict[str, float]:
        """Counted on the files just saved: file sizes, and the sparsity of each prunable module (a fused
        module over its saved parts: qkv over q/k/v_proj): 1 - its nonzeros / its size in the dense model,
        so a structured model's removed rows count as pruned; overall over every prunable module of the
        dense model (a dropped layer counts whole). Per-module keys name the dense model's modules: after
        depth pruning `layers.2.*` is dense block 2 wherever it was saved, and a dropped block has no
        per-module key. Unstructured methods also get `prune/target_sparsity/<module>`, the fraction the tie
        rule removes from that matrix (`pruning.target_sparsity`; none with prune.scope=global, whose one
        target is over all matrices together)."""
        saved = Path(model_dir) / WEIGHTS_FILE
        m = {"model/file_bytes": saved.stat().st_size}
        m["prune/file_bytes_dense"] = sum(f.stat().st_size for f in weight_files(self.source))  # shards summed
        m["prune/file_ratio"] = m["model/file_bytes"] / m["prune/file_bytes_dense"]
        # dense block i -> the name of its block in the saved file (depth pruning renumbers the kept ones)
        renumber = {f"model.layers.{i}.": f"model.layers.{j}." for j, i in enumerate(self.kept_layers or [])}

        def saved_name(part: str) -> str | None:
            if self.kept_layers is None or not part.startswith("model.layers."):
                return part
            block = ".".join(part.split(".")[:3]) + "."
            return renumber[block] + part.removeprefix(block) if block in renumber else None  # None: dropped

        kept, total = 0, 0
        with safe_open(str(saved), framework="pt") as f:
            names = set(f.keys())
            for module_name, parts in self.dense_prunable.items():
                present = [p for p in map(saved_name, parts) if p in names]  # none: a dropped layer
                nonzero = sum(int(torch.count_nonzero(f.get_tensor(p))) for p in present)
                kept, total = kept + nonzero, total + sum(parts.values())
                if present:
                    m[f"prune/sparsity/{module_name}"] = 1.0 - nonzero / sum(parts.values())
                if self.method != "structured" and self.scope != "global":
                    m[f"prune/target_sparsity/{module_name}"] = pruning.target_sparsity(
                        self.dense_shapes[module_name], self.sparsity, self.scope)
        m["prune/sparsity"] = 1.0 - kept / total
        s = self.structured
        # explicit prune.structured fractions set the shape: prune.sparsity is then no target to miss
        by_sparsity = s["heads"] is None and s["channels"] is None and not s["hidden"] and not s["layers"]
        if self.method == "structured" and by_sparsity and abs(m["prune/sparsity"] - self.sparsity) > 0.01:
            c = self.model.config
            log.warning("structured pruning removed %.4f of the prunable parameters, not prune.sparsity=%s: whole "
                        "query groups and channels are removed, each count rounded (%d query groups and %d MLP "
                        "channels kept)", m["prune/sparsity"], self.sparsity, c.n_kv_head, c.intermediate_size)
        target = self.sparsity if self.method != "structured" or by_sparsity else "set by prune.structured"
        log.info("achieved sparsity %.4f (target %s), %d parameters, %.2f MB", m["prune/sparsity"], target,
                 self.model.num_params(), m["model/file_bytes"] / 1e6)
        for lg in self.trainer.loggers:
            lg.log_metrics(m, self.trainer.global_step)
            lg.save()  # after fit: nothing else flushes them
        return m
