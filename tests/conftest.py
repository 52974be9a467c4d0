"""Shared fixtures: a generated multi-source corpus and composed Hydra configs on tmp folders."""

import os
import random
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from slimpajama.data.reader import write_jsonl_zst
from slimpajama.tokenizer import SlimPajamaTokenizer

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("SLIMPAJAMA_ROOT", str(ROOT))
os.environ.setdefault("WANDB_SILENT", "true")

SYLLABLES = "ka lo mi re su ta ne vo pi da go lu be si ra no ve ti mo za".split()
HANZI = "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可也你"

# ---- a small trained tokenizer: English, Chinese and control tokens ----
CONTROL = ["<|style:formal|>", "<|task:translate|>"]
VOCAB = 512
LINES = (
    "the of and to in is was for that with as on by at from this are be it an have which one not but all",
    "they their there were when more time about would into year first city world people state part new",
    "music school river house water light small large north south early later during between under",
)
WORDS = [word for line in LINES for word in line.split()]
HANZI = "写一篇正式的文章我们在中国人大学生时间工作问题今天天气很好明年会去北京上海和朋友一起学习语言"



def english(rng: random.Random) -> str:
    sentences = []
    for _ in range(rng.randint(2, 5)):
        words = [rng.choice(WORDS) for _ in range(rng.randint(5, 14))]
        words[0] = words[0].capitalize()
        if rng.random() < 0.3:
            words.insert(rng.randint(1, len(words) - 1), str(rng.randint(1, 2024)))
        text = " ".join(words)
        if rng.random() < 0.3:
            text = text.replace(" ", ", ", 1)
        sentences.append(text + rng.choice(".!?"))
    return " ".join(sentences)



def chinese(rng: random.Random) -> str:
    return "".join(rng.choice(HANZI) for _ in range(rng.randint(10, 40))) + rng.choice("。！？")


@pytest.fixture(scope="session")
def tok() -> SlimPajamaTokenizer:
    rng = random.Random(0)
    texts = [english(rng) + ("\n" + english(rng) if i % 3 == 0 else "") for i in range(600)]
    texts += [chinese(rng) for _ in range(300)]
    texts += [f"{CONTROL[0]}{english(rng)}" for _ in range(20)]  # the trainer never merges control tokens
    return SlimPajamaTokenizer.train(texts, VOCAB, CONTROL, num_threads=1)


def fake_words(rng: random.Random, n: int, vocab: list[str]) -> str:
    return " ".join(rng.choice(vocab) for _ in range(n))


def make_corpus(directory: Path, docs_per_source: int = 60, seed: int = 0) -> Path:
    """Three sources with different vocabularies, as SlimPajama-format jsonl.zst and .jsonl files."""
    rng = random.Random(seed)
    words = ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(300)]
    sources = {
        "alpha": (words[:150], ".jsonl.zst"),
        "beta": (words[150:], ".jsonl.zst"),
        "gamma": ([c for c in HANZI], ".jsonl"),
    }
    directory.mkdir(parents=True, exist_ok=True)
    for name, (vocab, suffix) in sources.items():
        docs = [(fake_words(rng, rng.randint(80, 200), vocab) + ".", name) for _ in range(docs_per_source)]
        path = directory / name / f"part-0{suffix}"
        path.parent.mkdir(exist_ok=True)
        if suffix == ".jsonl.zst":
            write_jsonl_zst(str(path), docs)
        else:
            import json

            path.write_text("".join(json.dumps({"text": t, "meta": {"redpajama_set_name": s}}) + "\n" for t, s in docs))
    return directory


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def compose_cfg(overrides: list[str], tmp_path: Path, data_dir: Path | None = None, output_dir: Path | None = None):
    """The real config, composed with test overrides, with run/log/data folders under tmp_path."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.log_dir = str(tmp_path / "logs")
        cfg.paths.data_dir = str(data_dir or tmp_path / "data")
        cfg.paths.output_dir = str(output_dir or tmp_path / "run")
        cfg.hydra.runtime.output_dir = cfg.paths.output_dir
        cfg.hydra.job.num = 0
    HydraConfig().set_config(cfg)
    return cfg


TINY = [
    "model=nano",
    "compile=false",  # tests start at once; test_train checks the compiled forward
    "data=custom",
    "data.vocab_size=384",
    "data.seq_len=32",
    "data.batch_size=4",
    "data.val_fraction=0.1",
    "logger=csv",
    "callbacks=none",
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "trainer.limit_val_batches=2",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "sample.max_new_tokens=8",
]


@pytest.fixture
def tiny_overrides(corpus_dir) -> list[str]:
    return TINY + [f"data.paths=[{corpus_dir}]"]


@pytest.fixture(autouse=True)
def restore_deterministic_algorithms():
    """A Trainer built with `deterministic: warn` (trainer=cpu) turns torch's deterministic algorithms on
    for the whole process; each test starts as a fresh process would, with them off."""
    yield
    torch.use_deterministic_algorithms(False)


def wandb_log_payload(path: Path) -> bytes:
    """The records of a .wandb file joined: a 7-byte file header, then LevelDB-style log blocks of
    32 KiB whose records (7-byte header: crc, length, type) may be split across blocks."""
    data, block = path.read_bytes(), 32768
    pos, out = 7, bytearray()
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        length = int.from_bytes(data[pos + 4 : pos + 6], "little")
        if length == 0 and data[pos + 6] == 0:
            pos += left
            continue
        out += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
    return bytes(out)


def wandb_offline_record(run_dir: Path, keys: tuple[bytes, ...], wait_s: int = 30) -> bytes:
    """An offline W&B run's protobuf log once every key is in it (W&B's service process writes it
    asynchronously: give it a moment to flush)."""
    import time

    for _ in range(wait_s):
        record = b"".join(wandb_log_payload(p) for p in run_dir.glob("run-*.wandb"))
        if all(k in record for k in keys):
            break
        time.sleep(1)
    return record


def op_calls(fn) -> dict[str, int]:
    """How many times each operator (e.g. "aten::bmm") ran during fn(), by the profiler."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key: e.count for e in prof.key_averages()}


def write_shards(folder: Path) -> None:
    """A model folder's model.safetensors as transformers writes a large model: two shards, every other
    tensor each, and model.safetensors.index.json naming them (model.safetensors removed)."""
    import json

    from safetensors.torch import load_file, save_file

    sd = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names, weight_map = sorted(sd), {}
    for i, part in enumerate((names[::2], names[1::2])):
        shard = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: sd[k] for k in part}, str(folder / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
