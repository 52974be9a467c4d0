"""LoRA: adapters start as the identity update, only they (and the control-token rows) train, and
merging gives a plain dense model with the same outputs."""

import json
import random
from pathlib import Path

import pytest
import torch

from conftest import TINY, compose_cfg
from slimpajama import SlimPajamaConfig, SlimPajamaModel
from slimpajama.lora import LoRALinear, apply_lora, check_lora_settings, has_lora, merge_lora
from slimpajama.optim import param_groups


def tiny_model(seed: int = 0) -> SlimPajamaModel:
    torch.manual_seed(seed)
    return SlimPajamaModel(SlimPajamaConfig(vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, d_model=32, max_seq_len=16))


def test_adapters_start_as_the_model_and_freeze_everything_else():
    model, x = tiny_model(), torch.randint(0, 64, (2, 10))
    before = model(x)
    wrapped = apply_lora(model, rank=4, alpha=8)
    assert sorted(wrapped) == sorted(f"layers.{i}.{m}" for i in range(2) for m in
                                     ("self_attn.qkv", "self_attn.o_proj", "mlp.gate_up", "mlp.down_proj"))
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)  # B = 0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A" in n or ".lora_B" in n for n in trainable)
    lora = model.layers[0].self_attn.qkv
    assert lora.lora_A.shape == (4, 32) and lora.lora_B.shape == (lora.base.out_features, 4) and lora.scaling == 2.0


def test_adapters_join_an_eval_mode_model_in_eval_mode():
    """Dropout in adapters added to a model in eval mode is off (it was on: two forwards differed)."""
    model, x = tiny_model().eval(), torch.randint(0, 64, (2, 10))
    apply_lora(model, rank=4, alpha=8, dropout=0.5)
    for lora in (m for m in model.modules() if isinstance(m, LoRALinear)):
        torch.nn.init.normal_(lora.lora_B)  # a trained update, so that dropout would show
    assert not any(m.training for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)
    model.train()
    assert not torch.equal(model(x), model(x))  # in training, dropout draws


def test_merge_folds_the_low_rank_update_into_a_plain_linear():
    model, x = tiny_model(), torch.randint(0, 64, (2, 10))
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}
    apply_lora(model, rank=3, alpha=6)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            torch.nn.init.normal_(m.lora_B, std=0.05)
    adapted = model(x)
    assert merge_lora(model) == 8 and not has_lora(model)
    torch.testing.assert_close(model(x), adapted, rtol=1e-5, atol=1e-5)
    assert set(dict(model.named_parameters())) == set(dense)  # the dense model's names: saves as before
    delta = model.layers[1].mlp.down_proj.weight - dense["layers.1.mlp.down_proj.weight"]
    assert torch.linalg.matrix_rank(delta).item() == 3
    assert all(p.requires_grad for p in model.parameters())


def test_only_the_given_embedding_rows_train_and_are_never_decayed():
    model = tiny_model()
    embed0, head0 = model.embed_tokens.weight.detach().clone(), model.lm_head.weight.detach().clone()
    apply_lora(model, rank=2, trainable_rows=[60, 61])
    opt = torch.optim.AdamW(param_groups(model, 0.1, never_decay=(model.embed_tokens.weight, model.lm_head.weight)),
                            lr=1e-2)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert id(model.embed_tokens.weight) not in decayed and id(model.lm_head.weight) not in decayed
    for _ in range(3):
        x = torch.tensor([[60, 5, 61, 7, 60, 9]])
        model(x).logsumexp(-1).sum().backward()
        opt.step()
        opt.zero_grad()
    changed = (model.embed_tokens.weight - embed0).abs().sum(1).nonzero().flatten().tolist()
    assert changed == [60, 61]
    assert (model.lm_head.weight - head0).abs().sum(1).nonzero().flatten().tolist() == [60, 61]
    merge_lora(model)  # the row hooks go with the adapters: full fine-tuning afterwards trains every row
    model(torch.tensor([[1, 2, 3]])).sum().backward()
    assert model.embed_tokens.weight.grad[1].abs().sum() > 0


def test_unknown_targets_are_a_clear_error():
    with pytest.raises(ValueError, match="lora.targets"):
        apply_lora(tiny_model(), targets=["q_proj"])


