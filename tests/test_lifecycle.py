"""The whole lifecycle as one command (experiment with a `pipeline` block): every stage runs as its
own train.py process, each starts from the previous stage's model, and the report is written with its plots."""

import json
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT, compose_cfg, wandb_offline_record

PIPELINES = sorted(f.stem for f in (ROOT / "conf" / "experiment").glob("*.yaml") if "pipeline:" in f.read_text())


@pytest.mark.parametrize("experiment", PIPELINES)
def test_every_stage_command_of_a_pipeline_experiment_composes(experiment, tmp_path):
    """The commands the pipeline would run (its loggers, common and stage overrides, the user's
    command-line overrides last) compose into the stage configs they mean."""
    from slimpajama.lifecycle import stage_command, user_overrides

    cfg = compose_cfg([f"experiment={experiment}"], tmp_path)
    assert set(cfg.logger) == {"wandb", "csv"}
    extra = user_overrides(["experiment=x", "hydra.verbose=true", "seed=3", "sample.top_k=7", "logger=csv",
                            "+trainer.foo=1", "pipeline.common=[]"])
    assert extra == ["sample.top_k=7", "+trainer.foo=1"]
    sizes = {}
    for stage, overrides in cfg.pipeline.stages.items():
        cmd = stage_command(cfg, stage, overrides, tmp_path / "run", "g", ["sample.top_k=7"])
        assert cmd[2:4] == [f"stage={stage}", "logger=[wandb,csv]"]
        assert cmd[-2:] == [f"hydra.run.dir={tmp_path / 'run' / stage}", "logger.wandb.group=g"]
        stage_cfg = compose_cfg([o for o in cmd[2:] if not o.startswith(("hydra.", "paths."))], tmp_path)
        assert stage_cfg.stage.name == stage and stage_cfg.sample.top_k == 7 and set(stage_cfg.logger) == {"wandb", "csv"}
        assert stage_cfg.logger.wandb.group == "g"
        sizes[stage] = (stage_cfg.model.n_layer, stage_cfg.model.d_model)
    if "gpu" in experiment:
        assert sizes["pretrain"][1] > 256 and stage_cfg.trainer.accelerator == "gpu"


def test_each_stage_starts_from_this_pipelines_own_previous_model(tmp_path):
    """A pipeline that leaves a stage out used to train the later stages on whatever logs/latest held from
    other runs (an old prune run fine-tuned, and reported as this teacher's). Now each stage is given the
    model of the newest stage before it in this pipeline, unless its overrides name one."""
    from slimpajama.lifecycle import input_override, stage_command

    runs = {}
    for stage in ("pretrain", "prune"):
        (tmp_path / stage / "model").mkdir(parents=True)
        (tmp_path / stage / "model" / "config.json").write_text("{}")
        runs[stage] = tmp_path / stage
    assert input_override("distill", [], runs) == [f"teacher={tmp_path / 'pretrain' / 'model'}"]
    assert input_override("prune", [], {"pretrain": runs["pretrain"]}) == [
        f"stage.module.init_from={tmp_path / 'pretrain' / 'model'}"]
    assert input_override("finetune", [], runs) == [f"init_from={tmp_path / 'prune' / 'model'}"]
    assert input_override("finetune", ["init_from=/models/mine"], runs) == []  # the stage's own choice
    assert input_override("pretrain", [], runs) == [] and input_override("distill", [], {}) == []  # as on its own
    (tmp_path / "pretrain" / "model" / "config.json").unlink()  # save_model=false: nothing to pass
    assert input_override("distill", [], runs) == []
    # the pipeline's seed comes first: a stage's own seed= wins (it used to be overridden silently)
    cfg = compose_cfg(["experiment=pipeline_demo"], tmp_path)
    cmd = stage_command(cfg, "finetune", ["seed=5"], tmp_path / "run", "g", input_override("finetune", [], runs))
    stage_cfg = compose_cfg([o for o in cmd[2:] if not o.startswith(("hydra.", "paths."))], tmp_path)
    assert stage_cfg.seed == 5 and stage_cfg.init_from == str(tmp_path / "prune" / "model")


