"""explain: token probabilities, logit lens, attention and control attribution, and the reports."""

import json
import math
import shutil
import subprocess

import numpy as np
import pytest
import torch

from conftest import CONTROL
from slimpajama import SlimPajamaConfig, SlimPajamaModel
from slimpajama.generation import encode_prompt
from slimpajama.explain import (
    Explanation,
    attention_probs,
    attribution_colors,
    explain,
    log_to_wandb,
    logit_lens,
    main,
    render_html,
    sequence_logprobs,
    surprisal_colors,
)

PROMPT = "The river and the"


def tiny_model(tok, seed=0, **kw) -> SlimPajamaModel:
    torch.manual_seed(seed)
    cfg = {"vocab_size": tok.vocab_size, "n_layer": 2, "n_head": 4, "n_kv_head": 2, "d_model": 32,
           "intermediate_size": 64, "max_seq_len": 64, **kw}
    return SlimPajamaModel(SlimPajamaConfig(**cfg)).eval()


def pruned_shape(tok) -> SlimPajamaModel:
    """The shape structured pruning leaves: fewer heads than d_model / head_dim, one key/value head."""
    return tiny_model(tok, seed=1, n_layer=3, n_head=2, n_kv_head=1, head_dim=16, d_model=48)


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(tok)


@pytest.fixture(scope="module")
def ex(model, tok) -> Explanation:
    return explain(model, tok, PROMPT, control=CONTROL[0], alt_control=CONTROL[1], max_new_tokens=8, top_k=5)


def test_final_layer_lens_equals_the_models_logits(model, tok, ex):
    x = torch.tensor([ex.ids])
    logits, hidden = model(x, output_hidden_states=True)
    lens = logit_lens(model, hidden)
    assert lens.shape == (model.config.n_layer + 1, *logits.shape)
    assert torch.equal(lens[-1], logits)  # the same two ops on the same states
    assert not torch.allclose(lens[0], logits)  # earlier states predict something else
    # in the explanation: the last lens entry is the step's own distribution
    logp = logits[0].float().log_softmax(-1)
    for s in ex.steps:
        assert s.lens[-1]["top"] == s.top and s.lens[-1]["prob"] == s.prob and s.lens[-1]["rank"] == s.rank
        assert s.prob == pytest.approx(logp[s.position - 1, s.token_id].exp().item(), rel=1e-5)
        assert s.surprisal == pytest.approx(-s.logprob / math.log(2))
    assert len(ex.steps[0].lens) == len(ex.lens_names) == model.config.n_layer + 1


def test_greedy_generation_is_explained_token_by_token(model, tok, ex):
    P = ex.prompt_length
    assert ex.ids[:P] == tok.encode(CONTROL[0] + PROMPT)
    out = model.generate(torch.tensor([ex.ids[:P]]), max_new_tokens=8, do_sample=False)
    assert ex.ids[P:] == out[0, P:].tolist() == [s.token_id for s in ex.steps]
    assert all(s.rank == 1 and s.top[0]["id"] == s.token_id for s in ex.steps)  # greedy: the top choice
    assert "".join(ex.token_texts[P:]) == ex.text and tok.decode(ex.ids) == tok.decode(ex.ids[:P]) + ex.text


def test_probabilities_sum_to_one_at_every_position_and_state(model, tok):
    V = tok.vocab_size
    small = explain(model, tok, PROMPT, max_new_tokens=3, top_k=V)
    for s in small.steps:
        assert len(s.top) == V and sum(t["prob"] for t in s.top) == pytest.approx(1.0, abs=1e-5)
        for state in s.lens:
            assert sum(t["prob"] for t in state["top"]) == pytest.approx(1.0, abs=1e-5)
        assert s.entropy <= math.log2(V) + 1e-6
    probs = logit_lens(model, model(torch.tensor([small.ids]), output_hidden_states=True)[1]).softmax(-1)
    torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]))


