"""generate(): the Hugging Face-style signature, sampling rules, left-padded batches, the KV cache,
streaming, stop strings, logits processors, from_pretrained's checks, and parity with transformers."""

import inspect
import json
import threading

import pytest
import torch

from slimpajama import SlimPajamaConfig, SlimPajamaModel
from slimpajama.generation import (
    StopStrings, TextIteratorStreamer, TextStreamer, draw, fastest_decode_kernel, generate, no_repeat_ngram_,
    repetition_penalty_, sample_next, warp,
)

from conftest import CONTROL, VOCAB, op_calls


def tiny(**kw) -> SlimPajamaConfig:
    return SlimPajamaConfig(**{"vocab_size": VOCAB, "n_layer": 2, "n_head": 4, "n_kv_head": 2, "d_model": 32,
                               "intermediate_size": 64, "max_seq_len": 96, **kw})


@pytest.fixture(scope="module")
def model() -> SlimPajamaModel:
    torch.manual_seed(0)
    return SlimPajamaModel(tiny()).eval()


def greedy(model, ids, n=12, **kw):
    return model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=-1, **kw)


def test_signature_has_every_documented_option():
    names = set(inspect.signature(generate).parameters)
    assert {"input_ids", "attention_mask", "max_length", "max_new_tokens", "do_sample", "temperature", "top_k",
            "top_p", "min_p", "repetition_penalty", "no_repeat_ngram_size", "eos_token_id", "stop_strings",
            "num_return_sequences", "seed", "generator", "streamer"} <= names


def test_returns_prompt_plus_new_ids_and_max_length_counts_the_prompt(model, caplog):
    ids = torch.randint(4, VOCAB, (1, 7))
    out = greedy(model, ids, n=5)
    assert out.shape == (1, 12) and torch.equal(out[:, :7], ids)
    assert model.generate(ids, max_length=10, do_sample=False, eos_token_id=-1).shape == (1, 10)
    assert model.generate(ids, max_length=10, max_new_tokens=3, eos_token_id=-1).shape == (1, 10)  # max_new_tokens wins
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["generate"]  # and says so, as transformers does
    caplog.clear()
    assert greedy(model, ids, n=500).shape == (1, 96)  # capped at max_seq_len, and said so
    assert "500 new tokens asked for after a 7-token prompt, but the model's max_seq_len is 96: at most 89" in caplog.text
    caplog.clear()
    assert model.generate(ids, do_sample=False, eos_token_id=-1).shape == (1, 96)  # no length: to max_seq_len
    assert not caplog.records


def test_a_sampling_knob_samples_and_do_sample_false_is_greedy(model):
    ids = torch.randint(4, VOCAB, (1, 5))
    runs = {tuple(model.generate(ids, max_new_tokens=20, temperature=0.9, seed=s, eos_token_id=-1)[0].tolist()) for s in range(4)}
    assert len(runs) > 1  # temperature alone means sampling
    same = [model.generate(ids, max_new_tokens=20, temperature=0.9, seed=3, eos_token_id=-1) for _ in range(2)]
    assert torch.equal(*same)  # a seed reproduces
    g = torch.Generator().manual_seed(3)
    assert torch.equal(model.generate(ids, max_new_tokens=20, temperature=0.9, generator=g, eos_token_id=-1), same[0])
    assert torch.equal(model.generate(ids, max_new_tokens=20, temperature=0.9, do_sample=False, eos_token_id=-1),
                       greedy(model, ids, 20))
    assert torch.equal(model.generate(ids, max_new_tokens=20, top_k=1, seed=0, eos_token_id=-1), greedy(model, ids, 20))
    assert torch.equal(model.generate(ids, max_new_tokens=20, temperature=0, eos_token_id=-1), greedy(model, ids, 20))


def test_defaults_come_from_generation_config_json(tmp_path):
    torch.manual_seed(0)
    SlimPajamaModel(tiny()).save_pretrained(tmp_path, generation_config={"max_new_tokens": 6, "eos_token_id": -1})
    loaded = SlimPajamaModel.from_pretrained(tmp_path)
    assert json.loads((tmp_path / "generation_config.json").read_text())["max_new_tokens"] == 6
    ids = torch.randint(4, VOCAB, (1, 5))
    assert loaded.generate(ids).shape == (1, 11)
    assert loaded.generate(ids, max_new_tokens=2).shape == (1, 7)  # an argument beats the file


def test_a_length_in_the_call_replaces_the_files_length_without_a_warning(tmp_path, caplog):
    """A folder whose generation_config.json sets max_length (as transformers' files often do) and a
    call with max_new_tokens: the call's length, and no both-lengths warning on every call."""
    torch.manual_seed(0)
    SlimPajamaModel(tiny()).save_pretrained(tmp_path, generation_config={"max_length": 9, "eos_token_id": -1})
    loaded = SlimPajamaModel.from_pretrained(tmp_path)
    ids = torch.randint(4, VOCAB, (1, 5))
    with caplog.at_level("WARNING", logger="slimpajama.generation"):
        assert loaded.generate(ids).shape == (1, 9)  # the file's max_length counts the prompt
        assert loaded.generate(ids, max_new_tokens=12).shape == (1, 17)
        assert loaded.generate(ids, max_length=7).shape == (1, 7)
    assert "both max_new_tokens" not in caplog.text


def test_the_files_sampling_settings_sample_only_where_it_sets_do_sample(tmp_path):
    torch.manual_seed(0)
    model = SlimPajamaModel(tiny())
    ids = torch.randint(4, VOCAB, (1, 5))
    expected = greedy(model.eval(), ids, n=20)
    model.save_pretrained(tmp_path / "a", generation_config={"temperature": 5.0, "top_k": 50, "eos_token_id": -1})
    plain = SlimPajamaModel.from_pretrained(tmp_path / "a")
    assert torch.equal(plain.generate(ids, max_new_tokens=20, seed=1), expected)  # greedy, as transformers
    assert not torch.equal(plain.generate(ids, max_new_tokens=20, temperature=5.0, seed=1), expected)  # asked for
    model.save_pretrained(tmp_path / "b", generation_config={"temperature": 5.0, "do_sample": True, "eos_token_id": -1})
    sampling = SlimPajamaModel.from_pretrained(tmp_path / "b")
    assert not torch.equal(sampling.generate(ids, max_new_tokens=20, seed=1), expected)