@pytest.mark.slow
def test_pipeline_runs_every_stage_and_writes_the_report(corpus_dir, tmp_path):
    data = ["data=custom", f"data.paths=[{corpus_dir}]", "data.vocab_size=384", "data.seq_len=64",
            "data.batch_size=4", "data.val_fraction=0.1"]
    steps = ["trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.limit_val_batches=2"]
    stages = {
        "pretrain": data + steps,
        "distill": data + steps + ["student.init=teacher_layers"],
        "prune": data + steps + ["prune.method=structured", "prune.sparsity=0.5", "prune.recovery=distill",
                                 "prune.calibration_batches=2", "prune.eval_batches=2", "prune.generation_tokens=4"],
        "finetune": steps + ["data.tasks={source: 1, topic: 1, sentiment: 0, translate: 0, dialogue: 0, qa: 0}", f"data.paths=[{corpus_dir}]", "data.per_source=12",
                             "data.passage_words=12", "data.seq_len=64", "data.batch_size=4",
                             "stage.module.evaluation.max_examples=4", "stage.module.evaluation.per_control=2",
                             "stage.module.evaluation.control_max_new_tokens=8"],
    }
    common = ["model=nano", "compile=false", "callbacks=none", "trainer.log_every_n_steps=1",
              "trainer.enable_progress_bar=false", "sample.max_new_tokens=4"]
    # a user's copy of the demo pipeline, with tiny sizes, in their own config folder
    experiment = yaml.safe_load((ROOT / "conf" / "experiment" / "pipeline_demo.yaml").read_text())
    experiment["pipeline"].update(common=common, stages=stages, report={"prompt": "ka", "gen_tokens": 4})
    (tmp_path / "conf" / "experiment").mkdir(parents=True)
    (tmp_path / "conf" / "experiment" / "pipeline_tiny.yaml").write_text("# @package _global_\n" + yaml.safe_dump(experiment, sort_keys=False))
    run_dir = tmp_path / "pipeline-run"
    cmd = [sys.executable, str(ROOT / "train.py"), f"--config-dir={tmp_path / 'conf'}", "experiment=pipeline_tiny",
           f"paths.log_dir={tmp_path / 'logs'}", f"paths.data_dir={tmp_path / 'data'}", f"hydra.run.dir={run_dir}",
           "sample.top_k=7"]  # a pipeline-level override: every stage gets it
    # the experiment's loggers (W&B offline + CSV) reach every stage
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "WANDB_DIR": str(tmp_path / "wandb"),
           "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"), "WANDB_DATA_DIR": str(tmp_path / "wandb-data")}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    record = json.loads((run_dir / "report.json").read_text())
    assert [r["stage"] for r in record["rows"]] == ["pretrain", "distill", "prune", "finetune"]
    teacher, student, pruned, finetuned = record["rows"]
    assert student["params"] < teacher["params"] and pruned["params"] < student["params"]
    assert all(r["file_mb"] > 0 and r["gen_tokens_per_s"] > 0 for r in record["rows"])
    assert finetuned["control"], "the fine-tuned model reports control adherence"
    assert record["samples"] and all(record["samples"].values())
    for png in ("losses.png", "size_vs_ppl.png", "adherence.png"):
        assert (run_dir / png).stat().st_size > 5000, png
    report = (run_dir / "report.md").read_text()
    assert "| teacher | pretrain |" in report and "losses.png" in report
    # each stage started from this pipeline's previous model
    for stage, key, source in (("distill", "teacher", "pretrain"), ("prune", "stage.module.init_from", "distill"),
                               ("finetune", "init_from", "prune")):
        overrides = yaml.safe_load((run_dir / stage / ".hydra" / "overrides.yaml").read_text())
        assert f"{key}={run_dir / source / 'model'}" in overrides, (stage, overrides)
    pipeline = json.loads((run_dir / "pipeline.json").read_text())
    assert set(pipeline["runs"]) == {"pretrain", "distill", "prune", "finetune"}
    # every stage: one offline W&B run in the pipeline's group, the CSV metrics, the pipeline's override
    for stage in pipeline["runs"]:
        overrides = (run_dir / stage / ".hydra" / "overrides.yaml").read_text()
        assert "logger=[wandb,csv]" in overrides and "sample.top_k=7" in overrides, overrides
        assert (run_dir / stage / "csv" / "metrics.csv").is_file()
        (wandb_run,) = (run_dir / stage / "wandb").glob("offline-run-*")
        record = wandb_offline_record(wandb_run, (pipeline["wandb_group"].encode(), b"val/loss"))
        assert pipeline["wandb_group"].encode() in record and b"val/loss" in record, stage
    assert "## Control adherence per value (source)" in report


def test_a_data_choice_is_not_forwarded_to_finetuning():
    from slimpajama.lifecycle import user_overrides

    given = ["data=custom", "data.paths=[/corpus]", "trainer=gpu"]
    assert user_overrides(given, "pretrain") == given
    assert user_overrides(given, "finetune") == ["data.paths=[/corpus]", "trainer=gpu"]  # it keeps data=tasks


def test_a_sigterm_to_the_pipeline_reaches_the_running_stage(tmp_path):
    """A scheduler's SIGTERM to the pipeline process stops the stage too (it used to run on, orphaned):
    the stage gets the signal, saves and exits 143, and the pipeline exits with its status."""
    import signal
    import time

    stage = (f"import pathlib, signal, sys, time\n"
             f"signal.signal(signal.SIGTERM, lambda *a: (pathlib.Path({str(tmp_path / 'saved')!r}).touch(), sys.exit(143)))\n"
             f"pathlib.Path({str(tmp_path / 'ready')!r}).touch()\n"
             f"time.sleep(60)\n")
    driver = ("import os, sys\nfrom slimpajama.lifecycle import run_stage\n"
              f"sys.exit(run_stage([sys.executable, '-c', {stage!r}], dict(os.environ)))\n")
    proc = subprocess.Popen([sys.executable, "-c", driver])
    for _ in range(300):
        if (tmp_path / "ready").exists():
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 143
    assert (tmp_path / "saved").exists()


