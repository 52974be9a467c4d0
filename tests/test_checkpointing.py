"""Surviving kills: atomic checkpoints, NaN stop, W&B run continued, resume after SIGKILL / SIGTERM."""

import csv
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, TINY, compose_cfg
from slimpajama.checkpointing import RUN_IDS_KEY, AtomicCheckpointIO, NonFiniteLossError
from slimpajama.pipeline import run

NO_UI = ["~callbacks.progress_bar", "~callbacks.throughput", "~callbacks.model_summary"]


def train(overrides, tmp_path, run_name="run", data_dir=None):
    cfg = compose_cfg(overrides, tmp_path, data_dir, output_dir=tmp_path / "logs" / "pretrain" / "runs" / run_name)
    return run(cfg), Path(cfg.paths.output_dir)


def test_atomic_save_keeps_the_previous_checkpoint_when_a_save_dies(tmp_path, monkeypatch):
    io, path = AtomicCheckpointIO(), tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "w": torch.ones(3)}, path)
    real_save = torch.save

    def dying_save(obj, f, *args, **kwargs):  # half a file written, then the process "dies"
        f.write(b"\x80\x02 partial pickle")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"global_step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no temp file left behind
    assert torch.load(path, weights_only=True)["global_step"] == 1  # the previous good one, loadable
    io.save_checkpoint({"global_step": 3, "w": torch.zeros(3)}, path)
    assert torch.load(path, weights_only=True)["global_step"] == 3


def test_a_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tiny_overrides, tmp_path, monkeypatch):
    from slimpajama.stages.lm import LanguageModelModule

    loss = LanguageModelModule._loss

    def nan_at_step_3(self, batch):
        value, n = loss(self, batch)
        return (value * float("nan") if self.training and self.global_step == 3 else value), n

    monkeypatch.setattr(LanguageModelModule, "_loss", nan_at_step_3)
    overrides = tiny_overrides + ["callbacks=default", *NO_UI, "trainer.max_steps=6",
                                  "callbacks.resume_checkpoint.every_n_train_steps=2"]
    with pytest.raises(NonFiniteLossError, match=r"training loss is nan at step 3 .*last\.ckpt"):
        train(overrides, tmp_path)
    ckpt = torch.load(tmp_path / "logs" / "pretrain" / "runs" / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2  # saved at step 2, not overwritten by the failing step
    assert all(torch.isfinite(t).all() for t in ckpt["state_dict"].values())
    from slimpajama.checkpointing import MODEL_CONFIG_KEY

    assert ckpt[MODEL_CONFIG_KEY] == ckpt["hyper_parameters"]["model"]  # the trained model's config, for consolidate


def test_resumed_run_continues_the_same_wandb_run(tiny_overrides, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    import wandb

    overrides = [o for o in tiny_overrides if o != "logger=csv"] + ["logger=wandb", "save_model=false",
                                                                     "final_validation=false"]
    _, first = train(overrides + ["trainer.max_steps=2", "callbacks=default", *NO_UI], tmp_path, "first")
    wandb.finish()
    run_id = torch.load(first / "checkpoints" / "last.ckpt", weights_only=True)[RUN_IDS_KEY]["wandb"]
    assert [p.name for p in (first / "wandb").glob("offline-run-*")][0].endswith(run_id)
    _, second = train(overrides + ["trainer.max_steps=4", "callbacks=default", *NO_UI, "ckpt_path=last"], tmp_path,
                      "second")
    wandb.finish()
    runs = list((second / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and runs[0].name.endswith(run_id), (runs, run_id)
    assert torch.load(second / "checkpoints" / "last.ckpt", weights_only=True)[RUN_IDS_KEY]["wandb"] == run_id


# ---- real processes: `python train.py`, killed with SIGKILL / SIGTERM, resumed with ckpt_path=last ----

def _command(corpus_dir, tmp_path, run_dir, *extra):
    common = [o for o in TINY if not o.startswith(("trainer.max_steps", "callbacks="))] + [
        f"data.paths=[{corpus_dir}]", f"paths.log_dir={tmp_path / 'logs'}", f"paths.data_dir={tmp_path / 'data'}",
        "callbacks=default", *NO_UI, "callbacks.resume_checkpoint.every_n_train_steps=3", "trainer.max_steps=40",
        "trainer.val_check_interval=20", "save_model=false", "final_validation=false", f"hydra.run.dir={run_dir}"]
    return [sys.executable, str(ROOT / "train.py"), *common, *extra]


def _env(tmp_path):
    return {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}


def _losses(run_dir: Path) -> dict[int, float]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


def _start_and_stop(corpus_dir, tmp_path, sig) -> tuple[Path, int]:
    """Start a run, send `sig` once its first periodic last.ckpt exists; returns the folder and exit code."""
    run_dir = tmp_path / "logs" / "pretrain" / "runs" / f"stopped-{sig.name}"
    proc = subprocess.Popen(_command(corpus_dir, tmp_path, run_dir), env=_env(tmp_path),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be stopped: " + proc.stderr.read().decode()[-2000:]
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    return run_dir, proc.returncode, err.decode()


def _full_and_resumed(corpus_dir, tmp_path, stopped: Path):
    step = torch.load(stopped / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert 3 <= step < 40
    resumed = tmp_path / "logs" / "pretrain" / "runs" / "resumed"
    subprocess.run(_command(corpus_dir, tmp_path, resumed, "ckpt_path=last"), env=_env(tmp_path), check=True,
                   capture_output=True, timeout=600)
    full = tmp_path / "full"
    subprocess.run(_command(corpus_dir, tmp_path, full), env=_env(tmp_path), check=True, capture_output=True,
                   timeout=600)
    expected, after = _losses(full), _losses(resumed)
    assert sorted(after) == list(range(step, 40))  # continues at the first step not in the checkpoint
    for s in after:
        assert after[s] == pytest.approx(expected[s], rel=1e-5, abs=1e-6), s
    return step


@pytest.mark.slow
def test_sigkill_mid_run_then_ckpt_path_last_continues_the_uninterrupted_losses(corpus_dir, tmp_path):
    stopped, code, _ = _start_and_stop(corpus_dir, tmp_path, signal.SIGKILL)
    assert code == -signal.SIGKILL
    step = _full_and_resumed(corpus_dir, tmp_path, stopped)
    assert step % 3 == 0  # a periodic checkpoint: the kill saved nothing


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_at_the_current_step_and_resume_continues(corpus_dir, tmp_path):
    stopped, code, err = _start_and_stop(corpus_dir, tmp_path, signal.SIGTERM)
    assert code == 128 + signal.SIGTERM and "SIGTERM" in err, err[-2000:]  # not 0: the run did not finish
    _full_and_resumed(corpus_dir, tmp_path, stopped)
