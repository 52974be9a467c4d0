"""Knowledge distillation: the KD losses by hand, the teacher kept frozen and out of checkpoints, the
tokenizer check, and the stage end to end through the real config and pipeline with each student init."""

import json
import math
import random
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate

from conftest import TINY, compose_cfg, fake_words
from slimpajama import SlimPajamaConfig, SlimPajamaModel, SlimPajamaTokenizer
from slimpajama.losses import (KD_KINDS, hidden_state_loss, kd_loss, linear_cross_entropy, linear_distill_loss,
                               lm_loss)
from slimpajama.pipeline import run
from slimpajama.stages.distill import DistillationModule, every_other_layer

# a student narrower and shallower than the nano teacher (so the hidden-state loss needs a projection)
SMALL_STUDENT = ["model.n_layer=2", "model.d_model=64", "model.n_head=2", "model.n_kv_head=1",
                 "model.intermediate_size=160"]


# ---- the loss functions ----------------------------------------------------------------------

def _hand_divergence(s: list[float], t: list[float], temperature: float, kind: str) -> float:
    """The divergences written out with math only, on one row of logits."""
    def softmax(z):
        e = [math.exp(v / temperature) for v in z]
        return [v / sum(e) for v in e]

    q, p = softmax(s), softmax(t)
    kl = lambda a, b: sum(x * math.log(x / y) for x, y in zip(a, b))  # noqa: E731
    if kind == "forward_kl":
        d = kl(p, q)
    elif kind == "reverse_kl":
        d = kl(q, p)
    else:
        m = [(x + y) / 2 for x, y in zip(p, q)]
        d = 0.5 * kl(p, m) + 0.5 * kl(q, m)
    return temperature**2 * d


@pytest.mark.parametrize("kind", KD_KINDS)
def test_kd_loss_is_zero_for_identical_logits(kind):
    z = torch.randn(2, 5, 33) * 3
    for temperature in (0.5, 1.0, 4.0):
        assert kd_loss(z, z.clone(), temperature=temperature, kind=kind).abs().item() < 1e-6


@pytest.mark.parametrize("kind", KD_KINDS)
def test_kd_loss_matches_a_hand_computation(kind):
    s = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
    t = [[2.0, 0.0, 1.0], [0.5, 0.5, 0.5]]
    for temperature in (1.0, 2.0):
        expected = sum(_hand_divergence(a, b, temperature, kind) for a, b in zip(s, t)) / 2
        got = kd_loss(torch.tensor(s), torch.tensor(t), temperature=temperature, kind=kind)
        assert got.item() == pytest.approx(expected, rel=1e-5)
    # padding does not count: the mean is over the real rows only
    masked = kd_loss(torch.tensor([s]), torch.tensor([t]), torch.tensor([[True, False]]), 2.0, kind)
    assert masked.item() == pytest.approx(_hand_divergence(s[0], t[0], 2.0, kind), rel=1e-5)


@pytest.mark.parametrize("kind", KD_KINDS)
def test_kd_loss_scales_with_temperature_squared(kind):
    s, t = torch.randn(6, 40) * 2, torch.randn(6, 40) * 2
    for temperature in (0.5, 2.0, 8.0):  # T^2 times the divergence of the tempered softmaxes
        unscaled = kd_loss(s / temperature, t / temperature, temperature=1.0, kind=kind)
        assert kd_loss(s, t, temperature=temperature, kind=kind).item() == pytest.approx(
            temperature**2 * unscaled.item(), rel=1e-4)
    # why T^2: for large T the term tends to a constant instead of vanishing. forward and reverse KL
    # -> Var(z_t - z_s) / 2 over the vocabulary (Hinton et al.); JS, a quarter of that
    limit = 0.5 * (t - s).var(-1, unbiased=False).mean().item() * (0.25 if kind == "js" else 1.0)
    assert kd_loss(s, t, temperature=200.0, kind=kind).item() == pytest.approx(limit, rel=0.02)


