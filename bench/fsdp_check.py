"""FSDP on one GPU: tokens/s and MFU of `small` and `tinyllama-1.1b` (bf16-mixed, auto-wrap per Block,
activation checkpointing, sharded checkpoints), then the consolidation path: the sharded checkpoint
and the in-memory gather both give one `save_pretrained` folder equal to the trained weights.

GPU only (Lightning 2.6 refuses FSDP on CPU). Random tokens, so no corpus is needed:

    python bench/fsdp_check.py --model tinyllama-1.1b --steps 30 --batch-size 4
    scripts/gpu_check.sh            # both models; results in bench/results/fsdp-*.json

It composes the real config (`trainer=fsdp model=<name>`), so it checks conf/trainer/fsdp.yaml too.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import lightning as L
import torch

ROOT = Path(__file__).resolve().parents[1]


class RandomTokens(L.LightningDataModule):
    def __init__(self, vocab: int, seq_len: int, batch_size: int, steps: int):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.data = torch.randint(0, vocab, (steps * batch_size, seq_len + 1), generator=g)
        self.batch_size, self.metrics, self.tokenizer = batch_size, {}, None

    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.data, batch_size=self.batch_size, drop_last=True)


class StepTimer(L.Callback):
    def __init__(self):
        self.times = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        torch.cuda.synchronize()
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self._t0)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="small")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5, help="steps left out of the timing")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--peak-tflops", type=float, default=None, help="bf16 dense peak per GPU (default: measured)")
    p.add_argument("--no-activation-checkpointing", action="store_true")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench/fsdp_check.py needs a CUDA GPU: Lightning refuses strategy=fsdp on CPU")

    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from omegaconf import open_dict

    from slimpajama.callbacks import measure_peak_flops
    from slimpajama.fsdp import consolidate, full_model
    from slimpajama.pretrained import SlimPajamaModel

    run_dir = Path(a.out) / f"fsdp-{a.model}-{time.strftime('%Y%m%d-%H%M%S')}"
    overrides = [f"model={a.model}", "trainer=fsdp", "trainer.devices=1", f"trainer.max_steps={a.steps}",
                 "trainer.limit_val_batches=0", "trainer.enable_progress_bar=false", "logger=none", "callbacks=none",
                 f"data.seq_len={a.seq_len}"] + (["data.vocab_size=32000"] if "tinyllama" in a.model else [])
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)
        if a.no_activation_checkpointing:
            cfg.trainer.strategy.activation_checkpointing_policy = None
    L.seed_everything(0)
    module = instantiate(cfg.stage.module)
    timer = StepTimer()
    trainer = instantiate(cfg.trainer, callbacks=[timer], logger=False, default_root_dir=str(run_dir))
    data = RandomTokens(module.model.config.vocab_size, a.seq_len, a.batch_size, a.steps)
    torch.cuda.reset_peak_memory_stats()
    trainer.fit(module, datamodule=data)

    times = sorted(timer.times[a.warmup:])
    step = times[len(times) // 2]
    tokens_per_sec = a.batch_size * a.seq_len / step
    flops = module.model.flops_per_token(a.seq_len) * tokens_per_sec
    peak = a.peak_tflops * 1e12 if a.peak_tflops else measure_peak_flops(torch.device("cuda"), torch.bfloat16, 8192)

    # sharded checkpoint -> consolidated folder, and the in-memory gather -> folder: both equal the weights
    ckpt = run_dir / "sharded.ckpt"
    trainer.save_checkpoint(ckpt)
    gathered = full_model(trainer, module)
    gathered.save_pretrained(run_dir / "model-gathered")
    consolidate(str(ckpt), model_dir=str(run_dir / "model-consolidated"))
    a_sd = SlimPajamaModel.from_pretrained(run_dir / "model-gathered").state_dict()
    b_sd = SlimPajamaModel.from_pretrained(run_dir / "model-consolidated").state_dict()
    same = all(torch.equal(a_sd[k], b_sd[k]) for k in a_sd)

    result = {
        "model": a.model, "params": module.model.num_params(), "batch_size": a.batch_size, "seq_len": a.seq_len,
        "activation_checkpointing": not a.no_activation_checkpointing, "precision": str(trainer.precision),
        "gpu": torch.cuda.get_device_name(), "median_step_s": step, "tokens_per_sec": tokens_per_sec,
        "flops_per_token": module.model.flops_per_token(a.seq_len), "peak_tflops": peak / 1e12,
        "mfu": flops / peak, "max_memory_gb": torch.cuda.max_memory_allocated() / 1e9,
        "sharded_checkpoint_is_dir": ckpt.is_dir(), "consolidated_equals_gathered": same,
        "command": "python bench/fsdp_check.py " + " ".join(argv or sys.argv[1:]),
    }
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / f"{run_dir.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    assert result["sharded_checkpoint_is_dir"] and same, "consolidation check failed"
    return result


if __name__ == "__main__":
    main()
