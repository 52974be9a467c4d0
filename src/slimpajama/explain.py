"""Explain a generation: why a saved model wrote what it wrote.

    from slimpajama.explain import explain
    ex = explain("slimpajama/finetune", prompt="Dear Sir,", control="<|source:speeches|>", alt_control="")
    ex.save("report/")          # report.html, explanation.json, logit_lens.png, attention_layer<i>.png, tokens.png

For each generated (or given, `continuation=`) token it reports

- its probability, surprisal (bits), the distribution's entropy, its rank and the top-k alternatives;
- the logit lens: every hidden state (the embeddings, then each block's output) passed through the
  final norm and output head; the last block's lens is the model's own distribution;
- attention: the softmax weights of every head, for the layers asked for (`layers`), recomputed from
  each block's query/key projections and rotary embeddings by a forward pre-hook, so the model's
  fast `scaled_dot_product_attention` path is untouched. Only those layers are kept, and for long
  texts only the rows of the positions that predicted the new tokens, so memory stays bounded;
- control attribution: log p(token | control) - log p(token | no control), in nats, and against an
  alternative control value (`alt_control`): the tokens the control signal caused stand out.

The prompt is built and encoded as the CLI and fine-tuning build it, with the model's `prompt_template`
("{control}{input}" unless the fine-tuning stage saved another one): the control signal's tokens kept,
the prompt's text (and a given continuation) as plain text. Probabilities are the model's own (temperature 1),
whatever decoding chose the tokens. Surprisal and entropy are in bits, log-probabilities in nats.
"""

import argparse
import html
import json
import logging
import math
import os
import sys
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from slimpajama.generation import check_template, encode_prompt, prompt_template
from slimpajama.model import Attention, apply_rope
from slimpajama.tokenizer import SPECIAL_TOKENS

log = logging.getLogger(__name__)

JSON_FILE, HTML_FILE = "explanation.json", "report.html"
ROUND = 6  # attention weights are kept to 1e-6: a 4-layer report stays ~1 MB of JSON
MAX_HTML_ATTENTION = 2_000_000  # per-head attention numbers embedded in the HTML; beyond it, head means only
LN2 = math.log(2.0)


# ---- the numbers ----------------------------------------------------------------------------------
@dataclass
class Step:
    """One generated (or scored) token and what the model thought when it wrote it."""

    position: int  # index in `Explanation.ids`; the distribution comes from position - 1
    token_id: int
    token: str  # the tokenizer's piece
    text: str  # the text it adds
    prob: float
    logprob: float  # nats
    surprisal: float  # bits: -log2 prob
    entropy: float  # bits, of the whole next-token distribution
    rank: int  # 1: the model's most likely token
    top: list = field(default_factory=list)  # the top-k: [{"id", "token", "prob"}]
    lens: list = field(default_factory=list)  # per hidden state: {"prob", "rank", "top": [...]}
    attribution: Optional[float] = None  # log p(token | control) - log p(token | no control)
    alt_attribution: Optional[float] = None  # log p(token | control) - log p(token | alt_control)