@pytest.mark.parametrize("kind", KD_KINDS)
def test_chunked_distill_loss_equals_the_plain_path_in_value_and_gradient(kind):
    torch.manual_seed(0)
    B, T, d, d_t, V = 2, 7, 8, 12, 300
    h = torch.randn(B, T, d, requires_grad=True)
    w = torch.randn(V, d, requires_grad=True)
    h_t, w_t = torch.randn(B, T, d_t), torch.randn(V, d_t)
    y = torch.randint(0, V, (B, T))
    y[0, :3] = -100  # padding
    out = linear_distill_loss(h, w, h_t, w_t, y, kd_ratio=0.7, temperature=2.5, kind=kind, chunk_elements=1000)
    out.loss.backward()
    grads = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    z, z_t = h @ w.t(), h_t @ w_t.t()
    ce, kd = lm_loss(z, y), kd_loss(z, z_t, y != -100, 2.5, kind)
    (0.7 * kd + 0.3 * ce).backward()
    assert out.ce.item() == pytest.approx(ce.item(), rel=1e-5) and out.kd.item() == pytest.approx(kd.item(), rel=1e-5)
    assert out.loss.item() == pytest.approx(0.7 * kd.item() + 0.3 * ce.item(), rel=1e-5)
    torch.testing.assert_close(grads[0], h.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grads[1], w.grad, rtol=1e-4, atol=1e-6)
    with torch.no_grad():  # validation: the same chunks without gradients
        ng = linear_distill_loss(h, w, h_t, w_t, y, kd_ratio=0.7, temperature=2.5, kind=kind, chunk_elements=1000)
    assert ng.loss.item() == pytest.approx(out.loss.item(), rel=1e-5)


