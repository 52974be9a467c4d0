"""Autoregressive decoding with the preallocated KV cache: one prefill, then one position per step.

`generate` follows Hugging Face's `generate` (it returns prompt + new ids, batches left-padded
prompts with an attention mask, stops at EOS or stop strings, streams through `put`/`end`
streamers) with one deliberate difference: passing `temperature`, `top_k`, `top_p` or `min_p`
samples unless `do_sample=False` is given; Hugging Face would silently decode greedily.

The logits processors run in Hugging Face's order: classifier-free guidance, repetition penalty,
no-repeat n-grams, then temperature, top-k, top-p and min-p.

Classifier-free guidance (`guidance_scale`, Hugging Face's name and formula): each step runs the
prompt and an unconditional prompt (`negative_prompt_ids`, e.g. the same prompt without its control
token) as one batch of 2B rows and samples from
`log_softmax(uncond) + guidance_scale * (log_softmax(cond) - log_softmax(uncond))`; 1 is plain
conditioning, larger values push the output further towards what the control signal changes.
"""

import functools
import inspect
import logging
import math
import queue
import statistics
import string
import time
from typing import Callable, Iterable, Optional, Sequence, Union

import torch

from slimpajama.checks import is_finite_number, is_whole_number
from slimpajama.model import (
    DECODE_KERNELS, DECODE_MAX_ROWS, Linear, check_decode_kernel, inference_without_autocast,
)
from slimpajama.tokenizer import SPACE_MARKER

SAMPLING_KEYS = ("temperature", "top_k", "top_p", "min_p")
DEFAULT_TEMPLATE = "{control}{input}"  # the prompt of a model whose generation_config.json has none
log = logging.getLogger(__name__)


def is_guided(guidance_scale: Optional[float]) -> bool:
    """Whether `generate` runs classifier-free guidance: a scale other than None or 1."""
    return guidance_scale is not None and guidance_scale != 1.0


# ---- prompts ---------------------------------------------------------------------------------------
def prompt_template(model) -> str:
    """The model's prompt template: the fine-tuning stage saves it in generation_config.json, so a
    control signal lands where training put it; other models take "{control}{input}"."""
    return (getattr(model, "generation_config", None) or {}).get("prompt_template", DEFAULT_TEMPLATE)


def check_template(template: str, key: str = "data.prompt_template") -> tuple[str, str]:
    """The template's text before and after `{input}`; `{control}` must come before `{input}`. `key`: what
    an error names (the config key, or the file the template came from)."""
    fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    if sorted(fields) != ["control", "input"] or fields.index("control") > fields.index("input"):
        raise ValueError(f"{key}={template!r} must contain {{control}} then {{input}}, once each (and no other field)")
    before, after = template.split("{input}")
    return before, after


def encode_prompt(tokenizer, template: str, control: str, text: str) -> list[int]:
    """bos + the template around `control` (control tokens kept) and `text` (encoded as plain text), as
    fine-tuning encodes its prompts. Equal to `tokenizer.encode(template.format(control=control,
    input=text))` when `text` holds no control- or special-token string (`<|...|>`, `</s>`) and the
    template puts no text right before `{input}` that could merge with it."""
    before, after = check_template(template)
    ids = tokenizer.encode(before.format(control=control))
    if len(ids) > 1:
        ids += tokenizer.encode_continuation(text, split_special_tokens=True)
    else:  # nothing before the input: it starts the text (SentencePiece's dummy prefix space)
        ids += tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)
    return ids + tokenizer.encode_continuation(after, split_special_tokens=False)