@pytest.mark.parametrize("shape", ["gqa", "pruned"])
def test_attention_rows_sum_to_one_zero_above_diagonal_and_reproduce_the_model(tok, shape):
    model = tiny_model(tok) if shape == "gqa" else pruned_shape(tok)
    c = model.config
    ex = explain(model, tok, PROMPT, control=CONTROL[0], max_new_tokens=6)
    S = len(ex.ids)
    assert ex.attention_layers == list(range(c.n_layer)) and ex.attention_rows == list(range(S))
    for layer in ex.attention:
        a = torch.tensor(layer)  # (H, S, S)
        assert a.shape == (c.n_head, S, S)
        torch.testing.assert_close(a.sum(-1), torch.ones(c.n_head, S), atol=S * 1e-6, rtol=0)
        assert torch.all(a.triu(1) == 0) and torch.all(a.tril() >= 0)
    # the weights are the ones the model used: weights @ v through o_proj is the module's output
    x = torch.randn(1, S, c.d_model)
    attn = model.layers[1].self_attn
    w = attention_probs(attn, x, model.cos[:S], model.sin[:S])  # (1, H, S, S)
    v = attn.qkv(x)[..., (c.n_head + c.n_kv_head) * c.head_dim :].view(1, S, c.n_kv_head, c.head_dim).transpose(1, 2)
    y = w @ v.repeat_interleave(c.n_head // c.n_kv_head, 1)
    expected = attn(x, model.cos[:S], model.sin[:S])
    torch.testing.assert_close(attn.o_proj(y.transpose(1, 2).reshape(1, S, -1)), expected, atol=1e-5, rtol=1e-5)


def test_attention_is_kept_only_for_the_layers_asked_and_the_new_rows_of_long_texts(model, tok):
    ex = explain(model, tok, PROMPT, max_new_tokens=5, layers=[-1], max_attention_rows=4)
    P, S = ex.prompt_length, len(ex.ids)
    assert ex.attention_layers == [1] and len(ex.attention) == 1
    assert ex.attention_rows == list(range(P - 1, S - 1))  # the rows that predicted the new tokens
    a = torch.tensor(ex.attention[0])
    assert a.shape == (4, 5, S)
    for r, pos in enumerate(ex.attention_rows):
        assert torch.all(a[:, r, pos + 1 :] == 0) and a[:, r].sum(-1).sub(1).abs().max() < 1e-4
    full = explain(model, tok, PROMPT, max_new_tokens=5, layers=[1])
    np.testing.assert_allclose(np.array(full.attention[0])[:, P - 1 : S - 1], a.numpy(), atol=2e-6)
    assert explain(model, tok, PROMPT, max_new_tokens=2, layers=[]).attention == []
    with pytest.raises(ValueError, match=r"layers \[5\] do not exist"):
        explain(model, tok, PROMPT, layers=[5])


def test_control_attribution_is_exactly_zero_for_the_same_control(model, tok, ex):
    same = explain(model, tok, PROMPT, control=CONTROL[0], alt_control=CONTROL[0], max_new_tokens=8)
    assert [s.alt_attribution for s in same.steps] == [0.0] * len(same.steps)
    assert any(abs(s.attribution) > 1e-4 for s in same.steps)  # dropping the control does change them
    # against a direct computation: log p(token | control + prompt) - log p(token | prompt)
    new = ex.ids[ex.prompt_length :]
    for other, attr in ((None, [s.attribution for s in ex.steps]), (CONTROL[1], [s.alt_attribution for s in ex.steps])):
        other_ids = tok.encode((other or "") + PROMPT)
        with torch.no_grad():
            full_with = model(torch.tensor([ex.ids]))[0].log_softmax(-1)
            full_without = model(torch.tensor([other_ids + new]))[0].log_softmax(-1)
        P, Q = ex.prompt_length, len(other_ids)
        direct = [float(full_with[P - 1 + i, t] - full_without[Q - 1 + i, t]) for i, t in enumerate(new)]
        np.testing.assert_allclose(attr, direct, atol=1e-5)
    assert explain(model, tok, PROMPT, max_new_tokens=2).steps[0].attribution is None  # no control: none


def test_a_given_continuation_is_scored_not_generated(model, tok):
    ex = explain(model, tok, "The river", continuation=" and the water", control=CONTROL[0])
    assert ex.generation == {"mode": "continuation"} and ex.text == " and the water"
    assert ex.ids == tok.encode(CONTROL[0] + "The river and the water")
    logp = sequence_logprobs(model, ex.ids, ex.prompt_length)
    np.testing.assert_allclose([s.logprob for s in ex.steps], logp.tolist(), rtol=1e-5)
    split = explain(model, tok, "The riv", continuation="er")  # a word cut in two keeps its letters
    assert tok.decode(split.ids[split.prompt_length :]) == "er"


def test_the_prompt_and_continuation_are_encoded_as_fine_tuning_encodes_them(model, tok):
    """A special-token string typed into the prompt or the continuation is plain text, as in fine-tuning
    and the CLI; the control signal keeps its token; a template's tail comes before the continuation."""
    ex = explain(model, tok, "a </s> b", continuation=" </s> c", control=CONTROL[0])
    assert ex.ids[: ex.prompt_length] == encode_prompt(tok, "{control}{input}", CONTROL[0], "a </s> b")
    assert tok.eos_token_id not in ex.ids and tok.convert_tokens_to_ids(CONTROL[0]) in ex.ids
    assert ex.text == " </s> c"
    template = "{control}Q: {input}\nA:"
    tail = explain(model, tok, "why", continuation=" so", control=CONTROL[0], template=template)
    prompt = encode_prompt(tok, template, CONTROL[0], "why")
    assert tail.ids == prompt + tok.encode_continuation(" so")
    plain = encode_prompt(tok, template, "", "why")  # attribution: the same prompt without the control
    direct = sequence_logprobs(model, tail.ids, len(prompt)) - sequence_logprobs(model, plain + tail.ids[len(prompt):], len(plain))
    np.testing.assert_allclose([s.attribution for s in tail.steps], direct.tolist(), atol=1e-5)
    with pytest.raises(ValueError, match=r"template='\{input\}' must contain \{control\} then \{input\}"):
        explain(model, tok, "why", template="{input}")


def test_json_round_trips(ex, tmp_path):
    path = ex.to_json(tmp_path / "explanation.json")
    back = Explanation.from_json(path)
    assert back == ex and back.to_dict() == ex.to_dict()
    assert json.loads(path.read_text())["steps"][0]["token_id"] == ex.steps[0].token_id
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="bad.json: not an explanation"):
        Explanation.from_json(tmp_path / "bad.json")


