"""Pruning: exact sparsity and its tie rule, Wanda's scores by hand, masks held through recovery,
structured shrinking (shapes, save/load, transformers), every method through the pipeline, sweeps."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import compose_cfg, write_shards
from slimpajama import SlimPajamaConfig, SlimPajamaModel, pruning
from slimpajama.pipeline import run


def tiny_model(seed: int = 0, **kw) -> SlimPajamaModel:
    torch.manual_seed(seed)
    c = {"vocab_size": 97, "n_layer": 3, "n_head": 4, "n_kv_head": 2, "d_model": 32, "intermediate_size": 64, "max_seq_len": 48}
    return SlimPajamaModel(SlimPajamaConfig(**{**c, **kw})).eval()


def batches(n: int = 3, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 97, (2, 17), generator=g) for _ in range(n)]


# ----------------------------------------------------------------------------- masks


@pytest.mark.parametrize("scope", pruning.SCOPES)
@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.77])
def test_achieved_sparsity_is_exactly_the_target_in_every_scope(scope, sparsity):
    model = tiny_model()
    modules = pruning.prunable_modules(model)
    with torch.no_grad():  # many exact ties, also across the threshold
        for m in modules.values():
            m.weight[:, ::3] = 0.01
    original = {n: m.weight.detach().abs().clone() for n, m in modules.items()}
    masks = pruning.masks_from_scores({n: pruning.magnitude_scores(m.weight) for n, m in modules.items()}, sparsity, scope)
    pruning.apply_masks(modules, masks)
    pruned = {n: int((~k).sum()) for n, k in masks.items()}
    sizes = {n: m.weight.numel() for n, m in modules.items()}
    if scope == "global":
        assert sum(pruned.values()) == math.floor(sparsity * sum(sizes.values()) + 0.5)
    elif scope == "layer":
        assert pruned == {n: math.floor(sparsity * s + 0.5) for n, s in sizes.items()}
    else:
        for n, k in masks.items():
            per_row = (~k).sum(1)
            assert (per_row == math.floor(sparsity * k.size(1) + 0.5)).all()
    zeros = {n: int((m.weight == 0).sum()) for n, m in modules.items()}
    assert zeros == pruned  # the masks are what ends up in the weights (no weight was zero before)
    # the lowest scores went: in each module every kept weight is at least as large as every pruned one
    if scope == "layer":
        for n, k in masks.items():
            a = original[n]
            assert a[k].min() >= a[~k].max()


def test_tie_rule_breaks_ties_by_position():
    scores = {"a": torch.ones(2, 5), "b": torch.ones(1, 5)}
    masks = pruning.masks_from_scores(scores, 0.4, "global")  # k = 6 of 15: the first six in model order
    assert masks["a"].flatten().tolist() == [False] * 6 + [True] * 4 and masks["b"].all()
    row = pruning.masks_from_scores({"a": torch.tensor([[3.0, 1.0, 1.0, 1.0]])}, 0.5, "row")["a"]
    assert row.tolist() == [[True, False, False, True]]  # the two tied 1.0s with the lowest index go
    assert pruning.n_pruned(10, 0.25) == 3 and pruning.n_pruned(10, 0.24) == 2  # 2.5 rounds up
    # halves that floats miss: 0.58 * 25 is 14.499999999999998 in floats, 0.7 * 45 is 31.499999999999996
    assert pruning.n_pruned(25, 0.58) == 15 and pruning.n_pruned(45, 0.7) == 32
    assert pruning.masks_from_scores({"a": torch.arange(25.0)[None]}, 0.58, "row")["a"].sum() == 25 - 15
    # the exact target of one matrix under that rule, as 1 - kept / n: 58 of 4 x 25 per layer, 15 of each row of 25
    assert pruning.target_sparsity((4, 25), 0.58, "layer") == 1 - 42 / 100 == pytest.approx(0.58)
    assert pruning.target_sparsity((4, 25), 0.58, "row") == 1 - 10 / 25 == pytest.approx(0.6)
    assert pruning.target_sparsity((4, 25), 0.58, "global") is None  # one k over every matrix together
    masks = pruning.masks_from_scores({"a": torch.rand(4, 25)}, 0.58, "row")
    assert 1 - masks["a"].sum().item() / 100 == pruning.target_sparsity((4, 25), 0.58, "row")  # the same float


def test_bad_settings_name_the_key():
    with pytest.raises(ValueError, match="prune.sparsity"):
        pruning.masks_from_scores({"a": torch.ones(2, 2)}, 1.0, "layer")
    with pytest.raises(ValueError, match="prune.scope"):
        pruning.masks_from_scores({"a": torch.ones(2, 2)}, 0.5, "block")
    with pytest.raises(ValueError, match="prune.prunable.*'layers.*.attn.nothing'"):
        pruning.prunable_modules(tiny_model(), ["layers.*.attn.nothing"])
    with pytest.raises(ValueError, match="prune.structured.heads"):
        pruning.structured_prune(tiny_model(), batches(), heads=0.9)
    with pytest.raises(ValueError, match="prune.structured.hidden keeps 29 hidden channels"):  # odd: no head count fits
        pruning.structured_prune(tiny_model(), batches(), hidden=0.1)
    with pytest.raises(ValueError, match="prune.structured.layer_metric='cos'"):  # even with no block dropped
        pruning.structured_prune(tiny_model(), batches(), layer_metric="cos")


@pytest.mark.parametrize(("overrides", "match"), [
    ({"prunable": []}, "prune.prunable is empty"),
    ({"method": "wanda", "prunable": ["embed_tokens"]}, "prune.prunable: embed_tokens is an embedding"),
    ({"schedule": "gradual", "gradual": {"every": 0}}, r"prune.gradual.every=0"),
    ({"schedule": "gradual", "gradual": {"initial_sparsity": 0.6}}, r"prune.gradual.initial_sparsity=0.6"),
    ({"sparsity": "abc"}, r"prune.sparsity='abc' must be a number"),
    ({"sparsity": None}, r"prune.sparsity=None must be a number"),
    ({"schedule": "gradual", "gradual": {"initial_sparsity": "abc"}}, r"prune.gradual.initial_sparsity='abc'"),
    ({"schedule": "gradual", "gradual": {"start_step": 5, "end_step": 2}}, r"end_step=2 must be after .*start_step=5"),
    ({"schedule": "gradual", "gradual": {"end_step": 0}}, r"end_step=0 must be after .*start_step=0"),
    ({"schedule": "gradual", "gradual": {"start_step": -1}}, r"prune.gradual.start_step=-1 must be a whole number"),
    ({"method": "structured", "structured": {"heads": "abc"}}, r"prune.structured.heads='abc' must be a number"),
    ({"method": "structured", "structured": {"layer_metric": "cos"}}, r"prune.structured.layer_metric='cos'"),
    ({"method": "structured", "scope": "bogus"}, r"prune.scope='bogus'"),
    ({"method": "structured", "prunable": ["layers.*.mlp.down_proj"]}, r"structured pruning removes whole query groups"),
    ({"calibration_batches": -1}, r"prune.calibration_batches=-1 must be a whole number >= 0"),
    ({"method": "wanda", "calibration_batches": 0}, r"prune.calibration_batches=0: prune.method=wanda"),
    ({"generation_tokens": -5}, r"prune.generation_tokens=-5"),
    ({"prunable": "layers.0.mlp.nothing"}, r"\['layers.0.mlp.nothing'\] match no module"),  # one pattern, not letters
    # distillation recovery, as stage=distill checks it (temperature 0 trained on NaN and saved a NaN model)
    ({"recovery": "distill", "distill": {"temperature": 0}}, r"prune.distill.temperature=0 must be positive"),
    ({"recovery": "distill", "distill": {"temperature": -2}}, r"prune.distill.temperature=-2 must be positive"),
    ({"recovery": "distill", "distill": {"temperature": "abc"}}, r"prune.distill.temperature='abc' must be a finite"),
    ({"recovery": "distill", "distill": {"kind": "fwd"}}, r"prune.distill.kind='fwd': one of forward_kl"),
    ({"recovery": "distill", "distill": {"kd_ratio": 2}}, r"prune.distill.kd_ratio=2 must lie in \[0, 1\]"),
    ({"recovery": "distill", "distill": {"temprature": 2}}, r"prune.distill.temprature: not a setting"),
    # structured shapes that remove everything (the tiny model: 3 blocks, 2 query groups, 64 MLP and 32 hidden channels)
    ({"method": "structured", "sparsity": 0.75},
     r"prune.sparsity=0.75 \(it sets prune.structured.heads, which is null\) would remove all 2 query groups"),
    ({"method": "structured", "structured": {"heads": 0.0, "channels": 0.9999}},
     r"prune.structured.channels=0.9999 would remove all 64 MLP channels"),
    ({"method": "structured", "structured": {"layers": 0.9}}, r"prune.structured.layers=0.9 would remove all 3 blocks"),
    ({"method": "structured", "structured": {"hidden": 0.99}}, r"prune.structured.hidden=0.99 would remove all 32 hidden"),
    ({"method": "structured", "structured": {"hidden": 0.1}}, r"prune.structured.hidden keeps 29 hidden channels"),
])
def test_bad_stage_settings_fail_before_any_pruning(tmp_path, overrides, match):
    from slimpajama.stages.prune import PruneModule

    tiny_model().save_pretrained(tmp_path / "model")
    with pytest.raises(ValueError, match=match):
        PruneModule(optimizer=torch.optim.AdamW, init_from=str(tmp_path / "model"), **overrides)


def test_a_tied_weight_is_pruned_and_counted_as_the_head():
    model = tiny_model(tie_embeddings=True)
    modules = pruning.prunable_modules(model, ["embed_tokens", "lm_head", "layers.0.mlp.down_proj"])
    assert list(modules) == ["layers.0.mlp.down_proj", "lm_head"]  # once, under the Linear (activations as inputs)
    from slimpajama.stages.prune import saved_tensor_names

    assert saved_tensor_names("lm_head", tied=True) == ["model.embed_tokens.weight"]  # what a tied folder saves
    with pytest.raises(ValueError, match="embed_tokens is an embedding"):  # token ids are no activations
        pruning.input_sq_sums(model, batches(), {"embed_tokens": model.embed_tokens})
    assert saved_tensor_names("lm_head") == ["lm_head.weight"]


def test_wanda_scores_match_a_hand_computation():
    layer = torch.nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -2.0, 0.5], [-0.1, 4.0, 3.0]]))
    net = torch.nn.Sequential(layer)
    x = torch.tensor([[[1.0, 0.0, 2.0], [3.0, 1.0, 0.0]]])  # (B=1, T=2, in=3)
    sums = {}
    h = layer.register_forward_pre_hook(lambda m, a: sums.setdefault("x", a[0]))
    net(x)
    h.remove()
    # ||X_j||_2 over the two tokens: sqrt(1 + 9), sqrt(0 + 1), sqrt(4 + 0)
    norms = torch.tensor([math.sqrt(10), 1.0, 2.0])
    expected = torch.tensor([[1 * math.sqrt(10), 2 * 1.0, 0.5 * 2], [0.1 * math.sqrt(10), 4 * 1.0, 3 * 2]])
    torch.testing.assert_close(pruning.wanda_scores(layer.weight, norms), expected)

    # the same norms from the calibration hooks of a real model, and per-row masks from those scores
    model = tiny_model()
    modules = {"layers.0.mlp.down_proj": model.layers[0].mlp.down_proj}
    seen = []
    hook = modules["layers.0.mlp.down_proj"].register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, 64)))
    data = batches()
    sq = pruning.input_sq_sums(model, data, modules)
    hook.remove()
    x_all = torch.cat(seen)
    torch.testing.assert_close(sq["layers.0.mlp.down_proj"], x_all.pow(2).sum(0))
    w = modules["layers.0.mlp.down_proj"].weight.detach().clone()
    masks, _ = pruning.wanda_prune(model, data, modules, 0.5, "row")
    score = w.abs() * x_all.norm(dim=0)[None]
    assert (~masks["layers.0.mlp.down_proj"]).sum(1).eq(32).all()  # half of each row
    kept_min = torch.where(masks["layers.0.mlp.down_proj"], score, torch.tensor(float("inf"))).min(1).values
    pruned_max = torch.where(masks["layers.0.mlp.down_proj"], torch.tensor(-1.0), score).max(1).values
    assert (kept_min >= pruned_max).all()


def test_wanda_beats_magnitude_when_inputs_have_outlier_features():
    """Wanda's point: a small weight on a large input feature matters; magnitude prunes it anyway."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 8, bias=False)
    x = torch.randn(256, 16)
    x[:, :2] *= 30  # two outlier features
    dense = layer(x).detach()
    errs = {}
    for method in ("magnitude", "wanda"):
        w = layer.weight.detach()
        s = pruning.magnitude_scores(w) if method == "magnitude" else pruning.wanda_scores(w, x.norm(dim=0))
        mask = pruning.masks_from_scores({"l": s}, 0.5, "row")["l"]
        errs[method] = float((x @ (w * mask).t() - dense).pow(2).mean())
    assert errs["wanda"] < 0.5 * errs["magnitude"], errs


