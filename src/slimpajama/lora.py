"""LoRA (Hu et al., 2021): fine-tune a frozen model through low-rank updates of its projections.

A targeted `nn.Linear` with weight W (out x in) becomes `LoRALinear`: y = x W^T + s * (dropout(x) A^T) B^T
with A (r x in) drawn like a Linear's weight, B (out x r) zero (so training starts from the model
itself) and s = alpha / r. Everything else is frozen, except — when `trainable_rows` is given —
those rows of the input embedding and output head (the control tokens the fine-tune adds; the
other rows keep a zero gradient). `merge_lora` folds every update into its weight, W + s * B A, and
puts plain `nn.Linear`s back, so the saved model is an ordinary dense folder.

The model's fused projections (`qkv`, `gate_up`) get one adapter over their fused output: rank r
is shared by q, k and v (gate and up) rather than given to each. `lm_head` takes none: the
fine-tuning loss applies its weight directly, so an adapter there would never train.
"""

import math
from collections.abc import Sequence
from typing import Iterable, Optional

import torch
from torch import nn

from slimpajama.checks import is_finite_number, is_whole_number


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        self.base = base
        self.rank, self.scaling = rank, alpha / rank
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear initialises its weight
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.train(base.training)  # in the mode of the model it joins: no dropout in an eval-mode model
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)

    @property
    def weight(self) -> torch.Tensor:  # the frozen weight, for code that reads `module.weight`
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (self.dropout(x) @ self.lora_A.t() @ self.lora_B.t()) * self.scaling

    def delta(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        self.base.weight += self.delta().to(self.base.weight.dtype)
        return self.base


def _swap_children(model: nn.Module, pick, make) -> list[str]:
    """Replace every submodule `child` with `pick(attribute name, child)` true by `make(child)`; returns
    the replaced modules' names."""
    swapped = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if pick(child_name, child):
                setattr(module, child_name, make(child))
                swapped.append(f"{name}.{child_name}" if name else child_name)
    return swapped


LORA_KEYS = ("rank", "alpha", "dropout", "targets")
DEFAULT_TARGETS = ("qkv", "o_proj", "gate_up", "down_proj")
# the loss applies lm_head's weight itself (linear_cross_entropy) and the embedding is no nn.Linear: an
# adapter there would never train
NOT_TARGETS = ("lm_head", "embed_tokens")


def _check_target_names(targets, key: str) -> list[str]:
    """`targets` as a list of names: a non-empty list of strings, none of NOT_TARGETS."""
    if isinstance(targets, str) or not isinstance(targets, Sequence) or not all(isinstance(t, str) for t in targets):
        raise ValueError(f"{key}={targets!r} must be a list of module names, e.g. [{', '.join(DEFAULT_TARGETS)}]")
    if not targets:
        raise ValueError(f"{key} is empty: name the projections to adapt ({', '.join(DEFAULT_TARGETS)})")
    refused = sorted(set(targets) & set(NOT_TARGETS))
    if refused:
        raise ValueError(f"{key}: {refused} cannot take LoRA: the fine-tuning loss applies the output head's weight "
                         "directly and the embedding is a lookup, so an adapter there would never train (the control "
                         "tokens' rows of both train anyway)")
    return list(targets)


def lora_target_names(model: nn.Module) -> list[str]:
    """The attribute names of the model's `nn.Linear`s that can take an adapter."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                   if isinstance(m, nn.Linear) and name and name.rsplit(".", 1)[-1] not in NOT_TARGETS})


def check_lora_targets(model: nn.Module, targets: Optional[Iterable[str]], key: str = "lora.targets") -> list[str]:
    """`targets` (None: the default) checked against `model`: every name must be the attribute name of at least
    one of its `nn.Linear`s. Returns them as a list."""
    targets = _check_target_names(list(DEFAULT_TARGETS) if targets is None else targets, key)
    valid = lora_target_names(model)
    missing = [t for t in targets if t not in valid]
    if missing:
        raise ValueError(f"{key}: {missing} matched no nn.Linear of the model (valid names: {', '.join(valid)})")
    return targets


def check_lora_settings(settings: dict, key: str = "lora") -> None:
    """Refuse settings `apply_lora` cannot use, naming `key`.<setting>: unknown keys, a rank that is not
    a positive integer, an alpha that is not positive, a dropout outside [0, 1), targets that are not a
    non-empty list of names or name lm_head / embed_tokens (`check_lora_targets` checks them against a model)."""
    unknown = sorted(set(settings) - set(LORA_KEYS))
    if unknown:
        raise ValueError(f"{key}: unknown keys {unknown} (it takes enabled, {', '.join(LORA_KEYS)})")
    rank, alpha, dropout = settings.get("rank", 8), settings.get("alpha", 16.0), settings.get("dropout", 0.0)
    if not is_whole_number(rank) or rank <= 0:
        raise ValueError(f"{key}.rank={rank!r} must be a positive integer")
    if not is_finite_number(alpha) or alpha <= 0:
        raise ValueError(f"{key}.alpha={alpha!r} must be a positive number (the updates are scaled by alpha / rank)")
    if not is_finite_number(dropout) or not 0 <= dropout < 1:
        raise ValueError(f"{key}.dropout={dropout!r} must lie in [0, 1)")
    if "targets" in settings:
        _check_target_names(settings["targets"], f"{key}.targets")


def apply_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
               targets: Sequence[str] = DEFAULT_TARGETS,
               trainable_rows: Optional[Iterable[int]] = None) -> list[str]:
    """Freeze `model`, wrap every `nn.Linear` whose attribute name is in `targets` (a list of names, each
    matching at least one), and return the wrapped module names. `trainable_rows`: token ids whose
    embedding and output-head rows still train."""
    targets = set(check_lora_targets(model, targets))
    model.requires_grad_(False)
    wrapped = _swap_children(model, lambda name, child: name in targets and isinstance(child, nn.Linear),
                             lambda child: LoRALinear(child, rank, alpha, dropout))
    rows = sorted(set(trainable_rows or []))
    model._lora_row_hooks = []
    if rows:
        for weight in row_trainable_weights(model):
            weight.requires_grad_(True)
            keep = torch.zeros(weight.size(0), 1, dtype=weight.dtype, device=weight.device)
            keep[rows] = 1
            model._lora_row_hooks.append(weight.register_hook(lambda grad, keep=keep: grad * keep))
    return wrapped


def row_trainable_weights(model: nn.Module) -> list[nn.Parameter]:
    """The input embedding and output head weights (once when tied). Their frozen rows get a zero
    gradient, so they must not be weight-decayed: the optimizer puts them in a no-decay group."""
    return list({id(w): w for w in (model.embed_tokens.weight, model.lm_head.weight)}.values())


def merge_lora(model: nn.Module) -> int:
    """Fold every LoRA update into its weight and restore plain `nn.Linear`s; returns how many."""
    for hook in getattr(model, "_lora_row_hooks", []):
        hook.remove()
    model._lora_row_hooks = []
    merged = _swap_children(model, lambda name, child: isinstance(child, LoRALinear), LoRALinear.merged)
    model.requires_grad_(True)
    return len(merged)


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())