def test_chunked_distill_loss_under_autocast_computes_in_float32():
    """bf16-mixed: the chunked loss turns autocast off for its logits, so it equals the float32 result."""
    torch.manual_seed(1)
    h, w = torch.randn(2, 6, 16, requires_grad=True), torch.randn(200, 16, requires_grad=True)
    h_t, w_t, y = torch.randn(2, 6, 16), torch.randn(200, 16), torch.randint(0, 200, (2, 6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear_distill_loss(h, w, h_t, w_t, y, kd_ratio=0.5, temperature=2.0)
    out.loss.backward()
    ref = linear_distill_loss(h.detach(), w.detach(), h_t, w_t, y, kd_ratio=0.5, temperature=2.0)
    assert out.loss.dtype == torch.float32 and out.loss.item() == pytest.approx(ref.loss.item(), rel=1e-5)
    assert torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()
    # hidden states that come out of autocast in bf16 (a projection's output) meet the float32 head
    proj = torch.nn.Linear(16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h_bf16 = proj(h.detach())
        assert h_bf16.dtype == torch.bfloat16
        out = linear_distill_loss(h_bf16, w, h_t.bfloat16(), w_t, y)  # was: "expected m1 and m2 ... same dtype"
    out.loss.backward()
    assert torch.isfinite(proj.weight.grad).all()


def test_chunked_distill_loss_rejects_bad_settings():
    h, w = torch.randn(1, 2, 4), torch.randn(10, 4)
    y = torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="teacher vocabulary 11 != student vocabulary 10"):
        linear_distill_loss(h, w, h, torch.randn(11, 4), y)
    with pytest.raises(ValueError, match="one of forward_kl, reverse_kl, js"):
        linear_distill_loss(h, w, h, w, y, kind="kl")


@pytest.mark.parametrize("setting, message", [
    ({"temperature": "2"}, "stage.module.temperature='2' must be a finite number"),
    ({"kd_ratio": float("nan")}, "stage.module.kd_ratio=nan must be a finite number"),
    ({"hidden_weight": -3.0}, "stage.module.hidden_weight=-3.0 must be >= 0"),
    ({"temperature": 0}, "stage.module.temperature=0 must be positive"),
    ({"kd_ratio": 1.5}, r"stage.module.kd_ratio=1.5 must lie in \[0, 1\]"),
])
def test_bad_stage_settings_name_the_key_before_any_model_is_built(setting, message):
    with pytest.raises(ValueError, match=message):
        DistillationModule(model=SlimPajamaConfig(vocab_size=64, n_layer=1, d_model=16, n_head=2, max_seq_len=16), optimizer=None, **setting)


def test_hidden_state_loss_by_hand():
    s = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
    t = torch.tensor([[[2.0, 0.0], [1.0, -1.0]]])
    # cosine: parallel -> 0, orthogonal -> 1; mean 0.5. mse: ((1 + 0) / 2 + (0 + 4) / 2) / 2 = 1.25
    assert hidden_state_loss(s, t, kind="cosine").item() == pytest.approx(0.5)
    assert hidden_state_loss(s, t, kind="mse").item() == pytest.approx(1.25)
    assert hidden_state_loss(s, t, torch.tensor([[True, False]]), kind="mse").item() == pytest.approx(0.5)


# ---- a tiny pretrained teacher ---------------------------------------------------------------

@pytest.fixture(scope="session")
def teacher_run(corpus_dir, tmp_path_factory):
    """A nano teacher pretrained for a few steps on the test corpus: (root, data_dir, model folder).
    `root/logs/latest/pretrain` points at it, so `teacher=null` finds it under `root`."""
    root = tmp_path_factory.mktemp("teacher")
    overrides = TINY + [f"data.paths=[{corpus_dir}]", "trainer.max_steps=12", "trainer.val_check_interval=6"]
    cfg = compose_cfg(overrides, root, root / "data", output_dir=root / "logs" / "pretrain" / "runs" / "teacher")
    run(cfg)
    return root, root / "data", Path(cfg.paths.output_dir) / "model"


def distill_cfg(overrides, root, data_dir, name="run"):
    return compose_cfg(["stage=distill"] + overrides, root, data_dir,
                       output_dir=root / "logs" / "distill" / "runs" / name)


def test_every_other_layer_copies_the_teachers_layers_0_2_4(teacher_run):
    teacher = SlimPajamaModel.from_pretrained(teacher_run[2])
    student = every_other_layer(teacher)
    assert student.config.n_layer == 2 and student.config.d_model == teacher.config.d_model
    sd_t, sd_s = teacher.state_dict(), student.state_dict()
    for name, value in sd_s.items():
        if name.startswith("layers."):
            i, rest = name.removeprefix("layers.").split(".", 1)
            name = f"layers.{2 * int(i)}.{rest}"
        assert torch.equal(value, sd_t[name]), name
    x = torch.randint(0, 384, (1, 8))
    assert torch.isfinite(student(x)).all()


def test_the_checkpoint_names_the_teachers_own_folder_not_latest(teacher_run, tiny_overrides, tmp_path):
    root, data_dir, teacher_dir = teacher_run
    cfg = distill_cfg(tiny_overrides + SMALL_STUDENT + [f"stage.module.log_dir={root / 'logs'}"], tmp_path, data_dir)
    module: DistillationModule = instantiate(cfg.stage.module)  # teacher=null: latest/pretrain
    assert module.hparams["teacher"] is None and module.hparams["teacher_dir"] == str(teacher_dir.resolve())


def test_gradients_reach_the_student_only(teacher_run, tiny_overrides, tmp_path):
    root, data_dir, teacher_dir = teacher_run
    cfg = distill_cfg(tiny_overrides + SMALL_STUDENT + [f"teacher={teacher_dir}", "stage.module.hidden_loss=cosine"],
                      tmp_path, data_dir)
    module: DistillationModule = instantiate(cfg.stage.module)
    module.setup("fit")  # loads the teacher; widths 64 vs 128: a learned projection
    assert module.hidden_proj is not None and module.hidden_proj.weight.shape == (128, 64)
    batch = torch.randint(4, 384, (2, 17))
    losses = module._losses(batch)
    assert set(losses) == {"loss", "ce", "kd", "hidden"}
    losses["loss"].backward()
    assert all(p.grad is None for p in module.teacher.parameters())
    assert all(not p.requires_grad for p in module.teacher.parameters()) and not module.teacher.training
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.model.parameters())
    assert module.hidden_proj.weight.grad.abs().sum() > 0
    # the teacher is not a child: not in parameters(), state_dict() or the optimizer
    teacher_ids = {id(p) for p in module.teacher.parameters()}
    assert not teacher_ids & {id(p) for p in module.parameters()}
    assert all(k.startswith(("model.", "hidden_proj.")) for k in module.state_dict())
    optimizer = module.configure_optimizers()["optimizer"]
    assert not teacher_ids & {id(p) for g in optimizer.param_groups for p in g["params"]}


def test_teacher_is_bit_identical_after_training_and_absent_from_the_checkpoint(teacher_run, tiny_overrides, tmp_path):
    root, data_dir, teacher_dir = teacher_run
    cfg = distill_cfg(tiny_overrides + SMALL_STUDENT + [f"teacher={teacher_dir}", "stage.module.kd_ratio=0.9"],
                      tmp_path, data_dir)
    datamodule, module = instantiate(cfg.data.module), instantiate(cfg.stage.module)
    student_before = {k: v.clone() for k, v in module.model.state_dict().items()}
    trainer = L.Trainer(accelerator="cpu", max_steps=3, limit_val_batches=1, val_check_interval=3, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=datamodule)
    reference = SlimPajamaModel.from_pretrained(teacher_dir).state_dict()
    for name, value in module.teacher.state_dict().items():
        assert torch.equal(value, reference[name]), name
    assert not module.teacher.training
    assert any(not torch.equal(v, student_before[k]) for k, v in module.model.state_dict().items())
    trainer.save_checkpoint(tmp_path / "x.ckpt")
    ckpt = torch.load(tmp_path / "x.ckpt", weights_only=True)
    assert ckpt["state_dict"] and all(k.startswith("model.") for k in ckpt["state_dict"])
    assert ckpt["hyper_parameters"]["teacher"] == str(teacher_dir)
    # the teacher's perplexity was measured on the validation batches, once
    assert "teacher/val_ppl" in trainer.callback_metrics and module.teacher_measured


def _other_tokenizer(vocab_size: int) -> SlimPajamaTokenizer:
    rng = random.Random(7)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 7))) for _ in range(400)]
    return SlimPajamaTokenizer.train([fake_words(rng, 300, words) for _ in range(200)], vocab_size, num_threads=1)