PROCESSORS = [{}, {"repetition_penalty": 0.5}, {"repetition_penalty": 1.5, "no_repeat_ngram_size": 2},
              {"no_repeat_ngram_size": 1}]


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
@pytest.mark.parametrize("processors", PROCESSORS, ids=str)
def test_left_padded_batch_gives_each_prompts_own_greedy_output(n_kv_head, processors):
    """Also with the logits processors that read the ids so far: the padding is not among them (a
    penalty below 1 rewarded the pad token, which a padded row then generated)."""
    torch.manual_seed(0)
    model = SlimPajamaModel(tiny(n_kv_head=n_kv_head)).eval()
    with torch.no_grad():  # the pad token's logit high, so that rewarding it would show
        model.lm_head.weight[model.config.pad_token_id] = model.lm_head.weight[4:].mean(0) + 0.05
    prompts = [torch.randint(4, VOCAB, (n,)) for n in (9, 3, 6)]
    alone = [greedy(model, p[None], n=15, **processors)[0] for p in prompts]
    width = max(len(p) for p in prompts)
    ids = torch.full((3, width), model.config.pad_token_id)
    mask = torch.zeros(3, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
    batched = greedy(model, ids, n=15, attention_mask=mask, **processors)
    for i, p in enumerate(prompts):
        assert torch.equal(batched[i, width - len(p):], alone[i]), i
    assert torch.equal(greedy(model, ids, n=15, **processors), batched)  # the mask is inferred from leading pads


def test_right_padding_is_refused(model):
    ids = torch.randint(4, VOCAB, (2, 6))
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    with pytest.raises(ValueError, match="pad on the left"):
        model.generate(ids, attention_mask=mask, max_new_tokens=3)
    ids[1, -2:] = model.config.pad_token_id  # and without a mask: the trailing pads are padding too
    with pytest.raises(ValueError, match="pad on the left"):
        model.generate(ids, max_new_tokens=3)


def test_without_a_mask_every_pad_is_padding_as_in_transformers(model):
    """A pad inside a prompt is masked, as transformers infers the mask (`input_ids != pad`)."""
    ids = torch.randint(4, VOCAB, (1, 8), generator=torch.Generator().manual_seed(0))
    ids[0, 3] = model.config.pad_token_id
    mask = torch.ones_like(ids)
    mask[0, 3] = 0
    assert torch.equal(greedy(model, ids, n=6), greedy(model, ids, n=6, attention_mask=mask))
    assert not torch.equal(greedy(model, ids, n=6), greedy(model, ids, n=6, attention_mask=torch.ones_like(ids)))


def test_kv_cache_decodes_one_position_per_step_and_matches_no_cache(model):
    seen = []
    hook = model.embed_tokens.register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
    ids = torch.randint(4, VOCAB, (2, 10))
    try:
        out = greedy(model, ids, n=8)
    finally:
        hook.remove()
    assert seen == [(2, 10)] + [(2, 1)] * 7  # a prefill, then one position per new token
    assert torch.equal(out, greedy(model, ids, n=8, use_cache=False))
    assert all(block.self_attn.kv_cache is None for block in model.layers)  # the cache is released


@pytest.mark.slow
def test_compiled_decoding_gives_eager_outputs_from_one_graph_for_every_step_and_length():
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = SlimPajamaModel(tiny()).eval()
    ids = torch.randint(4, VOCAB, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, :6], mask[2, :3] = 0, 0  # left padding: the masked path with rotary position ids
    torch._dynamo.reset()
    counters.clear()
    assert torch.equal(greedy(model, ids, n=15, attention_mask=mask, compile=True), greedy(model, ids, n=15, attention_mask=mask))
    # another prompt length, another cache length, and sampling: the same graph
    assert torch.equal(greedy(model, ids[:, 2:], n=30, attention_mask=mask[:, 2:], compile=True),
                       greedy(model, ids[:, 2:], n=30, attention_mask=mask[:, 2:]))
    sampled = [model.generate(ids, attention_mask=mask, max_new_tokens=10, top_k=5, seed=1, eos_token_id=-1, compile=c)
               for c in (True, False)]
    assert torch.equal(*sampled)
    assert counters["stats"]["unique_graphs"] == 1 and counters["stats"]["calls_captured"] > 0
    assert not counters["graph_break"]

    def blocked_products(n: int) -> int:
        calls = op_calls(lambda: greedy(model, ids, n=n, attention_mask=mask, compile=True))
        return calls.get("slimpajama::row_block_linear_kept", 0)

    # 4 more compiled steps: 4 x (4 products in each of the blocks, and the head) through the opaque op
    assert blocked_products(8) - blocked_products(4) == 4 * (4 * model.config.n_layer + 1)
    assert all(block.self_attn.kv_cache is None for block in model.layers)
    # new graphs where they are due: no padding, and a one-token prompt (its first step is slot 1,
    # which dynamo may specialise)
    for prompt in (ids[:1], ids[:1, -1:], ids[:2, -1:]):
        assert torch.equal(greedy(model, prompt, n=20, compile=True), greedy(model, prompt, n=20))


def test_compiled_one_row_steps_read_the_kept_blocks_from_one_graph_across_calls(monkeypatch):
    from torch._dynamo.utils import counters

    from slimpajama.model import Linear

    torch.manual_seed(0)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # blocks of 2, whatever the machine has
    model = SlimPajamaModel(tiny()).eval()
    ids = torch.randint(4, VOCAB, (1, 9))
    torch._dynamo.reset()
    counters.clear()
    # each call keeps new blocks (copies for the wide weights): the same graph reads them
    for n in (10, 14):
        assert torch.equal(greedy(model, ids, n=n, compile=True), greedy(model, ids, n=n))
    assert counters["stats"]["unique_graphs"] == 1
    prepare = Linear.prepare_decoding

    def negated_head(self, enable=True, kernel="blocks"):  # the head's copy negated: greedy picks the argmin
        prepare(self, enable, kernel)
        if enable and self is model.lm_head and kernel == "blocks":
            assert self.decode_blocks.is_contiguous()
            self.decode_blocks = -self.decode_blocks

    monkeypatch.setattr(Linear, "prepare_decoding", negated_head)
    eager, compiled = greedy(model, ids, n=6, decode_kernel="blocks"), greedy(model, ids, n=6, compile=True)
    with torch.inference_mode():
        logits = model(ids)[0, -1]  # no kept blocks here: the weight itself
    assert eager[0, 9] == logits.argmin() != logits.argmax()  # eager one-row products read the copy
    assert torch.equal(compiled, eager)  # and so do the compiled steps
    assert counters["stats"]["unique_graphs"] == 1


def test_compiled_decoding_without_a_cpp_compiler_warns_and_decodes_eagerly(model, monkeypatch, caplog):
    import logging

    from torch._dynamo.utils import counters

    import slimpajama.generation as generation

    monkeypatch.setattr(generation, "inductor_compiler", lambda: None)
    counters.clear()
    ids = torch.randint(4, VOCAB, (1, 6))
    with caplog.at_level(logging.WARNING, logger="slimpajama.generation"):
        out = greedy(model, ids, n=10, compile=True)
    assert "needs a C++ compiler" in caplog.text
    assert torch.equal(out, greedy(model, ids, n=10))
    assert counters["stats"]["unique_graphs"] == 0  # nothing went through dynamo


@pytest.mark.slow
@pytest.mark.parametrize("recompile_limit", [8, 1])
def test_compiled_decoding_picks_each_models_graph_even_past_the_recompile_limit(recompile_limit):
    # one compiled function serves every model: dynamo's guards pick each model's graph, and a model
    # left without one by the recompile limit decodes eagerly
    torch.manual_seed(0)
    models = [SlimPajamaModel(tiny()).eval(), SlimPajamaModel(tiny(n_layer=3, d_model=48, n_head=6, n_kv_head=3)).eval()]
    ids = torch.randint(4, VOCAB, (1, 7))
    expected = [greedy(m, ids, n=20) for m in models]
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=recompile_limit):
        for i in (0, 1, 0, 1):
            assert torch.equal(greedy(models[i], ids, n=20, compile=True), expected[i]), i