def test_targets_are_a_list_of_names_that_each_match_a_linear():
    """q_proj used to be dropped beside qkv, and the string "qkv" read as the letters q, k, v."""
    with pytest.raises(ValueError, match=r"lora.targets: \['q_proj'\] matched no nn.Linear .*"
                                         r"\(valid names: down_proj, gate_up, o_proj, qkv\)"):
        apply_lora(tiny_model(), targets=["qkv", "q_proj"])
    with pytest.raises(ValueError, match=r"lora.targets='qkv' must be a list of module names"):
        apply_lora(tiny_model(), targets="qkv")
    assert apply_lora(tiny_model(), targets=["qkv"]) == ["layers.0.self_attn.qkv", "layers.1.self_attn.qkv"]


@pytest.mark.parametrize("target", ["lm_head", "embed_tokens"])
def test_the_output_head_and_embedding_are_refused_as_targets(target):
    """The fine-tuning loss applies lm_head's frozen weight itself: an adapter there counted as
    trainable but never trained."""
    with pytest.raises(ValueError, match=rf"stage.module.lora.targets: \['{target}'\] cannot take LoRA"):
        check_lora_settings({"targets": ["qkv", target]}, "stage.module.lora")
    with pytest.raises(ValueError, match=rf"lora.targets: \['{target}'\] cannot take LoRA"):
        apply_lora(tiny_model(), targets=[target])


@pytest.mark.parametrize("settings, message", [
    ({"rank": 0}, r"stage.module.lora.rank=0 must be a positive integer"),
    ({"rank": 4.5}, r"stage.module.lora.rank=4.5 must be a positive integer"),
    ({"alpha": -16}, r"stage.module.lora.alpha=-16 must be a positive number"),
    ({"dropout": 1.5}, r"stage.module.lora.dropout=1.5 must lie in \[0, 1\)"),
    ({"targets": []}, r"stage.module.lora.targets is empty"),
    ({"targets": "qkv"}, r"stage.module.lora.targets='qkv' must be a list of module names"),
    ({"rnak": 8}, r"stage.module.lora: unknown keys \['rnak'\]"),
])
def test_bad_lora_settings_name_the_key(settings, message):
    with pytest.raises(ValueError, match=message):
        check_lora_settings(settings, "stage.module.lora")
    check_lora_settings({"rank": 4, "alpha": 8, "dropout": 0.1, "targets": ["qkv"]}, "stage.module.lora")


def test_finetune_stage_with_lora_saves_a_dense_model_changed_by_low_rank_updates(tok, tmp_path):
    from slimpajama.data import tasks as T
    from slimpajama.pipeline import run

    init = tmp_path / "init"
    torch.manual_seed(0)
    SlimPajamaModel(SlimPajamaConfig(vocab_size=len(tok), n_layer=2, n_head=2, d_model=32, max_seq_len=64)).save_pretrained(init)
    tok.save_pretrained(init)
    rng = random.Random(1)
    rows = [{"control": f"<|source:{s}|>", "input": "", "output": " ".join(rng.choice(w) for _ in range(12)), "label": s}
            for s, w in (("alpha", ["the", "city", "river"]), ("beta", ["music", "school", "water"])) for _ in range(40)]
    T.write_examples(tmp_path / "gen.jsonl", rows)
    overrides = [o for o in TINY if not o.startswith(("data", "model"))] + [
        "stage=finetune", f"init_from={init}", "data.tasks=null",
        f"data.custom={{gen:{{kind:generation,path:'{tmp_path / 'gen.jsonl'}',weight:1}}}}", "data.seq_len=63",
        "data.batch_size=4", "trainer.max_steps=3", "stage.module.lora.enabled=true", "stage.module.lora.rank=2",
        "stage.module.optimizer.lr=0.05", "stage.module.evaluation.enabled=false",
    ]
    cfg = compose_cfg(overrides, tmp_path, output_dir=tmp_path / "logs" / "finetune" / "runs" / "r")
    run(cfg)
    out = Path(cfg.paths.output_dir)
    before, after = SlimPajamaModel.from_pretrained(init), SlimPajamaModel.from_pretrained(out / "model")
    n_old = before.config.vocab_size
    assert after.config.vocab_size == n_old + 2  # the two control tokens joined
    torch.testing.assert_close(after.embed_tokens.weight[:n_old], before.embed_tokens.weight, rtol=0, atol=0)
    torch.testing.assert_close(after.layers[0].input_layernorm.weight, before.layers[0].input_layernorm.weight, rtol=0, atol=0)
    for name in ("self_attn.qkv", "self_attn.o_proj", "mlp.gate_up", "mlp.down_proj"):
        delta = after.get_submodule(f"layers.0.{name}").weight - before.get_submodule(f"layers.0.{name}").weight
        assert 0 < torch.linalg.matrix_rank(delta).item() <= 2, name
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 < metrics["model/trainable_params"] < 0.2 * metrics["model/params"]
