"""run(cfg): build data, stage module, callbacks, loggers and trainer from config; fit; save.

Every stage goes through here. A stage's config group (`conf/stage/*.yaml`) names its
LightningModule; the module exposes the model it trains as `.model`, which is saved with
`save_pretrained` into the run folder and published as `logs/latest/<stage>` (with its tokenizer:
a Markov check's model, which has none, is saved only).
"""

import json
import logging
import math
import os
import signal
import sys
from pathlib import Path
from typing import Optional

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict

from slimpajama.checkpointing import RngState, RunIdentity, checkpoint_state, logger_ids
from slimpajama.checks import is_finite_number, is_whole_number
from slimpajama.fsdp import full_model
from slimpajama.pretrained import write_together

log = logging.getLogger(__name__)


def _objects(group: Optional[DictConfig]) -> list:
    """Instantiate every `_target_` entry of a config group such as callbacks or logger."""
    if not group:
        return []
    return [instantiate(c) for c in group.values() if isinstance(c, DictConfig) and "_target_" in c]


def latest_link(cfg: DictConfig, stage: str) -> Path:
    return Path(cfg.paths.log_dir) / "latest" / stage


def resolve_ckpt_path(cfg: DictConfig) -> Optional[str]:
    """`ckpt_path=last`: this run's own `checkpoints/last.ckpt` (a rerun with the same `hydra.run.dir`), else
    the newest one of the stage's runs and of a pipeline's runs of it (never a multirun's sibling job)."""
    if cfg.ckpt_path != "last":  # a file, or the folder of a sharded (trainer=fsdp) checkpoint
        if cfg.ckpt_path and not Path(cfg.ckpt_path).exists():
            raise FileNotFoundError(f"ckpt_path={cfg.ckpt_path} does not exist")
        return cfg.ckpt_path
    log_dir, stage = Path(cfg.paths.log_dir), cfg.task_name
    own = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    if own.exists():  # a rerun with the same hydra.run.dir continues itself, whatever ran since
        log.info("resuming from %s", own)
        return str(own)
    candidates = set((log_dir / stage).glob("**/checkpoints/last.ckpt"))
    candidates |= set(log_dir.glob(f"pipeline/runs/*/{stage}/checkpoints/last.ckpt"))
    if not candidates:
        raise FileNotFoundError(f"ckpt_path=last: no checkpoints/last.ckpt in {own.parent.parent}, under "
                                f"{log_dir / stage} or in {log_dir}/pipeline/runs/*/{stage}")
    newest = max(candidates, key=lambda p: p.stat().st_mtime)
    log.info("resuming from %s", newest)
    return str(newest)


# the folder a run started from, saved in its checkpoint's hyperparameters, and the config key that chose it
PINNED_MODELS = {"teacher_dir": "teacher", "source_dir": "init_from"}


def _keep_the_runs_models(cfg: DictConfig, state: dict) -> None:
    """A resumed distill or prune run keeps the teacher or source model it started from, where the config
    leaves the choice to `latest/` or a registered name: a run published since would be picked instead.
    state: the checkpoint's `checkpoint_state`."""
    saved = state.get("hyper_parameters", {})
    module = cfg.stage.module
    for saved_key, key in PINNED_MODELS.items():
        folder = saved.get(saved_key)
        if folder is None or key not in module:
            continue
        chosen = module[key]
        if chosen is not None and Path(str(chosen)).is_dir():  # a folder the user gave: theirs
            continue
        if not Path(folder).is_dir():
            log.warning("the checkpoint's %s %s no longer exists: resuming with %s=%s", saved_key, folder, key, chosen)
            continue
        log.info("resuming with the model the run started from: %s=%s", key, folder)
        with open_dict(cfg):
            module[key] = folder


def _continue_logger_runs(cfg: DictConfig, state: dict) -> None:
    """A resumed run logs into the same W&B run: the id stored in the checkpoint (`RunIdentity`); state:
    the checkpoint's `checkpoint_state`."""
    wandb_cfg = (cfg.get("logger") or {}).get("wandb")
    if wandb_cfg is None or wandb_cfg.get("id"):
        return
    run_id = logger_ids(state).get("wandb")
    if run_id:
        with open_dict(cfg):
            wandb_cfg.id = run_id
            wandb_cfg.resume = wandb_cfg.get("resume") or "allow"
        log.info("continuing W&B run %s", run_id)


def wandb_loggers(loggers) -> list:
    """The W&B loggers among `loggers` (for what only W&B can show: tables, artifacts, HTML)."""
    from lightning.pytorch.loggers import WandbLogger

    return [lg for lg in loggers or [] if isinstance(lg, WandbLogger)]