def test_cubic_schedule():
    def s(step):
        return pruning.cubic_sparsity(step, final=0.8, initial=0.0, start=10, end=110, every=10)

    assert s(0) == 0.0 and s(10) == 0.0 and s(110) == 0.8 and s(500) == 0.8
    assert s(60) == pytest.approx(0.8 - 0.8 * 0.5**3)
    assert s(65) == s(60)  # held between updates
    values = [s(t) for t in range(120)]
    assert values == sorted(values)


# ----------------------------------------------------------------------------- structured


@pytest.mark.parametrize("tie", [False, True])
def test_structured_pruned_model_shapes_forward_save_load_and_transformers(tmp_path, tie):
    model = tiny_model(tie_embeddings=tie)
    small, kept = pruning.structured_prune(model, batches(), heads=0.5, channels=0.25, hidden=0.25, layers=1 / 3)
    c = small.config
    assert (c.n_layer, c.n_kv_head, c.n_head, c.head_dim, c.intermediate_size, c.d_model) == (2, 1, 2, 8, 48, 24)
    counts = pruning.structured_counts(model.config, heads=0.5, channels=0.25, hidden=0.25, layers=1 / 3)
    assert counts == {"layers": 2, "groups": 1, "channels": 48, "hidden": 24}  # from the config alone
    assert len(kept["layers"]) == 2 and all(len(g) == 1 for g in kept["groups"])
    blk = small.layers[0]
    assert blk.self_attn.qkv.weight.shape == ((2 + 2 * 1) * 8, 24) and blk.self_attn.o_proj.weight.shape == (24, 16)
    assert blk.mlp.gate_up.weight.shape == (96, 24) and blk.mlp.down_proj.weight.shape == (24, 48)
    assert small.lm_head.weight.shape == (97, 24) and (small.lm_head.weight is small.embed_tokens.weight) == tie
    assert small.num_params() < 0.75 * model.num_params()
    x = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        logits = small(x)
    assert logits.shape == (2, 20, 97) and torch.isfinite(logits).all()
    out = small.generate(x[:1, :5], max_new_tokens=4, do_sample=False)
    assert out.shape[1] <= 9

    small.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"],
            cfg["hidden_size"], cfg["intermediate_size"]) == (2, 2, 1, 8, 24, 48)
    loaded = SlimPajamaModel.from_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), logits, atol=0, rtol=0)
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, logits, atol=1e-5, rtol=1e-5)


