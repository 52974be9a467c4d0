"""Autoregressive decoding with the preallocated KV cache: one prefill, then one position per step."""

from typing import Optional

import torch


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    do_sample: bool = True,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """logits (B, V) -> next ids (B,). Greedy when do_sample is False or temperature is 0."""
    if not do_sample or temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        # keep the smallest set of tokens whose probability reaches top_p; e.g. probs (0.5, 0.3, 0.2)
        # with top_p 0.7 keep the first two: a token goes when the mass *before* it already reaches 0.7
        sorted_logits, order = torch.sort(logits, descending=True)
        mass_before = sorted_logits.softmax(-1).cumsum(-1) - sorted_logits.softmax(-1)
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    max_length: Optional[int] = None,
    max_new_tokens: Optional[int] = None,
    do_sample: Optional[bool] = None,
    temperature: Optional[float] = None,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    eos_token_id: Optional[int] = None,
    seed: Optional[int] = None,
    **_ignored,  # other generation_config.json keys (bos/pad ids ...) are not used here
) -> torch.Tensor:
    """Returns prompt + new ids (B, T + n). Passing temperature, top_k or top_p samples unless
    do_sample=False; with none of them decoding is greedy."""
    if do_sample is None:
        do_sample = temperature is not None or top_k is not None or top_p is not None
    temperature = 1.0 if temperature is None else temperature
    B, T = input_ids.shape
    limit = model.config.max_seq_len
    if max_new_tokens is None:
        max_new_tokens = (max_length or limit) - T
    total = min(T + max_new_tokens, limit)
    if total <= T:
        return input_ids
    generator = None
    if seed is not None:
        generator = torch.Generator(device=input_ids.device).manual_seed(seed)
    eos = model.config.eos_token_id if eos_token_id is None else eos_token_id

    was_training = model.training
    model.eval()
    model.setup_kv_cache(B, total)
    try:
        out = torch.empty(B, total, dtype=torch.long, device=input_ids.device)
        out[:, :T] = input_ids
        done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        logits = model(input_ids, input_pos=torch.arange(T, device=input_ids.device))[:, -1]
        for pos in range(T, total):
            nxt = sample_next(logits, temperature, top_k, top_p, do_sample, generator)
            nxt = torch.where(done, torch.full_like(nxt, eos), nxt)
            out[:, pos] = nxt
            done |= nxt == eos
            if done.all() or pos + 1 == total:
                return out[:, : pos + 1]
            logits = model(nxt[:, None], input_pos=torch.tensor([pos], device=input_ids.device))[:, -1]
        return out
    finally:
        model.clear_kv_cache()
        model.train(was_training)