def test_save_writes_the_html_json_and_heatmaps(ex, tmp_path):
    from PIL import Image

    paths = ex.save(tmp_path, heads=[0, 3])
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "attention_layer0.png", "attention_layer1.png", "explanation.json", "logit_lens.png", "report.html", "tokens.png"]
    for p in tmp_path.glob("*.png"):
        img = np.asarray(Image.open(p).convert("RGB"))
        assert img.shape[0] > 100 and img.std() > 10  # a drawn figure, not a blank canvas
    page = paths["html"].read_text()
    assert "http://" not in page and "https://" not in page and "<script src" not in page  # self-contained
    assert page.count('id="explain-data"') == 1


def test_html_escapes_text_that_looks_like_markup(model, tok):
    ex = explain(model, tok, "</script><b>x</b>", max_new_tokens=2, layers=[])
    page = render_html(ex)
    assert "</script><b>" not in page and page.count("</script>") == 2


def test_log_to_wandb_logs_the_html_and_images(ex):
    import wandb

    class Run:
        def __init__(self):
            self.logged = []

        def log(self, payload, step=None):
            self.logged.append((payload, step))

    class Logger:  # a Lightning WandbLogger exposes its run as .experiment
        experiment = Run()

    payload = log_to_wandb(ex, Logger(), key="val/explain", step=7)
    assert Logger.experiment.logged == [(payload, 7)]
    assert isinstance(payload["val/explain/report"], wandb.Html) and "explain-data" in payload["val/explain/report"].html
    images = [k for k, v in payload.items() if isinstance(v, wandb.Image)]
    assert sorted(images) == ["val/explain/attention_layer0", "val/explain/attention_layer1", "val/explain/lens",
                              "val/explain/tokens"]
    assert payload["val/explain/mean_surprisal"] == pytest.approx(np.mean([s.surprisal for s in ex.steps]))