def test_structured_keeps_the_important_parts_and_nothing_else_changes():
    model = tiny_model()
    data = batches()
    same, _ = pruning.structured_prune(model, data)  # nothing removed: the same function
    x = data[0][:, :-1]
    with torch.no_grad():
        torch.testing.assert_close(same(x), model(x), atol=0, rtol=0)
        model.layers[1].self_attn.qkv.weight[:16] *= 0.01  # query group 0 of layer 1: (almost) silent
        model.layers[1].mlp.down_proj.weight[:, 5] = 0
        model.layers[1].mlp.gate_up.weight[5] = 0  # channel 5 of layer 1 is dead
    _, kept = pruning.structured_prune(model, data, heads=0.5, channels=1 / 64)
    assert kept["groups"][1] == [1] and kept["n_channels"] == 63
    imp = pruning.width_importance(model, data)
    assert imp["channels"][1, 5] == 0 and imp["channels"][1].argmin() == 5
    # depth: a block whose output projections are zero changes nothing and is the one dropped
    with torch.no_grad():
        model.layers[2].self_attn.o_proj.weight.zero_()
        model.layers[2].mlp.down_proj.weight.zero_()
    score = pruning.layer_importance(model, data, "cosine")
    assert score.argmin() == 2 and abs(float(score[2])) < 1e-6
    _, kept = pruning.structured_prune(model, data, layers=1 / 3)
    assert kept["layers"] == [0, 1]
    loss_score = pruning.layer_importance(model, data, "loss")  # skipping a no-op block changes no loss
    assert abs(float(loss_score[2])) < 1e-6 and (loss_score[:2] != 0).all()


