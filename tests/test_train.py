"""End-to-end runs of the pretrain stage through the real config and pipeline (tiny model, CPU)."""

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from conftest import compose_cfg, wandb_offline_record
from slimpajama import SlimPajamaModel, SlimPajamaTokenizer
from slimpajama.pipeline import run


def train(overrides, tmp_path, run_name="run", data_dir=None):
    cfg = compose_cfg(overrides, tmp_path, data_dir, output_dir=tmp_path / "logs" / "pretrain" / "runs" / run_name)
    result = run(cfg)
    return cfg, result, Path(cfg.paths.output_dir)


def train_losses(out: Path) -> dict[int, float]:
    with open(out / "csv" / "metrics.csv") as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


def test_fast_dev_run_writes_model_metrics_and_latest(tiny_overrides, tmp_path):
    cfg, result, out = train(tiny_overrides + ["debug=fdr"], tmp_path)
    metrics = json.loads((out / "metrics.json").read_text())
    assert math.isfinite(metrics["val/loss"]) and metrics["val/ppl"] == pytest.approx(math.exp(metrics["val/loss"]), rel=1e-4)
    assert result == metrics["val/loss"]
    assert metrics["model/params"] > 0 and "train/loss" in metrics
    latest = tmp_path / "logs" / "latest" / "pretrain"
    assert latest.is_symlink() and latest.resolve() == out.resolve()
    model = SlimPajamaModel.from_pretrained(out / "model")
    tokenizer = SlimPajamaTokenizer.from_pretrained(out / "model")
    assert tokenizer.vocab_size == 384 == model.config.vocab_size
    ids = tokenizer.encode("ka lo", return_tensors="pt")
    assert model.generate(ids, max_new_tokens=4, do_sample=False).shape[1] <= ids.shape[1] + 4


def test_no_stray_checkpoints_and_the_progress_bar_switch(tiny_overrides, tmp_path):
    """debug=fdr with the default callbacks writes no last.ckpt (a later ckpt_path=last resumed from its one
    step); callbacks=none writes no checkpoint at all (Lightning added its own); and
    trainer.enable_progress_bar=false works with the default callbacks (their progress bar was refused)."""
    _, _, fdr = train(tiny_overrides + ["debug=fdr", "callbacks=default", "trainer.enable_progress_bar=false"],
                      tmp_path / "fdr")
    assert (fdr / "model" / "config.json").is_file() and not list(fdr.rglob("*.ckpt"))
    _, _, plain = train(tiny_overrides + ["trainer.max_steps=2"], tmp_path / "none")  # TINY: callbacks=none
    assert not list(plain.rglob("*.ckpt"))