# ---- logits processors: (B, V) scores in, (B, V) scores out --------------------------------------
def seen_tokens(ids: torch.Tensor, vocab_size: int, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B, V) bool: which tokens each row of ids (B, L) holds; valid: (B, L), False at left padding,
    whose ids do not count."""
    if valid is not None:
        ids = ids.masked_fill(~valid, vocab_size)  # padding points past the vocabulary
    hit = torch.zeros(ids.size(0), vocab_size + 1, dtype=torch.bool, device=ids.device)
    return hit.scatter_(1, ids, True)[:, :-1]


def repetition_penalty_(
    scores: torch.Tensor, seen: torch.Tensor, penalty: float, valid: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """CTRL's penalty, as in HF: a seen token's logit is divided by `penalty` if positive, multiplied
    if negative. seen: (B, L) ids already in each sequence (prompt included); valid: (B, L), False at
    left padding, whose ids do not count (transformers counts them: there a batched row can differ
    from its prompt alone)."""
    hit = seen_tokens(seen, scores.size(1), valid)
    return torch.where(hit, torch.where(scores < 0, scores * penalty, scores / penalty), scores, out=scores)


def no_repeat_ngram_(
    scores: torch.Tensor, seqs: torch.Tensor, n: int, valid: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Forbid any token that would complete an n-gram already in the sequence. seqs: (B, L); valid:
    (B, L), False at left padding: an n-gram that overlaps it does not count."""
    L = seqs.size(1)
    if L < n:
        return scores
    if n == 1:
        return scores.masked_fill_(seen_tokens(seqs, scores.size(1), valid), float("-inf"))
    grams = seqs.unfold(1, n, 1)  # (B, L - n + 1, n)
    matches = (grams[:, :, :-1] == seqs[:, L - n + 1 :][:, None, :]).all(-1)  # (B, L - n + 1)
    if valid is not None:
        matches &= valid.unfold(1, n, 1).all(-1)
    rows, cols = matches.nonzero(as_tuple=True)
    scores[rows, grams[rows, cols, -1]] = float("-inf")
    return scores


def warp(
    scores: torch.Tensor,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    min_p: Optional[float] = None,
) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p filtering (filtered logits become -inf)."""
    scores = scores.float() / temperature
    if top_k is not None and 0 < top_k < scores.size(-1):
        kth = torch.topk(scores, top_k).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        # keep the smallest set of tokens whose probability reaches top_p; e.g. probs (0.5, 0.3, 0.2)
        # with top_p 0.7 keep the first two: a token goes when the mass *before* it already reaches 0.7
        sorted_scores, order = torch.sort(scores, descending=True)
        probs = sorted_scores.softmax(-1)
        mass_before = probs.cumsum(-1) - probs
        sorted_scores = sorted_scores.masked_fill(mass_before >= top_p, float("-inf"))
        scores = torch.full_like(scores, float("-inf")).scatter(-1, order, sorted_scores)
    if min_p is not None and min_p > 0:
        # keep tokens at least min_p times as likely as the most likely one
        probs = scores.softmax(-1)
        scores = scores.masked_fill(probs < min_p * probs.max(-1, keepdim=True).values, float("-inf"))
    return scores


def draw(probs: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One index per row of probs (B, n), drawn with probability probs[i] / sum(probs): the index of
    the largest probs[i] / E_i with E_i ~ Exp(1) independent (the exponential race, exact: the
    smallest of independent Exp(probs[i]) variables is the i-th with that probability). The same
    distribution as `torch.multinomial(probs, 1)` in a few small ops instead of its heavier kernel: a
    third of its time on a CPU. E is kept above 0, so that a zero probability never gives 0 / 0."""
    race = torch.empty_like(probs).exponential_(generator=generator).clamp_(min=torch.finfo(probs.dtype).tiny)
    return (probs / race).argmax(-1)


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    min_p: Optional[float] = None,
    do_sample: bool = True,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """logits (B, V) -> next ids (B,). Greedy when do_sample is False or temperature is 0."""
    if not do_sample or temperature == 0:
        return logits.argmax(dim=-1)
    if top_k is not None and 0 < top_k < logits.size(-1):
        # only the k best can be drawn: filter and sample among those k (the same distribution as
        # masking the whole vocabulary, for a fraction of the work); ties at the k-th value are cut to k
        values, candidates = torch.topk(logits.float(), top_k)  # (B, k), sorted
        probs = warp(values, temperature, None, top_p, min_p).softmax(-1)
        return candidates.gather(-1, draw(probs, generator)[:, None]).squeeze(-1)
    return draw(warp(logits, temperature, top_k, top_p, min_p).softmax(-1), generator)