def test_num_return_sequences_repeats_each_prompt(model):
    ids = torch.randint(4, VOCAB, (2, 5))
    out = model.generate(ids, max_new_tokens=10, temperature=1.0, num_return_sequences=3, seed=0, eos_token_id=-1)
    assert out.shape == (6, 15)
    for i in range(6):
        assert torch.equal(out[i, :5], ids[i // 3])
    assert len({tuple(r) for r in out[:3, 5:].tolist()}) > 1  # samples of one prompt differ
    with pytest.raises(ValueError, match="num_return_sequences=3 with greedy decoding"):  # as in transformers
        model.generate(ids, max_new_tokens=10, do_sample=False, num_return_sequences=3)


def test_temperature_zero_is_greedy_so_several_sequences_are_refused(model):
    """temperature 0 samples nothing (sample_next takes the argmax): three "samples" would be one greedy copy."""
    ids = torch.randint(4, VOCAB, (1, 5))
    assert torch.equal(model.generate(ids, max_new_tokens=6, temperature=0, eos_token_id=-1), greedy(model, ids, n=6))
    for kwargs in ({"temperature": 0}, {"temperature": 0.0, "do_sample": True, "top_k": 5}):
        with pytest.raises(ValueError, match=r"num_return_sequences=3 with greedy decoding \(do_sample=False or temperature=0\)"):
            model.generate(ids, max_new_tokens=4, num_return_sequences=3, **kwargs)


def test_eos_stops_a_row_and_pads_the_rest(model):
    ids = torch.randint(4, VOCAB, (2, 5))
    free = greedy(model, ids, n=10)
    eos = int(free[0, 7])  # the third new token of row 0 becomes its end
    out = model.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=[eos, 10_000])
    first = (out[0, 5:] == eos).nonzero()[0].item() + 5
    assert torch.equal(out[0, : first + 1], free[0, : first + 1])
    assert (out[0, first + 1 :] == model.config.pad_token_id).all()
    if (free[1, 5:] == eos).any():
        return
    assert torch.equal(out[1], free[1, : out.size(1)])


def test_eos_as_a_tensor_stops_as_a_list_does(model):
    ids = torch.randint(4, VOCAB, (2, 5))
    free = greedy(model, ids, n=10)
    eos = [int(free[0, 7]), int(free[1, 9])]
    expected = model.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=eos)
    assert expected.size(1) < 15  # both rows ended
    assert torch.equal(model.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=torch.tensor(eos)), expected)
    one = model.generate(ids[:1], max_new_tokens=10, do_sample=False, eos_token_id=torch.tensor(eos[0]))  # 0-d
    assert torch.equal(one, expected[:1, : one.size(1)])


def test_min_new_tokens_holds_the_end_back(model):
    ids = torch.randint(4, VOCAB, (1, 5))
    free = greedy(model, ids, n=20)
    eos = int(free[0, 6])  # greedy's second new token
    assert model.generate(ids, max_new_tokens=20, do_sample=False, eos_token_id=eos).size(1) == 7
    out = model.generate(ids, max_new_tokens=20, do_sample=False, eos_token_id=eos, min_new_tokens=8)
    assert eos not in out[0, 5:13].tolist()  # the first 8 new tokens cannot be the end
    assert torch.equal(out[0, 5:6], free[0, 5:6])  # before the banned token, greedy as usual
    assert torch.equal(model.generate(ids, max_new_tokens=20, do_sample=False, eos_token_id=eos, min_length=13), out)