# ----------------------------------------------------------------------------- the stage, through the pipeline


@pytest.fixture(scope="module")
def teacher(corpus_dir, tmp_path_factory):
    """A tiny model pretrained for a few steps on the test corpus, published as logs/latest/pretrain."""
    from conftest import TINY

    root = tmp_path_factory.mktemp("prune")
    overrides = TINY + [f"data.paths=[{corpus_dir}]", "trainer.max_steps=10", "trainer.val_check_interval=10",
                        "model.tie_embeddings=false"]
    cfg = compose_cfg(overrides, root, root / "data", output_dir=root / "logs" / "pretrain" / "runs" / "teacher")
    run(cfg)
    return root


def prune_run(teacher: Path, overrides: list[str], tmp_path: Path, corpus_dir) -> tuple[dict, Path]:
    from conftest import TINY

    log_dir = tmp_path / "logs"
    (log_dir / "latest").mkdir(parents=True)
    (log_dir / "latest" / "pretrain").symlink_to(teacher / "logs" / "latest" / "pretrain")
    cfg = compose_cfg(TINY + [f"data.paths=[{corpus_dir}]", "stage=prune", "prune.calibration_batches=2",
                              "prune.eval_batches=2", "prune.generation_tokens=8", *overrides],
                      tmp_path, teacher / "data", output_dir=tmp_path / "run")
    run(cfg)
    out = Path(cfg.paths.output_dir)
    return json.loads((out / "metrics.json").read_text()), out


def saved_prunable(folder: Path) -> dict[str, torch.Tensor]:
    sd = load_file(folder / "model.safetensors")
    return {k: v for k, v in sd.items() if k.startswith("model.layers.") and "proj" in k}


@pytest.mark.parametrize("method", ["magnitude", "wanda", "structured"])
def test_fast_dev_run_of_each_method(method, teacher, tmp_path, corpus_dir):
    metrics, out = prune_run(teacher, [f"prune.method={method}", "debug=fdr"], tmp_path, corpus_dir)
    assert (tmp_path / "logs" / "latest" / "prune").resolve() == out.resolve()
    dense = SlimPajamaModel.from_pretrained(teacher / "logs" / "latest" / "pretrain" / "model")
    pruned = SlimPajamaModel.from_pretrained(out / "model")
    for key in ("prune/ppl_dense", "prune/ppl_pruned", "prune/ppl_recovered", "val/ppl", "prune/gen_tokens_per_sec",
                "prune/gen_tokens_per_sec_dense", "model/file_bytes", "prune/file_bytes_dense", "prune/sparsity"):
        assert math.isfinite(metrics[key]), key
    assert metrics["prune/target_sparsity"] == 0.5 and metrics["model/params"] == pruned.num_params()
    assert metrics["prune/params_dense"] == dense.num_params()
    assert metrics["model/file_bytes"] == (out / "model" / "model.safetensors").stat().st_size
    per_layer = {k: v for k, v in metrics.items() if k.startswith("prune/sparsity/")}
    assert len(per_layer) == 4 * dense.config.n_layer
    if method == "structured":  # half the query groups and MLP channels: a smaller dense model
        assert pruned.config.n_kv_head == dense.config.n_kv_head // 2
        assert pruned.config.intermediate_size == dense.config.intermediate_size // 2
        assert metrics["prune/sparsity"] == pytest.approx(0.5, abs=1e-9)
        assert metrics["model/file_bytes"] < metrics["prune/file_bytes_dense"]
    targets = {k.removeprefix("prune/target_"): v for k, v in metrics.items() if k.startswith("prune/target_sparsity/")}
    if method == "structured":
        assert not targets  # the shape is the target (prune/sparsity warns when it is off)
    else:  # per layer (magnitude) or per row (Wanda): every module loses exactly half
        assert set(per_layer.values()) == {0.5} and metrics["prune/sparsity"] == 0.5
        assert targets == {k.removeprefix("prune/"): v for k, v in per_layer.items()}
        assert metrics["prune/ppl_pruned"] > metrics["prune/ppl_dense"]