def log_model_artifact(loggers, model_dir: Path, name: str, metrics: dict) -> None:
    """The saved model folder as a W&B `model` artifact (version per run, alias `latest`) on every W&B
    logger; offline runs keep it in the run folder until `wandb sync`."""
    for lg in wandb_loggers(loggers):
        import wandb

        artifact = wandb.Artifact(name, type="model", metadata={k: v for k, v in metrics.items() if "/" in k})
        artifact.add_dir(str(model_dir))
        lg.experiment.log_artifact(artifact, aliases=["latest"])
        log.info("logged %s as the W&B model artifact %r", model_dir, name)


@rank_zero_only
def _publish(cfg: DictConfig, module: L.LightningModule, datamodule, metrics: dict, model=None, loggers=()) -> None:
    out = Path(cfg.paths.output_dir)
    model_dir = out / "model"
    model = module.model if model is None else model  # an FSDP run passes the unsharded copy
    # a stage may add generation defaults, e.g. the fine-tuning prompt_template
    # a stage may also keep its source's dtype in the files (pruning: a bfloat16 model stays bfloat16)
    model.save_pretrained(model_dir, generation_config=getattr(module, "generation_config", None),
                          dtype=getattr(module, "save_dtype", None))
    if hasattr(module, "saved_model_metrics"):  # a stage's measurements of the files just written (pruning)
        metrics.update(module.saved_model_metrics(model_dir))
    tokenizer = datamodule.tokenizer
    if tokenizer is not None:
        tokenizer.save_pretrained(model_dir)
    _write_metrics(out, metrics)
    if tokenizer is None:  # a Markov check's tokens: a model no tool can encode a prompt for is not published
        log.info("saved the model to %s; not published as %s: its data has no tokenizer (name the folder to use it, "
                 "e.g. teacher=%s)", model_dir, latest_link(cfg, cfg.task_name), model_dir)
        return
    if cfg.get("sample") and cfg.sample.max_new_tokens > 0:
        _sample(cfg, model, tokenizer, loggers)  # before the link: a run that fails here is not published
    link = latest_link(cfg, cfg.task_name)
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.with_name(link.name + f".tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(os.path.relpath(out, link.parent))
    os.replace(tmp, link)  # atomic: the link always points at a finished run
    log.info("saved the model to %s (%s -> %s)", model_dir, link, out)
    if cfg.get("model_artifact"):
        log_model_artifact(loggers, model_dir, f"{cfg.task_name}-model", metrics)


def check_sample(sample: Optional[DictConfig]) -> None:
    """The after-training sample's settings, before any training: a bad one would fail the run at its end."""
    if not sample:
        return
    n = sample.get("max_new_tokens", 0)
    if not is_whole_number(n) or n < 0:
        raise ValueError(f"sample.max_new_tokens={n!r} must be a whole number >= 0 (0: no sample)")
    if n == 0:
        return
    t, k, count = sample.get("temperature"), sample.get("top_k"), sample.get("num_samples", 1)
    if t is not None and (not is_finite_number(t) or t < 0):
        raise ValueError(f"sample.temperature={t!r} must be a finite number >= 0, or null (greedy with top_k null)")
    if k is not None and (not is_whole_number(k) or k < 0):
        raise ValueError(f"sample.top_k={k!r} must be a whole number >= 0 (0: the whole vocabulary), or null")
    if not is_whole_number(count) or count < 1:
        raise ValueError(f"sample.num_samples={count!r} must be a whole number >= 1")
    if not isinstance(sample.get("prompt"), str):
        raise ValueError(f"sample.prompt={sample.get('prompt')!r} must be text")


def _sample(cfg: DictConfig, model, tokenizer, loggers) -> None:
    """`sample.num_samples` generations from `sample.prompt`: logged, and a W&B table
    (`samples/generations`) when a logger is W&B."""
    s = cfg.sample
    # greedy, so one generation: temperature and top_k both null, or temperature 0
    sampled = s.temperature != 0 and (s.temperature is not None or s.top_k is not None)
    ids = tokenizer.encode(s.prompt, return_tensors="pt").to(next(model.parameters()).device)
    out_ids = model.generate(ids, max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_k=s.top_k,
                             seed=cfg.seed, num_return_sequences=s.get("num_samples", 1) if sampled else 1)
    texts = [tokenizer.decode(row, skip_special_tokens=True) for row in out_ids]
    for text in texts:
        log.info("sample (temperature %s): %s", s.temperature, text)
    for lg in wandb_loggers(loggers):
        lg.log_table(key="samples/generations", columns=["stage", "prompt", "temperature", "generation"],
                     data=[[cfg.task_name, s.prompt, s.temperature, t] for t in texts])


def run(cfg: DictConfig) -> Optional[float]:
    """Train the configured stage; returns `cfg.optimized_metric` for sweepers. The W&B run ends with it,
    so each job of a multirun (a grid or an Optuna search, all in one process) logs into a run of its own."""
    ok = False
    try:
        result = _run(cfg)
        ok = True
        return result
    finally:
        _finish_wandb(ok)


def _finish_wandb(ok: bool) -> None:
    wandb = sys.modules.get("wandb")  # imported only if a W&B logger was made
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=0 if ok else 1)


