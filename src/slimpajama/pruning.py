"""Pruning maths, torch only: masks, Wanda scores, activation statistics, structured shrinking.

Unstructured (weights stay the same shape; pruned entries become exact zeros):
- `magnitude_scores`: |W|.
- `wanda_scores`: |W_ij| * ||X_j||_2, the weight times the L2 norm of its input feature over all
  calibration tokens (Sun et al., 2023, "A Simple and Effective Pruning Approach for LLMs").
- `masks_from_scores` keeps the highest scores and compares them within a `scope`:
  `global` (all prunable weights together), `layer` (each weight matrix), `row` (each output row of
  each matrix: Wanda's comparison group).

Tie rule (what makes the achieved sparsity exact): a comparison group of n weights loses exactly
k = n * sparsity rounded half up (in decimal) of them: the k lowest scores, where equal
scores are ordered by their flat index (row-major within a matrix, matrices in model order), so a
tie at the threshold is broken by position, never by pruning more or fewer than k.

Structured (Minitron: Muralidharan et al., 2024, "Compact Language Models via Pruning and Knowledge
Distillation"): `structured_prune` ranks attention query groups (one key/value head with the query
heads that share it), MLP intermediate channels and, optionally, hidden (embedding) channels by their
activations on calibration batches, removes the same number of groups / channels from every layer
so the config stays uniform, optionally drops whole layers (`layer_importance`), and returns a new,
smaller dense model with a valid config.

Our layouts (see model.py): `self_attn.qkv.weight` is `[q (n_head*hd); k (n_kv*hd); v (n_kv*hd)]`
rows by d_model columns, query head h uses key/value head h // (n_head / n_kv); `mlp.gate_up.weight`
is `[gate (I); up (I)]` rows by d_model columns.
"""

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import replace
from decimal import ROUND_HALF_UP, Decimal

import logging

import torch
import torch.nn.functional as F
from torch import nn

from slimpajama.checks import is_finite_number
from slimpajama.model import RMSNorm, rope_cache

DEFAULT_PRUNABLE = ("layers.*.self_attn.qkv", "layers.*.self_attn.o_proj", "layers.*.mlp.gate_up", "layers.*.mlp.down_proj")
SCOPES = ("global", "layer", "row")
LAYER_METRICS = ("cosine", "loss")  # structured depth pruning's block importance (layer_importance)


# ----------------------------------------------------------------------------- which weights


log = logging.getLogger(__name__)


def prunable_modules(model: nn.Module, patterns: Sequence[str] = DEFAULT_PRUNABLE) -> dict[str, nn.Module]:
    """Modules whose name matches one of the fnmatch `patterns` (e.g. `layers.*.mlp.gate_up`), in model
    order. Linear layers (and, for magnitude pruning, embeddings); a weight shared by two modules (tied
    embeddings) is listed once, under the Linear where both match (`lm_head`: its inputs are activations,
    the embedding's are token ids). Every pattern must match something."""
    found, seen, hits = {}, {}, {p: 0 for p in patterns}  # seen: id(weight) -> the name it is listed under
    for name, module in model.named_modules():
        matched = [p for p in patterns if fnmatch.fnmatchcase(name, p)]
        if not matched:
            continue
        for p in matched:
            hits[p] += 1
        if not isinstance(module, (nn.Linear, nn.Embedding)):
            raise ValueError(f"prune.prunable: {name} (matched by {matched[0]!r}) is a {type(module).__name__}, "  # noqa: TRY004 (a config error)
                             "not a Linear or Embedding")
        first = seen.get(id(module.weight))
        if first is None:
            seen[id(module.weight)] = name
            found[name] = module
        elif isinstance(found[first], nn.Embedding) and isinstance(module, nn.Linear):
            del found[first]
            seen[id(module.weight)] = name
            found[name] = module
    missing = [p for p, n in hits.items() if n == 0]
    if missing:
        raise ValueError(f"prune.prunable: {missing} match no module of the model "
                         "(names look like 'layers.0.self_attn.qkv', 'layers.3.mlp.down_proj', 'lm_head')")
    return found


# ----------------------------------------------------------------------------- scores and masks