# ---- streamers ------------------------------------------------------------------------------------
class TextStreamer:
    """Receives ids through `put` (the prompt first, then each new token) and `end`, and calls
    `on_text` with each new piece of text as soon as it is complete UTF-8 (byte-fallback tokens of
    one character arrive separately). Default `on_text`: print to stdout. Batch size 1, as HF's.
    The pieces add up to `tokenizer.decode` of the ids streamed (the new ids alone with skip_prompt,
    so the first loses its leading space, as in transformers' streamer and `generate`'s output)."""

    def __init__(
        self, tokenizer, skip_prompt: bool = False, skip_special_tokens: bool = True,
        on_text: Optional[Callable[[str], None]] = None,
    ):
        self.tokenizer, self.skip_prompt, self.skip_special_tokens = tokenizer, skip_prompt, skip_special_tokens
        self.prints = on_text is None
        self.on_text = on_text or (lambda text: print(text, end="", flush=True))
        self._reset()

    def _reset(self) -> None:
        self.ids: list[int] = []
        self.printed = ""
        self.prompt_seen = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _text(self) -> str:
        """Everything generated so far (after the prompt when skip_prompt)."""
        return self._decode(self.ids)

    def put(self, value: torch.Tensor) -> None:
        ids = value.reshape(-1).tolist() if isinstance(value, torch.Tensor) else list(value)
        if not self.prompt_seen:
            self.prompt_seen = True
            if self.skip_prompt:
                return
        self.ids += ids
        text = self._text()
        if text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for its other bytes
            return
        new, self.printed = text[len(self.printed) :], text
        if new:
            self.on_text(new)

    def end(self) -> None:
        text = self._text()
        if len(text) > len(self.printed):
            self.on_text(text[len(self.printed) :])
        if self.prints:
            print(flush=True)
        self._reset()


class TextIteratorStreamer(TextStreamer):
    """A streamer to iterate over in another thread while `generate` runs:

        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
        Thread(target=model.generate, args=(ids,), kwargs=dict(streamer=streamer, ...)).start()
        for text in streamer: print(text, end="")
    """

    def __init__(self, tokenizer, skip_prompt: bool = False, skip_special_tokens: bool = True, timeout=None):
        super().__init__(tokenizer, skip_prompt, skip_special_tokens, on_text=self._enqueue)
        self.queue: queue.Queue = queue.Queue()
        self.timeout = timeout

    def _enqueue(self, text: str) -> None:
        self.queue.put(text)

    def end(self) -> None:
        super().end()
        self.queue.put(None)

    def fail(self, error: BaseException) -> None:
        """`generate` raised: the text so far is handed out, then the reader's loop raises `error`."""
        super().end()
        self.queue.put(error)

    def __iter__(self):
        return self

    def __next__(self) -> str:
        text = self.queue.get(timeout=self.timeout)
        if text is None:
            raise StopIteration
        if isinstance(text, BaseException):
            raise text
        return text


# ---- stop strings -------------------------------------------------------------------------------
def continuation_ids(tokenizer) -> set[int]:
    """The ids of the byte-fallback pieces <0x80> .. <0xBF>, the bytes of a UTF-8 character after its
    first: a cut just before one splits a character. 64 look-ups (a missing piece comes back as the
    unknown token's id, which is not it)."""
    pieces = [f"<0x{b:02X}>" for b in range(0x80, 0xC0)]
    ids = tokenizer.convert_tokens_to_ids(pieces)
    return {i for i, p in zip(ids, pieces) if tokenizer.convert_ids_to_tokens(i) == p}


class StopStrings:
    """Stops a row once a stop string ends in the text of its newest token; it may begin in the tokens
    before, the prompt's included, as in transformers. Decodes only the last tokens that could hold
    the longest string: a string of n characters spans at most 4n + 1 tokens (4 byte-fallback tokens a
    character, and one that begins before it), so a match never reaches the window's first token,
    which may begin inside a character."""

    def __init__(self, strings: Union[str, Sequence[str]], tokenizer):
        if tokenizer is None:
            raise ValueError("stop_strings needs the tokenizer: generate(..., stop_strings=[...], tokenizer=tokenizer)")
        self.strings = [strings] if isinstance(strings, str) else list(strings)
        if not self.strings or not all(self.strings):
            raise ValueError(f"stop_strings={self.strings!r}: every stop string must be non-empty text")
        self.tokenizer = tokenizer
        self.window = 4 * max(len(s) for s in self.strings) + 2

    def _text(self, ids: list[int]) -> str:
        text = self.tokenizer.decode(ids, skip_special_tokens=False)
        if ids and self.tokenizer.convert_ids_to_tokens(ids[0]).startswith(SPACE_MARKER):
            text = " " + text  # decode drops the first token's space, which is in the text
        return text

    def __call__(self, ids: torch.Tensor, mask: Optional[torch.Tensor] = None, new: int = 1) -> torch.Tensor:
        """ids (B, n): each row so far, the newest token last; mask (B, n): 0 on padding, which is left
        out -> (B,) bool: a stop string ends in the text of the last `new` tokens."""
        keep = self.window + new
        rows = ids[:, -keep:].tolist()
        real = None if mask is None else mask[:, -keep:].bool().tolist()
        stopped = []
        for b, row in enumerate(rows):
            window = row if real is None else [i for i, r in zip(row, real[b]) if r]
            text = self._text(window)
            found = [s for s in self.strings if s in text]
            if not found:  # most steps: one decode
                stopped.append(False)
                continue
            # the text before the newest tokens, less a character they complete (U+FFFD until then)
            before = len(self._text(window[: max(0, len(window) - new)]).rstrip("\ufffd"))
            stopped.append(any(s in text[max(0, before - len(s) + 1) :] for s in found))
        return torch.tensor(stopped, device=ids.device)