def test_tokenizer_mismatch_fails_before_training(teacher_run, tiny_overrides, tmp_path):
    root, data_dir, teacher_dir = teacher_run
    # same vocabulary size, a different tokenizer: the fingerprints differ
    other = tmp_path / "other-teacher"
    shutil.copytree(teacher_dir, other)
    _other_tokenizer(384).save_pretrained(other)
    cfg = distill_cfg(tiny_overrides + SMALL_STUDENT + [f"teacher={other}"], tmp_path, data_dir)
    with pytest.raises(ValueError, match="fingerprints differ") as err:
        run(cfg)
    message = str(err.value)
    assert str(other / "tokenizer.model") in message and "data tokenizer" in message
    assert "data.tokenizer_path=" in message
    out = Path(cfg.paths.output_dir)
    assert not (out / "model").exists() and not (out / "checkpoints").exists()  # nothing trained, nothing saved

    # a teacher with a different vocabulary size
    bigger = tmp_path / "bigger-teacher"
    SlimPajamaModel(SlimPajamaConfig(vocab_size=512, n_layer=1, d_model=32, n_head=2, max_seq_len=64)).save_pretrained(bigger)
    cfg = distill_cfg(tiny_overrides + SMALL_STUDENT + [f"teacher={bigger}"], tmp_path, data_dir, "bigger")
    with pytest.raises(ValueError, match="vocabulary sizes differ") as err:
        run(cfg)
    assert f"{bigger / 'config.json'} vocab_size): 512 tokens" in str(err.value)
    assert "student model (the `model` group, data.vocab_size vocab_size): 384 tokens" in str(err.value)


def test_missing_teacher_is_a_clear_error(teacher_run, tiny_overrides, tmp_path):
    cfg = distill_cfg(tiny_overrides + ["debug=fdr"], tmp_path, teacher_run[1])  # no logs/latest/pretrain here
    with pytest.raises(FileNotFoundError, match="teacher=None: .*latest/pretrain/model.*stage=pretrain"):
        run(cfg)
    cfg = distill_cfg(tiny_overrides + [f"teacher={teacher_run[2]}", f"student.init={tmp_path / 'nowhere'}"],
                      tmp_path, teacher_run[1])
    with pytest.raises(Exception, match="student.init=.*nowhere: not one of scratch, teacher_layers"):
        run(cfg)
    cfg = distill_cfg(tiny_overrides + [f"teacher={teacher_run[2]}", "student.init=null"], tmp_path, teacher_run[1])
    with pytest.raises(Exception, match="student.init=None: give one of scratch, teacher_layers"):
        run(cfg)


INITS = {  # each init option with a different loss variant, so every variant runs end to end once
    "scratch": SMALL_STUDENT + ["stage.module.hidden_loss=cosine"],  # teacher=null: latest/pretrain
    "teacher_layers": ["student.init=teacher_layers", "stage.module.kind=reverse_kl"],
    "folder": ["stage.module.kind=js", "stage.module.hidden_loss=mse"],
}