def n_pruned(n: int, sparsity: float) -> int:
    """How many of n weights a group loses: n * sparsity rounded half up (the tie rule's k), in decimal
    arithmetic on the sparsity as written (0.58 of 25 is 14.5, so 15; in floats it is 14.499...)."""
    return int((Decimal(repr(float(sparsity))) * n).to_integral_value(rounding=ROUND_HALF_UP))


def check_sparsity(sparsity: float, key: str = "prune.sparsity") -> None:
    if not is_finite_number(sparsity) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"{key}={sparsity!r} must be a number in [0, 1)")


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().float().abs()


def wanda_scores(weight: torch.Tensor, input_norm: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||_2. weight (out, in), input_norm (in,): the L2 norm of input feature j over all
    calibration tokens."""
    if input_norm.shape != weight.shape[1:]:
        raise ValueError(f"input norms of shape {tuple(input_norm.shape)} do not fit a weight of {tuple(weight.shape)}")
    return weight.detach().float().abs() * input_norm.float()[None, :]


def _keep_lowest_k_out(flat: torch.Tensor, k: int) -> torch.Tensor:
    """keep mask (bool) of a 1-D score vector with its k lowest scores (ties: lower index first) removed."""
    keep = torch.ones(flat.numel(), dtype=torch.bool, device=flat.device)
    if k:
        keep[torch.argsort(flat, stable=True)[:k]] = False
    return keep


def masks_from_scores(scores: dict[str, torch.Tensor], sparsity: float, scope: str = "layer") -> dict[str, torch.Tensor]:
    """Boolean keep-masks (True: kept) of the shapes of `scores`, removing exactly the tie rule's k
    lowest scores of each comparison group (`global`, `layer` or `row`; see the module docstring)."""
    check_sparsity(sparsity)
    if scope == "global":
        flat = torch.cat([s.flatten().float() for s in scores.values()])
        keep = _keep_lowest_k_out(flat, n_pruned(flat.numel(), sparsity))
        sizes = [s.numel() for s in scores.values()]
        return {name: m.view_as(s) for (name, s), m in zip(scores.items(), keep.split(sizes))}
    if scope == "layer":
        return {name: _keep_lowest_k_out(s.flatten().float(), n_pruned(s.numel(), sparsity)).view_as(s)
                for name, s in scores.items()}
    if scope == "row":
        masks = {}
        for name, s in scores.items():
            s = s.float().reshape(s.size(0), -1)  # (out, in): compared within each output row
            keep = torch.ones_like(s, dtype=torch.bool)
            k = n_pruned(s.size(1), sparsity)
            if k:
                keep.scatter_(1, torch.argsort(s, dim=1, stable=True)[:, :k], False)
            masks[name] = keep
        return masks
    raise ValueError(f"prune.scope={scope!r}: expected one of {SCOPES}")


def target_sparsity(shape: Sequence[int], sparsity: float, scope: str = "layer") -> float | None:
    """The fraction of one matrix of `shape` that `masks_from_scores` removes (the tie rule's k over a
    group's n): `layer` k(n) / n of its n weights, `row` k(m) / m of each row of m; `global` None (one k
    over all matrices together: no matrix has a target of its own). As 1 - kept / n, the way an achieved
    sparsity is counted, so a target met is the same float."""
    check_sparsity(sparsity)
    n = 1
    for d in shape:
        n *= int(d)
    if scope == "global":
        return None
    if scope in ("layer", "row"):
        n = n if scope == "layer" else n // int(shape[0])
        return 1.0 - (n - n_pruned(n, sparsity)) / n
    raise ValueError(f"prune.scope={scope!r}: expected one of {SCOPES}")


@torch.no_grad()
def apply_masks(modules: dict[str, nn.Module], masks: dict[str, torch.Tensor]) -> None:
    """Zero the pruned weights in place (and their gradients, when there are any)."""
    for name, mask in masks.items():
        w = modules[name].weight
        w.mul_(mask.to(w.dtype))
        if w.grad is not None:
            w.grad.mul_(mask.to(w.grad.dtype))


def zero_fraction(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, float], float]:
    """Per-tensor and overall fraction of exact zeros."""
    per = {name: float((t == 0).sum()) / t.numel() for name, t in tensors.items()}
    total = sum(t.numel() for t in tensors.values())
    overall = sum(per[n] * t.numel() for n, t in tensors.items()) / max(total, 1)
    return per, overall


def cubic_sparsity(step: int, final: float, initial: float = 0.0, start: int = 0, end: int = 1, every: int = 1) -> float:
    """Zhu & Gupta (2017) gradual schedule: s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt))^3 for
    t0 <= t <= t0 + n * dt, updated every `every` (dt) steps; `initial` before `start`, `final` from `end`."""
    if step < start:
        return initial
    if step >= end or end <= start:
        return final
    t = start + (step - start) // every * every
    return final + (initial - final) * (1.0 - (t - start) / (end - start)) ** 3


# ----------------------------------------------------------------------------- activations


class _StopForward(Exception):
    pass


def _inputs(batch: torch.Tensor, device) -> torch.Tensor:
    """A (B, T+1) token block -> the (B, T) model inputs (the last token is only ever a target)."""
    return batch[:, :-1].to(device=device, dtype=torch.long)


@torch.no_grad()
def input_sq_sums(model: nn.Module, batches: Iterable[torch.Tensor], modules: dict[str, nn.Module],
                  stop_after: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Sum over all calibration tokens of x_j^2 for the input x of each module (forward hooks).
    `stop_after`: a block after which the forward pass is cut short (its outputs are not needed)."""
    embeddings = [n for n, m in modules.items() if isinstance(m, nn.Embedding)]
    if embeddings:
        raise ValueError(f"{embeddings[0]} is an embedding: its inputs are token ids, not activations to measure")
    sums: dict[str, torch.Tensor] = {}

    def hook(name):
        def fn(module, args):
            x = args[0].detach().float().reshape(-1, args[0].size(-1))  # (tokens, in)
            sums[name] = sums.get(name, 0) + x.pow(2).sum(0)
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
    if stop_after is not None:
        def stop(*_):
            raise _StopForward
        handles.append(stop_after.register_forward_hook(stop))
    device = next(model.parameters()).device
    try:
        for batch in batches:
            try:
                model(_inputs(batch, device))
            except _StopForward:
                pass
    finally:
        for h in handles:
            h.remove()
    missing = set(modules) - set(sums)
    if missing:
        raise ValueError(f"no calibration activations reached {sorted(missing)} (Wanda needs Linear inputs)")
    return sums


