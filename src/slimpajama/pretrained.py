"""`SlimPajamaModel`: the Transformer plus Hugging Face-style save/load and `generate`.

A saved folder is in Hugging Face's Llama layout (`config.json` with Llama's keys,
`model.safetensors` with Llama's parameter names, `generation_config.json`, tokenizer files), so
`transformers.LlamaForCausalLM.from_pretrained(folder)` reads it unchanged. Our fused `qkv` and
`gate_up` projections are split into `q_proj/k_proj/v_proj` and `gate_proj/up_proj` on save and
fused again on load.
"""

import json
import os
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from slimpajama.model import SlimPajamaConfig, Transformer, rope_cache
from slimpajama.registry import resolve_model

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
GENERATION_CONFIG_FILE = "generation_config.json"
MODEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)  # what from_pretrained loads a model in
HF_TOP_K = 50  # sampling's top_k when neither the call nor generation_config.json sets one, as in transformers

_HF_KEYS = {  # ours -> Llama's config.json
    "vocab_size": "vocab_size",
    "d_model": "hidden_size",
    "intermediate_size": "intermediate_size",
    "n_layer": "num_hidden_layers",
    "n_head": "num_attention_heads",
    "n_kv_head": "num_key_value_heads",
    "max_seq_len": "max_position_embeddings",
    "norm_eps": "rms_norm_eps",
    "rope_theta": "rope_theta",
    "tie_embeddings": "tie_word_embeddings",
    "init_std": "initializer_range",
    "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
    "pad_token_id": "pad_token_id",
    "dropout": "attention_dropout",
}


# transformers' LlamaConfig defaults where they differ from ours (a foreign config.json may omit a key)
_LLAMA_DEFAULTS = {"norm_eps": 1e-6, "max_seq_len": 2048, "pad_token_id": None}


def config_to_hf(config: SlimPajamaConfig, dtype: torch.dtype = torch.float32) -> dict:
    hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    hf.update({theirs: getattr(config, ours) for ours, theirs in _HF_KEYS.items()})
    hf.update(
        head_dim=config.head_dim, hidden_act="silu", attention_bias=False, mlp_bias=False, rope_scaling=None,
        pretraining_tp=1, use_cache=True, torch_dtype=str(dtype).removeprefix("torch."),
    )
    return hf


def folder_dtype(directory: Path, hf: dict) -> torch.dtype:
    """The dtype of a folder's weights, as transformers' "auto" takes it: what its config.json `hf`
    records (transformers 5 writes "dtype", 4 and we "torch_dtype"), else that of its first floating
    point tensor."""
    dtype = getattr(torch, str(hf.get("dtype") or hf.get("torch_dtype")), None)
    if isinstance(dtype, torch.dtype):
        return dtype
    with safe_open(str(weight_files(directory)[0]), "pt") as f:
        for key in f.keys():
            if (t := f.get_slice(key)[:0]).is_floating_point():
                return t.dtype
    return torch.float32


def config_from_hf(hf: dict, source: str = CONFIG_FILE) -> SlimPajamaConfig:
    if hf.get("model_type", "llama") != "llama" and "LlamaForCausalLM" not in hf.get("architectures", []):
        raise ValueError(f"{source}: model_type {hf.get('model_type')!r} is not a Llama-layout model")
    if hf.get("hidden_act", "silu") != "silu" or hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ValueError(f"{source}: only Llama models with silu activations and no biases are supported")
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or rope
    if scaling.get("rope_type", scaling.get("type", "default")) != "default":
        raise ValueError(f"{source}: RoPE scaling {scaling.get('rope_type', scaling.get('type'))!r} is not "
                         "supported (only unscaled rotary embeddings): its logits would differ from transformers'")
    theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
    kwargs = {ours: hf[theirs] for ours, theirs in _HF_KEYS.items() if theirs in hf}
    for ours, theirs in _HF_KEYS.items():  # a key the file leaves out means transformers' LlamaConfig default
        if theirs not in hf and ours in _LLAMA_DEFAULTS:
            kwargs[ours] = _LLAMA_DEFAULTS[ours]
    kwargs["rope_theta"] = theta
    kwargs["head_dim"] = hf.get("head_dim")  # None: hidden_size / num_attention_heads
    return SlimPajamaConfig(**kwargs)