@pytest.mark.parametrize("init", sorted(INITS))
def test_distill_stage_runs_with_each_student_init(init, teacher_run, tiny_overrides, tmp_path):
    root, data_dir, teacher_dir = teacher_run
    overrides = tiny_overrides + INITS[init]
    if init == "folder":  # a saved model of another size (as a pruned model would be), with its tokenizer
        student_dir = tmp_path / "student"
        SlimPajamaModel(SlimPajamaConfig(vocab_size=384, n_layer=1, d_model=96, n_head=2, max_seq_len=32)).save_pretrained(student_dir)
        shutil.copy(teacher_dir / "tokenizer.model", student_dir / "tokenizer.model")
        overrides += [f"student.init={student_dir}"]
    if init == "scratch":
        cfg = distill_cfg(overrides, root, data_dir, name=f"scratch-{tmp_path.name}")  # finds root/logs/latest/pretrain
    else:
        cfg = distill_cfg(overrides + [f"teacher={teacher_dir}"], tmp_path, data_dir)
    result = run(cfg)
    out = Path(cfg.paths.output_dir)
    metrics = json.loads((out / "metrics.json").read_text())
    assert result == metrics["val/loss"] and metrics["val/ppl"] == pytest.approx(math.exp(metrics["val/loss"]), rel=1e-4)
    for key in ("train/loss", "distill/kd_loss", "distill/ce_loss", "teacher/val_ppl", "teacher/val_loss"):
        assert math.isfinite(metrics[key]), key
    header = (out / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/loss", "distill/kd_loss", "distill/ce_loss", "val/loss", "val/ppl", "teacher/val_ppl"} <= set(header)
    assert ("distill/hidden_loss" in header) == ("hidden_loss" in " ".join(INITS[init]))

    student = SlimPajamaModel.from_pretrained(out / "model")  # saved like any model, with the tokenizer
    assert SlimPajamaTokenizer.from_pretrained(out / "model").vocab_size == 384
    expected = {"scratch": (2, 64), "teacher_layers": (2, 128), "folder": (1, 96)}[init]
    assert (student.config.n_layer, student.config.d_model) == expected
    assert (Path(cfg.paths.log_dir) / "latest" / "distill").resolve() == out.resolve()

    # the teacher's perplexity is the teacher's own on the validation batches of the run (2 of them)
    teacher = SlimPajamaModel.from_pretrained(teacher_dir)
    datamodule = instantiate(cfg.data.module)
    datamodule.prepare_data()
    datamodule.setup("validate")
    total, n = 0.0, 0
    for batch, _ in zip(datamodule.val_dataloader(), range(2)):
        batch = batch.long()
        with torch.no_grad():
            h = teacher(batch[:, :-1], apply_head=False)
        total += linear_cross_entropy(h, teacher.lm_head.weight, batch[:, 1:]).item() * batch[:, 1:].numel()
        n += batch[:, 1:].numel()
    assert metrics["teacher/val_loss"] == pytest.approx(total / n, rel=1e-4)


@pytest.mark.slow
def test_distill_under_ddp_on_two_cpu_processes(teacher_run, corpus_dir, tmp_path):
    """`trainer=ddp` as users type it: each rank loads the teacher onto its device, the student is synchronised,
    rank 0 saves it."""
    import subprocess
    import sys

    from conftest import ROOT

    root, data_dir, teacher_dir = teacher_run
    common = [o for o in TINY if not o.startswith("trainer.max_steps")] + [
        f"data.paths=[{corpus_dir}]", f"paths.log_dir={tmp_path / 'logs'}", f"paths.data_dir={data_dir}",
        "trainer.max_steps=4", "stage=distill", f"teacher={teacher_dir}", "student.init=teacher_layers",
        "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true",
        f"hydra.run.dir={tmp_path / 'run'}"]
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(ROOT / "train.py"), *common], check=True, env=env, capture_output=True,
                   timeout=600)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert math.isfinite(metrics["val/loss"]) and math.isfinite(metrics["teacher/val_ppl"])
    assert metrics["trainer/global_step"] == 4
    assert SlimPajamaModel.from_pretrained(tmp_path / "run" / "model").config.n_layer == 2
