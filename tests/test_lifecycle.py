"""The whole lifecycle as one command (experiment with a `pipeline` block): every stage runs as its
own train.py process, each finds the previous model, and the report is written with its plots."""

import json
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT


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
    common = ["model=nano", "callbacks=none", "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false",
              "sample.max_new_tokens=4"]
    # a user's copy of the demo pipeline, with tiny sizes, in their own config folder
    experiment = yaml.safe_load((ROOT / "conf" / "experiment" / "pipeline_demo.yaml").read_text())
    experiment["pipeline"].update(common=common, stages=stages, report={"prompt": "ka", "gen_tokens": 4})
    (tmp_path / "conf" / "experiment").mkdir(parents=True)
    (tmp_path / "conf" / "experiment" / "pipeline_tiny.yaml").write_text("# @package _global_\n" + yaml.safe_dump(experiment, sort_keys=False))
    run_dir = tmp_path / "pipeline-run"
    cmd = [sys.executable, str(ROOT / "train.py"), f"--config-dir={tmp_path / 'conf'}", "experiment=pipeline_tiny",
           "logger=csv", f"paths.log_dir={tmp_path / 'logs'}", f"paths.data_dir={tmp_path / 'data'}",
           f"hydra.run.dir={run_dir}"]
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "WANDB_MODE": "disabled"}
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
    # each stage found the previous stage's model by itself
    distill_cfg = (run_dir / "distill" / ".hydra" / "config.yaml").read_text()
    assert "teacher: null" in distill_cfg
    pipeline = json.loads((run_dir / "pipeline.json").read_text())
    assert set(pipeline["runs"]) == {"pretrain", "distill", "prune", "finetune"}
