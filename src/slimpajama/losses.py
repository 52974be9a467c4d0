"""Loss functions, written once and used by every stage."""

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean next-token cross-entropy over the targets that are not `ignore_index`.
    logits (B, T, V), targets (B, T); computed in float32 whatever the autocast dtype."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=ignore_index)


class _LinearCrossEntropy(torch.autograd.Function):
    """Output projection + cross-entropy, a chunk of rows at a time, with the gradients computed in
    the forward pass: the (N, V) logits are never materialised whole, and neither is their gradient.
    The matmul FLOPs are the same as the plain path; what goes is two logits-sized buffers per step
    (fresh pages from the allocator each time) and a pass over them."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk_rows: int, ignore_index: int):
        # h (N, d), weight (V, d), targets (N,)
        valid = targets != ignore_index
        scale = 1.0 / valid.sum().clamp(min=1)
        safe_targets = targets.clamp(min=0)
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros_like(weight)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for s in range(0, h.size(0), chunk_rows):
            hc, tc, vc = h[s : s + chunk_rows], safe_targets[s : s + chunk_rows], valid[s : s + chunk_rows]
            logits = (hc @ weight.t()).float()  # (c, V)
            lse = logits.logsumexp(-1)  # (c,)
            picked = logits.gather(1, tc[:, None]).squeeze(1)
            total += ((lse - picked) * vc).sum()
            # d(mean loss)/d(logits) = (softmax - onehot(target)) * valid / n_valid, built in place
            g = logits.sub_(lse[:, None]).exp_()
            g[torch.arange(len(tc), device=g.device), tc] -= 1.0
            g.mul_((vc * scale)[:, None])
            g = g.to(h.dtype)
            torch.mm(g, weight, out=grad_h[s : s + chunk_rows])  # (c, d)
            grad_w.addmm_(g.t(), hc)  # (V, d)
        ctx.save_for_backward(grad_h, grad_w)
        return total * scale

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out, grad_w * grad_out, None, None, None


def linear_cross_entropy(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX,
    chunk_elements: int = 1 << 21,
) -> torch.Tensor:
    """`lm_loss(h @ weight.T, targets)` without the full logits. h (B, T, d), weight (V, d), targets (B, T).

    Under autocast, or when nothing needs a gradient, it takes the plain path."""
    if torch.is_autocast_enabled(h.device.type) or not (h.requires_grad or weight.requires_grad):
        return lm_loss(h @ weight.t(), targets, ignore_index)
    chunk_rows = max(128, chunk_elements // weight.size(0))
    return _LinearCrossEntropy.apply(h.flatten(0, 1), weight, targets.flatten(), chunk_rows, ignore_index)