def _run(cfg: DictConfig) -> Optional[float]:
    for name in ("litdata", "litdata.streaming.dataset", "litdata.utilities.format"):
        logging.getLogger(name).setLevel(logging.WARNING)  # chatty INFO on every dataset open
    L.seed_everything(cfg.seed, workers=True)
    if cfg.get("flush_denormal", True):
        torch.set_flush_denormal(True)  # denormals slow CPU matmuls 3-6x once weights get small
    torch.set_float32_matmul_precision(cfg.get("matmul_precision", "high"))

    check_sample(cfg.get("sample"))
    ckpt_path = resolve_ckpt_path(cfg)
    if ckpt_path:
        state = checkpoint_state(ckpt_path)  # read once, for both
        _continue_logger_runs(cfg, state)
        _keep_the_runs_models(cfg, state)
    datamodule = instantiate(cfg.data.module)
    module = instantiate(cfg.stage.module)
    callbacks = _objects(cfg.get("callbacks")) + [RunIdentity(), RngState()]
    if cfg.trainer.get("enable_progress_bar") is False:  # a progress bar callback would make Lightning refuse it
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    loggers = _objects(cfg.get("logger"))
    # no checkpoint callback chosen (callbacks=none): no checkpoints, rather than Lightning's default one
    checkpointing = {} if any(isinstance(c, ModelCheckpoint) for c in callbacks) else {"enable_checkpointing": False}
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, **checkpointing)

    n_params = module.model.num_params()
    log.info("model: %.2fM parameters (%.2fM without embeddings)", n_params / 1e6, module.model.num_params(True) / 1e6)
    hparams = {**OmegaConf.to_container(cfg, resolve=True), "model/params": n_params}
    for lg in trainer.loggers:
        lg.log_hyperparams(hparams)

    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if isinstance(v, (torch.Tensor, float, int))}
        if cfg.get("final_validation", True):  # measure the final weights, not those of the last periodic validation
            final = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
            metrics.update({k: float(v) for k, v in final.items()})
    except SIGTERMException:  # preempted (in fit or the final validation): last.ckpt was saved (ResumeCheckpoint);
        # SIGTERMException is a SystemExit of code None, which would exit with 0 and let a pipeline go on
        log.warning("stopped by SIGTERM after step %d: rerun the same command with ckpt_path=last", trainer.global_step)
        raise SystemExit(128 + signal.SIGTERM)
    metrics.update(datamodule.metrics)
    metrics["model/params"] = module.model.num_params()  # after fit: a stage may change the model (pruning)
    if hasattr(module, "extra_metrics"):  # a stage's own final measurements, e.g. prune/sparsity
        metrics.update(module.extra_metrics())
    metrics["trainer/global_step"] = trainer.global_step
    for lg in trainer.loggers:
        lg.log_metrics({k: v for k, v in metrics.items() if k.startswith(("val/", "data/", "model/"))}, trainer.global_step)
        lg.save()  # after fit nothing else flushes them (the CSV logger writes every log_every_n_steps)
    if trainer.is_global_zero and "val/loss" in metrics:
        log.info(
            "final validation: loss %.4f, perplexity %.2f%s",
            metrics["val/loss"], math.exp(metrics["val/loss"]),
            f" (entropy-rate bound {metrics['data/entropy_rate']:.4f})" if "data/entropy_rate" in metrics else "",
        )
    if cfg.get("save_model", True):
        model = full_model(trainer, module)  # FSDP: gathered onto rank 0 (every rank takes part)
        _publish(cfg, module, datamodule, metrics, model, trainer.loggers)
    else:  # no model, but the run's numbers still (a sweep's collector reads them)
        _write_metrics(Path(cfg.paths.output_dir), metrics)
    return metrics.get(cfg.get("optimized_metric", "val/loss"))


@rank_zero_only
def _write_metrics(out: Path, metrics: dict) -> None:
    """metrics.json, written whole or not at all (a temporary file renamed), for the sweep collector."""
    out.mkdir(parents=True, exist_ok=True)
    write_together({out / "metrics.json": lambda p: p.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")})