@torch.no_grad()
def wanda_prune(model: nn.Module, batches: Sequence[torch.Tensor], modules: dict[str, nn.Module], sparsity: float,
                scope: str = "row", sequential: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Prune `modules` in place by Wanda scores. sequential: as in Wanda's code, block by block, each
    block's input statistics measured on the output of the already pruned blocks before it (for
    `global` scope all statistics come from the dense model). Returns (masks, input L2 norms)."""
    if scope == "global" or not sequential:
        norms = {n: s.sqrt() for n, s in input_sq_sums(model, batches, modules).items()}
        masks = masks_from_scores({n: wanda_scores(m.weight, norms[n]) for n, m in modules.items()}, sparsity, scope)
        apply_masks(modules, masks)
        return masks, norms
    blocks = getattr(model, "layers", [])
    groups: list[tuple[nn.Module | None, dict]] = []
    for i, block in enumerate(blocks):
        group = {n: m for n, m in modules.items() if n.startswith(f"layers.{i}.")}
        if group:
            groups.append((block, group))
    rest = {n: m for n, m in modules.items() if not any(n in g for _, g in groups)}
    if rest:
        groups.append((None, rest))
    masks, norms = {}, {}
    for block, group in groups:
        group_norms = {n: s.sqrt() for n, s in input_sq_sums(model, batches, group, stop_after=block).items()}
        group_masks = masks_from_scores({n: wanda_scores(m.weight, group_norms[n]) for n, m in group.items()},
                                        sparsity, scope)
        apply_masks(group, group_masks)
        masks.update(group_masks)
        norms.update(group_norms)
    return masks, norms


# ----------------------------------------------------------------------------- structured


@torch.no_grad()
def width_importance(model: nn.Module, batches: Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Minitron's activation-based importance, averaged over calibration tokens:
    `heads` (L, n_head): L2 norm of each head's attention output (the input of o_proj);
    `channels` (L, I): |SwiGLU activation| of each MLP intermediate channel (the input of down_proj);
    `hidden` (d,): |output| of every RMSNorm (both of each block and the final one), summed."""
    c = model.config
    L = len(model.layers)
    heads = torch.zeros(L, c.n_head)
    channels = torch.zeros(L, c.intermediate_size)
    hidden = torch.zeros(c.d_model)
    tokens = 0

    def on_attn(i):
        def fn(module, args):
            x = args[0].detach().float()
            heads[i] += x.view(*x.shape[:-1], c.n_head, c.head_dim).norm(dim=-1).flatten(0, -2).sum(0).cpu()
        return fn

    def on_mlp(i):
        def fn(module, args):
            channels[i] += args[0].detach().float().abs().flatten(0, -2).sum(0).cpu()
        return fn

    def on_norm(module, args, out):
        hidden.add_(out.detach().float().abs().flatten(0, -2).sum(0).cpu())

    handles = []
    for i, block in enumerate(model.layers):
        handles.append(block.self_attn.o_proj.register_forward_pre_hook(on_attn(i)))
        handles.append(block.mlp.down_proj.register_forward_pre_hook(on_mlp(i)))
    handles += [m.register_forward_hook(on_norm) for m in model.modules() if isinstance(m, RMSNorm)]
    device = next(model.parameters()).device
    try:
        for batch in batches:
            x = _inputs(batch, device)
            model(x)
            tokens += x.numel()
    finally:
        for h in handles:
            h.remove()
    if not tokens:
        raise ValueError("structured pruning needs at least one calibration batch (prune.calibration_batches)")
    return {"heads": heads / tokens, "channels": channels / tokens, "hidden": hidden / tokens}