@dataclass
class Explanation:
    prompt: str
    control: Optional[str]
    alt_control: Optional[str]
    template: str
    text: str  # the generated (or given) continuation: what its tokens add to the prompt's text
    ids: list  # the whole sequence: prompt (control included) + continuation
    tokens: list  # pieces of `ids`
    token_texts: list  # the text each id adds
    prompt_length: int
    steps: list  # [Step], one per continuation token
    lens_names: list  # "embed", "layer 0", ..., one per hidden state
    attention_layers: list  # the layers whose attention is kept
    attention_rows: list  # the query positions kept (all, or the ones that predicted a new token)
    attention: list  # [layer][head][row][key] softmax weights (zero above the diagonal)
    model: dict = field(default_factory=dict)  # name and shape of the model
    generation: dict = field(default_factory=dict)  # how the continuation was chosen

    # -- JSON --
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Explanation":
        d = dict(d)
        d["steps"] = [Step(**s) for s in d["steps"]]
        return cls(**d)

    def to_json(self, path: Union[str, os.PathLike]) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), ensure_ascii=False, allow_nan=False) + "\n")
        tmp.replace(path)
        return path

    @classmethod
    def from_json(cls, path: Union[str, os.PathLike]) -> "Explanation":
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not an explanation JSON written by slimpajama.explain ({e})") from e

    # -- views --
    def attention_for(self, layer: int, heads: Union[str, Sequence[int]] = "mean") -> torch.Tensor:
        """(rows, keys) weights of `layer`, averaged over `heads` ("mean": all heads)."""
        if layer not in self.attention_layers:
            raise KeyError(f"attention of layer {layer} was not kept (kept: {self.attention_layers})")
        a = torch.tensor(self.attention[self.attention_layers.index(layer)])  # (H, R, S)
        if heads != "mean":
            a = a[list(heads)]
        return a.mean(0)

    def save(self, directory: Union[str, os.PathLike], png: bool = True, heads="mean") -> dict:
        """Writes the JSON, the HTML report and (png=True) the heatmaps into `directory`; returns the paths."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths = {"json": self.to_json(directory / JSON_FILE), "html": write_html(self, directory / HTML_FILE)}
        if png:
            paths.update(write_pngs(self, directory, heads=heads))
        return paths


# ---- attention probabilities, recomputed beside the model's fast path -------------------------------
def attention_probs(
    attn: Attention, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rows: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Causal softmax(q k^T / sqrt(hs)) of one attention module for its input x (B, T, d) (already
    normed) -> (B, n_head, R, T) float32, for the query positions `rows` (default all T).
    Query head h reads key/value head h // (n_head // n_kv_head), as SDPA's enable_gqa does."""
    B, T, _ = x.shape
    H, KV, hs = attn.n_head, attn.n_kv_head, attn.head_dim
    rows = torch.arange(T, device=x.device) if rows is None else rows.to(x.device)
    q, k, _ = attn.qkv(x).split([H * hs, KV * hs, KV * hs], dim=-1)
    q = apply_rope(q.view(B, T, H, hs).transpose(1, 2), cos, sin)[:, :, rows]  # (B, H, R, hs)
    k = apply_rope(k.view(B, T, KV, hs).transpose(1, 2), cos, sin)  # (B, KV, T, hs)
    scores = q.float().view(B, KV, H // KV, len(rows), hs) @ k.float()[:, :, None].transpose(-2, -1)
    scores = scores.view(B, H, len(rows), T) / math.sqrt(hs)  # (B, H, R, T)
    future = torch.arange(T, device=x.device)[None, :] > rows[:, None]  # (R, T)
    return scores.masked_fill(future, float("-inf")).softmax(-1)


class AttentionRecorder:
    """Forward pre-hooks on the chosen blocks' attention: each full forward stores (n_head, R, T)
    weights of those layers only, for the rows asked for. Use as a context manager."""

    def __init__(self, model, layers: Sequence[int], rows: Optional[torch.Tensor] = None):
        self.model, self.layers, self.rows = model, list(layers), rows
        self.weights: dict[int, torch.Tensor] = {}
        self._handles = []

    def __enter__(self):
        for i in self.layers:
            self._handles.append(self.model.layers[i].self_attn.register_forward_pre_hook(self._hook(i)))
        return self

    def _hook(self, i: int):
        def hook(module, args):
            x, cos, sin = args[:3]
            if cos.dim() != 2:
                raise ValueError("AttentionRecorder needs a plain forward (no position_ids)")
            with torch.no_grad():
                self.weights[i] = attention_probs(module, x, cos, sin, self.rows)[0].cpu()

        return hook

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()


# ---- the logit lens -----------------------------------------------------------------------------
def logit_lens(model, hidden: Sequence[torch.Tensor]) -> torch.Tensor:
    """Hidden states (each (..., d), pre-final-norm as `forward(output_hidden_states=True)` returns
    them) -> logits (n_states, ..., vocab) through the final norm and output head. The last entry
    is the model's own logits (the same two ops)."""
    return torch.stack([model.lm_head(model.norm(h)) for h in hidden])


def _top(logprobs: torch.Tensor, k: int, pieces) -> list:
    vals, idx = logprobs.topk(min(k, logprobs.numel()))
    return [{"id": int(i), "token": pieces(int(i)), "prob": float(v.exp())} for v, i in zip(vals, idx)]


def _rank(logprobs: torch.Tensor, token: int) -> int:
    return int((logprobs > logprobs[token]).sum()) + 1


# ---- building the prompt and the sequence ---------------------------------------------------------
def _continuation_ids(tokenizer, template: str, control: str, prompt: str, prompt_ids: list,
                      continuation: Union[str, Sequence[int]]) -> list:
    """Token ids of `continuation` after the prompt, as plain text (as fine-tuning encodes an output).
    Where the template ends with the input, the tokenizer's own split of prompt + continuation when it
    keeps the prompt's tokens; else the continuation encoded on its own without a leading space."""
    if not isinstance(continuation, str):
        return [int(i) for i in continuation]
    if template.endswith("{input}"):
        joint = encode_prompt(tokenizer, template, control, prompt + continuation)
        if joint[: len(prompt_ids)] == prompt_ids:
            return joint[len(prompt_ids):]
    return tokenizer.encode_continuation(continuation, split_special_tokens=True)  # "Hel" + "lo": not "Hel" + " lo"


def token_texts(tokenizer, ids: Sequence[int]) -> list:
    """The text each id adds to the decoded sequence (byte tokens of one character: the last one
    carries it); special tokens show as their piece."""
    special = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id}
    out, prev = [], ""
    for i in range(len(ids)):
        if ids[i] in special:
            out.append(tokenizer.convert_ids_to_tokens(int(ids[i])))
            continue
        now = tokenizer.decode([t for t in ids[: i + 1] if t not in special])
        out.append(now.removeprefix(prev))
        prev = now
    return out