def test_unknown_arguments_and_impossible_settings_are_errors(model):
    ids = torch.randint(4, VOCAB, (1, 7))
    with pytest.raises(TypeError, match=r"does not take \['max_new_token'\]"):  # a typo, not silently ignored
        model.generate(ids, max_new_token=3)
    with pytest.raises(TypeError, match="num_beams"):  # not supported: an error rather than greedy decoding
        model.generate(ids, max_new_tokens=3, num_beams=4)
    for kwargs, match in [({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
                          ({"max_length": 7, "max_new_tokens": None}, "max_length=7 leaves no room after a prompt of 7 tokens"),
                          ({"temperature": float("nan")}, "temperature must be a finite number"),
                          ({"top_k": -1}, "top_k must be a whole number >= 0"),
                          ({"min_p": 1.5}, r"min_p must be in \[0, 1\]"),
                          ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
                          ({"repetition_penalty": 0.0}, "repetition_penalty must be a finite number > 0"),
                          ({"no_repeat_ngram_size": -2}, "no_repeat_ngram_size must be >= 0"),
                          ({"num_return_sequences": 0}, "num_return_sequences must be a whole number >= 1")]:
        with pytest.raises(ValueError, match=match):
            model.generate(ids, **{"max_new_tokens": 3, **kwargs})


def test_generate_checks_its_mask_and_pad_and_warns_when_both_lengths_are_set(model, caplog):
    ids = torch.randint(4, VOCAB, (7,))
    assert torch.equal(greedy(model, ids, n=3, attention_mask=torch.ones(7, dtype=torch.long)), greedy(model, ids[None], n=3))
    with pytest.raises(ValueError, match=r"attention_mask has shape \(1, 6\) for input_ids of \(1, 7\)"):
        greedy(model, ids, attention_mask=torch.ones(1, 6, dtype=torch.long))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1] = 0
    with pytest.raises(ValueError, match=r"attention_mask rows \[1\] are all padding"):
        greedy(model, ids.repeat(2, 1), attention_mask=mask)
    with pytest.raises(ValueError, match=f"pad_token_id=-1 is outside the model's vocabulary of {VOCAB}"):
        greedy(model, ids, pad_token_id=-1)
    with caplog.at_level("WARNING", logger="slimpajama.generation"):
        out = model.generate(ids, max_new_tokens=3, max_length=20, do_sample=False)
    assert out.shape[1] <= 10 and "both max_new_tokens=3 and max_length=20 are set" in caplog.text


def test_sampling_keeps_transformers_default_top_k_of_50_unless_top_k_is_set(model, tmp_path):
    ids = torch.randint(4, VOCAB, (1, 6), generator=torch.Generator().manual_seed(0))
    top50 = set(model(ids)[0, -1].topk(50).indices.tolist())

    def drawn(m, **kw):
        return set(m.generate(ids.repeat(3000, 1), max_new_tokens=1, seed=0, eos_token_id=-1, **kw)[:, -1].tolist())

    for kw in ({"do_sample": True}, {"temperature": 1.0}):
        assert drawn(model, **kw) <= top50, kw
    assert len(drawn(model, do_sample=True, top_k=0)) > 50  # 0: the whole vocabulary
    assert len(drawn(model, do_sample=True, top_k=None)) > 50  # and an explicit None, as in transformers
    model.save_pretrained(tmp_path, generation_config={"top_k": 0})  # the file's setting wins over the default
    assert len(drawn(SlimPajamaModel.from_pretrained(tmp_path), do_sample=True)) > 50


def test_a_model_without_a_pad_id_pads_finished_rows_with_an_end_id_inside_the_vocabulary():
    """pad_token_id None falls back to the first end id, as in transformers, but never to -1 (the
    "no end" value), which would be fed back to the embedding once a row finishes."""
    torch.manual_seed(0)
    model = SlimPajamaModel(tiny(pad_token_id=None)).eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(4, VOCAB, (1, 5), generator=g) for _ in range(20)]
    alone = [greedy(model, p, n=6)[0, 5:].tolist() for p in prompts]
    # a pair where the first row's first new token never comes in the second row
    i, j = next((i, j) for i in range(20) for j in range(20) if alone[i][0] not in alone[j])
    end = alone[i][0]
    out = model.generate(torch.cat([prompts[i], prompts[j]]), max_new_tokens=6, do_sample=False, eos_token_id=[-1, end])
    assert out[0, 5:].tolist() == [end] * 6  # finished at once, then padded with the end id
    assert out[1, 5:].tolist() == alone[j]
    lead0 = torch.tensor([[0, 5, 6, 7]])  # with no pad id at all, a leading 0 is a token, not padding
    assert torch.equal(greedy(model, lead0, n=4), greedy(model, lead0, n=4, attention_mask=torch.ones_like(lead0)))


def test_repetition_penalty_matches_hand_computation():
    scores = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    out = repetition_penalty_(scores.clone(), torch.tensor([[0, 1, 1]]), 2.0)
    assert torch.equal(out, torch.tensor([[1.0, -2.0, 0.5, 3.0]]))
    # left padding (id 3 here) does not count as seen
    valid = torch.tensor([[False, False, True, True]])
    out = repetition_penalty_(scores.clone(), torch.tensor([[3, 3, 0, 1]]), 2.0, valid)
    assert torch.equal(out, torch.tensor([[1.0, -2.0, 0.5, 3.0]]))


def test_no_repeat_ngram_bans_the_completing_token():
    seqs = torch.tensor([[5, 6, 7, 5, 6]])  # "5 6" was followed by 7: with n=3 token 7 is banned next
    out = no_repeat_ngram_(torch.zeros(1, 10), seqs, 3)
    assert out[0, 7] == float("-inf") and (out[0, torch.arange(10) != 7] == 0).all()
    assert (no_repeat_ngram_(torch.zeros(1, 10), seqs, 1)[0, [5, 6, 7]] == float("-inf")).all()
    # an n-gram that overlaps the left padding (id 0 here) does not count
    padded, valid = torch.tensor([[0, 0, 1, 0]]), torch.tensor([[False, False, True, True]])
    assert (no_repeat_ngram_(torch.zeros(1, 10), padded, 2, valid) == 0).all()  # (0, 0) and (0, 1) overlap it
    assert no_repeat_ngram_(torch.zeros(1, 10), padded, 2)[0, 1] == float("-inf")  # without valid: "0 1" counts
    out = no_repeat_ngram_(torch.zeros(1, 10), padded, 1, valid)
    assert out[0, 1] == out[0, 0] == float("-inf") and (out[0, 2:] == 0).all()  # 0 is also a real token here


def test_no_repeat_ngram_in_generation(model):
    ids = torch.randint(4, VOCAB, (1, 4))
    out = model.generate(ids, max_new_tokens=60, do_sample=False, no_repeat_ngram_size=2, eos_token_id=-1)[0].tolist()
    bigrams = list(zip(out, out[1:]))
    assert len(bigrams) == len(set(bigrams))


def test_warpers_match_hand_computation():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    keep = lambda s: (s > float("-inf")).squeeze(0).tolist()  # noqa: E731
    assert keep(warp(logits, top_k=2)) == [True, True, False, False]
    assert keep(warp(logits, top_p=0.7)) == [True, True, False, False]  # 0.5 + 0.3 reaches 0.7
    assert keep(warp(logits, top_p=0.85)) == [True, True, True, False]
    assert keep(warp(logits, min_p=0.5)) == [True, True, False, False]  # >= 0.5 * 0.5
    torch.testing.assert_close(warp(logits, temperature=2.0), logits / 2.0)