@torch.no_grad()
def layer_importance(model: nn.Module, batches: Sequence[torch.Tensor], metric: str = "cosine") -> torch.Tensor:
    """(L,) importance of each block. `cosine`: mean over tokens of 1 - cos(block input, block output)
    (ShortGPT's block influence: a block that barely turns the hidden state matters little);
    `loss`: increase of the calibration loss when the block alone is skipped (Minitron's depth metric)."""
    check_layer_metric(metric)
    device = next(model.parameters()).device
    L = len(model.layers)
    if metric == "cosine":
        score, n = torch.zeros(L), 0
        for batch in batches:
            _, hidden = model(_inputs(batch, device), output_hidden_states=True)
            for i in range(L):
                score[i] += (1 - F.cosine_similarity(hidden[i].float(), hidden[i + 1].float(), dim=-1)).sum().cpu()
            n += hidden[0].shape[0] * hidden[0].shape[1]
        return score / max(n, 1)
    # metric == "loss"
    def loss() -> float:
        total = 0.0
        for batch in batches:
            batch = batch.to(device=device, dtype=torch.long)
            logits = model(batch[:, :-1])
            total += float(F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten()))
        return total / max(len(batches), 1)

    base, layers, score = loss(), model.layers, torch.zeros(L)
    try:
        for i in range(L):
            model.layers = nn.ModuleList(b for j, b in enumerate(layers) if j != i)
            score[i] = loss() - base
    finally:
        model.layers = layers
    return score


def check_layer_metric(metric: str) -> None:
    if metric not in LAYER_METRICS:
        raise ValueError(f"prune.structured.layer_metric={metric!r}: expected one of {', '.join(LAYER_METRICS)}")


_PARTS = {"heads": "query groups", "channels": "MLP channels", "hidden": "hidden channels", "layers": "blocks"}


