import math

import pytest
import torch
import torch.nn.functional as F

from conftest import op_calls, write_shards
from slimpajama import SlimPajamaConfig, SlimPajamaModel
from slimpajama.lora import apply_lora, merge_lora
from slimpajama.model import Block, Linear, RMSNorm, apply_rope


def tiny(**kw) -> SlimPajamaConfig:
    return SlimPajamaConfig(**{"vocab_size": 97, "n_layer": 2, "n_head": 4, "n_kv_head": 2, "d_model": 32,
                               "intermediate_size": 64, "max_seq_len": 48, **kw})


def manual_attention(attn, x, cos, sin):
    """Textbook causal attention with explicit softmax, for comparison with SDPA."""
    B, T, _ = x.shape
    q, k, v = attn.qkv(x).split([attn.n_head * attn.head_dim, attn.n_kv_head * attn.head_dim,
                                 attn.n_kv_head * attn.head_dim], dim=-1)
    q = apply_rope(q.view(B, T, attn.n_head, attn.head_dim).transpose(1, 2), cos, sin)
    k = apply_rope(k.view(B, T, attn.n_kv_head, attn.head_dim).transpose(1, 2), cos, sin)
    v = v.view(B, T, attn.n_kv_head, attn.head_dim).transpose(1, 2)
    rep = attn.n_head // attn.n_kv_head
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = q @ k.transpose(-2, -1) / math.sqrt(attn.head_dim)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    y = scores.softmax(-1) @ v
    return attn.o_proj(y.transpose(1, 2).reshape(B, T, -1))


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_sdpa_equals_manual_attention(n_kv_head):
    torch.manual_seed(0)
    model = SlimPajamaModel(tiny(n_kv_head=n_kv_head)).eval()
    attn = model.layers[0].self_attn
    x = torch.randn(2, 11, 32)
    cos, sin = model.cos[:11], model.sin[:11]
    torch.testing.assert_close(attn(x, cos, sin), manual_attention(attn, x, cos, sin), atol=1e-5, rtol=1e-5)


def test_later_token_never_changes_earlier_logits():
    torch.manual_seed(0)
    model = SlimPajamaModel(tiny()).eval()
    x = torch.randint(0, 97, (2, 20))
    y = x.clone()
    y[:, 12:] = torch.randint(0, 97, (2, 8))
    torch.testing.assert_close(model(x)[:, :12], model(y)[:, :12])
    assert not torch.allclose(model(x)[:, 12:], model(y)[:, 12:])


@pytest.mark.parametrize("tie", [False, True])
def test_kv_cache_decoding_equals_full_forward(tie):
    torch.manual_seed(0)
    model = SlimPajamaModel(tiny(tie_embeddings=tie)).eval()
    x = torch.randint(0, 97, (3, 30))
    full = model(x)
    model.setup_kv_cache(batch_size=3, max_seq_len=48)
    steps = [model(x[:, :17], input_pos=torch.arange(17))]  # prefill
    for t in range(17, 30):  # one position per step
        steps.append(model(x[:, t : t + 1], input_pos=torch.tensor([t])))
    model.clear_kv_cache()
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def decode_steps(model, x, mask=None, prefill=9, kernel="blocks") -> torch.Tensor:
    """Logits (B, T - prefill, V): a prefill of x[:, :prefill] (B, T), then decode_step at each later
    position, its products on `kernel`; mask: left padding, with the rotary positions generate would give."""
    pos_ids = None if mask is None else (mask.cumsum(1) - 1).clamp(min=0)
    at = (lambda a, b: None) if mask is None else (lambda a, b: pos_ids[:, a:b])
    model.setup_kv_cache(batch_size=x.size(0), max_seq_len=x.size(1), kernel=kernel)
    try:
        with torch.inference_mode():
            model(x[:, :prefill], input_pos=0, attention_mask=mask, position_ids=at(0, prefill))
            steps = [model.decode_step(x[:, t : t + 1], t, attention_mask=mask, position_ids=at(t, t + 1))
                     for t in range(prefill, x.size(1))]
        return torch.stack(steps, 1)
    finally:
        model.clear_kv_cache()