def test_training_lowers_the_loss_and_logs_namespaced_metrics(tiny_overrides, tmp_path):
    overrides = tiny_overrides + ["trainer.max_steps=30", "trainer.val_check_interval=10", "callbacks=default",
                                  "callbacks.throughput.peak_flops=1e11", "~callbacks.progress_bar"]
    cfg, result, out = train(overrides, tmp_path)
    losses = train_losses(out)
    first, last = losses[min(losses)], sum(losses[s] for s in sorted(losses)[-5:]) / 5
    assert last < first - 0.5, (first, last)
    header = (out / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/loss", "train/lr", "val/loss", "val/ppl", "train/tokens_per_sec", "train/mfu"} <= set(header)
    assert "model/params" in header  # the end-of-run metrics reach the CSV too (they were never flushed)
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert len(list((out / "checkpoints").glob("step_*.ckpt"))) == 1  # the best one


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_gradients_are_clipped_with_fused_adamw_in_every_precision(tiny_overrides, tmp_path, monkeypatch, precision):
    # Lightning refuses to clip under mixed precision with a fused optimizer; bf16 has no scaler, so the stages clip
    from slimpajama.optim import FusedOptimizerClipping
    from slimpajama.stages import distill, finetune, lm, prune

    assert all(issubclass(m, FusedOptimizerClipping) for m in (lm.LanguageModelModule, distill.DistillationModule,
                                                               finetune.FinetuneModule, prune.PruneModule))
    calls, clip = [], torch.nn.utils.clip_grad_norm_

    def spy(parameters, max_norm, *args, **kwargs):
        parameters = list(parameters)
        calls.append((max_norm, sum(p.numel() for p in parameters)))
        return clip(parameters, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    cfg, _, out = train(tiny_overrides + [f"trainer.precision={precision}", "trainer.max_steps=3"], tmp_path)
    assert cfg.stage.module.optimizer.fused and cfg.trainer.gradient_clip_val == 1.0
    n_params = SlimPajamaModel.from_pretrained(out / "model").num_params()
    assert calls == [(1.0, n_params)] * 3  # every step, over every parameter
    assert math.isfinite(json.loads((out / "metrics.json").read_text())["val/loss"])


def _interrupted_and_full_runs(overrides, tmp_path, monkeypatch):
    """One run of 8 steps, and the same run stopped after step 4 then resumed with ckpt_path=last.
    Returns the three run folders and the batches each run trained on, in order (as hashes)."""
    from slimpajama.stages.lm import LanguageModelModule

    seen: list[tuple[int, int]] = []  # (global step, hash of the batch's tokens)
    step = LanguageModelModule.training_step

    def recording_step(self, batch, batch_idx):
        seen.append((self.global_step, hash(batch.numpy().tobytes())))
        return step(self, batch, batch_idx)

    monkeypatch.setattr(LanguageModelModule, "training_step", recording_step)
    base = overrides + ["trainer.max_steps=8", "trainer.val_check_interval=4", "callbacks=default",
                        "~callbacks.progress_bar", "~callbacks.throughput", "~callbacks.model_summary"]
    data_dir = tmp_path / "data"
    _, _, full = train(base, tmp_path / "a", data_dir=data_dir)
    full_batches, seen[:] = list(seen), []
    _, _, first = train(base + ["trainer.max_steps=4"], tmp_path / "b", "first", data_dir=data_dir)
    assert (first / "checkpoints" / "last.ckpt").is_file()
    _, _, second = train(base + ["ckpt_path=last"], tmp_path / "b", "second", data_dir=data_dir)
    return full, first, second, full_batches, list(seen)


def test_resume_continues_with_the_next_unseen_batch_and_the_same_losses(tiny_overrides, tmp_path, monkeypatch):
    full, first, second, full_batches, resumed_batches = _interrupted_and_full_runs(tiny_overrides, tmp_path, monkeypatch)
    ckpt = torch.load(second / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 8
    assert ckpt["optimizer_states"][0]["state"][0]["step"] == 8  # AdamW moments carried over
    assert ckpt["lr_schedulers"][0]["last_epoch"] == 8  # the schedule continued, not restarted
    # the data position: the resumed run trains on exactly the batches of the uninterrupted one
    assert [s for s, _ in resumed_batches] == [s for s, _ in full_batches] == list(range(8))
    assert len(set(h for _, h in full_batches)) == 8  # distinct batches, so a repeat would show
    assert resumed_batches == full_batches  # none repeated, none skipped, same order
    expected, resumed = train_losses(full), {**train_losses(first), **train_losses(second)}
    assert sorted(resumed) == sorted(expected) == list(range(8))
    for step in expected:
        assert resumed[step] == pytest.approx(expected[step], rel=1e-5), step


def test_each_run_of_one_process_logs_into_a_wandb_run_of_its_own(tiny_overrides, tmp_path, monkeypatch):
    """A Hydra multirun (a grid, an Optuna search) calls run() once per job in one process: each job
    needs its own W&B run (a job used to log into the first one's) and its metrics.json, model or not."""
    import wandb

    for var, sub in (("WANDB_DIR", ""), ("WANDB_CACHE_DIR", "wandb-cache"), ("WANDB_DATA_DIR", "wandb-data")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    overrides = [o for o in tiny_overrides if o != "logger=csv"] + ["logger=wandb", "trainer.max_steps=1",
                                                                   "save_model=false", "sample.max_new_tokens=0"]
    outs = [train(overrides + [f"seed={seed}"], tmp_path, run_name=f"job{seed}")[2] for seed in (1, 2)]
    assert wandb.run is None  # finished with its run
    for out in outs:
        assert len(list((out / "wandb").glob("offline-run-*"))) == 1, out
        assert "val/loss" in json.loads((out / "metrics.json").read_text()) and not (out / "model").exists()


def test_ckpt_path_last_without_a_previous_run_is_a_clear_error(tiny_overrides, tmp_path):
    with pytest.raises(FileNotFoundError, match="ckpt_path=last"):
        train(tiny_overrides + ["ckpt_path=last"], tmp_path)


def test_wandb_offline_run_holds_the_metrics_and_the_model_artifact(tiny_overrides, tmp_path, monkeypatch):
    for var, sub in (("WANDB_DIR", ""), ("WANDB_CACHE_DIR", "wandb-cache"), ("WANDB_DATA_DIR", "wandb-data")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    overrides = [o for o in tiny_overrides if o != "logger=csv"] + ["logger=wandb", "trainer.max_steps=2",
                                                                   "model_artifact=true"]
    _, _, out = train(overrides, tmp_path)
    import wandb

    wandb.finish()
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))
    # the artifact (name, type, its files) is recorded in the run's log, its files staged for `wandb sync`
    keys = (b"val/loss", b"model/params", b"pretrain-model", b"model.safetensors", b"config.json", b"tokenizer.model",
            b"samples/generations")
    record = wandb_offline_record(runs[0], keys)
    assert [k for k in keys if k not in record] == []
    (table,) = (runs[0] / "files" / "media" / "table").rglob("*.table.json")  # the sample generations
    table = json.loads(table.read_text())
    assert table["columns"] == ["stage", "prompt", "temperature", "generation"] and len(table["data"]) == 3
    assert all(row[0] == "pretrain" and row[3] for row in table["data"])
    staged = {p.stat().st_size for p in (tmp_path / "wandb-data").rglob("*") if p.is_file()}
    assert (out / "model" / "model.safetensors").stat().st_size in staged


@pytest.mark.slow
def test_compile_trains_the_same_model_through_a_compiled_forward(tiny_overrides, tmp_path):
    from torch._dynamo.utils import counters

    steps = ["trainer.max_steps=6", "trainer.val_check_interval=6", "callbacks=default",
             "callbacks.throughput.peak_flops=1e11", "~callbacks.progress_bar"]
    _, _, eager = train(tiny_overrides + steps, tmp_path, "eager")
    counters.clear()
    _, _, compiled = train(tiny_overrides + steps + ["compile=true"], tmp_path, "compiled")
    assert counters["stats"]["unique_graphs"] >= 1  # the training forward really went through dynamo
    a, b = train_losses(eager), train_losses(compiled)
    assert a.keys() == b.keys() and len(a) >= 3
    for step in a:  # same data, same seed: the compiled kernels agree with eager to float32 rounding
        assert b[step] == pytest.approx(a[step], rel=1e-4), step
    ckpt = torch.load(compiled / "checkpoints" / "last.ckpt", weights_only=True)
    assert set(ckpt["state_dict"]) == set(torch.load(eager / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"])
    assert not any("_orig_mod" in k for k in ckpt["state_dict"])
    m_eager, m_compiled = SlimPajamaModel.from_pretrained(eager / "model"), SlimPajamaModel.from_pretrained(compiled / "model")
    for (k, v), (k2, v2) in zip(m_eager.state_dict().items(), m_compiled.state_dict().items()):
        assert k == k2 and torch.allclose(v, v2, atol=1e-4), k


@pytest.mark.slow
def test_a_compiled_rerun_with_the_same_seed_is_bit_identical(tiny_overrides, tmp_path):
    # trainer=cpu turns on torch's deterministic algorithms; without them inductor adds up the
    # embedding's gradient by atomic adds, in an order that changes from run to run
    steps = ["trainer.max_steps=8", "trainer.val_check_interval=8", "compile=true", "data.batch_size=16"]
    first, second = (train(tiny_overrides + steps, tmp_path, name)[2] for name in ("first", "second"))
    assert train_losses(first) == train_losses(second) and len(train_losses(first)) == 8
    a, b = (SlimPajamaModel.from_pretrained(out / "model").state_dict() for out in (first, second))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_pretraining_compiles_by_default_and_trains_eagerly_without_a_cpp_compiler(tiny_overrides, tmp_path,
                                                                                  monkeypatch, caplog):
    import logging

    from torch._dynamo.utils import counters

    import slimpajama.stages.lm as lm

    assert compose_cfg([], tmp_path).stage.module.compile is True  # as LitGPT's and nanoGPT's pretraining
    assert compose_cfg(["debug=fdr"], tmp_path).stage.module.compile is False
    monkeypatch.setattr(lm, "inductor_compiler", lambda: None)
    counters.clear()
    with caplog.at_level(logging.WARNING, logger="slimpajama.stages.lm"):
        _, _, out = train(tiny_overrides + ["compile=true"], tmp_path)
    assert "needs a C++ compiler" in caplog.text and "compile=false" in caplog.text
    assert counters["stats"]["unique_graphs"] == 0  # nothing went through dynamo
    assert math.isfinite(json.loads((out / "metrics.json").read_text())["val/loss"])


@pytest.mark.slow
def test_markov_nano_reaches_the_entropy_rate(tmp_path):
    """The whole stack learns what it should: val loss within 10% of the chain's exact entropy rate."""
    overrides = ["data=markov", "model=nano", "logger=none", "callbacks=none", "trainer.max_steps=300",
                 "trainer.val_check_interval=100", "trainer.enable_progress_bar=false"]
    cfg, result, out = train(overrides, tmp_path)
    metrics = json.loads((out / "metrics.json").read_text())
    h = metrics["data/entropy_rate"]
    assert 2.0 < h < 2.7
    assert h <= metrics["val/loss"] <= 1.10 * h, metrics
    # saved, but not published: no tool could encode a prompt for it, and it would replace the real teacher
    assert (out / "model" / "config.json").is_file() and not (tmp_path / "logs" / "latest" / "pretrain").exists()


def train_cli(args: list[str], corpus_dir: Path, tmp_path: Path, timeout: int = 600):
    """`python train.py <args>` in a subprocess as a user runs it: the tiny config for 2 steps on the
    test corpus, logs and data under tmp_path, W&B off."""
    import subprocess
    import sys

    from conftest import ROOT, TINY

    common = [o for o in TINY if not o.startswith("trainer.max_steps")] + [
        f"data.paths=[{corpus_dir}]", f"paths.log_dir={tmp_path / 'logs'}", f"paths.data_dir={tmp_path / 'data'}",
        "trainer.max_steps=2"]
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "WANDB_MODE": "disabled"}
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), *args, *common], env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_command_line_multirun_and_run_dir_override(corpus_dir, tmp_path):
    """`python train.py -m ...` as users type it: one job folder per value, each with its metrics."""
    train_cli(["-m", "seed=1,2", "save_model=false"], corpus_dir, tmp_path)
    jobs = sorted((tmp_path / "logs" / "multiruns" / "pretrain").glob("*/[0-9]"))
    assert [j.name for j in jobs] == ["0", "1"]
    seeds = [(j / ".hydra" / "overrides.yaml").read_text() for j in jobs]
    assert "seed=1" in seeds[0] and "seed=2" in seeds[1]

    run_dir = tmp_path / "my-run"
    train_cli([f"hydra.run.dir={run_dir}", "save_model=false"], corpus_dir, tmp_path)
    assert (run_dir / ".hydra" / "config.yaml").is_file() and (run_dir / "pretrain.log").is_file()
    assert "final validation" in (run_dir / "pretrain.log").read_text()


@pytest.mark.slow
def test_optuna_search_runs_trials_and_reports_the_best_val_loss(corpus_dir, tmp_path):
    """hparams_search=pretrain_optuna: each trial is a run whose returned val/loss Optuna minimises."""
    import yaml

    train_cli(["-m", "hparams_search=pretrain_optuna", "sample.max_new_tokens=0", "hydra.sweeper.n_trials=3",
               "hydra.sweeper.sampler.n_startup_trials=2"], corpus_dir, tmp_path, timeout=900)
    (sweep,) = (tmp_path / "logs" / "multiruns" / "pretrain").glob("*")
    trials = sorted(sweep.glob("[0-9]"))
    assert [t.name for t in trials] == ["0", "1", "2"]
    losses = [json.loads((t / "metrics.json").read_text())["val/loss"] for t in trials]
    lrs = {yaml.safe_load((t / ".hydra" / "config.yaml").read_text())["stage"]["module"]["optimizer"]["lr"]
           for t in trials}
    assert len(lrs) == 3 and all(3e-4 <= lr <= 1e-2 for lr in lrs)  # sampled, not the default 3e-3
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert results["best_value"] == pytest.approx(min(losses), rel=1e-6)
    # the sweep collector turns the real multirun into its table: one row per trial, the swept keys
    from slimpajama.sweep import collect, write_table

    _, md = write_table(collect(sweep), sweep)
    header, _, *rows = md.read_text().splitlines()
    assert len(rows) == 3 and "stage.module.optimizer.lr" in header and "val/ppl" in header


def test_throughput_leaves_validation_time_out_and_keeps_the_batches_before_it(monkeypatch):
    """10 batches of 64 tokens a second each, with 100 s of validation after the 5th: 64 tokens/s over the
    window. Restarting the window at validation dropped 5 batches and logged nothing at the window's end
    (Lightning then wrote the previous window's rate again). The fit's first batch (50 s: compilation)
    is in no window."""
    from types import SimpleNamespace

    from slimpajama import callbacks

    clock = SimpleNamespace(now=0.0)
    monkeypatch.setattr(callbacks.time, "perf_counter", lambda: clock.now)
    logged = []
    module = SimpleNamespace(device=torch.device("cpu"), model=SimpleNamespace(flops_per_token=lambda n: 1000.0),
                             log=lambda name, value, **kw: logged.append((name, value)))
    trainer = SimpleNamespace(accumulate_grad_batches=1, world_size=1)
    monitor = callbacks.ThroughputMonitor(peak_flops=1e6, log_every_n_steps=10)
    batch = torch.zeros(1, 65, dtype=torch.long)
    monitor.on_train_batch_start(trainer, module, batch, 0)  # the first batch waits for torch.compile: left out
    clock.now += 50.0
    monitor.on_train_batch_end(trainer, module, None, batch, 0)
    for i in range(10):
        if i == 5:
            monitor.on_validation_start(trainer, module)
            clock.now += 100.0
            monitor.on_validation_end(trainer, module)
        monitor.on_train_batch_start(trainer, module, batch, i)
        clock.now += 1.0
        monitor.on_train_batch_end(trainer, module, None, batch, i)
    assert logged == [("train/tokens_per_sec", pytest.approx(64.0)), ("train/mfu", pytest.approx(64 * 1000 / 1e6))]


@pytest.mark.parametrize("settings, n", [({"temperature": 0.8, "top_k": 50}, 3), ({"temperature": None, "top_k": None}, 1),
                                         ({"temperature": 0, "top_k": 50}, 1)], ids=["sampled", "greedy", "temperature-0"])
def test_the_after_training_sample_draws_num_samples_or_one_greedy_text(tok, caplog, settings, n):
    """sample.temperature and sample.top_k both null, or temperature 0, decode greedily: one text, not an
    error for num_samples identical copies."""
    from omegaconf import OmegaConf

    from slimpajama.model import SlimPajamaConfig
    from slimpajama.pipeline import _sample

    torch.manual_seed(0)
    model = SlimPajamaModel(SlimPajamaConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_kv_head=1, d_model=16,
                                             intermediate_size=32, max_seq_len=32)).eval()
    cfg = OmegaConf.create({"seed": 0, "task_name": "pretrain",
                            "sample": {"prompt": "the", "max_new_tokens": 4, "num_samples": 3, **settings}})
    with caplog.at_level("INFO", logger="slimpajama.pipeline"):
        _sample(cfg, model, tok, loggers=[])
    assert caplog.text.count("sample (temperature") == n


@pytest.mark.parametrize("key, value, match", [("temperature", -1, "sample.temperature=-1"),
                                               ("top_k", 2.5, "sample.top_k=2.5"),
                                               ("num_samples", 0, "sample.num_samples=0"),
                                               ("max_new_tokens", -4, "sample.max_new_tokens=-4")])
def test_a_bad_sample_setting_is_an_error_before_training_and_publishes_nothing(tiny_overrides, tmp_path, key, value,
                                                                                match):
    with pytest.raises(ValueError, match=match):
        train(tiny_overrides + ["trainer.max_steps=2", f"sample.{key}={value}"], tmp_path)
    assert not (tmp_path / "logs" / "latest").exists() and not list(tmp_path.glob("logs/pretrain/runs/*/metrics.json"))


def test_a_sigterm_in_the_final_validation_exits_143_and_publishes_nothing(tiny_overrides, tmp_path, monkeypatch):
    """Lightning's SIGTERMException is a SystemExit of code None: escaping the final validation it would
    end the stage with 0, and a pipeline would go on with an older model."""
    import lightning as L
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    def validate(*args, **kwargs):
        raise SIGTERMException

    monkeypatch.setattr(L.Trainer, "validate", validate)
    with pytest.raises(SystemExit) as stopped:
        train(tiny_overrides + ["trainer.max_steps=2"], tmp_path)
    assert stopped.value.code == 143 and not (tmp_path / "logs" / "latest").exists()


def test_a_warmup_as_long_as_the_run_is_warned_about(caplog):
    from slimpajama.optim import warmup_cosine

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with caplog.at_level("WARNING", logger="slimpajama.optim"):
        schedule = warmup_cosine(opt, warmup_steps=10, max_steps=5)
    assert "warmup_steps=10 >= max_steps=5" in caplog.text and "0.45 of its base value" in caplog.text
    assert [schedule.lr_lambdas[0](t) for t in (0, 4)] == [pytest.approx(1 / 11), pytest.approx(5 / 11)]
    caplog.clear()
    warmup_cosine(opt, warmup_steps=4, max_steps=5)
    assert caplog.text == ""