def test_top_k_sampling_draws_from_the_warped_top_k_distribution():
    # sample_next draws among the k best only; the frequencies must match softmax(warp(...)) over the whole vocabulary
    torch.manual_seed(0)
    logits = torch.randn(1, 50) * 2
    settings = [dict(temperature=0.7, top_k=5), dict(temperature=1.3, top_k=8, top_p=0.8), dict(temperature=1.0, top_k=6, min_p=0.2)]
    for kw in settings:
        expected = warp(logits, **kw).softmax(-1)[0]
        g = torch.Generator().manual_seed(1)
        draws = sample_next(logits.expand(20000, -1), generator=g, **kw)
        freq = torch.bincount(draws, minlength=50).float() / draws.numel()
        assert set(draws.unique().tolist()) <= set(expected.nonzero().flatten().tolist()), kw
        torch.testing.assert_close(freq, expected, atol=0.015, rtol=0), kw


def test_the_decode_kernel_is_raced_once_per_shape_and_batch_size_and_the_kernels_decode_alike(monkeypatch):
    """The race on a simulated clock: a slowed kernel's products advance it, nothing else does, so the
    outcome does not depend on the load of the machine running the test."""
    import types

    import torch.nn.functional as F

    import slimpajama.generation as generation
    import slimpajama.model as M

    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # blocks of 2, whatever the machine has
    monkeypatch.setattr(generation, "_decode_kernels", {})
    now = [0.0]
    monkeypatch.setattr(generation, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    torch.manual_seed(0)
    model = SlimPajamaModel(tiny()).eval()
    shapes = tuple(tuple(m.weight.shape) for m in model.modules() if isinstance(m, M.Linear))
    ids = torch.randint(4, VOCAB, (2, 7))
    steps = []
    decode_step = M.Transformer.decode_step
    monkeypatch.setattr(M.Transformer, "decode_step", lambda *a, **k: steps.append(1) or decode_step(*a, **k))

    slow_calls = []

    def slowed(fn, seconds):
        def call(*a, **k):
            slow_calls.append(1)
            now[0] += seconds
            return fn(*a, **k)
        return call

    row_block_linear, linear = M.row_block_linear, F.linear
    monkeypatch.setattr(M, "row_block_linear", slowed(row_block_linear, 2e-4))  # a blocks step's 9 products slowed
    greedy(model, ids, n=5)
    race = len(steps) - 4  # then the call's 4 steps
    assert race == 8 * 10  # 10 turns of 8 steps: the blocks' 5 turns take 72 ms, within the race's 0.25 s
    assert generation._decode_kernels == {(shapes, 2, 2): "gemm"}
    assert len(slow_calls) == 8 * 5 * 9  # the blocks turns' products; the call's own steps took F.linear
    steps.clear()
    out = greedy(model, ids, n=12)
    assert len(steps) == 11  # not raced again
    greedy(model, ids[:1], n=5)  # a new batch size is
    assert len(steps) - 11 - 4 == 8 * 10 and generation._decode_kernels[(shapes, 1, 2)] == "gemm"

    generation._decode_kernels.clear()
    monkeypatch.setattr(M, "row_block_linear", row_block_linear)
    monkeypatch.setattr(F, "linear", slowed(linear, 5e-3))  # gemm: a step's 9 products slowed; blocks take none
    slow_calls.clear()
    assert fastest_decode_kernel(model, 2) == "blocks"
    # gemm steps cost 45 ms: after 2 turns of each kernel the race's 0.25 s are spent
    assert len(slow_calls) == 2 * 8 * 9
    assert torch.equal(greedy(model, ids, n=12), out)
    assert torch.equal(greedy(model, ids, n=12, decode_kernel="gemm"), out)
    with pytest.raises(ValueError, match="decoding kernel must be one of .*'fast'"):
        greedy(model, ids, decode_kernel="fast")

    generation._decode_kernels.clear()
    hook = model.layers[0].register_forward_hook(lambda *a: None)  # the steps would go through forward
    assert fastest_decode_kernel(model, 2) == "blocks" and generation._decode_kernels == {}
    hook.remove()
    assert fastest_decode_kernel(model, M.DECODE_MAX_ROWS + 1) == "blocks"  # so would these rows
    assert generation._decode_kernels == {}


def test_the_exponential_race_draws_each_index_with_its_probability_and_never_a_zero_one():
    probs = torch.tensor([[0.5, 0.0, 0.3, 0.15, 0.05, 0.0]])
    draws = draw(probs.expand(100000, -1), torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=6).float() / draws.numel()
    assert freq[1] == freq[5] == 0
    torch.testing.assert_close(freq, probs[0], atol=0.006, rtol=0)  # about 4 standard errors at 0.5
    again = draw(probs.expand(100000, -1), torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)  # the generator makes it reproducible
    # the whole-vocabulary branch of sample_next (no top_k) draws through it too
    logits = torch.randn(1, 30) * 2
    expected = warp(logits, temperature=0.9, top_p=0.9).softmax(-1)[0]
    g = torch.Generator().manual_seed(1)
    draws = sample_next(logits.expand(20000, -1), temperature=0.9, top_p=0.9, generator=g)
    assert set(draws.unique().tolist()) <= set(expected.nonzero().flatten().tolist())
    freq = torch.bincount(draws, minlength=30).float() / draws.numel()
    torch.testing.assert_close(freq, expected, atol=0.015, rtol=0)


def test_generate_returns_an_ordinary_tensor(model):
    # decoding runs under inference_mode; what comes back must accept in-place edits like any tensor
    out = greedy(model, torch.randint(4, VOCAB, (1, 5)), n=3)
    assert not out.is_inference()
    out[0, 0] = 7


def test_text_streamer_sends_text_as_it_is_made(model, tok):
    ids = tok.encode("写一篇 the river", return_tensors="pt")
    pieces = []
    streamer = TextStreamer(tok, skip_prompt=True, on_text=pieces.append)
    out = model.generate(ids, max_new_tokens=30, temperature=1.0, seed=1, eos_token_id=-1, streamer=streamer)
    new_text = tok.decode(out[0, ids.size(1):], skip_special_tokens=True)
    assert len(pieces) > 5 and "".join(pieces) == new_text
    assert not any("\ufffd" in p for p in pieces) or "\ufffd" in new_text


def test_streamed_pieces_add_up_to_the_decoded_new_ids(tok):
    prompt = tok.encode("the", return_tensors="pt")
    new = tok.encode("city by the river 写一篇😀", add_special_tokens=False)  # starts with "▁city"
    for skip_prompt in (True, False):
        pieces = []
        streamer = TextStreamer(tok, skip_prompt=skip_prompt, on_text=pieces.append)
        streamer.put(prompt)
        for i in new:
            streamer.put(torch.tensor([i]))
        streamer.end()
        shown = new if skip_prompt else prompt[0].tolist() + new
        assert "".join(pieces) == tok.decode(shown, skip_special_tokens=True)  # no leading space of its own
    assert "".join(pieces) == "the city by the river 写一篇😀"


def test_iterator_streamer_in_a_thread(model, tok):
    ids = tok.encode("the city", return_tensors="pt")
    streamer = TextIteratorStreamer(tok, skip_prompt=True, timeout=30)
    result = {}
    thread = threading.Thread(target=lambda: result.update(out=greedy(model, ids, n=20, streamer=streamer)))
    thread.start()
    text = "".join(streamer)
    thread.join()
    assert text == tok.decode(result["out"][0, ids.size(1):], skip_special_tokens=True)


@pytest.mark.parametrize("bad", [{"max_new_token": 5}, {"top_p": 0.0}, {"stop_strings": ["x"]}], ids=str)
def test_the_iterator_streamers_reader_gets_the_error_when_generate_raises(model, tok, bad):
    """An unknown argument, a bad setting, or one found later (stop strings without the tokenizer
    they need): the reader's loop raises generate's error instead of waiting for ever."""
    ids = tok.encode("the city", return_tensors="pt")
    streamer = TextIteratorStreamer(tok, skip_prompt=True, timeout=30)  # a hang: queue.Empty, not the error
    errors = []

    def run():
        try:
            model.generate(ids, **{"max_new_tokens": 5, "do_sample": False, **bad}, streamer=streamer)
        except (TypeError, ValueError) as error:
            errors.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    with pytest.raises((TypeError, ValueError)) as raised:
        "".join(streamer)
    thread.join(timeout=30)
    assert errors and raised.value is errors[0]


def test_stop_strings_stop_after_the_string(model, tok):
    ids = tok.encode("the river", return_tensors="pt")
    free = greedy(model, ids, n=40)
    new = free[0, ids.size(1):]
    text = tok.decode(new)
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    out = model.generate(ids, max_new_tokens=40, do_sample=False, eos_token_id=-1, stop_strings=[stop], tokenizer=tok)
    got = tok.decode(out[0, ids.size(1):])
    assert stop in got and stop not in tok.decode(out[0, ids.size(1):-1])  # stops at the token that completes it
    assert torch.equal(out[0], free[0, : out.size(1)])
    with pytest.raises(ValueError, match="tokenizer"):
        model.generate(ids, max_new_tokens=5, stop_strings=["x"])


def test_a_stop_string_with_a_leading_space_matches_the_first_new_token(tok):
    ids = torch.tensor([tok.encode("city by", add_special_tokens=False)])  # "▁city ▁by": the text " city by"
    assert StopStrings([" city"], tok)(ids, new=2).tolist() == [True]
    assert StopStrings([" by"], tok)(ids[:, 1:]).tolist() == [True]
    with pytest.raises(ValueError, match="must be non-empty"):
        StopStrings(["x", ""], tok)


def test_a_stop_string_must_end_in_the_newest_token_and_may_begin_before_it(tok):
    """As transformers' StopStringCriteria: the text before the newest token (the prompt's too) may
    hold the string's start, not the whole string; padding is left out; a character of four
    byte-fallback tokens matches once its last byte comes, and not before."""
    ids = torch.tensor([tok.encode("the city by the river")])
    assert StopStrings(["the river"], tok)(ids).tolist() == [True]
    assert StopStrings(["e riv"], tok)(ids).tolist() == [True]  # the newest token is "▁river"
    assert StopStrings(["city by"], tok)(ids).tolist() == [False]  # done before the newest token
    assert StopStrings(["city by"], tok)(ids, new=3).tolist() == [True]
    pad = tok.pad_token_id
    padded, mask = torch.cat([torch.tensor([[pad, pad]]), ids], 1), torch.tensor([[0, 0] + [1] * ids.size(1)])
    assert StopStrings(["<pad><s>"], tok)(padded, new=ids.size(1)).tolist() == [True]
    assert StopStrings(["<pad><s>"], tok)(padded, mask, new=ids.size(1)).tolist() == [False]
    emoji = tok.encode("a😀", add_special_tokens=False)
    assert [tok.convert_ids_to_tokens(i) for i in emoji[-4:]] == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    stops = StopStrings(["a😀"], tok)
    assert [stops(torch.tensor([emoji[:n]])).item() for n in range(1, len(emoji) + 1)] == [False] * (len(emoji) - 1) + [True]


def test_the_issue_example_runs(tmp_path, tok, capsys):
    torch.manual_seed(0)
    SlimPajamaModel(tiny()).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    from slimpajama import SlimPajamaModel as M, SlimPajamaTokenizer as T

    model = M.from_pretrained(tmp_path)
    tokenizer = T.from_pretrained(tmp_path)
    input_ids = tokenizer.encode("写一篇正式的文章", return_tensors="pt")
    output = model.generate(input_ids, max_length=500, temperature=0.7)
    assert output.shape[1] > input_ids.shape[1] and torch.equal(output[:, : input_ids.size(1)], input_ids)
    print(tokenizer.decode(output[0], skip_special_tokens=True))
    assert capsys.readouterr().out.strip()


# ---- from_pretrained ----------------------------------------------------------------------------------
def test_from_pretrained_resolves_registry_names(tmp_path, monkeypatch):
    torch.manual_seed(0)
    run = tmp_path / "logs" / "pretrain" / "runs" / "r1"
    SlimPajamaModel(tiny()).save_pretrained(run / "model")
    (tmp_path / "logs" / "latest").mkdir(parents=True)
    (tmp_path / "logs" / "latest" / "pretrain").symlink_to(run)
    monkeypatch.setenv("SLIMPAJAMA_LOG_DIR", str(tmp_path / "logs"))
    for name in ("slimpajama", "slimpajama/pretrain", "pretrain", str(run)):
        assert SlimPajamaModel.from_pretrained(name).config == tiny(), name
    with pytest.raises(FileNotFoundError, match="stage=distill"):
        SlimPajamaModel.from_pretrained("slimpajama/distill")
    with pytest.raises(FileNotFoundError, match="not a registered name"):
        SlimPajamaModel.from_pretrained("no-such-model")


def test_from_pretrained_refuses_pickles_and_shape_mismatches(tmp_path):
    torch.manual_seed(0)
    SlimPajamaModel(tiny()).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 128}))
    with pytest.raises(ValueError, match=r"mlp\..*\.weight has shape .* disagree"):
        SlimPajamaModel.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin are pickles"):
        SlimPajamaModel.from_pretrained(tmp_path)