def state_dict_to_hf(sd: dict, config: SlimPajamaConfig) -> dict:
    q, kv = config.n_head * config.head_dim, config.n_kv_head * config.head_dim
    out = {}
    for name, t in sd.items():
        if name == "lm_head.weight":
            if not config.tie_embeddings:
                out[name] = t
        elif name.endswith("self_attn.qkv.weight"):
            base = "model." + name.removesuffix("qkv.weight")
            out[base + "q_proj.weight"], out[base + "k_proj.weight"], out[base + "v_proj.weight"] = t.split([q, kv, kv])
        elif name.endswith("mlp.gate_up.weight"):
            base = "model." + name.removesuffix("gate_up.weight")
            out[base + "gate_proj.weight"], out[base + "up_proj.weight"] = t.chunk(2)
        else:
            out["model." + name] = t
    return {k: v.contiguous() for k, v in out.items()}


def state_dict_from_hf(sd: dict, config: SlimPajamaConfig) -> dict:
    out = {}
    for name, t in sd.items():
        if name.endswith(("k_proj.weight", "v_proj.weight", "up_proj.weight", "rotary_emb.inv_freq")):
            continue  # fused with their q_proj / gate_proj below; the rotary tables are recomputed (as in transformers)
        parts = {"q_proj.weight": ("k_proj.weight", "v_proj.weight"), "gate_proj.weight": ("up_proj.weight",)}
        for first, rest in parts.items():
            if name.endswith(first):
                base = name.removesuffix(first)
                missing = [base + r for r in rest if base + r not in sd]
                if missing:
                    raise ValueError(f"missing weights {missing}")
                t = torch.cat([t, *(sd[base + r] for r in rest)])
                name = base + ("qkv.weight" if first.startswith("q") else "gate_up.weight")
        out[name.removeprefix("model.")] = t
    if "lm_head.weight" not in out:
        if not config.tie_embeddings:
            raise ValueError("the checkpoint has no lm_head.weight and tie_word_embeddings is false")
        if "embed_tokens.weight" in out:  # else reported as missing
            out["lm_head.weight"] = out["embed_tokens.weight"]
    elif config.tie_embeddings and not torch.equal(out["lm_head.weight"], out.get("embed_tokens.weight", out["lm_head.weight"])):
        raise ValueError("tie_word_embeddings is true but the checkpoint's lm_head.weight differs from its "
                         "embed_tokens.weight: set tie_word_embeddings to false in config.json to keep the head")
    return out


def write_together(writes: dict) -> None:
    """{path: write(tmp_path)}: every file written to a temporary name first, then all renamed into place,
    so a save that fails (a full disk, an interrupt) changes none of them and leaves no temporary file;
    an overwritten folder never holds one model's weights with another's config."""
    tmps = {path: path.with_name(path.name + f".tmp-{os.getpid()}") for path in writes}
    try:
        for path, write in writes.items():
            write(tmps[path])
    except BaseException:
        for tmp in tmps.values():
            tmp.unlink(missing_ok=True)
        raise
    for path, tmp in tmps.items():
        os.replace(tmp, path)