# grouped-query; multi-head with tied embeddings; a structured-pruned shape (head_dim * n_head != d_model)
@pytest.mark.parametrize("cfg", [{}, {"n_kv_head": 4, "tie_embeddings": True},
                                 {"n_head": 3, "n_kv_head": 1, "head_dim": 12}])
def test_decode_step_takes_its_own_path_with_the_logits_of_forward(monkeypatch, cfg):
    torch.manual_seed(0)
    model = SlimPajamaModel(tiny(**cfg)).eval()
    x = torch.randint(4, 97, (3, 20))
    mask = torch.ones_like(x)
    mask[1, :4] = mask[2, :7] = 0  # left padding of 4 and 7 tokens
    full = model(x)[:, 9:]
    padded = model(x, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0))[:, 9:]
    block_forwards = []
    forward = Block.forward
    monkeypatch.setattr(Block, "forward", lambda self, *a: block_forwards.append(1) or forward(self, *a))
    torch.testing.assert_close(decode_steps(model, x), full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(decode_steps(model, x, mask), padded, atol=1e-5, rtol=1e-5)
    assert len(block_forwards) == 2 * 2  # the two prefills' blocks: no step went through forward
    assert not model._decodes  # clear_kv_cache ends the path
    model.setup_kv_cache(batch_size=3, max_seq_len=20)
    assert model._decodes
    model.clear_kv_cache()


def test_the_gemm_kernel_runs_decoding_products_on_f_linear_and_keeps_no_blocks(monkeypatch):
    torch.manual_seed(0)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # blocks of 2, whatever the machine has
    model = SlimPajamaModel(tiny()).eval()
    x = torch.randint(4, 97, (3, 20))
    mask = torch.ones_like(x)
    mask[2, :5] = 0
    full = model(x)[:, 9:]
    blocks = decode_steps(model, x)
    for m in (None, mask):
        torch.testing.assert_close(decode_steps(model, x, m, kernel="gemm"), decode_steps(model, x, m),
                                   atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(blocks, full, atol=1e-5, rtol=1e-5)
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    with torch.inference_mode():
        model.setup_kv_cache(batch_size=1, max_seq_len=20, kernel="gemm")
        assert model._decodes and all(m.kernel == "gemm" and m.decode_blocks is None for m in linears)
        model(x[:1, :9], input_pos=0)
        step = lambda pos: lambda: model.decode_step(x[:1, pos : pos + 1], pos)  # noqa: E731
        gemm = op_calls(step(9))
        assert "aten::bmm" not in gemm and gemm["aten::linear"] == len(linears)
        gate_up, row = model.layers[0].mlp.gate_up, torch.randn(1, 1, 32)
        assert "aten::bmm" not in op_calls(lambda: gate_up(row))  # forward too: a decoding row takes F.linear
        model.use_decode_kernel("blocks")  # views (nothing was kept) of each weight whose rows divide in 2
        halves = sum(m.out_features % 2 == 0 for m in linears)
        assert op_calls(step(10))["aten::bmm"] == halves == len(linears) - 1  # all but the head
        assert op_calls(lambda: gate_up(row))["aten::bmm"] == 1
        with pytest.raises(ValueError, match="decoding kernel must be one of .*'gemv'"):
            model.use_decode_kernel("gemv")
    model.clear_kv_cache()
    assert all(m.kernel == "blocks" for m in linears)
    with pytest.raises(ValueError, match="decoding kernel must be one of"):
        model.setup_kv_cache(batch_size=1, max_seq_len=20, kernel="mkl")


def test_decode_step_falls_back_to_forward_for_what_its_path_does_not_cover(monkeypatch):
    torch.manual_seed(0)
    model = SlimPajamaModel(tiny()).eval()
    x = torch.randint(4, 97, (2, 14))
    full = model(x)[:, 9:]
    block_forwards = []
    forward = Block.forward
    monkeypatch.setattr(Block, "forward", lambda self, *a: block_forwards.append(1) or forward(self, *a))
    hook = model.layers[1].mlp.register_forward_hook(lambda *a: None)  # decode_step would skip the hook
    torch.testing.assert_close(decode_steps(model, x), full, atol=1e-5, rtol=1e-5)
    assert len(block_forwards) == 2 * 6  # the prefill and 5 steps, each through forward
    hook.remove()
    apply_lora(model, rank=2, targets=("qkv",))  # a module without `decode`
    block_forwards.clear()
    torch.testing.assert_close(decode_steps(model, x), full, atol=1e-5, rtol=1e-5)  # B starts at zero
    assert len(block_forwards) == 2 * 6
    merge_lora(model)
    block_forwards.clear()
    decode_steps(model, x)
    assert len(block_forwards) == 2  # the prefill only
    model.setup_kv_cache(batch_size=2, max_seq_len=14)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(x[:, :9], input_pos=0)
        block_forwards.clear()
        model.decode_step(x[:, 9:10], 9)
    assert len(block_forwards) == 2  # autocast: forward
    model.clear_kv_cache()


def test_linear_cuts_only_decoding_products_into_row_blocks_with_the_same_results(monkeypatch):
    torch.manual_seed(0)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)  # the block count follows the threads
    narrow, wide, odd = Linear(40, 24, bias=True), Linear(24, 40, bias=False), Linear(24, 42, bias=False)
    narrow_bf16 = Linear(40, 24, bias=True).bfloat16()
    few, many = torch.randn(2, 3, 40), torch.randn(4, 9, 40)  # 6 rows and 36 rows (max_rows is 32)
    few_wide = torch.randn(2, 3, 24)
    bmm = "aten::bmm"
    with torch.inference_mode():
        calls = op_calls(lambda: narrow(few))
        assert calls.get(bmm) == 1 and "aten::mm" not in calls and "aten::addmm" not in calls
        expected = F.linear(few, narrow.weight, narrow.bias)
        torch.testing.assert_close(narrow(few), expected, atol=1e-6, rtol=1e-6)
        x = torch.randn(1, 1, 24)
        assert narrow.decodes(few) and wide.decodes(x) and not narrow.decodes(many)
        torch.testing.assert_close(wide(x), F.linear(x, wide.weight), atol=1e-6, rtol=1e-6)
        assert odd.decodes(x) and bmm not in op_calls(lambda: odd(x))  # 42 rows: no 4 equal blocks
        assert bmm not in op_calls(lambda: narrow(many))  # a prefill: gemm
        assert bmm not in op_calls(lambda: narrow_bf16(few.bfloat16()))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert bmm not in op_calls(lambda: narrow(few))
            assert narrow(few).dtype == torch.bfloat16  # autocast still applies
        monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
        assert bmm not in op_calls(lambda: narrow(few))  # one thread: nothing to spread the blocks over
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    y = wide(few_wide)  # training: autograd through F.linear
    assert bmm not in op_calls(lambda: wide(few_wide)) and y.requires_grad
    y.sum().backward()
    torch.testing.assert_close(wide.weight.grad, few_wide.reshape(-1, 24).sum(0).expand(40, 24))


def test_setup_kv_cache_gives_decoding_products_a_contiguous_copy_of_a_wide_weights_row_blocks(monkeypatch):
    torch.manual_seed(0)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    model = SlimPajamaModel(tiny(vocab_size=96)).eval()  # blocks of 2: gate_up 64 x 32, head 48 x 32 (wide)
    layer = model.layers[0]
    gate_up, qkv = layer.mlp.gate_up, layer.self_attn.qkv  # qkv: 32 outputs per block for 32 inputs
    model.setup_kv_cache(batch_size=1, max_seq_len=16)
    assert (gate_up.decode_blocks.shape, model.lm_head.decode_blocks.shape) == ((2, 32, 64), (2, 32, 48))
    for linear in (gate_up, model.lm_head):  # a contiguous copy of its own
        blocks, storage = linear.decode_blocks, linear.weight.untyped_storage()
        assert blocks.is_contiguous() and blocks.untyped_storage().data_ptr() != storage.data_ptr()
    view = qkv.decode_blocks
    assert view.data_ptr() == qkv.weight.data_ptr() and not view.is_contiguous()
    one, three = torch.randn(1, 1, 32), torch.randn(1, 3, 32)
    with torch.inference_mode():
        for linear in (gate_up, qkv, model.lm_head):
            for x in (one, three):
                torch.testing.assert_close(linear(x), F.linear(x, linear.weight), atol=1e-6, rtol=1e-6)
        gate_up.decode_blocks.zero_()  # every decoding product reads the copy, a prefill the weight
        assert gate_up(one).abs().max() == gate_up(three).abs().max() == 0
        assert gate_up(torch.randn(1, 33, 32)).abs().max() > 0
    model.clear_kv_cache()
    assert all(m.decode_blocks is None for m in model.modules() if isinstance(m, Linear))
    monkeypatch.setattr(Linear, "copy_wide", False)  # views only
    model.setup_kv_cache(batch_size=1, max_seq_len=16)
    view = gate_up.decode_blocks
    assert view.data_ptr() == gate_up.weight.data_ptr() and not view.is_contiguous()
    model.clear_kv_cache()
    model.bfloat16().setup_kv_cache(batch_size=1, max_seq_len=16)  # bf16 weights take F.linear: nothing kept
    assert all(m.decode_blocks is None for m in model.modules() if isinstance(m, Linear))


def llama_rms_norm(x, weight, eps):
    """Hugging Face Llama's RMSNorm, written out."""
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def test_setup_kv_cache_gives_each_norm_a_two_op_pair_form_with_llamas_values():
    torch.manual_seed(0)
    model = SlimPajamaModel(tiny()).eval()
    norm = model.layers[0].post_attention_layernorm
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    model.setup_kv_cache(batch_size=1, max_seq_len=16)
    assert torch.equal(norm.pair_weight, torch.stack([norm.weight, norm.weight]))
    # decoding rows, large and at the embeddings' scale (where eps matters); 40 rows are a prefill
    rows = [torch.randn(1, 1, 32) * 3, torch.randn(3, 1, 32) * 0.003, torch.randn(1, 40, 32)]
    with torch.inference_mode():
        for x in rows:
            expected = llama_rms_norm(x, norm.weight, norm.eps)
            torch.testing.assert_close(norm(x), expected, atol=1e-6, rtol=1e-5)
        calls = op_calls(lambda: norm(rows[0]))
        assert calls.get("aten::layer_norm") == 1 and "aten::rms_norm" not in calls
        assert calls.get("aten::mul") == 1 and "aten::pow" not in calls
        assert "aten::layer_norm" not in op_calls(lambda: norm(rows[2]))  # a prefill keeps F.rms_norm
    x = rows[0].requires_grad_()
    assert "aten::layer_norm" not in op_calls(lambda: norm(x))  # training keeps F.rms_norm
    model.clear_kv_cache()
    assert all(n.pair_weight is None for n in model.modules() if isinstance(n, RMSNorm))
    with torch.inference_mode():
        assert "aten::layer_norm" not in op_calls(lambda: norm(rows[0]))
    model.bfloat16().setup_kv_cache(batch_size=1, max_seq_len=16)  # bf16: normalised in float32 as before
    assert all(n.pair_weight is None for n in model.modules() if isinstance(n, RMSNorm))


def test_greedy_generate_matches_argmax_of_full_forward():
    torch.manual_seed(0)
    model = SlimPajamaModel(tiny()).eval()
    prompt = torch.randint(4, 97, (1, 5))  # no pad id (3): a pad in a prompt is padding
    out = model.generate(prompt, max_new_tokens=10, do_sample=False, eos_token_id=-1)
    assert out.shape == (1, 15) and torch.equal(out[:, :5], prompt)
    for t in range(5, 15):  # each new token is the argmax given everything before it
        assert out[0, t] == model(out[:, :t])[0, -1].argmax()


def test_attention_mask_hides_left_padding():
    torch.manual_seed(0)
    model = SlimPajamaModel(tiny()).eval()
    x = torch.randint(4, 97, (1, 9))
    padded = torch.cat([torch.full((1, 3), 3), x], 1)
    mask = torch.cat([torch.zeros(1, 3), torch.ones(1, 9)], 1).long()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    torch.testing.assert_close(model(padded, attention_mask=mask, position_ids=pos)[:, 3:], model(x), atol=1e-5, rtol=1e-5)


def test_save_load_roundtrip_identical_logits(tmp_path):
    torch.manual_seed(0)
    model = SlimPajamaModel(tiny()).eval()
    model.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {"config.json", "model.safetensors", "generation_config.json"}
    loaded = SlimPajamaModel.from_pretrained(tmp_path)
    x = torch.randint(0, 97, (2, 16))
    assert torch.equal(model(x), loaded(x))
    assert loaded.config == model.config


def test_sharded_folder_loads_and_saving_over_it_removes_the_old_shards(tmp_path):
    """A folder in transformers' sharded layout (an index naming two shards) loads to the same logits;
    saving another model over it leaves one model.safetensors and none of the old index or shards,
    which vLLM would read (it globs *.safetensors, filtered by the index), and keeps the other files."""
    torch.manual_seed(0)
    model = SlimPajamaModel(tiny()).eval()
    model.save_pretrained(tmp_path)
    write_shards(tmp_path)
    assert (tmp_path / "model-00002-of-00002.safetensors").is_file()
    (tmp_path / "notes.safetensors").write_bytes(b"not a shard of the index")
    x = torch.randint(0, 97, (2, 16))
    assert torch.equal(SlimPajamaModel.from_pretrained(tmp_path)(x), model(x))

    torch.manual_seed(1)
    other = SlimPajamaModel(tiny()).eval()
    other.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "notes.safetensors"]
    assert torch.equal(SlimPajamaModel.from_pretrained(tmp_path)(x), other(x))