def test_from_pretrained_reads_foreign_llama_folders_as_transformers_does(tmp_path):
    """Folders written elsewhere: a key left out means LlamaConfig's default, RoPE scaling (which we do not
    implement) is refused, old checkpoints' rotary buffers are ignored, a missing k_proj is named, and a
    tied config with a different head in the file is refused (we would silently drop that head)."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    SlimPajamaModel(tiny()).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    sd = load_file(str(tmp_path / "model.safetensors"))

    def write(config=cfg, weights=sd):
        (tmp_path / "config.json").write_text(json.dumps(config))
        save_file(weights, str(tmp_path / "model.safetensors"))

    write({k: v for k, v in cfg.items() if k not in ("rms_norm_eps", "pad_token_id")})
    loaded = SlimPajamaModel.from_pretrained(tmp_path).config
    assert loaded.norm_eps == 1e-6 and loaded.pad_token_id is None  # LlamaConfig's, not ours (1e-5, 3)
    for scaling in ({"rope_scaling": {"rope_type": "linear", "factor": 4.0}},
                    {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}):
        write({**cfg, **scaling})
        with pytest.raises(ValueError, match="RoPE scaling .* is not supported"):
            SlimPajamaModel.from_pretrained(tmp_path)
    write(cfg, {**sd, "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4)})
    assert SlimPajamaModel.from_pretrained(tmp_path).config == tiny()
    write(cfg, {k: v for k, v in sd.items() if k != "model.layers.1.self_attn.k_proj.weight"})
    with pytest.raises(ValueError, match=r"model.safetensors: missing weights \['model.layers.1.self_attn.k_proj"):
        SlimPajamaModel.from_pretrained(tmp_path)
    write({**cfg, "tie_word_embeddings": True}, sd)  # an untied model's head, under a tied config
    with pytest.raises(ValueError, match="lm_head.weight differs from its embed_tokens.weight"):
        SlimPajamaModel.from_pretrained(tmp_path)


def test_a_failed_save_changes_no_file_of_the_folder(tmp_path, monkeypatch):
    import slimpajama.pretrained as P

    torch.manual_seed(0)
    a, b = SlimPajamaModel(tiny()), SlimPajamaModel(tiny(n_layer=1))
    a.save_pretrained(tmp_path)
    before = {f.name: f.read_bytes() for f in tmp_path.iterdir()}
    real = P.config_to_hf
    monkeypatch.setattr(P, "config_to_hf", lambda *args: {**real(*args), "bad": object()})  # json cannot write it
    with pytest.raises(TypeError):
        b.save_pretrained(tmp_path)  # the weights were written first: they must not replace a's
    assert {f.name: f.read_bytes() for f in tmp_path.iterdir()} == before  # and no temporary file is left
    torch.testing.assert_close(SlimPajamaModel.from_pretrained(tmp_path)(torch.tensor([[5, 6]])), a(torch.tensor([[5, 6]])))


def test_from_pretrained_dtype_and_device(tmp_path):
    torch.manual_seed(0)
    model = SlimPajamaModel(tiny())
    model.save_pretrained(tmp_path)
    bf16 = SlimPajamaModel.from_pretrained(tmp_path, torch_dtype="bfloat16", device="cpu")
    assert bf16.lm_head.weight.dtype == torch.bfloat16 and bf16.lm_head.weight.device.type == "cpu"
    assert SlimPajamaModel.from_pretrained(tmp_path, torch_dtype="auto").lm_head.weight.dtype == torch.float32
    assert SlimPajamaModel.from_pretrained(tmp_path, dtype=torch.float64).lm_head.weight.dtype == torch.float64
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("torch_dtype")
    (tmp_path / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))  # as transformers 5 saves it
    assert SlimPajamaModel.from_pretrained(tmp_path, torch_dtype="auto").lm_head.weight.dtype == torch.bfloat16
    ids = torch.randint(4, VOCAB, (1, 6))
    assert greedy(bf16, ids, n=5).shape == (1, 11)
    SlimPajamaModel(tiny()).save_pretrained(tmp_path, dtype=torch.bfloat16)
    (tmp_path / "config.json").write_text(json.dumps(config))  # records no dtype: "auto" is the stored weights'
    assert SlimPajamaModel.from_pretrained(tmp_path, torch_dtype="auto").dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", ["int8", "bool", "complex64", "float8_e4m3fn", torch.int64])
def test_from_pretrained_refuses_a_dtype_a_model_cannot_run_in(tmp_path, dtype):
    """nn.Module.to refuses integer dtypes with a traceback; complex and float8 load but no kernel runs them."""
    SlimPajamaModel(tiny()).save_pretrained(tmp_path)
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(ValueError, match=rf"torch_dtype=.*{name}.*: a model runs in float32, bfloat16, float16 or "
                                         rf"float64, not {name}$"):
        SlimPajamaModel.from_pretrained(tmp_path, torch_dtype=dtype)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "torch_dtype": name}))
    with pytest.raises(ValueError, match=r"torch_dtype='auto' \(the saved dtype\): .*not " + name):
        SlimPajamaModel.from_pretrained(tmp_path, torch_dtype="auto")


def test_save_pretrained_keeps_the_loaded_generation_config_under_the_one_passed(tmp_path):
    """Load, then save: the folder's prompt template, end ids and defaults survive, as with transformers."""
    saved = {"eos_token_id": [2, 5], "prompt_template": "{control}Q: {input}\nA:", "max_new_tokens": 7}
    SlimPajamaModel(tiny()).save_pretrained(tmp_path / "a", generation_config=saved)
    loaded = SlimPajamaModel.from_pretrained(tmp_path / "a")
    loaded.save_pretrained(tmp_path / "b", generation_config={"max_new_tokens": 9})
    again = json.loads((tmp_path / "b" / "generation_config.json").read_text())
    assert again == {**json.loads((tmp_path / "a" / "generation_config.json").read_text()), "max_new_tokens": 9}
    assert again["eos_token_id"] == [2, 5] and again["prompt_template"] == saved["prompt_template"]


