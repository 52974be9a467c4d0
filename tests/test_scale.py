"""Scaling out: DDP on two CPU processes (gloo) equals one process with the global batch; each rank
reads its own share of the data; the data path works the same for a local folder and a remote URL."""

import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf, open_dict

from conftest import ROOT, TINY, compose_cfg
from slimpajama.pipeline import run

STEPS = 6


@pytest.mark.slow
def test_ddp_two_processes_batch_b_equal_one_process_batch_2b_and_ranks_see_different_data(corpus_dir, tmp_path):
    common = [o for o in TINY if not o.startswith(("trainer.max_steps", "callbacks="))] + [
        f"data.paths=[{corpus_dir}]", f"paths.log_dir={tmp_path / 'logs'}", f"paths.data_dir={tmp_path / 'data'}",
        f"trainer.max_steps={STEPS}", "trainer.limit_val_batches=0", "final_validation=false", "save_model=false",
        "trainer.precision=32-true", "callbacks=none"]
    recorded = tmp_path / "recorded"
    ddp = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "data.batch_size=2",
           "+callbacks.record._target_=recorders.RecordBatches", f"+callbacks.record.out={recorded}",
           f"hydra.run.dir={tmp_path / 'ddp'}"]
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT / "tests")}
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *common, *ddp], env=env, capture_output=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    ranks = [torch.load(recorded / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [len(r["batches"]) for r in ranks] == [STEPS, STEPS]
    assert all(b.shape == (2, 33) for r in ranks for b in r["batches"])  # batch b = 2 per rank, seq_len + 1

    # each rank streams its own share: no token block is read by both
    rows = [{tuple(row.tolist()) for b in r["batches"] for row in b} for r in ranks]
    assert len(rows[0]) == len(rows[1]) == 2 * STEPS and not rows[0] & rows[1]

    # one process, batch 2b = the two ranks' batches of each step: the same loss trajectory
    cfg = compose_cfg(common + ["data.batch_size=4", "logger=none"], tmp_path / "single")
    with open_dict(cfg):
        cfg.data.module = OmegaConf.create({"_target_": "recorders.ReplayDataModule", "recorded": str(recorded)})
    single_out = tmp_path / "single-recorded"
    with open_dict(cfg):
        cfg.callbacks = OmegaConf.create({"record": {"_target_": "recorders.RecordBatches", "out": str(single_out)}})
    run(cfg)
    single = torch.load(single_out / "rank0.pt", weights_only=True)
    assert all(b.shape == (4, 33) for b in single["batches"])
    mean_of_ranks = [(a + b) / 2 for a, b in zip(ranks[0]["losses"], ranks[1]["losses"])]
    assert single["losses"] == pytest.approx(mean_of_ranks, rel=1e-4), (single["losses"], mean_of_ranks)
    assert single["losses"][-1] < single["losses"][0] - 0.1  # it trained: the steps changed the weights


def test_remote_url_reads_the_same_batches_as_the_local_folder(tiny_overrides, tmp_path):
    """The training data as LitData streams it from an object store: the prepared token folders are
    served as a remote `local:` URL (no network), downloaded chunk by chunk into a cache, and give
    the same batches as the local folder."""
    from hydra.utils import instantiate

    cfg = compose_cfg(tiny_overrides, tmp_path)
    local = instantiate(cfg.data.module)
    local.prepare_data()
    local.setup()
    remote = instantiate(cfg.data.module, remote_url=f"local:{local.prepared.root}",
                         stream_cache_dir=str(tmp_path / "stream-cache"))
    remote.setup()
    assert remote.prepared.dirs("train")["alpha"].startswith("local:")
    for split in ("train_dataloader", "val_dataloader"):
        a = [b for _, b in zip(range(5), getattr(local, split)())]
        b = [b for _, b in zip(range(5), getattr(remote, split)())]
        assert len(a) == len(b) == 5 and all(torch.equal(x, y) for x, y in zip(a, b)), split
    assert list((tmp_path / "stream-cache").rglob("chunk-*.bin"))  # chunks were fetched into the cache


@pytest.mark.parametrize("version", [None, 1])
def test_a_remote_copy_prepared_in_another_format_is_refused_naming_the_url(tiny_overrides, tmp_path, version):
    """A bucket copy made by an older version holds tokens the tokenizer no longer gives: refused, not trained on."""
    import json
    import shutil

    from hydra.utils import instantiate

    from slimpajama.data.corpus import FORMAT_VERSION, MANIFEST
    from slimpajama.data.reader import CorpusError

    cfg = compose_cfg(tiny_overrides, tmp_path)
    local = instantiate(cfg.data.module)
    local.prepare_data()
    local.setup()
    assert local.prepared.manifest["format_version"] == FORMAT_VERSION
    old = shutil.copytree(local.prepared.root, tmp_path / "bucket" / "textcorpus-old")
    manifest = json.loads((old / MANIFEST).read_text())
    if version is None:
        del manifest["format_version"]
    else:
        manifest["format_version"] = version
    (old / MANIFEST).write_text(json.dumps(manifest))
    remote = instantiate(cfg.data.module, remote_url=f"local:{old}", stream_cache_dir=str(tmp_path / "stream-cache"))
    with pytest.raises(CorpusError, match=rf"data.remote_url=local:{old}.*reads format {FORMAT_VERSION}"):
        remote.setup()
    # uploaded again in the current format to the same URL: read afresh (LitData's downloader kept the old file)
    manifest["format_version"] = FORMAT_VERSION
    (old / MANIFEST).write_text(json.dumps(manifest))
    remote = instantiate(cfg.data.module, remote_url=f"local:{old}", stream_cache_dir=str(tmp_path / "stream-cache"))
    remote.setup()
    assert remote.prepared.manifest["format_version"] == FORMAT_VERSION


def test_a_sharded_fsdp_checkpoint_consolidates_into_one_model_folder(tmp_path):
    """The folder layout Lightning's FSDPStrategy writes with state_dict_type=sharded (torch.distributed.
    checkpoint shards of {"model", "optimizer_0"} + meta.pt), consolidated on one CPU process."""
    import torch.distributed.checkpoint as dcp

    from slimpajama import SlimPajamaConfig, SlimPajamaModel
    from slimpajama.fsdp import consolidate

    config = SlimPajamaConfig(vocab_size=64, n_layer=2, n_head=2, d_model=32, intermediate_size=64, max_seq_len=16)
    torch.manual_seed(0)
    model = SlimPajamaModel(config)
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    ckpt_dir = tmp_path / "last.ckpt"
    dcp.save({"model": state}, checkpoint_id=str(ckpt_dir), no_dist=True)
    torch.save({"global_step": 7, "hyper_parameters": {"model": config.to_dict()}}, ckpt_dir / "meta.pt")

    single = consolidate(str(ckpt_dir), model_dir=str(tmp_path / "model"))
    ckpt = torch.load(single, weights_only=True)
    assert ckpt["global_step"] == 7 and set(ckpt["state_dict"]) == set(state)
    loaded = SlimPajamaModel.from_pretrained(tmp_path / "model")
    ids = torch.randint(0, 64, (2, 16))
    assert torch.equal(loaded(ids), model(ids))
    # the trained model's own config (RunIdentity writes it into every checkpoint) wins over the `model`
    # group's: fine-tuning and pruning have none, and pretraining with init_from has the wrong one
    from slimpajama.checkpointing import MODEL_CONFIG_KEY

    other = SlimPajamaConfig(**{**config.to_dict(), "rope_theta": 5e5, "norm_eps": 1e-6})
    torch.save({"global_step": 7, "hyper_parameters": {"model": config.to_dict()}, MODEL_CONFIG_KEY: other.to_dict()},
               ckpt_dir / "meta.pt")
    consolidate(str(ckpt_dir), model_dir=str(tmp_path / "model2"))
    assert SlimPajamaModel.from_pretrained(tmp_path / "model2").config == other
    torch.save({"global_step": 7, "hyper_parameters": {"init_from": "x"}}, ckpt_dir / "meta.pt")  # a finetune's
    with pytest.raises(ValueError, match="holds no model config"):
        consolidate(str(ckpt_dir), model_dir=str(tmp_path / "model3"))
