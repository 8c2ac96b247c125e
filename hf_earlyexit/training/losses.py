"""The losses of head training and the agreement they are judged by (see `train.py` for eq. 1).

`head_loss` and `sparse_head_loss` take a head's logits; `linear_topk_loss` takes a shared or context head's
features and multiplies them with the frozen LM head's rows itself, a slice of positions at a time, so the training
step's largest tensors (`(batch, seq, head_vocab)` logits, their float32 copy and their softmax) never exist whole.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from ..modeling.heads_earlyexit import ExitHead, SharedHead
from ..modeling.products_earlyexit import kept
from .features import SparseTargets


def head_loss(logits: Tensor, target: Tensor, mask: Tensor, lam: float, kind: str) -> tuple[Tensor, Tensor]:
    """Eq. 1 for one head. `logits`, `target` `(batch, seq, head_vocab)`, `mask` `(batch, seq)`.

    Returns:
        `(loss, entropy)`: the masked mean loss (scalar) and the head's entropy per position `(batch, seq)`.
    """
    logp = F.log_softmax(logits.float(), dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)  # (batch, seq)
    cross = -(target * logp).sum(-1)  # (batch, seq)
    if kind == "kl":
        cross = cross + (target * target.clamp(min=1e-30).log()).sum(-1)  # CE - H(target)
    per_token = (1.0 - lam) * cross - lam * entropy
    weight = mask.to(per_token.dtype)
    return (per_token * weight).sum() / weight.sum().clamp(min=1.0), entropy


class _TopKCrossEntropy(torch.autograd.Function):
    """`logsumexp(logits) - Σ w·logits[classes]` per position, i.e. the cross-entropy of `log_softmax(logits)`
    against weights `w` summing to 1 on `classes`, with the gradient written in one buffer
    (`softmax(logits) - scatter(w)`): no log-softmax, exp or gather tensors of `(batch, seq, head_vocab)` kept for
    the backward pass (the training step's largest tensors)."""

    @staticmethod
    def forward(ctx, logits: Tensor, classes: Tensor, weights: Tensor) -> Tensor:
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # (batch, seq, 1)
        ctx.save_for_backward(logits, lse, classes, weights)
        return lse.squeeze(-1) - (weights * logits.gather(-1, classes)).sum(-1)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        logits, lse, classes, weights = ctx.saved_tensors
        out = torch.sub(logits, lse).exp_()  # softmax
        out.scatter_add_(-1, classes, -weights.to(out.dtype))
        return out.mul_(grad.unsqueeze(-1)), None, None


def sparse_head_loss(logits: Tensor, head: ExitHead, target: SparseTargets, mask: Tensor, lam: float,
                     with_entropy: bool = True) -> tuple[Tensor, Tensor | None]:
    """Eq. 1 against the model's top-k tokens renormalised (top-k distillation). `logits` `(batch, seq, head_vocab)`;
    `target` ids / log-probs `(batch, seq, k)`, full-vocabulary ids mapped to the head's classes (tokens outside a
    draft vocabulary to its OTHER class). Returns `(loss, entropy)` as `head_loss`; with `lam=0` the entropy is not
    part of the loss, and `with_entropy=False` skips computing it (`None`)."""
    logits = logits.float()
    classes, weights = topk_classes(head, target)
    weight = mask.to(torch.float32)
    if lam == 0.0:
        cross = _TopKCrossEntropy.apply(logits, classes, weights)  # (batch, seq)
        entropy = entropy_of(logits.detach()) if with_entropy else None
        return (cross * weight).sum() / weight.sum().clamp(min=1.0), entropy
    logp = F.log_softmax(logits, dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)  # (batch, seq)
    cross = -(weights * logp.gather(-1, classes)).sum(-1)  # (batch, seq)
    per_token = (1.0 - lam) * cross - lam * entropy
    return (per_token * weight).sum() / weight.sum().clamp(min=1.0), entropy


def topk_classes(head: ExitHead, target: SparseTargets) -> tuple[Tensor, Tensor]:
    """The top-k targets as the head's classes `(..., k)` (tokens outside a draft vocabulary: its OTHER class) and
    their weights `(..., k)`: the top-k mass renormalised."""
    return head.classes_of(target.ids), torch.softmax(target.logp.float(), dim=-1)


@torch.no_grad()
def entropy_of(logits: Tensor) -> Tensor:
    """Entropy of `softmax(logits)` per position `(...)`."""
    logp = F.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def agrees_with(head: ExitHead, logits: Tensor, top: Tensor) -> Tensor:
    """`(batch, seq)` bool: the head's top token equals the model's `top` `(batch, seq)` (an OTHER prediction never
    agrees)."""
    return head.to_token_ids(logits.argmax(-1)) == top


def agreement(head: ExitHead, logits: Tensor, model_logits: Tensor) -> Tensor:
    """`agrees_with` the model's logits `(batch, seq, vocab)`."""
    return agrees_with(head, logits, model_logits.argmax(-1))


# float32 values of one slice of logits (positions x (head_vocab + 1)): slices this small come from the allocator's
# reused heap, where a whole batch's logits (67 MB at 1,024 x 16k) are fresh pages on every step
SLICE_BYTES = 16 * 2**20


def linear_topk_loss(head: SharedHead, features: Tensor, target: SparseTargets, mask: Tensor) -> Tensor:
    """`sparse_head_loss(head.logits_from(features), head, target, mask, lam=0)[0]`, computed without the whole
    logits: a shared or context head's norm and adapter run as usual, then `LinearTopKCrossEntropy` multiplies the
    adapter's output with the frozen LM head's rows a slice of positions at a time (under autocast in its dtype,
    with the rows' cast kept between steps) and writes the gradient of the loss with respect to that output in the
    same pass. `features` `(batch, seq, hidden)`; `mask` `(batch, seq)`. Equal to the logits path up to float
    rounding (tested)."""
    normed = head.norm(features)
    adapted = head.adapt(normed)
    other = head.other(normed) if head.other is not None else None
    weight, bias = head.lm_rows()
    device = adapted.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else adapted.dtype
    classes, weights = topk_classes(head, target)
    per_position = mask.to(torch.float32)
    per_position = per_position / per_position.sum().clamp(min=1.0)
    hidden, k = adapted.shape[-1], classes.shape[-1]
    return LinearTopKCrossEntropy.apply(
        adapted.reshape(-1, hidden), None if other is None else other.reshape(-1, 1), _rows_in(head, weight, dtype),
        bias, classes.reshape(-1, k), weights.reshape(-1, k), per_position.reshape(-1), head.softcap)


def _rows_in(head: SharedHead, rows: Tensor, dtype: torch.dtype) -> Tensor:
    """`rows` cast to `dtype`, kept per head until the rows change (frozen, so autocast would cast them again on
    every step)."""
    if rows.dtype == dtype:
        return rows
    return kept(head, ("rows_in", dtype), (rows,), lambda: rows.detach().to(dtype))


class LinearTopKCrossEntropy(torch.autograd.Function):
    """`Σ_i w_i · (logsumexp(z_i) − Σ_j p_ij · z_i[c_ij])` with `z_i = softcap(x_i Wᵀ + b ⊕ o_i)` (`o_i`: the OTHER
    logit, when the head has one), over slices of positions. Each slice's logits live only inside the loop: the
    gradient `w_i · (softmax(z_i) − scatter(p_i))` (times the soft-cap's slope) is taken there and multiplied back
    through `W`, so the backward pass only scales the saved `(n, hidden)` gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, other: Tensor | None, weight: Tensor, bias: Tensor | None, classes: Tensor,
                targets: Tensor, per_position: Tensor, softcap: float | None) -> Tensor:
        n, rows = x.shape[0], weight.shape[0]
        width = rows + (other is not None)
        step = max(16, SLICE_BYTES // (4 * width))
        grad_x = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        grad_other = None if other is None else torch.empty(n, 1, dtype=torch.float32, device=x.device)
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        with torch.autocast(x.device.type, enabled=False):
            xs = x.to(weight.dtype)
            z_all = torch.empty(min(step, n), width, dtype=torch.float32, device=x.device)
            for start in range(0, n, step):
                end = min(start + step, n)
                z = z_all[: end - start]
                z[:, :rows] = F.linear(xs[start:end], weight)
                if bias is not None:
                    z[:, :rows] += bias
                if other is not None:
                    z[:, rows:] = other[start:end]
                slope = None
                if softcap:
                    capped = torch.tanh(z / softcap)
                    slope = 1.0 - capped * capped
                    torch.mul(capped, softcap, out=z)
                c, p, w = classes[start:end], targets[start:end], per_position[start:end, None]
                z_top, z_targets = z.amax(-1, keepdim=True), (p * z.gather(-1, c)).sum(-1, keepdim=True)
                grad = torch.softmax(z, dim=-1)
                lse = z_top - grad.amax(-1, keepdim=True).log()  # the top probability (>= 1/width) never underflows
                total += ((lse - z_targets) * w).sum()
                grad.scatter_add_(-1, c, -p).mul_(w)
                if slope is not None:
                    grad.mul_(slope)
                grad_x[start:end] = grad[:, :rows].to(weight.dtype) @ weight
                if grad_other is not None:
                    grad_other[start:end] = grad[:, rows:]
        ctx.save_for_backward(grad_x, grad_other)
        ctx.dtypes = (x.dtype, None if other is None else other.dtype)
        return total

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad_x, grad_other = ctx.saved_tensors
        scaled_other = None if grad_other is None else (grad_other * grad).to(ctx.dtypes[1])
        return (grad_x * grad).to(ctx.dtypes[0]), scaled_other, None, None, None, None, None, None