def test_the_attributes_a_transformers_script_reaches_for(tmp_path):
    transformers = pytest.importorskip("transformers")
    for tie in (False, True):
        model = SlimPajamaModel(tiny(tie_embeddings=tie))
        model.save_pretrained(tmp_path / str(tie))
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / str(tie))
        for kw in ({}, {"exclude_embeddings": True}, {"only_trainable": True}):
            assert model.num_parameters(**kw) == hf.num_parameters(**kw), (tie, kw)
        assert (model.device, model.dtype) == (hf.device, hf.dtype)
        assert model.get_input_embeddings() is model.embed_tokens and model.get_output_embeddings() is model.lm_head
    model.lm_head.weight.requires_grad_(False)  # tied: the embedding too
    assert model.num_parameters(only_trainable=True) == model.num_parameters() - model.embed_tokens.weight.numel()
    assert SlimPajamaModel.from_pretrained(tmp_path / "True", torch_dtype="bfloat16").dtype == torch.bfloat16


def test_position_ids_of_another_shape_are_refused(model):
    ids = torch.randint(4, VOCAB, (2, 6))
    torch.testing.assert_close(model(ids, position_ids=torch.arange(6)[None]), model(ids))  # (1, T) broadcasts
    for bad in (torch.arange(6), torch.arange(5)[None], torch.zeros(3, 6, dtype=torch.long)):
        with pytest.raises(ValueError, match=r"position_ids of shape .* expected \(2, 6\) or \(1, 6\)"):
            model(ids, position_ids=bad)