@torch.no_grad()
def sequence_logprobs(model, ids: Sequence[int], start: int) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t = start .. len(ids) - 1 (float32), one plain forward pass,
    the output head applied to those rows only."""
    device = model.lm_head.weight.device
    x = torch.tensor([list(ids)], device=device)
    h = model(x, apply_head=False)[0, start - 1 : -1]  # (n, d) final normed states
    logp = model.lm_head(h).float().log_softmax(-1)
    return logp.gather(-1, x[0, start:, None]).squeeze(-1).cpu()


# ---- explain --------------------------------------------------------------------------------------
@torch.no_grad()
def explain(
    model,
    tokenizer=None,
    prompt: str = "",
    control: Optional[str] = None,
    alt_control: Optional[str] = None,
    continuation: Optional[Union[str, Sequence[int]]] = None,
    max_new_tokens: int = 32,
    top_k: int = 5,
    layers: Optional[Sequence[int]] = None,
    max_attention_rows: int = 256,
    template: Optional[str] = None,
    generate_kwargs: Optional[dict] = None,
) -> Explanation:
    """Generate from (or score `continuation` after) `prompt` with `control` and explain every new token.

    model: a loaded SlimPajamaModel, or a folder / registry name (then the tokenizer loads from it too).
    control: the control signal (a control token such as "<|style:formal|>" or an instruction),
      placed by `template` (default: the model's prompt_template, else "{control}{input}").
      Attribution compares against the same prompt without it, and against `alt_control` when given
      ("" is a valid alternative: no control).
    continuation: text (or token ids) to score instead of generating `max_new_tokens` tokens.
    layers: the blocks whose attention is kept (default all; [] none; negative indices count from the end).
    max_attention_rows: sequences up to this length keep every attention row; longer ones keep only
      the rows that predicted a new token.
    generate_kwargs: passed to `model.generate` (default greedy: {"do_sample": False}).
    """
    from slimpajama.pretrained import SlimPajamaModel
    from slimpajama.tokenizer import SlimPajamaTokenizer

    name = None
    if isinstance(model, (str, os.PathLike)):
        name = str(model)
        model = SlimPajamaModel.from_pretrained(name)
        tokenizer = tokenizer or SlimPajamaTokenizer.from_pretrained(name)
    if tokenizer is None:
        raise ValueError("explain needs the tokenizer of the model (or a model folder to load both from)")
    config = model.config
    if template is None:
        template = prompt_template(model)
    check_template(template, "template")
    n_layer = config.n_layer
    layers = list(range(n_layer)) if layers is None else sorted({i % n_layer if -n_layer <= i < 0 else i for i in layers})
    bad = [i for i in layers if not 0 <= i < n_layer]
    if bad:
        raise ValueError(f"layers {bad} do not exist: the model has {n_layer} (0 .. {n_layer - 1})")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    device = model.lm_head.weight.device
    was_training = model.training
    model.eval()
    try:
        # 1. the sequence: prompt (with control) + the continuation, generated or given
        prompt_ids = encode_prompt(tokenizer, template, control or "", prompt)
        gen = {"do_sample": False, **(generate_kwargs or {})}
        if continuation is None:
            out = model.generate(torch.tensor([prompt_ids], device=device), max_new_tokens=max_new_tokens,
                                 tokenizer=tokenizer, **gen)
            new_ids = out[0, len(prompt_ids):].tolist()
            generation = {"mode": "generate", "max_new_tokens": max_new_tokens, **gen}
        else:
            new_ids = _continuation_ids(tokenizer, template, control or "", prompt, prompt_ids, continuation)
            generation = {"mode": "continuation"}
        if not new_ids:
            raise ValueError("nothing to explain: the continuation is empty (or generation stopped at once)")
        ids = prompt_ids + new_ids
        if len(ids) > config.max_seq_len:
            raise ValueError(f"prompt + continuation is {len(ids)} tokens; the model's max_seq_len is {config.max_seq_len}")
        P, S = len(prompt_ids), len(ids)
        pred = torch.arange(P - 1, S - 1)  # the positions whose output predicts each new token
        rows = torch.arange(S) if S <= max_attention_rows else pred

        # 2. one forward pass: hidden states, and attention of the chosen layers via pre-hooks
        x = torch.tensor([ids], device=device)
        with AttentionRecorder(model, layers, rows.to(device)) as rec:
            _, hidden = model(x, output_hidden_states=True, apply_head=False)
        targets = torch.tensor(new_ids)
        pieces = tokenizer.convert_ids_to_tokens
        steps = []
        chunk = max(1, 2**24 // ((n_layer + 1) * config.vocab_size))  # lens logits of <= 16M floats at a time
        for c0 in range(0, len(new_ids), chunk):
            sel = pred[c0 : c0 + chunk].to(device)
            lens = logit_lens(model, [h[0, sel] for h in hidden]).float().log_softmax(-1).cpu()  # (L+1, n, V)
            for j in range(lens.size(1)):
                t = c0 + j
                tok = int(targets[t])
                final = lens[-1, j]
                p = final.exp()
                entropy = float(-(p * final).nan_to_num().sum()) / LN2
                steps.append(Step(
                    position=P + t, token_id=tok, token=pieces(tok), text="", prob=float(p[tok]),
                    logprob=float(final[tok]), surprisal=-float(final[tok]) / LN2, entropy=entropy,
                    rank=_rank(final, tok), top=_top(final, top_k, pieces),
                    lens=[{"prob": float(lens[s, j, tok].exp()), "rank": _rank(lens[s, j], tok),
                           "top": _top(lens[s, j], top_k, pieces)} for s in range(lens.size(0))],
                ))
            del lens
        del hidden

        # 3. control attribution: the same new tokens after the prompt without / with the other control
        # (both sides through the same function, so an identical prompt gives exactly 0)
        with_c = sequence_logprobs(model, ids, P) if control is not None or alt_control is not None else None

        def attribution_vs(other: Optional[str]) -> list:
            other_ids = encode_prompt(tokenizer, template, other or "", prompt)
            if len(other_ids) + len(new_ids) > config.max_seq_len:
                raise ValueError(f"the prompt with control {other!r} + continuation exceeds max_seq_len")
            return (with_c - sequence_logprobs(model, other_ids + new_ids, len(other_ids))).tolist()

        if control is not None:
            for s, a in zip(steps, attribution_vs(None)):
                s.attribution = a
        if alt_control is not None:
            for s, a in zip(steps, attribution_vs(alt_control)):
                s.alt_attribution = a

        texts = token_texts(tokenizer, ids)
        for s in steps:
            s.text = texts[s.position]
        attention = [rec.weights[i].double().round(decimals=ROUND).tolist() for i in layers]
        return Explanation(
            prompt=prompt, control=control, alt_control=alt_control, template=template,
            text="".join(texts[P:]), ids=ids, tokens=[pieces(int(i)) for i in ids], token_texts=texts,
            prompt_length=P, steps=steps, lens_names=["embed"] + [f"layer {i}" for i in range(n_layer)],
            attention_layers=layers, attention_rows=rows.tolist(), attention=attention,
            model={"name": name, "n_layer": n_layer, "n_head": config.n_head, "n_kv_head": config.n_kv_head,
                   "head_dim": config.head_dim, "d_model": config.d_model, "vocab_size": config.vocab_size},
            generation=generation,
        )
    finally:
        model.train(was_training)


# ---- colours (one definition: the HTML, the PNGs and the tests use these) ---------------------------
def _mix(c0, c1, t: float) -> str:
    t = min(max(t, 0.0), 1.0)
    return "#" + "".join(f"{round(a + (b - a) * t):02x}" for a, b in zip(c0, c1))


WHITE, RED, GREEN, BLUE = (255, 255, 255), (214, 39, 40), (44, 160, 44), (70, 90, 220)


def surprisal_colors(ex: Explanation) -> tuple[list, float]:
    """A white-to-red background per step, scaled to the report's largest surprisal (bits)."""
    vmax = max([s.surprisal for s in ex.steps] + [1e-9])
    return [_mix(WHITE, RED, s.surprisal / vmax) for s in ex.steps], vmax


def attribution_colors(ex: Explanation, alt: bool = False) -> tuple[list, float]:
    """Green where the control raised the token's log-probability, blue where it lowered it, white at
    zero; scaled to the largest |attribution| (at least 0.1 nats, so noise stays pale)."""
    vals = [(s.alt_attribution if alt else s.attribution) for s in ex.steps]
    if any(v is None for v in vals):
        return [], 0.0
    vmax = max([abs(v) for v in vals] + [0.1])
    return [_mix(WHITE, GREEN if v >= 0 else BLUE, abs(v) / vmax) for v in vals], vmax


# ---- the HTML report ----------------------------------------------------------------------------
_CSS = """
body{font:15px/1.5 system-ui,-apple-system,Segoe UI,sans-serif;margin:24px;color:#222;background:#fff}
h1{font-size:20px;margin:0 0 4px} .meta{color:#666;font-size:13px;margin-bottom:12px}
.bar{display:flex;gap:16px;align-items:center;flex-wrap:wrap;margin:10px 0}
.legend{display:inline-flex;align-items:center;gap:6px;font-size:13px;color:#444}
.legend .grad{width:140px;height:12px;border:1px solid #ccc}
#text{font:18px/2.1 ui-monospace,Menlo,Consolas,monospace;white-space:pre-wrap;word-break:break-word;
 border:1px solid #ddd;border-radius:6px;padding:14px}
.tok{padding:3px 1px;border-radius:3px;cursor:pointer}
.tok.prompt{color:#777} .tok.step{color:#000} .tok.sel{outline:2px solid #000}
.tok.special{font-size:12px;color:#999}
#panel{margin-top:14px;display:grid;grid-template-columns:repeat(auto-fit,minmax(300px,1fr));gap:16px}
#panel section{border:1px solid #ddd;border-radius:6px;padding:10px}
#panel h2{font-size:14px;margin:0 0 6px}
table{border-collapse:collapse;font-size:13px;width:100%} td,th{padding:2px 6px;text-align:left;border-bottom:1px solid #eee}
td.num{text-align:right;font-variant-numeric:tabular-nums} .pbar{display:inline-block;height:8px;background:#4a7bd0}
.hint{color:#888;font-size:13px}
"""

_JS = r"""
(function(){
var D = JSON.parse(document.getElementById('explain-data').textContent);
var textEl = document.getElementById('text'), panel = document.getElementById('panel');
var modeSel = document.getElementById('mode'), layerSel = document.getElementById('layer'),
    headSel = document.getElementById('head');
var stepAt = {}; D.steps.forEach(function(s, i){ stepAt[s.position] = i; });
var spans = [], selected = null;
function esc(s){ return s.replace(/\n/g, '\u21b5\n'); }
D.token_texts.forEach(function(t, p){
  var sp = document.createElement('span');
  var isStep = p in stepAt;
  sp.className = 'tok ' + (isStep ? 'step' : 'prompt') + (D.special[p] ? ' special' : '');
  sp.textContent = D.special[p] ? D.tokens[p] : esc(t);
  sp.dataset.pos = p;
  if (isStep) {
    var s = D.steps[stepAt[p]];
    sp.title = s.token + '  p=' + s.prob.toFixed(4) + '  ' + s.surprisal.toFixed(2) + ' bits' +
      (s.attribution === null ? '' : '  attribution ' + s.attribution.toFixed(3));
    sp.addEventListener('mouseenter', function(){ if (selected === null) show(p); });
    sp.addEventListener('click', function(){ selected = (selected === p ? null : p); show(p); });
  }
  spans.push(sp); textEl.appendChild(sp);
});
D.modes.forEach(function(m){
  var o = document.createElement('option'); o.value = m.key; o.textContent = m.label; modeSel.appendChild(o);
});
D.attention_layers.forEach(function(l){
  var o = document.createElement('option'); o.value = l; o.textContent = 'layer ' + l; layerSel.appendChild(o);
});
var o = document.createElement('option'); o.value = 'mean'; o.textContent = 'heads: mean'; headSel.appendChild(o);
if (D.per_head) for (var hd = 0; hd < D.model.n_head; hd++) {
  o = document.createElement('option'); o.value = hd; o.textContent = 'head ' + hd; headSel.appendChild(o);
}
function colorize(){
  var m = D.modes.filter(function(x){ return x.key === modeSel.value; })[0];
  document.getElementById('legend-lo').textContent = m.lo;
  document.getElementById('legend-hi').textContent = m.hi;
  document.getElementById('legend-grad').style.background = m.gradient;
  spans.forEach(function(sp, p){
    sp.style.background = (p in stepAt) ? m.colors[stepAt[p]] : '';
  });
}
function attnRow(i){
  if (!D.attention_layers.length) return null;
  var li = D.attention_layers.indexOf(+layerSel.value), row = D.step_attention[li][i];
  return headSel.value === 'mean' ? row.mean : row.heads[+headSel.value];
}
function table(head, rows){
  return '<table><tr>' + head.map(function(h){ return '<th>' + h + '</th>'; }).join('') + '</tr>' +
    rows.map(function(r){ return '<tr>' + r.join('') + '</tr>'; }).join('') + '</table>';
}
function h(s){ var d = document.createElement('div'); d.textContent = s; return d.innerHTML; }
function tokCell(t){ return '<td><code>' + h(t.replace(/\n/g, '\\n')) + '</code></td>'; }
function pcell(p){ return '<td class="num">' + p.toFixed(4) + ' <span class="pbar" style="width:' +
  Math.round(60 * p) + 'px"></span></td>'; }
function show(p){
  colorize();
  spans.forEach(function(sp){ sp.classList.remove('sel'); sp.style.boxShadow = ''; });
  var i = stepAt[p], s = D.steps[i];
  spans[p].classList.add('sel');
  var att = attnRow(i);
  if (att) att.forEach(function(w, k){ if (k < p && w > 0.01)
    spans[k].style.boxShadow = 'inset 0 -' + Math.max(2, Math.round(12 * w)) + 'px 0 rgba(255,140,0,' +
      Math.min(1, 0.25 + w) + ')'; });
  var out = '<section><h2>token ' + h(JSON.stringify(s.token)) + ' at position ' + s.position + '</h2>' +
    table(['', ''], [
      ['<td>probability</td>', '<td class="num">' + s.prob.toFixed(5) + '</td>'],
      ['<td>surprisal</td>', '<td class="num">' + s.surprisal.toFixed(3) + ' bits</td>'],
      ['<td>entropy</td>', '<td class="num">' + s.entropy.toFixed(3) + ' bits</td>'],
      ['<td>rank</td>', '<td class="num">' + s.rank + '</td>']
    ].concat(s.attribution === null ? [] : [['<td>control attribution</td>', '<td class="num">' +
      s.attribution.toFixed(4) + ' nats</td>']]).concat(s.alt_attribution === null ? [] :
      [['<td>vs alt control</td>', '<td class="num">' + s.alt_attribution.toFixed(4) + ' nats</td>']])) +
    '</section><section><h2>top ' + s.top.length + ' alternatives</h2>' +
    table(['token', 'probability'], s.top.map(function(t){ return [tokCell(t.token), pcell(t.prob)]; })) +
    '</section><section><h2>logit lens</h2>' +
    table(['state', 'p(token)', 'rank', 'top'], s.lens.map(function(l, j){
      return ['<td>' + D.lens_names[j] + '</td>', pcell(l.prob), '<td class="num">' + l.rank + '</td>',
        tokCell(l.top[0].token)];
    })) + '</section>' + (att ? '<section><h2>attention (layer ' + layerSel.value + ', ' +
      headSel.options[headSel.selectedIndex].text + ')</h2><p class="hint">orange underline on earlier ' +
      'tokens: the weight position ' + (p - 1) + ' gave them when it predicted this token</p>' +
      table(['token', 'weight'], att.map(function(w, k){ return [k, w]; }).filter(function(x){
        return x[0] < p; }).sort(function(a, b){ return b[1] - a[1]; }).slice(0, 8).map(function(x){
        return [tokCell(D.token_texts[x[0]] + ' @' + x[0]), pcell(x[1])]; })) + '</section>' : '');
  panel.innerHTML = out;
}
[modeSel, layerSel, headSel].forEach(function(el){ el.addEventListener('change', function(){
  var p = selected !== null ? selected : D.steps[0].position; show(p); }); });
var wanted = (location.hash || '').replace('#', '');
if (D.modes.some(function(m){ return m.key === wanted; })) modeSel.value = wanted;
show(D.steps[0].position);
selected = null;
document.body.setAttribute('data-rendered', String(spans.length));
})();
"""


def _html_data(ex: Explanation) -> dict:
    """What the page's script reads: the explanation without the full attention matrices, plus the
    colours of each mode and, per step and kept layer, the attention row that predicted it."""
    modes = []
    colors, vmax = surprisal_colors(ex)
    modes.append({"key": "surprisal", "label": "colour: surprisal", "colors": colors, "lo": "0 bits",
                  "hi": f"{vmax:.2f} bits", "gradient": f"linear-gradient(90deg,{_mix(WHITE, RED, 0)},{_mix(WHITE, RED, 1)})"})
    for alt, key, label in ((False, "attribution", "colour: control attribution"),
                            (True, "alt_attribution", "colour: attribution vs alt control")):
        colors, vmax = attribution_colors(ex, alt)
        if colors:
            modes.append({"key": key, "label": label, "colors": colors, "lo": f"-{vmax:.2f} nats",
                          "hi": f"+{vmax:.2f} nats",
                          "gradient": f"linear-gradient(90deg,{_mix(WHITE, BLUE, 1)},#ffffff,{_mix(WHITE, GREEN, 1)})"})
    S = len(ex.ids)
    per_head = len(ex.steps) * len(ex.attention_layers) * ex.model.get("n_head", 1) * S <= MAX_HTML_ATTENTION
    row_of = {r: i for i, r in enumerate(ex.attention_rows)}
    step_attention = []
    for li in range(len(ex.attention_layers)):
        a = torch.tensor(ex.attention[li])  # (H, R, S)
        layer_rows = []
        for s in ex.steps:
            row = a[:, row_of[s.position - 1]]  # (H, S): the query that predicted the token
            entry = {"mean": [round(v, 4) for v in row.mean(0).tolist()]}
            if per_head:
                entry["heads"] = [[round(v, 4) for v in r] for r in row.tolist()]
            layer_rows.append(entry)
        step_attention.append(layer_rows)
    special = [t in SPECIAL_TOKENS.values() for t in ex.tokens]  # unk, bos, eos, pad: shown small
    d = {k: v for k, v in ex.to_dict().items() if k != "attention"}
    d.update(modes=modes, step_attention=step_attention, per_head=per_head, special=special)
    return d


def render_html(ex: Explanation) -> str:
    """One self-contained page (inline CSS and JS, no network): the text with its new tokens coloured
    by surprisal or control attribution (a selector; `#attribution` in the URL picks it), hover or
    click a token for its top-k, logit lens and attention."""
    data = json.dumps(_html_data(ex), ensure_ascii=False, allow_nan=False)
    data = data.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")  # inert in <script>
    title = f"explain: {ex.prompt[:60]}"
    meta = (f"model {html.escape(str(ex.model.get('name') or 'in memory'))} · {ex.model.get('n_layer')} layers, "
            f"{ex.model.get('n_head')} heads · control {html.escape(repr(ex.control))}"
            + (f" · alt control {html.escape(repr(ex.alt_control))}" if ex.alt_control is not None else "")
            + f" · {len(ex.steps)} new tokens ({html.escape(ex.generation.get('mode', ''))})")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{_CSS}</style></head>
<body>
<h1>Why the model wrote this</h1>
<div class="meta">{meta}</div>
<div class="bar">
 <select id="mode"></select>
 <span class="legend"><span id="legend-lo"></span><span class="grad" id="legend-grad"></span><span id="legend-hi"></span></span>
 <select id="layer"></select><select id="head"></select>
 <span class="hint">grey: prompt · hover a new token, click to pin it</span>
</div>
<div id="text"></div>
<div id="panel"></div>
<script type="application/json" id="explain-data">{data}</script>
<script>{_JS}</script>
</body></html>
"""


def write_html(ex: Explanation, path: Union[str, os.PathLike]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(render_html(ex), encoding="utf-8")
    tmp.replace(path)
    return path


# ---- PNG heatmaps -------------------------------------------------------------------------------
def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - matplotlib is a dependency
        raise ImportError("the PNG heatmaps need matplotlib (pip install matplotlib)") from e
    return plt


def _label(ex: Explanation, p: int) -> str:
    t = ex.token_texts[p].replace("\n", "\\n")
    if not t.isprintable() or "\ufffd" in t:  # a control character or a partial UTF-8 byte: show the piece
        t = ex.tokens[p]
    return (t if t.strip() else repr(t))[:12]


def write_pngs(ex: Explanation, directory: Union[str, os.PathLike], heads="mean") -> dict:
    """logit_lens.png (p(token) per hidden state and new token, the lens' top-1 written in when it
    fits), tokens.png (surprisal and attribution per new token) and attention_layer<i>.png (rows:
    the kept query positions; heads averaged, or one panel per chosen head)."""
    with warnings.catch_warnings():  # a token the font lacks (CJK, say) draws as a box: not worth a warning
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        return _write_pngs(_pyplot(), ex, Path(directory), heads)


def _write_pngs(plt, ex: Explanation, directory: Path, heads) -> dict:
    paths = {}
    n = len(ex.steps)
    labels = [_label(ex, s.position) for s in ex.steps]

    fig, ax = plt.subplots(figsize=(min(max(6, 2 + 0.45 * n), 40), 1.6 + 0.4 * len(ex.lens_names)))
    grid = [[s.lens[j]["prob"] for s in ex.steps] for j in range(len(ex.lens_names))]
    im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1, origin="lower")
    if n <= 40:
        for j in range(len(ex.lens_names)):
            for i, s in enumerate(ex.steps):
                top = s.lens[j]["top"][0]["token"].replace("\u2581", " ")[:6]
                ax.text(i, j, top, ha="center", va="center", fontsize=6, color="w" if grid[j][i] < 0.5 else "k")
    ax.set_yticks(range(len(ex.lens_names)), ex.lens_names)
    ax.set_xticks(range(n), labels, rotation=90, fontsize=7)
    ax.set_title("logit lens: p(written token) per hidden state\n(text: that state's top-1)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    paths["lens_png"] = directory / "logit_lens.png"
    fig.savefig(paths["lens_png"], dpi=110)
    plt.close(fig)

    rows = 1 + (ex.steps[0].attribution is not None) + (ex.steps[0].alt_attribution is not None)
    fig, axes = plt.subplots(rows, 1, figsize=(min(max(6, 2 + 0.45 * n), 40), 2.2 * rows), squeeze=False)
    axes[0, 0].bar(range(n), [s.surprisal for s in ex.steps], color=surprisal_colors(ex)[0], edgecolor="#555")
    axes[0, 0].set_ylabel("surprisal (bits)")
    r = 1
    for alt, name in ((False, "attribution (nats)"), (True, "vs alt control (nats)")):
        vals = [(s.alt_attribution if alt else s.attribution) for s in ex.steps]
        if vals[0] is None:
            continue
        axes[r, 0].bar(range(n), vals, color=attribution_colors(ex, alt)[0], edgecolor="#555")
        axes[r, 0].axhline(0, color="k", lw=0.6)
        axes[r, 0].set_ylabel(name)
        r += 1
    for a in axes[:, 0]:
        a.set_xticks(range(n), labels, rotation=90, fontsize=7)
    fig.tight_layout()
    paths["tokens_png"] = directory / "tokens.png"
    fig.savefig(paths["tokens_png"], dpi=110)
    plt.close(fig)

    keys = list(range(len(ex.ids)))
    for li, layer in enumerate(ex.attention_layers):
        chosen = ["mean"] if heads == "mean" else list(heads)
        fig, axes = plt.subplots(1, len(chosen), figsize=(min(3 + 0.12 * len(keys), 30) * len(chosen) ** 0.5 + 2,
                                                        min(3 + 0.12 * len(ex.attention_rows), 30)), squeeze=False)
        for k, hsel in enumerate(chosen):
            w = ex.attention_for(layer, "mean" if hsel == "mean" else [hsel])
            ax = axes[0, k]
            ax.imshow(w, aspect="auto", cmap="magma", vmin=0, vmax=float(w.max()), interpolation="nearest")
            ax.set_title(f"layer {layer}, " + ("heads averaged" if hsel == "mean" else f"head {hsel}"))
            if len(keys) <= 80:
                ax.set_xticks(keys, [_label(ex, p) for p in keys], rotation=90, fontsize=6)
            if len(ex.attention_rows) <= 80:
                ax.set_yticks(range(len(ex.attention_rows)), [_label(ex, p) for p in ex.attention_rows], fontsize=6)
            ax.set_xlabel("key (attended) position")
            ax.set_ylabel("query position")
        fig.tight_layout()
        paths[f"attention_png_{layer}"] = directory / f"attention_layer{layer}.png"
        fig.savefig(paths[f"attention_png_{layer}"], dpi=110)
        plt.close(fig)
    return paths


# ---- W&B ----------------------------------------------------------------------------------------
def log_to_wandb(ex: Explanation, run=None, key: str = "explain", step: Optional[int] = None,
                 directory: Optional[Union[str, os.PathLike]] = None) -> dict:
    """Log the report to W&B: `<key>/report` (wandb.Html), `<key>/lens`, `<key>/tokens`,
    `<key>/attention_layer<i>` (wandb.Image) and `<key>/mean_surprisal`, `<key>/mean_attribution`.
    run: a wandb run, a Lightning WandbLogger (its `.experiment`), or None (the active `wandb.run`).
    The PNGs are written to `directory` (a temporary folder when None). Returns the logged dict."""
    import tempfile

    import wandb

    run = getattr(run, "experiment", run) or wandb.run
    if run is None:
        raise RuntimeError("log_to_wandb needs a W&B run: pass run= or call wandb.init() first")
    with tempfile.TemporaryDirectory() as tmp:
        pngs = write_pngs(ex, Path(directory or tmp))
        payload = {f"{key}/report": wandb.Html(render_html(ex), inject=False)}
        for name, path in pngs.items():
            short = name.removesuffix("_png").replace("attention_png_", "attention_layer")
            payload[f"{key}/{short}"] = wandb.Image(str(path))  # read now, before the folder goes
        payload[f"{key}/mean_surprisal"] = sum(s.surprisal for s in ex.steps) / len(ex.steps)
        if ex.steps[0].attribution is not None:
            payload[f"{key}/mean_attribution"] = sum(s.attribution for s in ex.steps) / len(ex.steps)
        run.log(payload, step=step)
    return payload


# ---- the command line ---------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="slimpajama-explain",
        description="Show why a saved model wrote what it wrote: token probabilities, logit lens, attention "
                    "and control attribution, as an HTML report, PNG heatmaps and a JSON of all numbers.")
    p.add_argument("model", nargs="?", default="slimpajama",
                   help="a model folder, or a registry name: slimpajama (the newest finished model of the furthest stage: finetune > prune > distill > pretrain), slimpajama/<stage>")
    p.add_argument("-p", "--prompt", required=True)
    p.add_argument("-c", "--control", default=None, help='a control signal such as "<|style:formal|>"')
    p.add_argument("--alt-control", default=None, help='another control value to compare with ("" : none)')
    p.add_argument("--continuation", default=None, help="score this text instead of generating")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--top-k", type=int, default=5, help="alternatives shown per token")
    p.add_argument("--layers", default="all", help='attention layers to keep: "all", "none" or e.g. "0,-1"')
    p.add_argument("--heads", default="mean", help='attention heatmaps: "mean" or heads such as "0,3"')
    p.add_argument("--max-attention-rows", type=int, default=256)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("-o", "--out", default="explain", help="output folder (default ./explain)")
    p.add_argument("--no-png", action="store_true")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def _int_list(text: str, what: str) -> list:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise SystemExit(f"slimpajama-explain: {what} must be comma-separated integers, got {text!r}") from e


def main(argv: Optional[list] = None) -> int:
    from slimpajama.cli import run_command

    return run_command("slimpajama-explain", run, build_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    from slimpajama.cli import check_control, checked_device, checked_template
    from slimpajama.pretrained import SlimPajamaModel
    from slimpajama.tokenizer import SlimPajamaTokenizer

    checked_device(args.device)
    layers = None if args.layers == "all" else [] if args.layers == "none" else _int_list(args.layers, "--layers")
    heads = "mean" if args.heads == "mean" else _int_list(args.heads, "--heads")
    tokenizer = SlimPajamaTokenizer.from_pretrained(args.model)
    check_control(tokenizer, args.model, "--control", args.control)
    check_control(tokenizer, args.model, "--alt-control", args.alt_control)
    model = SlimPajamaModel.from_pretrained(args.model, torch_dtype=args.dtype, device=args.device)
    gen = {"do_sample": args.sample or args.temperature is not None}
    if args.temperature is not None:
        gen["temperature"] = args.temperature
    if args.seed is not None:
        gen["seed"] = args.seed
    if heads != "mean" and any(not 0 <= h < model.config.n_head for h in heads):
        raise SystemExit(f"slimpajama-explain: --heads {args.heads}: the model has {model.config.n_head} heads")
    ex = explain(model, tokenizer, args.prompt, template=checked_template(model, args.model), control=args.control,
                 alt_control=args.alt_control, continuation=args.continuation, max_new_tokens=args.max_new_tokens,
                 top_k=args.top_k, layers=layers, max_attention_rows=args.max_attention_rows, generate_kwargs=gen)
    ex.model["name"] = args.model
    paths = ex.save(args.out, png=not args.no_png, heads=heads)
    out = sys.stdout
    out.write(f"{ex.prompt!r} -> {ex.text!r}\n")
    head = f"{'pos':>4}  {'token':<16} {'prob':>7} {'bits':>6}  top-1 by layer"
    attr = ex.steps[0].attribution is not None
    out.write(head + ("   attribution" if attr else "") + "\n")
    for s in ex.steps:
        lens = " ".join(layer["top"][0]["token"][:8] for layer in s.lens[1:])
        out.write(f"{s.position:>4}  {s.token[:16]!s:<16} {s.prob:7.4f} {s.surprisal:6.2f}  {lens}"
                  + (f"   {s.attribution:+.3f}" if attr else "") + "\n")
    for name, path in paths.items():
        out.write(f"{name}: {path}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