def test_saved_folder_uses_llama_layout(tmp_path):
    import json

    from safetensors.torch import load_file

    model = SlimPajamaModel(tiny())
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (32, 2, 4, 2)
    keys = set(load_file(tmp_path / "model.safetensors"))
    for name in ["q_proj", "k_proj", "v_proj", "o_proj"]:
        assert f"model.layers.1.self_attn.{name}.weight" in keys
    for name in ["gate_proj", "up_proj", "down_proj"]:
        assert f"model.layers.0.mlp.{name}.weight" in keys
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= keys


def test_transformers_llama_gives_identical_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = SlimPajamaModel(tiny(tie_embeddings=True)).eval()
    model.save_pretrained(tmp_path)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    x = torch.randint(0, 97, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x), atol=1e-5, rtol=1e-5)


def test_too_long_input_is_refused():
    model = SlimPajamaModel(tiny())
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 49, dtype=torch.long))
    # with explicit positions too (they used to reach the rotary tables: an IndexError)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 49, dtype=torch.long), position_ids=torch.arange(49)[None])
    with pytest.raises(ValueError, match="position 48 is past model.max_seq_len=48"):
        model(torch.zeros(1, 2, dtype=torch.long), position_ids=torch.tensor([[0, 48]]))


@pytest.mark.parametrize("settings, message", [
    ({"n_head": 4, "n_kv_head": 3, "d_model": 32}, "model.n_kv_head"),
    ({"n_head": 0}, "model.n_head=0 must be a positive integer"),  # was a ZeroDivisionError
    ({"n_kv_head": 0}, "model.n_kv_head=0 must be a positive integer"),
    ({"d_model": "32"}, "model.d_model='32' must be a positive integer"),
    ({"rope_theta": 0.0}, "model.rope_theta=0.0 must be a positive number"),  # was NaN rotary tables
    ({"norm_eps": -1e-5}, "model.norm_eps=-1e-05 must be a positive number"),
    ({"dropout": 2.0}, r"model.dropout=2.0 must lie in \[0, 1\)"),
    ({"d_model": 36, "n_head": 4}, r"model.head_dim, else model.d_model / model.n_head"),
])
def test_bad_config_names_the_key(settings, message):
    with pytest.raises(ValueError, match=message):
        SlimPajamaConfig(**settings)