# ---- the loop -----------------------------------------------------------------------------------
def _eos_ids(eos_token_id, default) -> list[int]:
    """The end ids as ints, from an int, a list or a tensor of ids (as transformers takes them)."""
    if eos_token_id is None:
        eos_token_id = default
    if eos_token_id is None:
        return []
    if isinstance(eos_token_id, torch.Tensor):
        return [int(i) for i in eos_token_id.flatten().tolist()]
    return [int(i) for i in eos_token_id] if isinstance(eos_token_id, Iterable) else [int(eos_token_id)]


def _check_settings(temperature: float, top_k, top_p, min_p, repetition_penalty, no_repeat_ngram_size) -> None:
    """A clear error for a setting that would otherwise decode nonsense (NaN logits, every token
    filtered) or be silently ignored, as transformers checks them."""
    if not temperature >= 0 or math.isinf(temperature):  # NaN fails both comparisons
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    if top_k is not None and (not is_whole_number(top_k) or top_k < 0):
        raise ValueError(f"top_k must be a whole number >= 0 (0: no top-k filtering), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if min_p is not None and not 0 <= min_p <= 1:
        raise ValueError(f"min_p must be in [0, 1], got {min_p}")
    if not repetition_penalty > 0 or math.isinf(repetition_penalty):
        raise ValueError(f"repetition_penalty must be a finite number > 0 (1.0: none), got {repetition_penalty}")
    if no_repeat_ngram_size < 0:
        raise ValueError(f"no_repeat_ngram_size must be >= 0 (0: off), got {no_repeat_ngram_size}")


def _with_unconditional(input_ids, attention_mask, negative_ids, negative_mask, num_return_sequences: int, pad: int):
    """One left-padded batch of the prompts (B, T) and their unconditional prompts (B, T') -> (2B, max(T, T'))."""
    if negative_ids is None:
        negative_ids = input_ids[:, -1:]  # HF's default: the last prompt token alone
    else:
        if negative_ids.dim() == 1:
            negative_ids = negative_ids[None]
        negative_ids = negative_ids.to(input_ids.device)
        if negative_mask is None:
            negative_mask = ((negative_ids != pad).cumsum(1) > 0).long()
        if num_return_sequences > 1:
            negative_ids = negative_ids.repeat_interleave(num_return_sequences, 0)
            negative_mask = negative_mask.repeat_interleave(num_return_sequences, 0)
    if negative_mask is None:
        negative_mask = torch.ones_like(negative_ids)
    if negative_ids.size(0) != input_ids.size(0):
        raise ValueError(f"negative_prompt_ids has {negative_ids.size(0)} rows for {input_ids.size(0)} prompts")
    width = max(input_ids.size(1), negative_ids.size(1))

    def left_pad(t: torch.Tensor, value: int) -> torch.Tensor:
        return torch.nn.functional.pad(t, (width - t.size(1), 0), value=value)

    ids = torch.cat([left_pad(input_ids, pad), left_pad(negative_ids, pad)])
    mask = torch.cat([left_pad(attention_mask, 0), left_pad(negative_mask.to(attention_mask), 0)])
    return ids, mask


def _inference(fn: Callable) -> Callable:
    """Run `fn` under `torch.inference_mode` (less work per op than `no_grad`: no version counters,
    no view tracking; decoding is op-bound) and hand back a normal tensor, since an inference tensor
    refuses in-place updates outside inference mode."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.inference_mode():
            out = fn(*args, **kwargs)
        return out.clone()

    return wrapper


def _ends_streamer(fn: Callable) -> Callable:
    """Call the `streamer` argument's `end` once `fn` returns, and also when it raises, at any point
    (a bad or unknown argument included): a `TextIteratorStreamer` is handed the error, which its
    reader's loop raises, where transformers' streamer leaves the reader waiting for ever."""
    names = inspect.signature(fn).parameters

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        streamer = kwargs.get("streamer")
        try:
            unknown = sorted(set(kwargs) - set(names))
            if unknown:  # a typo or another library's option (num_beams): an error, not silently ignored
                raise TypeError(f"generate() does not take {unknown} (see slimpajama.generation.generate for the options)")
            out = fn(*args, **kwargs)
        except BaseException as error:
            if hasattr(streamer, "fail"):  # ours: its reader raises the error
                streamer.fail(error)
            elif streamer is not None:  # another (transformers') streamer: ended, as on success
                streamer.end()
            raise
        if streamer is not None:
            streamer.end()
        return out

    return wrapper


def _last_logits(model, idx: torch.Tensor, start: Optional[int], **kwargs) -> torch.Tensor:
    """Logits (B, V) at the last of the positions `idx` (B, T), which go into KV-cache slots start ..
    start + T - 1 (start None: no cache, the whole prefix): the head runs on that position only."""
    return model.lm_head(model(idx, input_pos=start, apply_head=False, **kwargs)[:, -1])


def inductor_compiler() -> Optional[str]:
    """The C++ compiler torch.compile's inductor backend would build kernels with, or None."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        return get_cpp_compiler()
    except Exception:  # inductor raises its own InvalidCxxCompiler (or RuntimeError) when none is found
        return None


@functools.cache
def _compiled_last_logits() -> Callable:
    """`_last_logits` through torch.compile, built once per process. dynamic=True: the cache slot
    and the number of filled slots are symbolic, so one graph serves every step of every call
    (a new batch size compiles once more). cpp_wrapper: the graph's kernels are called from generated
    C++ rather than Python, which takes a further 15-20% off a small model's step on a CPU."""
    return torch.compile(_last_logits, dynamic=True, options={"cpp_wrapper": True})


_decode_kernels: dict = {}  # (weight shapes, batch size, threads) -> what fastest_decode_kernel measured


def fastest_decode_kernel(
    model, batch_size: int, turns: int = 10, steps: int = 8, budget_s: float = 0.25
) -> str:
    """The faster of `DECODE_KERNELS` for `model`'s decoding steps at `batch_size` on this machine,
    measured once per process for each set of weight shapes, batch size and thread count (as cuDNN's
    benchmark mode picks its convolutions).

    The race runs on a scratch KV cache: `turns` turns of `steps` steps (2 for each kernel, then more
    while `budget_s` lasts), the kernels taking turns (the blocks are kept once and the kernel
    switched). A switch slows the next 4-5 steps of either kernel by 15-30%, as each reloads what
    the other pushed out of the caches, and a generation never switches: so each kernel is timed by
    the median of its steps in the second halves of its turns, its steady state.

    Neither kernel wins on every CPU and model (docs/benchmarks.md): the row blocks can read a large
    model's weights faster, `F.linear` runs fewer ops, which wins where a step costs its ops more
    than its weight reads. A model whose steps fall back to `forward` (LoRA, hooks, bf16, autocast,
    more than `DECODE_MAX_ROWS` rows: see `Transformer.decode_step`) is not raced and gets
    "blocks"."""
    shapes = tuple(tuple(m.weight.shape) for m in model.modules() if isinstance(m, Linear))
    key = (shapes, batch_size, torch.get_num_threads())
    if key in _decode_kernels:
        return _decode_kernels[key]
    with torch.inference_mode():
        if batch_size > DECODE_MAX_ROWS or not inference_without_autocast():
            return "blocks"  # steps through forward, whose products take F.linear on either kernel
    idx = torch.zeros(batch_size, 1, dtype=torch.long, device=model.lm_head.weight.device)
    steps = min(steps, model.config.max_seq_len)
    seconds = {kernel: [] for kernel in DECODE_KERNELS}  # per step, in the second halves of the turns
    model.setup_kv_cache(batch_size, steps)
    try:
        with torch.inference_mode():
            if not model._decodes:  # what only the set-up tells: modules, hooks, dtypes, devices
                return "blocks"
            began = time.perf_counter()
            for turn in range(turns):
                if turn >= 2 * len(DECODE_KERNELS) and time.perf_counter() - began > budget_s:
                    break
                kernel = DECODE_KERNELS[turn % len(DECODE_KERNELS)]
                model.use_decode_kernel(kernel)
                for pos in range(steps):
                    start = time.perf_counter()
                    model.decode_step(idx, pos)
                    if pos >= steps // 2:
                        seconds[kernel].append(time.perf_counter() - start)
    finally:
        model.clear_kv_cache()
    _decode_kernels[key] = min(DECODE_KERNELS, key=lambda kernel: statistics.median(seconds[kernel]))
    return _decode_kernels[key]


def tokens_per_sec(model, prompt: torch.Tensor, new_tokens: int, repeats: int = 1) -> float:
    """Greedy new tokens/s of `model.generate` decoding exactly `new_tokens` (end-of-text disabled)
    after `prompt` (1, T): the best of `repeats` timed calls (the least disturbed by other processes)
    after one warm-up call, which also races the decoding kernel (`fastest_decode_kernel`)."""
    new_tokens = min(new_tokens, model.config.max_seq_len - prompt.size(1))
    if new_tokens <= 0:
        limit = model.config.max_seq_len
        raise ValueError(f"a prompt of {prompt.size(1)} tokens leaves no room in max_seq_len={limit}")
    prompt = prompt.to(next(model.parameters()).device)
    model.generate(prompt, max_new_tokens=min(4, new_tokens), do_sample=False, eos_token_id=-1)
    best = math.inf
    for _ in range(repeats):
        if prompt.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, eos_token_id=-1)
        if prompt.is_cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return new_tokens / best


