"""Loss functions, written once and used by every stage."""

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from slimpajama.checks import is_finite_number

IGNORE_INDEX = -100


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean next-token cross-entropy over the targets that are not `ignore_index`.
    logits (B, T, V), targets (B, T); computed in float32 whatever the autocast dtype. With no target to
    count (all `ignore_index`) the loss is 0, as on the fused path, not F.cross_entropy's NaN."""
    targets = targets.flatten()
    total = F.cross_entropy(logits.flatten(0, 1).float(), targets, ignore_index=ignore_index, reduction="sum")
    return total / (targets != ignore_index).sum().clamp(min=1)


def _fused_head(h, weight, targets, chunk_rows: int, ignore_index: int, logit_grad):
    """The loop shared by the fused head losses below. For each chunk of rows, `logit_grad(s, hc, tc)`
    gives the gradient of the chunk's summed loss w.r.t. its logits (c, V) and its per-row loss terms
    (a tuple of (c,) tensors). Returns the terms averaged over the rows whose target is not
    `ignore_index`, and the gradients of that average w.r.t. h (N, d) and weight (V, d)."""
    valid = targets != ignore_index
    scale = 1.0 / valid.sum().clamp(min=1)
    safe_targets = targets.clamp(min=0)
    grad_h = torch.empty_like(h)
    grad_w = torch.zeros_like(weight)
    totals = None
    for s in range(0, h.size(0), chunk_rows):
        hc, tc, vc = h[s : s + chunk_rows], safe_targets[s : s + chunk_rows], valid[s : s + chunk_rows]
        g, terms = logit_grad(s, hc, tc)
        sums = [(t * vc).sum() for t in terms]
        totals = sums if totals is None else [a + b for a, b in zip(totals, sums)]
        # each row's weight (1 / valid rows, or 0) scales the (c, d) factors, not the (c, V) g;
        # in float32, so that a bfloat16 model rounds the scaled values once
        row_scale = (vc * scale)[:, None]
        g = g.to(h.dtype)
        torch.mm(g, weight, out=grad_h[s : s + chunk_rows]).mul_(row_scale)  # (c, d)
        grad_w.addmm_(g.t(), (hc * row_scale).to(h.dtype))  # (V, d)
    return [t * scale for t in totals], grad_h, grad_w


def _softmax_minus_onehot_(log_probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """d CE / d logits per row, built in log_probs' memory: softmax - onehot(target)."""
    g = log_probs.exp_()
    g[torch.arange(len(targets), device=g.device), targets] -= 1.0
    return g


class _LinearCrossEntropy(torch.autograd.Function):
    """Output projection + cross-entropy, a chunk of rows at a time, with the gradients computed in
    the forward pass: the (N, V) logits are never materialised whole, and neither is their gradient.
    The matmul FLOPs are the same as the plain path; what goes is two logits-sized buffers per step
    (fresh pages from the allocator each time) and a pass over them."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk_rows: int, ignore_index: int):
        # h (N, d), weight (V, d), targets (N,)
        def logit_grad(s, hc, tc):
            log_probs = torch.log_softmax((hc @ weight.t()).float(), -1)  # (c, V): one fused kernel
            ce = -log_probs.gather(1, tc[:, None]).squeeze(1)
            return _softmax_minus_onehot_(log_probs, tc), (ce,)

        (loss,), grad_h, grad_w = _fused_head(h, weight, targets, chunk_rows, ignore_index, logit_grad)
        ctx.save_for_backward(grad_h, grad_w)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out, grad_w * grad_out, None, None, None


def linear_cross_entropy(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX,
    chunk_elements: int = 1 << 21,
) -> torch.Tensor:
    """`lm_loss(h @ weight.T, targets)` without the full logits. h (B, T, d), weight (V, d), targets (B, T).

    Under autocast, or when no gradient is computed (no_grad, as in validation, or nothing requires one),
    it takes the plain path: the fused one computes the gradients in its forward."""
    grads = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    if torch.is_autocast_enabled(h.device.type) or not grads:
        return lm_loss(h @ weight.t(), targets, ignore_index)
    chunk_rows = max(128, chunk_elements // weight.size(0))
    return _LinearCrossEntropy.apply(h.flatten(0, 1), weight, targets.flatten(), chunk_rows, ignore_index)


# ---- knowledge distillation ------------------------------------------------------------------
# Notation: z_s, z_t student and teacher logits; q = softmax(z_s / T), p = softmax(z_t / T).
#   forward_kl  KL(p || q) = sum p (log p - log q)    mass-covering: the student spreads over the teacher's modes
#   reverse_kl  KL(q || p) = sum q (log q - log p)    mode-seeking (MiniLLM)
#   js          0.5 KL(p || m) + 0.5 KL(q || m), m = (p + q) / 2: symmetric, bounded by log 2
# Every divergence is multiplied by T^2 (Hinton et al. 2015): the gradient of a divergence of
# tempered softmaxes shrinks as 1/T^2, so T^2 keeps the KD term on the scale of the CE term as T
# changes. For large T, T^2 KL(p || q) -> Var(z_t - z_s) / 2, the variance taken over the vocabulary.

KD_KINDS = ("forward_kl", "reverse_kl", "js")


def check_kd_settings(temperature, kd_ratio, kind, prefix: str) -> None:
    """The KD term's settings, each error naming `<prefix>.<key>` (a stage's config keys): kind one of
    KD_KINDS, kd_ratio a finite number in [0, 1], temperature a finite number > 0 (at 0 the tempered
    logits are inf and the loss NaN)."""
    if kind not in KD_KINDS:
        raise ValueError(f"{prefix}.kind={kind!r}: one of {', '.join(KD_KINDS)}")
    for name, value in (("temperature", temperature), ("kd_ratio", kd_ratio)):
        if not is_finite_number(value):
            raise ValueError(f"{prefix}.{name}={value!r} must be a finite number")
    if not 0.0 <= kd_ratio <= 1.0:
        raise ValueError(f"{prefix}.kd_ratio={kd_ratio} must lie in [0, 1]")
    if temperature <= 0:
        raise ValueError(f"{prefix}.temperature={temperature} must be positive")


def _check_kind(kind: str) -> None:
    if kind not in KD_KINDS:
        raise ValueError(f"kind={kind!r}: the KD divergence is one of {', '.join(KD_KINDS)}")


def _divergence_rows(log_q: torch.Tensor, log_p: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-row divergence (N,) between log-probabilities log_q (student) and log_p (teacher), (N, V)."""
    if kind == "forward_kl":
        return (log_p.exp() * (log_p - log_q)).sum(-1)
    if kind == "reverse_kl":
        return (log_q.exp() * (log_q - log_p)).sum(-1)
    log_m = torch.logaddexp(log_p, log_q) - math.log(2.0)
    return 0.5 * (log_p.exp() * (log_p - log_m)).sum(-1) + 0.5 * (log_q.exp() * (log_q - log_m)).sum(-1)


def kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: Optional[torch.Tensor] = None,
    temperature: float = 1.0, kind: str = "forward_kl",
) -> torch.Tensor:
    """T^2 * divergence(teacher_T, student_T), averaged over the real tokens (`mask` True; all when None).

    logits (B, T, V) or (N, V); mask (B, T) or (N,). The teacher is detached: gradients reach the
    student only. Computed in float32. Reference implementation on whole logits; training uses
    `linear_distill_loss`, which never holds them whole."""
    _check_kind(kind)
    s = student_logits.flatten(0, -2).float() / temperature
    t = teacher_logits.detach().flatten(0, -2).float() / temperature
    rows = _divergence_rows(F.log_softmax(s, -1), F.log_softmax(t, -1), kind) * temperature**2  # (N,)
    if mask is None:
        return rows.mean()
    m = mask.flatten().to(rows.dtype)
    return (rows * m).sum() / m.sum().clamp(min=1)


def hidden_state_loss(
    student_h: torch.Tensor, teacher_h: torch.Tensor, mask: Optional[torch.Tensor] = None, kind: str = "cosine"
) -> torch.Tensor:
    """Distance between hidden states of equal width (B, T, d), averaged over the real tokens.

    cosine: 1 - cos(student, teacher) (DistilBERT's cosine embedding loss); mse: mean squared error
    per dimension. Project the student first when the widths differ. The teacher is detached."""
    s, t = student_h.float(), teacher_h.detach().float()
    if kind == "cosine":
        rows = 1.0 - F.cosine_similarity(s, t, dim=-1)
    elif kind == "mse":
        rows = (s - t).pow(2).mean(-1)
    else:
        raise ValueError(f"hidden_loss={kind!r}: one of cosine, mse (or null for none)")
    if mask is None:
        return rows.mean()
    m = mask.to(rows.dtype)
    return (rows * m).sum() / m.sum().clamp(min=1)


class DistillLoss(NamedTuple):
    loss: torch.Tensor  # kd_ratio * kd + (1 - kd_ratio) * ce: the one to back-propagate
    ce: torch.Tensor  # student cross-entropy on the labels (no gradient of its own)
    kd: torch.Tensor  # T^2 * divergence (no gradient of its own)


def _distill_chunk(hc, weight, thc, teacher_weight, tc, temperature: float, kind: str):
    """Logits of one chunk of rows -> per-row CE (c,), per-row T^2 * divergence (c,), the student
    logits (c, V) and log q, log p (c, V) at temperature T (for the gradient)."""
    z = (hc @ weight.t()).float()  # (c, V) student
    log_p = F.log_softmax((thc.to(teacher_weight.dtype) @ teacher_weight.t()).float() / temperature, -1)  # teacher
    log_q = F.log_softmax(z / temperature, -1)
    lse = z.logsumexp(-1)
    ce = lse - z.gather(1, tc[:, None]).squeeze(1)
    kd = _divergence_rows(log_q, log_p, kind) * temperature**2
    return ce, kd, z, lse, log_q, log_p


