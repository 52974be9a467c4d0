"""The whole lifecycle in one command: every stage as an ordinary `python train.py stage=<s>` run,
then the report.

    python train.py experiment=pipeline_demo       # conf/experiment/pipeline_demo.yaml

A config with a `pipeline` block (`stages`: stage name -> its overrides, run in the pipeline's
order pretrain, distill, prune, finetune (leave a stage out to skip it); `common`:
overrides for every stage) makes `train.py` run each stage in its own process, in a sub-folder
of this run (`logs/pipeline/runs/<time>/<stage>/`). Each stage starts from the model of the stage
before it in this pipeline (`registry.INPUTS`: distill's teacher is this pipeline's pretrained model,
fine-tuning starts from its pruned, else distilled, else pretrained one), passed as `teacher=` or
`init_from=` unless the stage's overrides name one; a stage with no earlier stage in the pipeline
finds its model as it would on its own (`logs/latest/<stage>`). Runs of one pipeline share a W&B
group. At the end `slimpajama.report` measures every model and writes `report.md` and its plots into
this run folder.
"""

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from slimpajama.registry import INPUTS, PIPELINE

log = logging.getLogger(__name__)


# command-line overrides of the pipeline run that are not for its stages: the stages get their own
# hydra.run.dir, paths and seed are forwarded explicitly, the logger selection by `logger_choice`
_NOT_FORWARDED = ("experiment=", "hydra.", "pipeline.", "logger=", "paths.log_dir=", "paths.data_dir=", "seed=")


def logger_choice(cfg: DictConfig) -> str:
    """The `logger=` override that selects this run's loggers in a stage: `logger=[wandb,csv]` keeps a
    list (Hydra's runtime choices drop lists), `logger=none` when there is none."""
    names = [k for k, v in (cfg.get("logger") or {}).items() if isinstance(v, DictConfig) and "_target_" in v]
    return f"logger=[{','.join(names)}]" if names else "logger=none"


def user_overrides(task_overrides, stage: str = "") -> list:
    """The pipeline's own command-line overrides that every stage also gets (e.g. `trainer=gpu`,
    `logger.wandb.mode=online`), after the experiment's: the command line wins. A `data=` choice is
    the corpus of the language-model stages: fine-tuning keeps its `data=tasks`."""
    out = [o for o in map(str, task_overrides) if not o.lstrip("+~").startswith(_NOT_FORWARDED)]
    if stage == "finetune":
        out = [o for o in out if not o.lstrip("+~").startswith("data=")]
    return out


def run_stage(cmd: list, env: dict) -> int:
    """Run one stage and return its exit status. A SIGTERM to the pipeline (a scheduler's preemption) goes
    on to the stage, which saves its last.ckpt and exits 143, instead of leaving it running on its own."""
    proc = subprocess.Popen(cmd, env=env)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: proc.send_signal(signum))
    try:
        return proc.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)


def input_override(stage: str, overrides: list, runs: dict) -> list:
    """`teacher=` / `init_from=` naming the model of the newest stage of this pipeline that `stage`
    starts from (`runs`: stage -> its run folder), unless `overrides` name one already; [] when no
    such stage ran (the stage then finds one as on its own)."""
    if stage not in INPUTS:
        return []
    key, sources = INPUTS[stage]
    if any(str(o).lstrip("+~").startswith(f"{key}=") for o in overrides):
        return []
    done = [s for s in sources if s in runs]
    if not done:
        return []
    if not (runs[done[0]] / "model" / "config.json").is_file():
        log.warning("pipeline: %s saved no model (save_model=false?): %s finds its model as on its own", done[0], stage)
        return []
    return [f"{key}={runs[done[0]] / 'model'}"]


def stage_command(cfg: DictConfig, stage: str, overrides: list, out: Path, group: str, extra: list = ()) -> list:
    """The stage's `train.py` command: the pipeline's seed, then `pipeline.common`, the stage's own
    overrides and `extra` (a later one wins: a stage may set its own seed), then the paths."""
    cmd = [sys.executable, str(Path(cfg.paths.root_dir) / "train.py"), f"stage={stage}", logger_choice(cfg),
           f"seed={cfg.seed}", *map(str, cfg.pipeline.get("common") or []), *map(str, overrides or []), *extra,
           f"paths.log_dir={cfg.paths.log_dir}", f"paths.data_dir={cfg.paths.data_dir}", f"hydra.run.dir={out / stage}"]
    if "wandb" in (cfg.get("logger") or {}):
        cmd.append(f"logger.wandb.group={group}")
    return cmd


def run_lifecycle(cfg: DictConfig) -> dict:
    from hydra.core.hydra_config import HydraConfig

    from slimpajama.report import write_report

    out = Path(cfg.paths.output_dir)
    given = HydraConfig.get().overrides.task
    group = f"pipeline-{out.name}"
    stages = OmegaConf.to_container(cfg.pipeline.stages, resolve=True)
    unknown = sorted(set(stages) - set(PIPELINE))
    if unknown:
        raise ValueError(f"pipeline.stages: unknown stages {unknown}; the stages are {', '.join(PIPELINE)}")
    runs, timings = {}, {}
    for stage in [s for s in PIPELINE if s in stages]:  # always in the pipeline's order
        extra = user_overrides(given, stage)
        extra += input_override(stage, [*(cfg.pipeline.get("common") or []), *(stages[stage] or []), *extra], runs)
        cmd = stage_command(cfg, stage, stages[stage], out, group, extra)
        log.info("pipeline: %s\n  %s", stage, " ".join(cmd))
        start = time.perf_counter()
        returncode = run_stage(cmd, {**os.environ, "SLIMPAJAMA_ROOT": str(cfg.paths.root_dir)})
        timings[stage] = time.perf_counter() - start
        if returncode == 128 + signal.SIGTERM:
            log.error("pipeline: stage %r was stopped by SIGTERM and saved %s; resume it with its command above "
                      "plus ckpt_path=last, then run the later stages", stage, out / stage / "checkpoints" / "last.ckpt")
            raise SystemExit(returncode)
        if returncode != 0:
            raise RuntimeError(f"pipeline stage {stage!r} failed (exit {returncode}); its log: "
                               f"{out / stage / (stage + '.log')}")
        runs[stage] = out / stage
        log.info("pipeline: %s finished in %.0f s", stage, timings[stage])
    start = time.perf_counter()
    report = write_report(runs, out, Path(cfg.paths.log_dir), **OmegaConf.to_container(cfg.pipeline.report, resolve=True))
    timings["report"] = time.perf_counter() - start
    (out / "pipeline.json").write_text(json.dumps({"runs": {s: str(r) for s, r in runs.items()},
                                                   "seconds": timings, "wandb_group": group}, indent=2))
    log.info("pipeline: %s", ", ".join(f"{s} {t / 60:.1f} min" for s, t in timings.items()))
    return report