@_ends_streamer
@_inference
def generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
    max_length: Optional[int] = None,
    max_new_tokens: Optional[int] = None,
    min_length: Optional[int] = None,
    min_new_tokens: Optional[int] = None,
    do_sample: Optional[bool] = None,
    temperature: Optional[float] = None,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    min_p: Optional[float] = None,
    repetition_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
    eos_token_id: Optional[Union[int, Sequence[int]]] = None,
    pad_token_id: Optional[int] = None,
    stop_strings: Optional[Union[str, Sequence[str]]] = None,
    tokenizer=None,
    num_return_sequences: int = 1,
    seed: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    streamer=None,
    use_cache: bool = True,
    compile: bool = False,
    decode_kernel: Optional[str] = None,
    guidance_scale: Optional[float] = None,
    negative_prompt_ids: Optional[torch.Tensor] = None,
    negative_prompt_attention_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """input_ids (B, T), left-padded when prompts differ in length (attention_mask 0 on padding)
    -> (B * num_return_sequences, T + n): prompt + new ids; rows that finish early are filled with
    `pad_token_id`. Greedy unless sampling is asked for (`do_sample=True`, or any of temperature,
    top_k, top_p, min_p given without `do_sample=False`); temperature 0 is greedy too. `max_new_tokens`
    wins over `max_length` (prompt included); with neither, decoding runs to the model's `max_seq_len`. Before
    `min_new_tokens` new tokens (or a length of `min_length`, prompt included) no end id is drawn,
    as in transformers; stop strings still stop.
    `use_cache=False` recomputes the whole prefix every step (for comparison only).
    `compile=True` runs each one-token step of the cached loop through `torch.compile` (the prefill
    stays eager): the elementwise work between the matmuls is fused, which is most of a small
    model's step on a CPU. The first call compiles (about 20 s on a 2-core CPU); later calls in the
    process reuse the graph, as do other prompt and output lengths.
    decode_kernel: the kernel of the eager steps' products, "blocks" or "gemm" (`DECODE_KERNELS`);
    None: `fastest_decode_kernel`, raced on the first call for each model shape and batch size
    (compiled steps: "blocks"). Both give the same results to float32 rounding.
    guidance_scale (not None or 1): classifier-free guidance against `negative_prompt_ids` (B, T'),
    left-padded like input_ids; default, as in HF, the last prompt token alone."""
    config = model.config
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if do_sample is None:
        do_sample = any(v is not None for v in (temperature, top_k, top_p, min_p))
    temperature = 1.0 if temperature is None else float(temperature)
    _check_settings(temperature, top_k, top_p, min_p, repetition_penalty, no_repeat_ngram_size)
    if decode_kernel is not None:
        check_decode_kernel(decode_kernel)
    eos = _eos_ids(eos_token_id, config.eos_token_id)
    pad = pad_token_id if pad_token_id is not None else config.pad_token_id
    if pad is None:  # as in HF, the first end id (one inside the vocabulary: -1 disables ending), else 0
        pad = next((i for i in eos if 0 <= i < config.vocab_size), None)
        if pad is None:  # no pad id at all: finished rows get 0, and no prompt token counts as padding
            pad, attention_mask = 0, attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    elif not 0 <= pad < config.vocab_size:
        raise ValueError(f"pad_token_id={pad} is outside the model's vocabulary of {config.vocab_size}")
    device = input_ids.device
    if attention_mask is None and pad in eos:  # as in transformers: a pad that is also an end id is a token
        attention_mask = torch.ones_like(input_ids)
    if attention_mask is None:  # as in transformers, every pad is padding (then refused unless on the left)
        attention_mask = (input_ids != pad).long()
    if attention_mask.dim() == 1:
        attention_mask = attention_mask[None]
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)} for input_ids of {tuple(input_ids.shape)}")
    attention_mask = attention_mask.to(device=device, dtype=torch.long)
    empty = (attention_mask == 0).all(1).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"attention_mask rows {empty} are all padding: each prompt needs at least one real token")
    if bool((attention_mask[:, -1] == 0).any()):
        raise ValueError("a prompt ends with padding: pad on the left (tokenizer(..., padding_side='left'))")
    if not is_whole_number(num_return_sequences) or num_return_sequences < 1:
        raise ValueError(f"num_return_sequences must be a whole number >= 1, got {num_return_sequences!r}")
    if num_return_sequences > 1 and (not do_sample or temperature == 0):  # temperature 0 decodes greedily too
        raise ValueError(f"num_return_sequences={num_return_sequences} with greedy decoding (do_sample=False or "
                         "temperature=0) would return identical copies: sample with a temperature above 0, as "
                         "transformers requires")
    if num_return_sequences > 1:
        input_ids = input_ids.repeat_interleave(num_return_sequences, 0)
        attention_mask = attention_mask.repeat_interleave(num_return_sequences, 0)
    if streamer is not None and input_ids.size(0) > 1:
        raise ValueError("streamer works with one sequence at a time (batch size 1, num_return_sequences 1)")
    n_rows = input_ids.size(0)  # the sequences returned; with guidance the batch also holds their unconditional twins
    prompt_len = input_ids.size(1)  # a longer negative prompt widens the batch: the returned rows drop that padding
    if guidance_scale is not None and not is_finite_number(guidance_scale):
        raise ValueError(f"guidance_scale must be a finite number (1: plain conditioning), got {guidance_scale!r}")
    guided = is_guided(guidance_scale)
    if guided:
        input_ids, attention_mask = _with_unconditional(
            input_ids, attention_mask, negative_prompt_ids, negative_prompt_attention_mask, num_return_sequences, pad
        )

    if compile and inductor_compiler() is None:
        log.warning("generate(compile=True) needs a C++ compiler for torch.compile's generated kernels and none "
                    "was found (set CXX, or install g++/clang++): decoding eagerly")
        compile = False
    B, T = input_ids.shape
    offset = T - prompt_len
    limit = config.max_seq_len
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if max_new_tokens is None and max_length is not None and max_length <= prompt_len:
        raise ValueError(f"max_length={max_length} leaves no room after a prompt of {prompt_len} tokens "
                         "(max_length counts the prompt): pass max_new_tokens instead")
    if max_new_tokens is not None and max_length is not None:
        log.warning("generate: both max_new_tokens=%d and max_length=%d are set (one may come from "
                    "generation_config.json): max_new_tokens wins, as in transformers", max_new_tokens, max_length)
    asked = max_new_tokens is not None or max_length is not None  # else: up to max_seq_len, as documented
    if max_new_tokens is None:
        max_new_tokens = max_length - prompt_len if max_length else limit - T
    min_new = max(min_new_tokens or 0, (min_length or 0) - prompt_len)  # new tokens before an end id may be drawn
    if T > limit:
        raise ValueError(f"the prompt has {T} tokens but the model's max_seq_len is {limit}")
    if asked and T + max_new_tokens > limit:
        log.warning("generate: %d new tokens asked for after a %d-token prompt, but the model's max_seq_len is %d: "
                    "at most %d new tokens", max_new_tokens, T, limit, limit - T)
    total = min(T + max_new_tokens, limit)
    if generator is None and seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    stops = StopStrings(stop_strings, tokenizer) if stop_strings else None
    eos = set(eos)
    # the end ids inside the vocabulary (eos_token_id=-1 disables ending)
    eos_index = torch.tensor([i for i in sorted(eos) if 0 <= i < config.vocab_size], dtype=torch.long, device=device)
    if streamer is not None:
        streamer.put(input_ids[:n_rows, offset:].cpu())
    if total <= T:
        return input_ids[:n_rows, offset:]

    out = torch.full((B, total), pad, dtype=torch.long, device=device)
    out[:, :T] = input_ids
    mask = torch.ones(B, total, dtype=torch.long, device=device)  # future slots are masked causally
    mask[:, :T] = attention_mask
    left_padded = bool((attention_mask == 0).any())
    # rotary positions: prompt positions skip the padding, new tokens continue from the last real one
    position_ids = torch.empty(B, total, dtype=torch.long, device=device)
    position_ids[:, :T] = (attention_mask.cumsum(1) - 1).clamp(min=0)
    position_ids[:, T:] = attention_mask.sum(1, keepdim=True) - T + torch.arange(T, total, device=device)

    def forward(start: int, end: int) -> torch.Tensor:
        """Logits (B, V) at slot end - 1, after feeding slots start .. end - 1 (all of them without cache)."""
        kwargs = {"attention_mask": mask[:, : total if use_cache else end]} if left_padded else {}
        if left_padded:
            kwargs["position_ids"] = position_ids[:, start:end]
        if not use_cache:
            return _last_logits(model, out[:, :end], None, **kwargs)
        if end - start > 1:  # the prefill
            return _last_logits(model, out[:, start:end], start, **kwargs)
        if compile:
            return _compiled_last_logits()(model, out[:, start:end], start, **kwargs)
        return model.decode_step(out[:, start:end], start, **kwargs)

    was_training = model.training
    model.eval()
    if use_cache:
        # compiled steps: a cache of max_seq_len slots whatever the call's length, since dynamo keeps
        # module buffers' shapes static (a new length would recompile); the steps attend to the
        # filled slots only, so the spare slots cost memory, not time
        if decode_kernel is None:
            decode_kernel = "blocks" if compile else fastest_decode_kernel(model, B)
        model.setup_kv_cache(B, limit if compile else total, kernel=decode_kernel)
    try:
        processed = repetition_penalty != 1.0 or no_repeat_ngram_size > 0  # the processors that read the ids
        done = torch.zeros(n_rows, dtype=torch.bool, device=device)
        some_done = False  # whether a row has finished
        logits = forward(0, T)  # the prefill
        for pos in range(T, total):
            if guided:  # rows n_rows.. are the unconditional twins of rows ..n_rows
                lp = logits.float().log_softmax(-1)
                logits = lp[n_rows:] + guidance_scale * (lp[:n_rows] - lp[n_rows:])
            real = mask[:n_rows, :pos].bool() if left_padded and processed else None  # padding does not count
            if repetition_penalty != 1.0:
                logits = repetition_penalty_(logits.float(), out[:n_rows, :pos], repetition_penalty, real)
            if no_repeat_ngram_size > 0:
                logits = no_repeat_ngram_(logits.float(), out[:n_rows, :pos], no_repeat_ngram_size, real)
            if pos - T < min_new and len(eos_index):  # too early to end
                logits = logits.float().index_fill(-1, eos_index, float("-inf"))
            nxt = sample_next(logits, temperature, top_k, top_p, min_p, do_sample, generator)
            if some_done:
                nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            out[:, pos] = nxt.repeat(2) if guided else nxt  # both twins continue with the same token
            if streamer is not None:
                streamer.put(nxt.cpu())
            if eos or stops is not None:  # one sync a step: the new ids, read in Python
                finished = [t in eos for t in nxt.tolist()] if eos else [False] * n_rows
                if stops is not None:
                    real = mask[:n_rows, : pos + 1] if left_padded else None  # padding is no text
                    stopped = stops(out[:n_rows, : pos + 1], real).tolist()
                    finished = [f or s for f, s in zip(finished, stopped)]
                if any(finished):
                    done |= torch.tensor(finished, device=device)
                    some_done = True
                    if bool(done.all()):
                        return out[:n_rows, offset : pos + 1]
            if pos + 1 == total:
                return out[:n_rows, offset : pos + 1]
            logits = forward(pos if use_cache else 0, pos + 1)  # one position per step with the cache
        return out[:n_rows, offset:]
    finally:
        if use_cache:
            model.clear_kv_cache()
        model.train(was_training)


# the options `generate` takes after (model, input_ids, attention_mask): SlimPajamaModel.generate refuses others
GENERATE_OPTIONS = frozenset(inspect.signature(generate).parameters) - {"model", "input_ids", "attention_mask"}