def _n_removed(n: int, fraction: float, what: str, key: str | None = None) -> int:
    """How many of n `what` (a key of _PARTS) the fraction removes. key: the config key the fraction came
    from, when not prune.structured.<what> (heads and channels follow prune.sparsity when null)."""
    own = f"prune.structured.{what}"
    key = key or own
    check_sparsity(fraction, key)
    removed = n_pruned(n, fraction)
    if removed >= n:
        implied = "" if key == own else f" (it sets {own}, which is null)"
        raise ValueError(f"{key}={fraction}{implied} would remove all {n} {_PARTS[what]} ({fraction} * {n} rounds "
                         f"to {removed}): lower it{'' if key == own else f' or set {own}'}")
    return removed


def structured_counts(config, heads: float = 0.0, channels: float = 0.0, hidden: float = 0.0, layers: float = 0.0,
                      keys: dict[str, str] | None = None) -> dict[str, int]:
    """What `structured_prune` keeps of a model of `config`: `layers` blocks, `groups` query groups (the
    nearest count transformers loads, see `_loadable_groups`), `channels` MLP channels, `hidden` hidden
    channels. From the config alone, so a fraction that would remove everything fails before any work;
    keys: the config key each fraction came from, for the errors (default prune.structured.<part>)."""
    c, keys = config, keys or {}
    n = {"layers": c.n_layer, "heads": c.n_kv_head, "channels": c.intermediate_size, "hidden": c.d_model}
    fractions = {"layers": layers, "heads": heads, "channels": channels, "hidden": hidden}
    keep = {what: n[what] - _n_removed(n[what], f, what, keys.get(what)) for what, f in fractions.items()}
    groups = _loadable_groups(keep["heads"], c.n_head // c.n_kv_head, keep["hidden"], c.n_kv_head)
    return {"layers": keep["layers"], "groups": groups, "channels": keep["channels"], "hidden": keep["hidden"]}


def _loadable_groups(keep: int, group_size: int, d_model: int, n_groups: int) -> int:
    """transformers requires hidden_size to be a multiple of num_attention_heads: the number of kept
    query groups nearest to `keep` (more kept on a tie) for which d_model % (groups * group_size) == 0."""
    valid = [g for g in range(1, n_groups + 1) if d_model % (g * group_size) == 0]
    if not valid:
        raise ValueError(f"prune.structured.hidden keeps {d_model} hidden channels, which no number of query groups "
                         f"of {group_size} heads divides (transformers needs hidden_size to be a multiple of "
                         f"num_attention_heads): choose a fraction that keeps a multiple of {group_size}")
    return min(valid, key=lambda g: (abs(g - keep), -g))


def _top(importance: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the `keep` largest entries (ties: lower index first), in ascending order."""
    order = torch.argsort(-importance.float(), stable=True)
    return order[:keep].sort().values


def shrink(model: nn.Module, layers: Sequence[int], groups: Sequence[torch.Tensor], channels: Sequence[torch.Tensor],
           hidden: torch.Tensor) -> nn.Module:
    """A new model of the same class keeping blocks `layers` (in order), for each kept block the
    query groups `groups[j]` and MLP channels `channels[j]`, and hidden channels `hidden`."""
    c = model.config
    gs, hd = c.n_head // c.n_kv_head, c.head_dim
    n_groups, n_channels = len(groups[0]), len(channels[0])
    if any(len(g) != n_groups for g in groups) or any(len(ch) != n_channels for ch in channels):
        raise ValueError("every layer must keep the same number of query groups and channels")
    config = replace(c, n_layer=len(layers), n_kv_head=n_groups, n_head=n_groups * gs, intermediate_size=n_channels,
                     d_model=len(hidden), head_dim=hd)
    sd = model.state_dict()
    h = hidden.to(sd["norm.weight"].device)
    out = {"embed_tokens.weight": sd["embed_tokens.weight"][:, h], "norm.weight": sd["norm.weight"][h]}
    if not c.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"][:, h]
    for j, (i, g, ch) in enumerate(zip(layers, groups, channels)):
        old, new = f"layers.{i}.", f"layers.{j}."
        g, ch = g.to(h.device), ch.to(h.device)
        q_heads = (g[:, None] * gs + torch.arange(gs, device=h.device)).flatten()  # query heads of the kept groups
        q_rows = (q_heads[:, None] * hd + torch.arange(hd, device=h.device)).flatten()
        kv_rows = (g[:, None] * hd + torch.arange(hd, device=h.device)).flatten()
        q_size, kv_size = c.n_head * hd, c.n_kv_head * hd
        rows = torch.cat([q_rows, q_size + kv_rows, q_size + kv_size + kv_rows])
        out[new + "self_attn.qkv.weight"] = sd[old + "self_attn.qkv.weight"][rows][:, h]
        out[new + "self_attn.o_proj.weight"] = sd[old + "self_attn.o_proj.weight"][h][:, q_rows]
        out[new + "mlp.gate_up.weight"] = sd[old + "mlp.gate_up.weight"][torch.cat([ch, c.intermediate_size + ch])][:, h]
        out[new + "mlp.down_proj.weight"] = sd[old + "mlp.down_proj.weight"][h][:, ch]
        for norm in ("input_layernorm.weight", "post_attention_layernorm.weight"):
            out[new + norm] = sd[old + norm][h]
    with torch.device("meta"):
        small = type(model)(config)
    small.load_state_dict({k: v.clone() for k, v in out.items()}, strict=False, assign=True)
    if config.tie_embeddings:
        small.lm_head.weight = small.embed_tokens.weight
    device = out["norm.weight"].device
    small.cos, small.sin = rope_cache(config.max_seq_len, config.head_dim, config.rope_theta, device=device)
    if hasattr(model, "generation_config"):
        small.generation_config = dict(model.generation_config)
    return small.train(model.training)


@torch.no_grad()
def structured_prune(model: nn.Module, batches: Sequence[torch.Tensor], heads: float = 0.0, channels: float = 0.0,
                     hidden: float = 0.0, layers: float = 0.0, layer_metric: str = "cosine") -> tuple[nn.Module, dict]:
    """Minitron-style pruning to a smaller dense model. Fractions removed: `heads` of the query groups
    (whole groups under GQA), `channels` of the MLP intermediate channels, `hidden` of the embedding
    channels, `layers` of the blocks; each rounded half up, the same count in every layer.
    Depth first (blocks ranked by `layer_importance`), then width ranked by `width_importance` on the
    remaining blocks. Returns (new model, what was kept)."""
    check_layer_metric(layer_metric)  # even when no block is dropped: a typo is still a typo
    c = model.config
    counts = structured_counts(c, heads, channels, hidden, layers)  # before the importance passes
    n_drop, keep_groups = c.n_layer - counts["layers"], counts["groups"]
    keep_channels, keep_hidden, gs = counts["channels"], counts["hidden"], c.n_head // c.n_kv_head
    if keep_groups != c.n_kv_head - n_pruned(c.n_kv_head, heads):
        log.warning("structured pruning keeps %d query groups instead of %d: transformers needs hidden size %d "
                    "to be a multiple of the head count", keep_groups, c.n_kv_head - n_pruned(c.n_kv_head, heads),
                    keep_hidden)
    kept_layers = list(range(c.n_layer))
    if n_drop:
        score = layer_importance(model, batches, layer_metric)
        kept_layers = _top(score, c.n_layer - n_drop).tolist()
    all_layers = model.layers
    model.layers = nn.ModuleList(all_layers[i] for i in kept_layers)
    try:
        imp = width_importance(model, batches)
    finally:
        model.layers = all_layers
    group_imp = imp["heads"].view(len(kept_layers), c.n_kv_head, gs).sum(-1)  # a query group: its query heads
    groups = [_top(group_imp[j], keep_groups) for j in range(len(kept_layers))]
    chans = [_top(imp["channels"][j], keep_channels) for j in range(len(kept_layers))]
    hid = _top(imp["hidden"], keep_hidden)
    small = shrink(model, kept_layers, groups, chans, hid)
    kept = {"layers": kept_layers, "groups": [g.tolist() for g in groups], "n_channels": keep_channels,
            "n_hidden": keep_hidden}
    return small, kept


def prunable_params(model: nn.Module, patterns: Sequence[str] = DEFAULT_PRUNABLE) -> int:
    return sum(m.weight.numel() for m in prunable_modules(model, patterns).values())