def test_calibration_runs_without_dropout_and_a_bfloat16_source_is_saved_as_bfloat16(teacher, tmp_path, corpus_dir):
    """Wanda's statistics are the eval-mode activations: a teacher whose config adds attention dropout gets
    the same masks. The source's dtype is kept in the files, so the file ratio compares like with like."""
    source = teacher / "logs" / "latest" / "pretrain" / "model"
    masks = {}
    for name, dropout, dtype in (("plain", 0.0, None), ("dropout", 0.3, None), ("bf16", 0.0, torch.bfloat16)):
        folder = tmp_path / name
        model = SlimPajamaModel.from_pretrained(source)
        model.config.dropout = dropout
        model.save_pretrained(folder, dtype=dtype)
        for f in source.iterdir():  # the tokenizer files
            if not (folder / f.name).exists():
                (folder / f.name).write_bytes(f.read_bytes())
        assert SlimPajamaModel.from_pretrained(folder).layers[0].self_attn.dropout == dropout
        metrics, out = prune_run(teacher, ["prune.method=wanda", "prune.recovery=none", "prune.generation_tokens=0",
                                           f"stage.module.init_from={folder}"], tmp_path / f"run-{name}", corpus_dir)
        masks[name] = {k: v == 0 for k, v in saved_prunable(out / "model").items()}
        saved = json.loads((out / "model" / "config.json").read_text())["torch_dtype"]
        assert saved == ("bfloat16" if dtype else "float32")
        assert metrics["prune/file_ratio"] == pytest.approx(1.0, abs=0.01)  # unstructured: the same size
    assert masks["plain"].keys() == masks["dropout"].keys()
    for k in masks["plain"]:
        assert torch.equal(masks["plain"][k], masks["dropout"][k]), k


def test_structured_sparsity_off_target_by_rounding_is_reported_and_warned(teacher, tmp_path, corpus_dir, caplog):
    """2 query groups at 0.25: 0.5 of a group rounds up to one, so half the attention goes."""
    with caplog.at_level("WARNING", logger="slimpajama.stages.prune"):
        metrics, out = prune_run(teacher, ["prune.method=structured", "prune.sparsity=0.25", "debug=fdr"], tmp_path,
                                 corpus_dir)
    assert SlimPajamaModel.from_pretrained(out / "model").config.n_kv_head == 1
    assert metrics["prune/sparsity"] > 0.26
    assert f"structured pruning removed {metrics['prune/sparsity']:.4f} of the prunable parameters, not " \
           "prune.sparsity=0.25" in caplog.text
    caplog.clear()  # the same shape from explicit fractions: the shape is the target, nothing to warn of
    with caplog.at_level("WARNING", logger="slimpajama.stages.prune"):
        explicit, _ = prune_run(teacher, ["prune.method=structured", "prune.structured.heads=0.25",
                                          "prune.structured.channels=0.25", "debug=fdr"], tmp_path / "explicit",
                                corpus_dir)
    assert explicit["prune/sparsity"] == metrics["prune/sparsity"] and "structured pruning removed" not in caplog.text


def test_masked_weights_stay_zero_through_finetune_recovery(teacher, tmp_path, corpus_dir):
    metrics, out = prune_run(teacher, ["prune.method=magnitude", "prune.scope=global", "prune.sparsity=0.6",
                                       "trainer.max_steps=4"], tmp_path, corpus_dir)
    assert metrics["trainer/global_step"] == 4
    dense = saved_prunable(teacher / "logs" / "latest" / "pretrain" / "model")
    tuned = saved_prunable(out / "model")
    total = sum(t.numel() for t in dense.values())
    zeros = sum(int((t == 0).sum()) for t in tuned.values())
    assert zeros == math.floor(0.6 * total + 0.5) and metrics["prune/sparsity"] == pytest.approx(zeros / total)
    assert not [k for k in metrics if k.startswith("prune/target_sparsity/")]  # global: no matrix has its own target
    # the one-shot global magnitude masks, recomputed from the dense weights, are exactly the zeros
    scores = torch.cat([t.abs().flatten() for t in dense.values()])
    keep = torch.ones_like(scores, dtype=torch.bool)
    keep[torch.argsort(scores, stable=True)[:zeros]] = False
    tuned_flat = torch.cat([t.flatten() for t in tuned.values()])
    assert torch.equal(tuned_flat != 0, keep)
    # and recovery did train the kept weights
    dense_flat = torch.cat([t.flatten() for t in dense.values()])
    assert not torch.equal(tuned_flat[keep], dense_flat[keep])