# ---- Hugging Face parity --------------------------------------------------------------------------------
def sharp_pair(folder, tok, **shape):
    """A tiny model with weights sharper than at init (so greedy paths are not near-ties), saved with
    `tok` in `folder`, and loaded from it by us and by transformers: (ours, hf, hf_tok)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = SlimPajamaModel(tiny(**shape))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0) if p.dim() > 1 else None
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    return SlimPajamaModel.from_pretrained(folder), hf, transformers.AutoTokenizer.from_pretrained(str(folder))


@pytest.mark.parametrize(
    "shape", [{"n_kv_head": 4}, {"tie_embeddings": True, "n_kv_head": 2}, {"n_kv_head": 1},
              {"n_head": 2, "n_kv_head": 1, "head_dim": 8}],  # the last: heads removed by structured pruning
    ids=["mha-untied", "gqa-tied", "mqa", "pruned-heads"])
def test_transformers_parity_logits_and_64_greedy_tokens(tmp_path, monkeypatch, tok, shape):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ours, hf, hf_tok = sharp_pair(tmp_path, tok, **shape)
    texts = ["The city by the river was new.", "写一篇正式的文章", f"{CONTROL[0]}the music school"]
    for text in texts:
        assert hf_tok(text)["input_ids"] == tok.encode(text), text
    ids = torch.tensor([tok.encode(texts[0])])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)
    for text in texts:
        ids = torch.tensor([tok.encode(text)])
        expected = hf.generate(ids, max_new_tokens=64, do_sample=False, eos_token_id=None, pad_token_id=3)
        mine = ours.generate(ids, max_new_tokens=64, do_sample=False, eos_token_id=-1)
        assert torch.equal(mine, expected), text
    # a left-padded batch as transformers would build it
    batch = hf_tok([t for t in texts], padding=True, padding_side="left", return_tensors="pt")
    expected = hf.generate(**batch, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=3)
    mine = ours.generate(batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=16,
                         do_sample=False, eos_token_id=-1)
    assert torch.equal(mine, expected)
    for n in (8, 30):  # min_new_tokens with an end id that greedy decoding reaches early
        ids = torch.tensor([tok.encode(texts[0])])
        eos = int(hf.generate(ids, max_new_tokens=3, do_sample=False, eos_token_id=None, pad_token_id=3)[0, -2])
        expected = hf.generate(ids, max_new_tokens=40, min_new_tokens=n, do_sample=False, eos_token_id=eos,
                               pad_token_id=3)
        mine = ours.generate(ids, max_new_tokens=40, min_new_tokens=n, do_sample=False, eos_token_id=eos)
        assert torch.equal(mine, expected), n
    for penalty in (0.8, 1.3):  # transformers also penalises the pad id (we leave padding out): equal unless pad wins
        expected = hf.generate(**batch, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=3,
                               repetition_penalty=penalty)
        mine = ours.generate(batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=16,
                             do_sample=False, eos_token_id=-1, repetition_penalty=penalty)
        assert torch.equal(mine, expected), penalty


@pytest.mark.parametrize("pad", [None, 2], ids=["no-pad-id", "pad-is-eos"])
def test_leading_end_ids_are_tokens_when_the_pad_id_is_an_end_id_as_in_transformers(tmp_path, monkeypatch, pad):
    """With no pad id, or one equal to the end id, transformers infers no mask from the prompt: a
    prompt that starts with end ids (a document separator) attends to them, and so do we."""
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    SlimPajamaModel(tiny(pad_token_id=pad)).save_pretrained(tmp_path)
    ours = SlimPajamaModel.from_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    ids = torch.cat([torch.tensor([[2, 2]]), torch.randint(4, VOCAB, (1, 6))], 1)
    expected = hf.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=2)
    assert torch.equal(ours.generate(ids, max_new_tokens=12, do_sample=False), expected)
    masked = ours.generate(ids, attention_mask=(ids != 2).long(), max_new_tokens=12, do_sample=False)
    assert not torch.equal(masked, expected)  # the case tells the two readings apart


def test_a_stop_string_across_the_prompts_end_stops_as_in_transformers(tmp_path, monkeypatch, tok):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ours, hf, hf_tok = sharp_pair(tmp_path, tok)
    ids = torch.tensor([tok.encode("from was have of")])
    free = greedy(ours, ids, n=8)
    assert tok.decode(free[0, ids.size(1):]).startswith("small small")  # so "of small" spans the prompt's end
    kwargs = {"max_new_tokens": 8, "do_sample": False, "stop_strings": "of small"}
    expected = hf.generate(ids, tokenizer=hf_tok, pad_token_id=3, eos_token_id=None, **kwargs)
    mine = ours.generate(ids, tokenizer=tok, eos_token_id=-1, **kwargs)
    assert torch.equal(mine, expected) and mine.size(1) == ids.size(1) + 1  # stopped at the first new token