def test_param_count_and_flops():
    c = tiny()
    model = SlimPajamaModel(c)
    per_layer = 32 * (4 + 2 * 2) * 8 + 32 * 32 + 3 * 32 * 64 + 2 * 32
    expected = 2 * 97 * 32 + 2 * per_layer + 32
    assert model.num_params() == expected
    assert model.num_params(non_embedding=True) == expected - 2 * 97 * 32
    assert model.flops_per_token(16) == 6 * (expected - 97 * 32) + 12 * 2 * 4 * 8 * 16


def test_loss_at_init_is_near_log_vocab():
    torch.manual_seed(0)
    model = SlimPajamaModel(tiny())
    x = torch.randint(0, 97, (4, 32))
    loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
    assert abs(loss.item() - math.log(97)) < 0.1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_linear_cross_entropy_equals_plain_loss_and_gradients(dtype):
    from slimpajama.losses import IGNORE_INDEX, linear_cross_entropy, lm_loss

    torch.manual_seed(0)
    h = torch.randn(3, 50, 16, dtype=dtype, requires_grad=True)
    w = torch.randn(300, 16, dtype=dtype, requires_grad=True)
    y = torch.randint(0, 300, (3, 50))
    y[0, :7] = IGNORE_INDEX  # masked targets count neither in the loss nor in the mean
    ref = lm_loss(h @ w.t(), y)
    ref.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    out = linear_cross_entropy(h, w, y, chunk_elements=300 * 7)  # several chunks (min 128 rows) ...
    out2 = linear_cross_entropy(h.detach().requires_grad_(), w, y, chunk_elements=1)  # ... and one row block
    (2 * out).backward()
    tol = dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.to(ref.dtype), ref, **tol)
    torch.testing.assert_close(out2.to(ref.dtype), ref, **tol)
    torch.testing.assert_close(h.grad, 2 * gh, **tol)
    torch.testing.assert_close(w.grad, 2 * gw, **tol)


def test_linear_cross_entropy_without_grad_takes_the_plain_path_and_no_target_counts_zero(monkeypatch):
    """Validation runs under no_grad with parameters that require grad: the fused path (which computes the
    gradients in its forward) used to run there, at twice the cost. All targets ignored: 0 on every path."""
    from slimpajama import losses

    h, w = torch.randn(2, 9, 16, requires_grad=True), torch.randn(40, 16, requires_grad=True)
    y = torch.randint(0, 40, (2, 9))
    fused = []
    monkeypatch.setattr(losses._LinearCrossEntropy, "apply", lambda *a: fused.append(1) or torch.tensor(0.0))
    with torch.no_grad():
        torch.testing.assert_close(losses.linear_cross_entropy(h, w, y), losses.lm_loss(h @ w.t(), y))
    assert fused == []
    monkeypatch.undo()
    ignored = torch.full_like(y, losses.IGNORE_INDEX)
    assert losses.lm_loss(h @ w.t(), ignored).item() == 0.0  # F.cross_entropy's mean would be NaN
    assert losses.linear_cross_entropy(h, w, ignored).item() == 0.0
    with torch.no_grad():
        assert losses.linear_cross_entropy(h, w, ignored).item() == 0.0