def test_gradual_schedule_and_distill_recovery(teacher, tmp_path, corpus_dir):
    metrics, out = prune_run(teacher, ["prune.method=wanda", "prune.schedule=gradual", "prune.gradual.every=2",
                                       "prune.gradual.end_step=4", "prune.recovery=distill", "trainer.max_steps=6",
                                       "prune.sparsity=0.4"], tmp_path, corpus_dir)
    header = (out / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"prune/scheduled_sparsity", "distill/kd_loss", "train/loss", "prune/ppl_dense", "prune/sparsity",
            "prune/gen_tokens_per_sec", "model/file_bytes"} <= set(header)  # logged, not only in metrics.json
    rows = (out / "csv" / "metrics.csv").read_text().splitlines()
    col = header.index("prune/scheduled_sparsity")
    scheduled = [float(r.split(",")[col]) for r in rows[1:] if r.split(",")[col]]
    assert scheduled[0] == 0.0 and scheduled[-1] == pytest.approx(0.4) and scheduled == sorted(scheduled)
    assert metrics["prune/sparsity"] == pytest.approx(0.4, abs=0.01)  # row scope: exact per row of each module
    per_module = [v for k, v in metrics.items() if k.startswith("prune/sparsity/")]
    assert per_module == pytest.approx([0.4] * len(per_module), abs=1 / 128)  # nano's rows: 128 or 352 inputs
    # the exact per-matrix target of row scope: round(0.4 * 128) = 51 of 128 inputs, round(0.4 * 352) = 141 of 352
    targets = {k.removeprefix("prune/target_"): v for k, v in metrics.items() if k.startswith("prune/target_sparsity/")}
    assert len(targets) == 16 and set(targets.values()) == {1 - 77 / 128, 1 - 211 / 352}
    assert targets["sparsity/layers.0.mlp.down_proj"] == 1 - 211 / 352  # down_proj: 352 intermediate inputs
    assert targets == {k.removeprefix("prune/"): v for k, v in metrics.items() if k.startswith("prune/sparsity/")}
    assert "prune/target_sparsity/layers.3.mlp.gate_up" in header  # logged too


