"""The optimizer side of training: AdamW written out, a warm-up + cosine learning-rate schedule,
global gradient-norm clipping, and the usual weight-decay parameter groups."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn


class AdamW(torch.optim.Optimizer):
    """Adam with decoupled weight decay (Loshchilov & Hutter, 2019), one readable loop per parameter.

    Per parameter `p` with gradient `g` at step `t` (counting from 1):

        p   <- p - lr * weight_decay * p          (decay: pulls weights to 0, independent of g)
        m   <- beta1 * m + (1 - beta1) * g        (first moment: a running mean of g)
        v   <- beta2 * v + (1 - beta2) * g**2     (second moment: a running mean of g**2)
        m_hat = m / (1 - beta1**t)                (undo the bias towards the zero initial state)
        v_hat = v / (1 - beta2**t)
        p   <- p - lr * m_hat / (sqrt(v_hat) + eps)

    The arithmetic is ordered as in `torch.optim.AdamW`, so both give the same numbers.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
    ) -> None:
        if not lr >= 0.0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if len(betas) != 2 or not all(0.0 <= beta < 1.0 for beta in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")
        if not eps > 0.0:
            raise ValueError(f"eps must be > 0, got {eps}")
        if not weight_decay >= 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Update every parameter that has a gradient; returns the closure's loss if one is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, weight_decay, eps = group["lr"], group["weight_decay"], group["eps"]
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise TypeError("AdamW does not support sparse gradients")
                grad = param.grad
                state = self.state[param]
                if not state:
                    # The step count is a tensor (as in torch.optim) so the whole state saves as tensors.
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["step"] += 1
                step = state["step"].item()
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]

                param.mul_(1.0 - lr * weight_decay)  # decoupled: not part of the gradient statistics
                exp_avg.lerp_(grad, 1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)

                bias_correction1 = 1.0 - beta1**step
                bias_correction2_sqrt = math.sqrt(1.0 - beta2**step)
                denom = exp_avg_sq.sqrt().div_(bias_correction2_sqrt).add_(eps)  # one temporary, not two
                param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)
        return loss


def cosine_schedule(step: int, max_lr: float, min_lr: float, warmup_steps: int, cosine_steps: int) -> float:
    """Learning rate at `step`: linear warm-up 0 -> max_lr over `warmup_steps`, cosine decay to min_lr
    at step `cosine_steps` (counted from 0, warm-up included), then flat at min_lr."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if cosine_steps < warmup_steps:
        raise ValueError(f"cosine_steps ({cosine_steps}) must be >= warmup_steps ({warmup_steps})")
    if not 0.0 <= min_lr <= max_lr:
        raise ValueError(f"need 0 <= min_lr <= max_lr, got min_lr={min_lr}, max_lr={max_lr}")
    if step < warmup_steps:
        return max_lr * step / warmup_steps
    if step <= cosine_steps and cosine_steps > warmup_steps:
        progress = (step - warmup_steps) / (cosine_steps - warmup_steps)  # 0 -> 1
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)
    return min_lr


@torch.no_grad()
def grad_norm(params: Iterable[Tensor]) -> Tensor:
    """The global L2 norm of all gradients of `params` together (a 0-d tensor; 0 when there are none)."""
    grads = [param.grad for param in params if param.grad is not None]
    return _global_norm(grads) if grads else torch.tensor(0.0)


def _global_norm(tensors: list[Tensor]) -> Tensor:
    # Norm of the per-tensor norms = norm of all entries as one long vector.
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in tensors]))


def clip_grad_norm(params: Iterable[Tensor], max_norm: float) -> Tensor:
    """Scale all gradients together so their global L2 norm is at most `max_norm`; returns the norm
    before clipping (a 0-d tensor). Same numbers as `torch.nn.utils.clip_grad_norm_`."""
    if not max_norm > 0.0:
        raise ValueError(f"max_norm must be > 0, got {max_norm}")
    grads = [param.grad for param in params if param.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    total_norm = _global_norm(grads)
    # Multiply even when no clipping is needed (factor 1.0): no data-dependent branch, no device sync.
    # The 1e-6 keeps the factor finite for an all-zero gradient.
    scale = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
    for grad in grads:
        grad.mul_(scale.to(grad.device))
    return total_norm


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split `model`'s parameters into a decayed group (weight matrices) and an undecayed one
    (embeddings, norm gains, biases: anything 1-D or owned by an nn.Embedding)."""
    if not weight_decay >= 0.0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    embedding_params = {
        id(param)
        for module in model.modules()
        if isinstance(module, nn.Embedding)
        for param in module.parameters()
    }
    decay, no_decay = [], []
    # named_parameters() lists a tied (shared) weight once, so it lands in exactly one group.
    for _, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim < 2 or id(param) in embedding_params:
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