def test_ckpt_path_last_finds_the_stage_in_its_own_folder_and_in_pipelines(tmp_path):
    import os

    from omegaconf import OmegaConf

    from slimpajama.pipeline import resolve_ckpt_path

    logs = tmp_path / "logs"
    cfg = OmegaConf.create({"ckpt_path": "last", "task_name": "pretrain",
                            "paths": {"log_dir": str(logs), "output_dir": str(logs / "fixed")}})
    with pytest.raises(FileNotFoundError, match="ckpt_path=last: no checkpoints/last.ckpt"):
        resolve_ckpt_path(cfg)
    def checkpoint(folder, mtime):
        ckpt = folder / "checkpoints" / "last.ckpt"
        ckpt.parent.mkdir(parents=True)
        ckpt.write_bytes(b"x")
        os.utime(ckpt, (mtime, mtime))
        return str(ckpt)

    first = checkpoint(logs / "pretrain" / "runs" / "a", 1000)
    assert resolve_ckpt_path(cfg) == first
    newest = checkpoint(logs / "pipeline" / "runs" / "t" / "pretrain", 1001)
    assert resolve_ckpt_path(cfg) == newest
    checkpoint(logs / "pipeline" / "runs" / "u" / "distill", 1005)  # another stage
    checkpoint(logs / "multiruns" / "pretrain" / "t" / "0", 1006)  # a sweep's job: never another job's start
    assert resolve_ckpt_path(cfg) == newest
    own = checkpoint(logs / "fixed", 900)  # a rerun with the same hydra.run.dir continues itself, newer runs or not
    assert resolve_ckpt_path(cfg) == own
    # trainer=fsdp saves a sharded checkpoint: last.ckpt is a folder, and the run still continues itself
    sharded = logs / "sharded"
    (sharded / "checkpoints" / "last.ckpt").mkdir(parents=True)
    (sharded / "checkpoints" / "last.ckpt" / "meta.pt").write_bytes(b"x")
    cfg.paths.output_dir = str(sharded)
    assert resolve_ckpt_path(cfg) == str(sharded / "checkpoints" / "last.ckpt")
    cfg.ckpt_path = str(sharded / "checkpoints" / "last.ckpt")  # and an explicit folder is taken
    assert resolve_ckpt_path(cfg) == cfg.ckpt_path


def test_the_summary_table_shows_each_task_metric_of_metrics_json():
    from slimpajama.report import summary_table

    row = {"model": "m", "stage": "finetune", "params": 1e6, "file_mb": 4.0, "val_ppl": 12.0, "gen_tokens_per_s": 300.0,
           "sparsity": None, "control": {},
           "tasks": {"test/topic/accuracy": 0.5, "test/topic/f1_macro": 0.25, "test/qa/exact_match": 0.1,
                     "test/qa/f1": 0.3, "test/translate/bleu": 2.0, "test/topic/loss": 9.0}}
    line = summary_table([row]).splitlines()[-1]
    assert "topic/accuracy 0.5, topic/f1_macro 0.25, qa/exact_match 0.1, qa/f1 0.3, translate/bleu 2" in line
    assert "loss" not in line


def test_a_resume_keeps_the_teacher_and_source_the_run_started_from(tmp_path, caplog):
    """teacher=null (latest/pretrain) or a registered name: a resumed run reads its checkpoint's folder,
    not a model published since; a folder the user gives stays theirs."""
    import torch
    from omegaconf import OmegaConf

    from slimpajama.checkpointing import checkpoint_state
    from slimpajama.pipeline import _keep_the_runs_models

    started, newer = tmp_path / "pretrain-a" / "model", tmp_path / "pretrain-b" / "model"
    started.mkdir(parents=True), newer.mkdir(parents=True)
    ckpt = tmp_path / "last.ckpt"
    torch.save({"hyper_parameters": {"teacher_dir": str(started), "source_dir": str(started)}}, ckpt)
    for chosen, expected in ((None, started), ("slimpajama/pretrain", started), (str(newer), newer)):
        cfg = OmegaConf.create({"teacher": chosen, "stage": {"module": {"teacher": "${teacher}"}}})
        _keep_the_runs_models(cfg, checkpoint_state(ckpt))
        assert cfg.stage.module.teacher == str(expected), chosen
    cfg = OmegaConf.create({"stage": {"module": {"init_from": None}}})  # prune
    _keep_the_runs_models(cfg, checkpoint_state(ckpt))
    assert cfg.stage.module.init_from == str(started)
    started.rmdir()
    cfg = OmegaConf.create({"stage": {"module": {"init_from": None}}})
    with caplog.at_level("WARNING", logger="slimpajama.pipeline"):
        _keep_the_runs_models(cfg, checkpoint_state(ckpt))
    assert cfg.stage.module.init_from is None and "no longer exists" in caplog.text