def test_cli_on_a_saved_structured_pruned_shape(tok, tmp_path, capsys):
    folder = tmp_path / "model"
    pruned_shape(tok).save_pretrained(folder)
    tok.save_pretrained(folder)
    out = tmp_path / "report"
    assert main([str(folder), "-p", PROMPT, "-c", CONTROL[0], "--alt-control", "", "--max-new-tokens", "5",
                 "--layers", "0,-1", "--heads", "1", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "attribution" in printed and str(out / "report.html") in printed
    ex = Explanation.from_json(out / "explanation.json")
    assert ex.model["name"] == str(folder) and ex.model["n_head"] == 2 and ex.model["head_dim"] == 16
    assert ex.attention_layers == [0, 2] and len(ex.steps) == 5
    assert all(s.alt_attribution == s.attribution for s in ex.steps)  # "" is no control
    assert {p.name for p in out.glob("*.png")} == {"attention_layer0.png", "attention_layer2.png", "logit_lens.png",
                                                    "tokens.png"}
    with pytest.raises(SystemExit, match="the model has 2 heads"):
        main([str(folder), "-p", PROMPT, "--heads", "5", "-o", str(out)])
    with pytest.raises(SystemExit, match=r"--alt-control '<\|style:casual\|>' is not a control token"):
        main([str(folder), "-p", PROMPT, "-c", CONTROL[0], "--alt-control", "<|style:casual|>", "-o", str(out)])
    with pytest.raises(SystemExit, match=r"slimpajama-explain: error: .*layers \[9\] do not exist"):  # no traceback
        main([str(folder), "-p", PROMPT, "--layers", "9", "-o", str(out)])
    with pytest.raises(SystemExit, match="slimpajama-explain: error: .*nowhere"):
        main([str(folder / "nowhere"), "-p", PROMPT, "-o", str(out)])
    with pytest.raises(SystemExit, match="slimpajama-explain: error: --device 'bogus'"):
        main([str(folder), "-p", PROMPT, "--device", "bogus", "-o", str(out)])
    with pytest.raises(SystemExit, match="slimpajama-explain: error: torch_dtype='int8': a model runs in float32"):
        main([str(folder), "-p", PROMPT, "--dtype", "int8", "-o", str(out)])  # was nn.Module.to's traceback
    (tmp_path / "afile").write_text("")
    with pytest.raises(SystemExit, match="slimpajama-explain: error: .*afile"):  # an output path that is a file
        main([str(folder), "-p", PROMPT, "--max-new-tokens", "2", "-o", str(tmp_path / "afile")])


# ---- the report in a real browser -----------------------------------------------------------------
CAPTURE_ERRORS = ("<script>window.addEventListener('error', function (e) {var r = document.documentElement;"
                  "r.setAttribute('data-js-errors', (r.getAttribute('data-js-errors') || '') + e.message + ';');"
                  "});</script>")


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.skip("no Chromium on this machine: scripts/setup.sh installs Debian's `chromium` with apt-get "
                "(it needs root and the Debian archive)")


def run_chromium(*args) -> subprocess.CompletedProcess:
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           "--virtual-time-budget=5000", *args]
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)


def pixels_of(img: np.ndarray, color: str, tol: int = 2) -> int:
    rgb = np.array([int(color[i : i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(img.astype(int) - rgb).max(-1) <= tol).sum())


@pytest.mark.slow
def test_html_report_renders_in_headless_chromium_with_coloured_tokens(ex, tmp_path):
    from PIL import Image

    page = tmp_path / "report.html"
    page.write_text(render_html(ex).replace("<head>", "<head>" + CAPTURE_ERRORS, 1), encoding="utf-8")
    dom = run_chromium("--dump-dom", page.as_uri()).stdout
    assert 'data-js-errors="' not in dom, dom[:400]
    assert f'data-rendered="{len(ex.ids)}"' in dom  # the script ran to its end
    assert dom.count('class="tok step') == len(ex.steps)
    assert "logit lens" in dom and "top 5 alternatives" in dom  # the first token's panel is filled

    broken = tmp_path / "broken.html"  # the error capture does catch an error
    broken.write_text(page.read_text().replace("var D = JSON.parse", "undefinedFunction(); var D = JSON.parse"))
    assert 'data-js-errors="Uncaught ReferenceError' in run_chromium("--dump-dom", broken.as_uri()).stdout

    shots = {}
    for mode in ("surprisal", "attribution"):
        shot = tmp_path / f"{mode}.png"
        run_chromium("--window-size=1200,900", f"--screenshot={shot}", page.as_uri() + f"#{mode}")
        shots[mode] = np.asarray(Image.open(shot).convert("RGB"))
    s_colors, _ = surprisal_colors(ex)
    a_colors, _ = attribution_colors(ex)
    hottest = s_colors[int(np.argmax([s.surprisal for s in ex.steps]))]
    strongest = a_colors[int(np.argmax([abs(s.attribution) for s in ex.steps]))]
    assert hottest == "#d62728" and strongest != "#ffffff"  # the red end of its scale; not the background
    # each new token is painted with its colour (a token box is some hundreds of pixels) ...
    assert pixels_of(shots["surprisal"], hottest) > 100
    assert pixels_of(shots["attribution"], strongest) > 100
    # ... and the selector repaints them: no surprisal red in attribution mode and vice versa
    assert pixels_of(shots["attribution"], hottest) < 10  # the legend's gradient ends are 1-2 px
    assert pixels_of(shots["surprisal"], strongest) < 10