class _LinearDistill(torch.autograd.Function):
    """Both output heads, CE and the KD divergence a chunk of rows at a time, with the student's
    gradients computed in the forward pass (as `_LinearCrossEntropy`): the (N, V) logits of student
    and teacher are never whole, the student's head matmul serves CE and KD at once.

    d(T^2 D)/dz_s = T dD/du with u = z_s / T, and per row:
      forward_kl  dD/du = q - p
      reverse_kl  dD/du = q * (log q - log p - KL(q || p))
      js          dD/du = q * (log q - log m - KL(q || m)) / 2
    """

    @staticmethod
    def forward(ctx, h, weight, teacher_h, teacher_weight, targets, chunk_rows: int, temperature: float,
                kind: str, kd_ratio: float, ignore_index: int):
        # h (N, d), weight (V, d), teacher_h (N, d_t), teacher_weight (V, d_t), targets (N,)
        def logit_grad(s, hc, tc):
            ce, kd, z, lse, log_q, log_p = _distill_chunk(
                hc, weight, teacher_h[s : s + chunk_rows], teacher_weight, tc, temperature, kind)
            q = log_q.exp()
            if kind == "forward_kl":
                g_kd = q.sub_(log_p.exp_())
            elif kind == "reverse_kl":
                diff = log_q.sub_(log_p)
                g_kd = diff.sub_((q * diff).sum(-1, keepdim=True)).mul_(q)
            else:
                log_m = torch.logaddexp(log_p, log_q).sub_(math.log(2.0))
                diff = log_q.sub_(log_m)
                g_kd = diff.sub_((q * diff).sum(-1, keepdim=True)).mul_(q).mul_(0.5)
            g = _softmax_minus_onehot_(z.sub_(lse[:, None]), tc)  # z - lse: the student's log-probabilities
            g = g.mul_(1.0 - kd_ratio).add_(g_kd, alpha=kd_ratio * temperature)
            return g, (ce, kd)

        with torch.autocast(h.device.type, enabled=False):  # float32 logits and softmaxes whatever the autocast
            (ce, kd), grad_h, grad_w = _fused_head(h, weight, targets, chunk_rows, ignore_index, logit_grad)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.mark_non_differentiable(ce, kd)
        return (1.0 - kd_ratio) * ce + kd_ratio * kd, ce, kd

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kd):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_loss, grad_w * grad_loss, None, None, None, None, None, None, None, None


def linear_distill_loss(
    h: torch.Tensor, weight: torch.Tensor, teacher_h: torch.Tensor, teacher_weight: torch.Tensor,
    targets: torch.Tensor, kd_ratio: float = 0.5, temperature: float = 1.0, kind: str = "forward_kl",
    ignore_index: int = IGNORE_INDEX, chunk_elements: int = 1 << 21,
) -> DistillLoss:
    """`kd_ratio * kd_loss(h @ weight.T, teacher_h @ teacher_weight.T) + (1 - kd_ratio) * lm_loss(h @ weight.T)`
    without the logits of either model whole. h (B, T, d), weight (V, d); teacher_h (B, T, d_t),
    teacher_weight (V, d_t); targets (B, T), `ignore_index` marks padding (left out of both terms).

    Gradients go to h and weight only (the teacher gets none). Without any gradient to compute
    (validation) the same chunks are evaluated under no_grad."""
    _check_kind(kind)
    if teacher_weight.size(0) != weight.size(0):
        raise ValueError(f"teacher vocabulary {teacher_weight.size(0)} != student vocabulary {weight.size(0)}")
    if not 0.0 <= kd_ratio <= 1.0:
        raise ValueError(f"kd_ratio={kd_ratio} must lie in [0, 1]")
    # hidden states in their head's dtype: under autocast a bf16 h would meet a float32 weight
    h2, th2 = h.flatten(0, 1).to(weight.dtype), teacher_h.detach().flatten(0, 1).to(teacher_weight.dtype)
    t2 = targets.flatten()
    chunk_rows = max(128, chunk_elements // weight.size(0))
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        loss, ce, kd = _LinearDistill.apply(
            h2, weight, th2, teacher_weight.detach(), t2, chunk_rows, float(temperature), kind, float(kd_ratio),
            ignore_index)
        return DistillLoss(loss, ce, kd)
    with torch.no_grad(), torch.autocast(h.device.type, enabled=False):
        valid = t2 != ignore_index
        ce_total = kd_total = torch.zeros((), dtype=torch.float32, device=h.device)
        for s in range(0, h2.size(0), chunk_rows):
            vc = valid[s : s + chunk_rows]
            ce, kd, *_ = _distill_chunk(h2[s : s + chunk_rows], weight, th2[s : s + chunk_rows], teacher_weight,
                                        t2[s : s + chunk_rows].clamp(min=0), temperature, kind)
            ce_total, kd_total = ce_total + (ce * vc).sum(), kd_total + (kd * vc).sum()
        n = valid.sum().clamp(min=1)
        ce, kd = ce_total / n, kd_total / n
    return DistillLoss((1.0 - kd_ratio) * ce + kd_ratio * kd, ce, kd)