def test_recovery_none_trains_nothing_and_init_from_null_finds_the_pretrained_model(teacher, tmp_path, corpus_dir):
    metrics, out = prune_run(teacher, ["prune.recovery=none", "prune.method=structured", "prune.sparsity=0.25",
                                       "prune.structured.layers=0.25"], tmp_path, corpus_dir)
    assert metrics["trainer/global_step"] == 0
    assert metrics["val/ppl"] == pytest.approx(metrics["prune/ppl_pruned"], rel=0.2)  # same model, more batches
    cfg = json.loads((out / "model" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 3  # nano: 4 layers, one dropped
    assert len(list((out / "model").glob("tokenizer*"))) >= 1


def test_depth_pruning_reports_each_kept_block_under_its_dense_name(teacher, tmp_path, corpus_dir, monkeypatch):
    """Block 1 of 4 dropped: the saved blocks 0, 1, 2 are the dense blocks 0, 2, 3, and so are labelled."""
    monkeypatch.setattr(pruning, "layer_importance", lambda model, batches, metric="cosine": torch.tensor([3.0, 0, 2, 1]))
    metrics, out = prune_run(teacher, ["prune.recovery=none", "prune.method=structured", "prune.structured.heads=0",
                                       "prune.structured.channels=0.5", "prune.structured.layers=0.25",
                                       "prune.generation_tokens=0"], tmp_path, corpus_dir)
    per_module = {k.removeprefix("prune/sparsity/"): v for k, v in metrics.items() if k.startswith("prune/sparsity/")}
    assert sorted({k.split(".")[1] for k in per_module}) == ["0", "2", "3"]
    for i in (0, 2, 3):  # the MLPs lose half their channels, attention keeps every query group
        assert per_module[f"layers.{i}.mlp.down_proj"] == 0.5 and per_module[f"layers.{i}.self_attn.qkv"] == 0.0
    # saved block 1 is dense block 2: its o_proj (whole: no head or hidden channel removed) is the dense one
    dense = load_file(teacher / "logs" / "latest" / "pretrain" / "model" / "model.safetensors")
    saved = load_file(out / "model" / "model.safetensors")
    assert torch.equal(saved["model.layers.1.self_attn.o_proj.weight"], dense["model.layers.2.self_attn.o_proj.weight"])
    attn = sum(dense[f"model.layers.0.self_attn.{p}_proj.weight"].numel() for p in "qkvo")
    mlp = sum(dense[f"model.layers.0.mlp.{p}_proj.weight"].numel() for p in ("gate", "up", "down"))
    assert metrics["prune/sparsity"] == pytest.approx(1 - 3 * (attn + mlp / 2) / (4 * (attn + mlp)))  # block 1 whole


def test_the_dense_file_size_is_counted_for_a_registry_name_and_for_shards(teacher, tmp_path, corpus_dir):
    dense_folder = teacher / "logs" / "latest" / "pretrain" / "model"
    overrides = ["prune.recovery=none", "prune.method=structured", "prune.generation_tokens=0"]
    metrics, _ = prune_run(teacher, [*overrides, "stage.module.init_from=slimpajama/pretrain"], tmp_path / "name",
                           corpus_dir)
    assert metrics["prune/file_bytes_dense"] == (dense_folder / "model.safetensors").stat().st_size
    assert metrics["prune/file_ratio"] == metrics["model/file_bytes"] / metrics["prune/file_bytes_dense"]
    assert "prune/ppl_final" in metrics and "prune/ppl_recovered" not in metrics  # no recovery ran
    sharded = tmp_path / "sharded"  # the same weights in two shards and an index, as transformers writes them
    shutil.copytree(dense_folder, sharded)
    write_shards(sharded)
    metrics, _ = prune_run(teacher, [*overrides, f"stage.module.init_from={sharded}"], tmp_path / "shards", corpus_dir)
    shards = sum(f.stat().st_size for f in sharded.glob("model-*.safetensors"))
    assert metrics["prune/file_bytes_dense"] == shards


def test_a_vocabulary_mismatch_is_a_clear_error(teacher, tmp_path, corpus_dir):
    other = tmp_path / "other-vocab"
    tiny_model().save_pretrained(other)  # 97 tokens; the data's tokenizer has 384
    with pytest.raises(ValueError, match="vocab_size 97 != the data's tokenizer"):
        prune_run(teacher, [f"stage.module.init_from={other}", "debug=fdr"], tmp_path, corpus_dir)


def test_a_model_shorter_than_the_data_is_an_error_naming_data_seq_len(teacher, tmp_path, corpus_dir):
    """A folder's own max_seq_len (16) against data.seq_len=32: prune and pretrain with init_from name
    the key and the folder, before any pruning or training."""
    import dataclasses

    from conftest import TINY

    dense = SlimPajamaModel.from_pretrained(teacher / "logs" / "latest" / "pretrain" / "model")
    short = tmp_path / "short"
    SlimPajamaModel(dataclasses.replace(dense.config, max_seq_len=16)).save_pretrained(short)
    match = f"data.seq_len=32 exceeds the max_position_embeddings=16 of {short / 'config.json'}"
    with pytest.raises(ValueError, match=match):
        prune_run(teacher, [f"stage.module.init_from={short}", "debug=fdr"], tmp_path / "prune", corpus_dir)
    cfg = compose_cfg(TINY + [f"data.paths=[{corpus_dir}]", f"stage.module.init_from={short}", "trainer.max_steps=2"],
                      tmp_path / "pretrain", teacher / "data", output_dir=tmp_path / "pretrain" / "run")
    with pytest.raises(ValueError, match=match):
        run(cfg)


# ----------------------------------------------------------------------------- sweeps


def fake_multirun(folder: Path) -> Path:
    for n, (method, s, ppl) in enumerate([("magnitude", 0.3, 20.0), ("magnitude", 0.5, 40.0), ("wanda", 0.3, 15.0),
                                          ("wanda", 0.5, 22.0)]):
        job = folder / str(n)
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(f"- stage=prune\n- prune.method={method}\n- prune.sparsity={s}\n")
        (job / "metrics.json").write_text(json.dumps({"val/ppl": ppl, "prune/sparsity": s, "prune/ppl_dense": 10.0}))
    (folder / "4" / ".hydra").mkdir(parents=True)  # a failed job: overrides but no metrics
    (folder / "4" / ".hydra" / "overrides.yaml").write_text("- prune.method=wanda\n- prune.sparsity=0.7\n")
    (folder / "5" / ".hydra").mkdir(parents=True)  # a job killed while writing metrics.json: skipped, named
    (folder / "5" / ".hydra" / "overrides.yaml").write_text("- prune.method=wanda\n- prune.sparsity=0.9\n")
    (folder / "5" / "metrics.json").write_text('{"val/ppl": 1')
    return folder


def test_collector_writes_a_table_and_a_plot(tmp_path, caplog):
    import sys

    from conftest import ROOT

    sys.path.insert(0, str(ROOT / "bench"))
    import collect_sweep

    folder = fake_multirun(tmp_path / "multirun")
    with caplog.at_level("WARNING", logger="slimpajama.sweep"):
        assert collect_sweep.main([str(folder)]) == 0
    assert f"{folder / '5'}: unreadable metrics.json" in caplog.text and f"{folder / '4'}: no metrics.json" in caplog.text
    md = (folder / "sweep.md").read_text().splitlines()
    assert md[0].startswith("| prune.method | prune.sparsity | val/ppl") and len(md) == 2 + 4
    assert "| wanda | 0.5 | 22 |" in md[-1]
    png = (folder / "sweep.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert len((folder / "sweep.csv").read_text().splitlines()) == 5
    with pytest.raises(SystemExit, match="collect_sweep: error: .*multirun"):  # one line, not a traceback
        collect_sweep.main([str(tmp_path)])
    with pytest.raises(SystemExit, match="prune.method='magnitude'.*needs numbers.*sweep.md were written; no plot"):
        collect_sweep.main([str(folder), "--x", "prune.method"])
    assert not (folder / "sweep.png").exists() and (folder / "sweep.md").is_file()  # no plot of another table
    # a method-only sweep: the sparsity each job ran with comes from its config (it was not an override)
    only = tmp_path / "methods"
    for n, method in enumerate(["magnitude", "wanda"]):
        (only / str(n) / ".hydra").mkdir(parents=True)
        (only / str(n) / ".hydra" / "overrides.yaml").write_text(f"- prune.method={method}\n")
        (only / str(n) / ".hydra" / "config.yaml").write_text("prune:\n  sparsity: 0.5\n  method: x\n")
        (only / str(n) / "metrics.json").write_text(json.dumps({"val/ppl": 12.0 + n, "train/loss": 2.5 - n}))
    assert collect_sweep.main([str(only), "--y", "train/loss"]) == 0
    md = (only / "sweep.md").read_text()
    assert "train/loss" in md.splitlines()[0] and "| wanda | 13 | 1.5 |" in md  # y is a column of the table
    from slimpajama.sweep import collect

    assert [r["prune.sparsity"] for r in collect(only, keys=["prune.sparsity"])] == [0.5, 0.5]


@pytest.mark.slow
def test_collector_names_the_job_folders_a_sweep_is_missing(tmp_path, caplog):
    """A job folder removed (or never started): named, from the gaps and from the sweep multirun.yaml
    records (Hydra's basic sweeper: the product of the swept values; Optuna's: n_trials)."""
    import yaml

    from slimpajama.sweep import collect

    folder = fake_multirun(tmp_path / "multirun")  # jobs 0-5
    shutil.rmtree(folder / "2")
    basic = {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper", "params": {"seed": "1,2"}}
    task = ["stage=prune", "prune.method=magnitude,wanda", "prune.sparsity=0.3,0.5"]
    for sweeper, missing in ((basic, "2, 6, 7 (never started, or removed): 5 of 8"),
                             ({"n_trials": 7}, "2, 6 (never started, or removed): 5 of 7"),
                             (None, "2 (never started, or removed): 5 of more")):
        if sweeper is None:
            (folder / "multirun.yaml").unlink()
        else:
            (folder / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {"sweeper": sweeper, "overrides": {"task": task}}}))
        caplog.clear()
        with caplog.at_level("WARNING", logger="slimpajama.sweep"):
            assert len(collect(folder)) == 3  # 0, 1, 3: 4 and 5 have no readable metrics
        assert f"{folder}: no job folder {missing} job folders are there" in caplog.text


def test_command_line_prune_sweep_and_collector(teacher, corpus_dir, tmp_path):
    """`python train.py -m stage=prune prune.method=magnitude,wanda prune.sparsity=0.3,0.5` as users type it,
    then `bench/collect_sweep.py latest`."""
    import subprocess
    import sys

    from conftest import ROOT, TINY

    log_dir = tmp_path / "logs"
    (log_dir / "latest").mkdir(parents=True)
    (log_dir / "latest" / "pretrain").symlink_to(teacher / "logs" / "latest" / "pretrain")
    common = [o for o in TINY if not o.startswith(("trainer.max_steps", "model="))] + [
        f"data.paths=[{corpus_dir}]", f"paths.log_dir={log_dir}", f"paths.data_dir={teacher / 'data'}",
        "trainer.max_steps=2", "prune.calibration_batches=2", "prune.eval_batches=2", "prune.generation_tokens=4"]
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "WANDB_MODE": "disabled"}
    subprocess.run([sys.executable, str(ROOT / "train.py"), "-m", "stage=prune", "prune.method=magnitude,wanda",
                    "prune.sparsity=0.3,0.5", *common], check=True, env=env, capture_output=True, timeout=900)
    subprocess.run([sys.executable, str(ROOT / "bench" / "collect_sweep.py"), "latest", "--log-dir", str(log_dir)],
                   check=True, env=env, capture_output=True, timeout=300)
    (folder,) = (log_dir / "multiruns" / "prune").iterdir()
    from slimpajama.sweep import collect, expected_jobs

    assert expected_jobs(folder) == 4  # from Hydra's own multirun.yaml
    rows = collect(folder)
    assert sorted((r["prune.method"], r["prune.sparsity"]) for r in rows) == [
        ("magnitude", 0.3), ("magnitude", 0.5), ("wanda", 0.3), ("wanda", 0.5)]
    for r in rows:
        assert r["prune/target_sparsity"] == r["prune.sparsity"]
        # magnitude: exact per layer; Wanda: exact per row (30% of a 128-input row is 38 weights: 29.7%)
        tolerance = 1e-3 if r["prune.method"] == "magnitude" else 1 / 128
        assert r["prune/sparsity"] == pytest.approx(r["prune.sparsity"], abs=tolerance)
    assert (folder / "sweep.png").stat().st_size > 5000 and len((folder / "sweep.md").read_text().splitlines()) == 6


def test_structured_head_count_stays_loadable_in_transformers():
    """d_model 32 with 6 query groups of 1 head: keeping 3 of them (32 % 3 != 0) would give a config
    transformers refuses; the nearest loadable count (4, a tie with 2: more kept) is used instead."""
    from slimpajama.pruning import _loadable_groups

    assert _loadable_groups(3, 1, 32, 6) == 4
    assert _loadable_groups(2, 2, 256, 4) == 2  # micro: 4 groups of 2 heads, keeping 2 is fine
    assert _loadable_groups(3, 2, 256, 4) == 4  # 6 heads do not divide 256; 2 and 4 groups tie: keep more