def remove_stale_shards(directory: Path) -> None:
    """After a save of one model.safetensors, a sharded model's index and the shards it names, left in the
    folder by an earlier save (transformers', of a large model): vLLM reads every `*.safetensors` of a
    folder, filtered by the index when there is one, so it would read the old weights, or none of the new.
    Only the index's own shards go (plain names in the folder); any other file stays."""
    index = directory / WEIGHTS_INDEX
    if not index.is_file():
        return
    try:
        shards = set(json.loads(index.read_text())["weight_map"].values())
    except (ValueError, KeyError, TypeError, AttributeError):  # unreadable: the index alone goes
        shards = set()
    for shard in shards:
        if isinstance(shard, str) and shard.endswith(".safetensors") and Path(shard).name == shard != WEIGHTS_FILE:
            (directory / shard).unlink(missing_ok=True)
    index.unlink()


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a model folder: model.safetensors, or the shards its index names (as
    transformers writes large models). A folder with neither is an error that names any pickles there."""
    if (directory / WEIGHTS_FILE).is_file():
        return [directory / WEIGHTS_FILE]
    if (directory / WEIGHTS_INDEX).is_file():
        index = json.loads((directory / WEIGHTS_INDEX).read_text())
        return [directory / shard for shard in sorted(set(index["weight_map"].values()))]
    pickled = [p.name for p in directory.glob("*.bin")] + [p.name for p in directory.glob("*.pt*")]
    raise FileNotFoundError(
        f"{directory}: neither {WEIGHTS_FILE} nor {WEIGHTS_INDEX} found"
        + (f" ({', '.join(pickled)} are pickles, which we never load: convert them to safetensors)" if pickled else "")
    )


class SlimPajamaModel(Transformer):
    """The model users load, train and generate with."""

    def save_pretrained(
        self, directory: Union[str, os.PathLike], generation_config: dict = None, dtype: Optional[torch.dtype] = None
    ) -> None:
        """Weights (safetensors), config.json and generation_config.json, written together. dtype: the
        weights' dtype in the files (default: the model's). generation_config.json holds the model's own
        `generation_config` (what `from_pretrained` read, e.g. a prompt template or end ids) updated with
        the `generation_config` passed here, as transformers saves its model's."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        dtype = dtype or self.lm_head.weight.dtype
        sd = state_dict_to_hf({k: v.detach().cpu().to(dtype) for k, v in self.state_dict().items()}, self.config)
        hf = config_to_hf(self.config, dtype)
        gen = {"bos_token_id": self.config.bos_token_id, "eos_token_id": self.config.eos_token_id,
               "pad_token_id": self.config.pad_token_id, **(getattr(self, "generation_config", None) or {}),
               **(generation_config or {})}
        write_together({
            directory / WEIGHTS_FILE: lambda p: save_file(sd, str(p), metadata={"format": "pt"}),
            directory / CONFIG_FILE: lambda p: p.write_text(json.dumps(hf, indent=2) + "\n"),
            directory / GENERATION_CONFIG_FILE: lambda p: p.write_text(json.dumps(gen, indent=2) + "\n"),
        })
        remove_stale_shards(directory)

    @property
    def device(self) -> torch.device:
        """Where the weights are (`inputs.to(model.device)`, as with a transformers model)."""
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """transformers' count: tied weights once; `exclude_embeddings` leaves out the input embedding
        (only it: an untied output head counts, as in transformers)."""
        params = {id(p): p for p in self.parameters() if p.requires_grad or not only_trainable}
        if exclude_embeddings:
            params.pop(id(self.embed_tokens.weight), None)
        return sum(p.numel() for p in params.values())

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.embed_tokens

    def get_output_embeddings(self) -> torch.nn.Linear:
        return self.lm_head

    @torch.no_grad()
    def resize_token_embeddings(self, new_num_tokens: int) -> "SlimPajamaModel":
        """Grow the embedding and output layers to `new_num_tokens` rows (as transformers' method of the
        same name). Existing rows are kept unchanged; each new row starts at the mean of the old rows
        (of the embedding and of the head, separately), so a new token begins as an "average" token
        rather than as noise that would dominate the softmax. Shrinking is refused."""
        old = self.config.vocab_size
        if new_num_tokens < old:
            raise ValueError(f"resize_token_embeddings({new_num_tokens}) would drop rows of a {old}-token vocabulary")
        if new_num_tokens == old:
            return self

        def grown(weight: torch.Tensor) -> torch.nn.Parameter:
            extra = weight.float().mean(0, keepdim=True).expand(new_num_tokens - old, -1).to(weight.dtype)
            return torch.nn.Parameter(torch.cat([weight, extra]), requires_grad=weight.requires_grad)

        self.embed_tokens.weight = grown(self.embed_tokens.weight)
        self.embed_tokens.num_embeddings = new_num_tokens
        if self.config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        else:
            self.lm_head.weight = grown(self.lm_head.weight)
        self.lm_head.out_features = new_num_tokens
        self.config.vocab_size = new_num_tokens
        return self

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: Union[str, os.PathLike],
        torch_dtype: Optional[Union[str, torch.dtype]] = None,
        device: Union[str, torch.device] = "cpu",
        dtype: Optional[Union[str, torch.dtype]] = None,
    ) -> "SlimPajamaModel":
        """Load a saved folder, or a name of the local model index (`slimpajama`, `slimpajama/<stage>`:
        see `slimpajama.registry`). Weights are read from safetensors only (never unpickled); a tensor
        whose shape disagrees with config.json is an error. torch_dtype (or dtype): float32, bfloat16,
        float16, float64 (another dtype is a ValueError), or "auto" (as saved); default float32
        (transformers 5 defaults to "auto"). Returns the model in eval mode."""
        directory = resolve_model(name_or_path)
        config_path = directory / CONFIG_FILE
        hf_config = json.loads(config_path.read_text())
        config = config_from_hf(hf_config, str(config_path))
        asked = torch_dtype if torch_dtype is not None else dtype
        dtype = folder_dtype(directory, hf_config) if asked == "auto" else asked
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype, None)
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"torch_dtype={asked!r} is not a torch dtype (e.g. 'float32', 'bfloat16', 'auto')")
        dtype = dtype or torch.float32
        if dtype not in MODEL_DTYPES:  # int8, bool: nn.Module.to refuses them; complex, float8: no model kernels
            saved = " (the saved dtype)" if asked == "auto" else ""
            raise ValueError(f"torch_dtype={asked!r}{saved}: a model runs in float32, bfloat16, float16 or float64, "
                             f"not {str(dtype).removeprefix('torch.')}")
        files = weight_files(directory)
        hf_sd = {}
        for f in files:
            hf_sd.update(load_file(str(f)))
        with torch.device("meta"):
            model = cls(config)
        try:
            sd = state_dict_from_hf(hf_sd, config)
        except ValueError as e:
            raise ValueError(f"{files[0]}: {e}") from None
        expected = model.state_dict()  # every parameter name, tied lm_head included
        missing = sorted(set(expected) - set(sd))
        if missing:
            raise ValueError(f"{files[0]}: missing weights {missing[:5]}")
        for name, t in sd.items():
            if name in expected and t.shape != expected[name].shape:
                raise ValueError(
                    f"{files[0]}: {name} has shape {tuple(t.shape)} but {config_path} implies "
                    f"{tuple(expected[name].shape)}: the weights and the config disagree"
                )
        unexpected = sorted(set(sd) - set(expected))
        if unexpected:
            raise ValueError(f"{files[0]}: unexpected weights {unexpected[:5]} for the config in {config_path}")
        model.load_state_dict(sd, strict=False, assign=True)  # rope buffers are not saved
        if config.tie_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        model.cos, model.sin = rope_cache(config.max_seq_len, config.head_dim, config.rope_theta)
        model.generation_config = {}
        if (directory / GENERATION_CONFIG_FILE).is_file():
            model.generation_config = json.loads((directory / GENERATION_CONFIG_FILE).read_text())
        model = model.to(device=device, dtype=dtype)
        model.cos, model.sin = model.cos.float(), model.sin.float()  # rotary tables stay float32
        return model.eval()

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, **kwargs) -> torch.Tensor:
        """Hugging Face-style generation (see `slimpajama.generation.generate` for every option);
        defaults come from the folder's generation_config.json, and a max_length or max_new_tokens in
        the call replaces both of the file's lengths. Passing temperature, top_k, top_p or min_p
        samples unless do_sample=False is passed too; the file's own sampling settings sample only
        where it sets do_sample, as in transformers. Sampling keeps the 50 likeliest tokens unless
        top_k is given (top_k=0 or None: the whole vocabulary), transformers' default. An argument
        `generate` does not take is an error, as in transformers, where it would otherwise be
        silently ignored."""
        from slimpajama.generation import GENERATE_OPTIONS as options
        from slimpajama.generation import SAMPLING_KEYS, generate

        saved = dict(getattr(self, "generation_config", None) or {})
        defaults = {k: v for k, v in saved.items() if k in options}  # not bos_token_id, prompt_template ...
        if "do_sample" not in kwargs:
            if any(kwargs.get(k) is not None for k in SAMPLING_KEYS):
                kwargs["do_sample"] = True  # the user asked for a sampling knob: sample
            else:
                defaults.setdefault("do_sample", False)
        if "max_length" in kwargs or "max_new_tokens" in kwargs:  # the call's length, not the file's
            for key in ("max_length", "max_new_tokens"):
                defaults.pop(key, None)
        settings = {**defaults, **kwargs}
        if settings.get("do_sample") and "top_k" not in settings:  # an explicit None: the whole vocabulary
            settings["top_k"] = HF_TOP_K  # transformers' GenerationConfig default; top_k=0 turns it off
        return generate(self, input_ids, attention_mask=attention_mask, **settings)
