"""The optimizer side of training: AdamW and Muon written out, warm-up + cosine (or linear) learning-rate
schedules, global gradient-norm clipping, and the usual parameter groups.

* `AdamW` — one readable loop per parameter, the same numbers as `torch.optim.AdamW`;
* `newton_schulz` and `Muon` — momentum, then the update matrix orthogonalised by a few Newton–Schulz
  iterations (Jordan et al., 2024), the same numbers as `torch.optim.Muon`;
* `MuonAdamW` — the way Muon is used in practice: Muon for the blocks' weight matrices, AdamW for
  everything else (embeddings, the LM head, gains), one optimizer with one state dict;
* `param_groups` (AdamW's decay / no-decay split) and `muon_param_groups` (the three-way split), both
  from the model's own `parameter_groups()` (`TransformerLM` decides what is a matrix, not a name match).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from jaxtyping import Float
from torch import Tensor, nn

from llmbook.errors import ConfigValueError, check_float, check_int


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
        _check_hyperparameters("AdamW", lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Update every parameter that has a gradient; returns the closure's loss if one is given."""
        loss = _evaluate_closure(closure)
        for group in self.param_groups:
            lr, weight_decay, eps = group["lr"], group["weight_decay"], group["eps"]
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise TypeError("AdamW does not support sparse gradients")
                adamw_update(param, param.grad, self.state[param], lr, beta1, beta2, eps, weight_decay)
        return loss


def _evaluate_closure(closure: Callable[[], Tensor] | None) -> Tensor | None:
    # torch.optim's convention: a closure recomputes the loss (with gradients) before the update.
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def adamw_update(
    param: Tensor,
    grad: Tensor,
    state: dict,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """One AdamW step for one parameter, in place (the formulas in `AdamW`'s docstring); `state` holds
    its moments and step count and is filled on the first call."""
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


# Muon's quintic Newton–Schulz coefficients (Jordan et al., 2024; the defaults of torch.optim.Muon).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz(
    matrix: Float[Tensor, "rows cols"],
    steps: int = 5,
    coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    eps: float = 1e-7,
    dtype: torch.dtype = torch.bfloat16,
) -> Float[Tensor, "rows cols"]:
    """An approximately orthogonal matrix with `matrix`'s singular vectors: U·S'·Vᵀ with S' near 1.

    For G = U·S·Vᵀ, an odd polynomial p(X) = a·X + b·X·Xᵀ·X + c·(X·Xᵀ)²·X changes only the singular
    values: p(G) = U·p(S)·Vᵀ. Scale G so every singular value is at most 1 (dividing by the Frobenius
    norm, which bounds the largest), then apply p `steps` times: each pass pushes every singular value
    in (0, 1] towards 1. Muon's coefficients make small singular values grow as fast as possible (slope
    a = 3.4 at 0), at the price of ending in a band around 1 (about 0.7 to 1.2) rather than exactly 1.
    Computed on the wide orientation (rows <= cols), where X·Xᵀ is the smaller Gram matrix, in `dtype`
    (bfloat16, as torch.optim.Muon; float32 is far faster on CPUs without bfloat16 matrix units).
    """
    if matrix.ndim != 2:
        raise ValueError(f"newton_schulz needs a 2-D matrix, got shape {tuple(matrix.shape)}")
    if not 0 < steps < 100:
        raise ValueError(f"steps must be in 1..99, got {steps}")
    a, b, c = coefficients
    x = matrix.to(dtype)
    tall = matrix.shape[0] > matrix.shape[1]
    if tall:
        x = x.T
    x = x.div(x.norm().clamp(min=eps))  # singular values now in [0, 1]
    for _ in range(steps):
        gram = x @ x.T  # (rows, rows): X·Xᵀ
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)  # b·X·Xᵀ + c·(X·Xᵀ)²
        x = torch.addmm(x, poly, x, beta=a)  # a·X + (b·X·Xᵀ + c·(X·Xᵀ)²)·X
    return x.T if tall else x


def muon_lr_scale(shape: torch.Size | tuple[int, ...], adjust_lr_fn: str | None) -> float:
    """How much Muon scales the learning rate for a (rows, cols) matrix.

    An orthogonal update has root-mean-square entry 1/√max(rows, cols), whatever the gradient's size.
    "original" (Jordan's, the default) multiplies by √max(1, rows/cols); "match_rms_adamw" (Moonshot's,
    Liu et al., 2025) by 0.2·√max(rows, cols), which gives every update the RMS of 0.2 that a typical AdamW
    update has, so AdamW's learning rate and weight decay carry over.
    """
    rows, cols = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return math.sqrt(max(1.0, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    raise ValueError(f"adjust_lr_fn must be None, 'original' or 'match_rms_adamw', got {adjust_lr_fn!r}")


def muon_update(
    param: Tensor,
    grad: Tensor,
    state: dict,
    lr: float,
    weight_decay: float,
    momentum: float,
    nesterov: bool,
    ns_coefficients: tuple[float, float, float],
    eps: float,
    ns_steps: int,
    adjust_lr_fn: str | None,
    ns_dtype: torch.dtype = torch.bfloat16,
) -> None:
    """One Muon step for one weight matrix, in place:

    B <- momentum·B + (1 - momentum)·g             (the momentum buffer, in state)
    U =  g + momentum·(B - g) if nesterov else B    (Nesterov: look one momentum step ahead)
    O =  newton_schulz(U)                           (keep the directions, drop the magnitudes)
    p <- p - lr·weight_decay·p - lr·muon_lr_scale(p.shape)·O
    """
    update = muon_momentum(grad, state, momentum, nesterov)
    orthogonal = newton_schulz(update, ns_steps, ns_coefficients, eps, ns_dtype)
    muon_apply(param, orthogonal, lr, weight_decay, adjust_lr_fn)


def muon_momentum(grad: Tensor, state: dict, momentum: float, nesterov: bool) -> Tensor:
    """`muon_update`'s first two lines: update the momentum buffer B in `state`, return U."""
    if "momentum_buffer" not in state:
        state["momentum_buffer"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
    buffer = state["momentum_buffer"]
    buffer.lerp_(grad, 1.0 - momentum)
    return grad.lerp(buffer, momentum) if nesterov else buffer


def muon_apply(
    param: Tensor, orthogonal: Tensor, lr: float, weight_decay: float, adjust_lr_fn: str | None
) -> None:
    """`muon_update`'s last line: decay `param` and move it along the orthogonalised update."""
    param.mul_(1.0 - lr * weight_decay)
    param.add_(orthogonal, alpha=-lr * muon_lr_scale(param.shape, adjust_lr_fn))


class Muon(torch.optim.Optimizer):
    """MomentUm Orthogonalized by Newton–Schulz (Jordan et al., 2024), for 2-D weight matrices only.

    SGD with momentum, except that the update matrix is replaced by the nearest (semi-)orthogonal
    matrix, computed by `newton_schulz`: every direction the momentum points in moves the weights by the
    same amount, so the rare directions are not drowned by the dominant ones. `muon_update` holds the
    formulas. Arguments and defaults are `torch.optim.Muon`'s, and so are the numbers; ``ns_dtype`` (an
    addition) chooses the precision of the iteration.
    Embeddings, the LM head and gains are not hidden-layer matrices: train them with AdamW
    (`MuonAdamW` does both).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
        eps: float = 1e-7,
        ns_steps: int = 5,
        adjust_lr_fn: str | None = None,
        ns_dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        _check_muon_arguments("Muon", lr, weight_decay, momentum, adjust_lr_fn, ns_steps)
        _check_hyperparameters("Muon", eps=eps)
        defaults = {
            "lr": lr, "weight_decay": weight_decay, "momentum": momentum, "nesterov": nesterov,
            "ns_coefficients": tuple(ns_coefficients), "eps": eps, "ns_steps": ns_steps,
            "adjust_lr_fn": adjust_lr_fn, "ns_dtype": ns_dtype,
        }  # fmt: skip
        super().__init__(params, defaults)
        for group in self.param_groups:
            for param in group["params"]:
                if param.ndim != 2:
                    raise ValueError(
                        f"Muon updates 2-D weight matrices only, got a parameter shaped "
                        f"{tuple(param.shape)}; give it to AdamW (see MuonAdamW)"
                    )

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Update every matrix that has a gradient; returns the closure's loss if one is given."""
        loss = _evaluate_closure(closure)
        for group in self.param_groups:
            _muon_group_step(self, group, group["eps"])
        return loss


def _check_hyperparameters(
    owner: str,
    lr: float = 0.0,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.0, 0.0),
    eps: float = 1.0,
    momentum: float = 0.0,
) -> None:
    """Finite numbers: lr, weight_decay >= 0; betas and momentum in [0, 1); eps > 0 (else a ConfigError)."""
    check_float(owner, "lr", lr, minimum=0)
    check_float(owner, "weight_decay", weight_decay, minimum=0)
    check_float(owner, "eps", eps, above=0)
    check_float(owner, "momentum", momentum, minimum=0, below=1)
    if not isinstance(betas, tuple | list) or len(betas) != 2:
        raise ConfigValueError(f"{owner}.betas must be two numbers in [0, 1), got {betas!r}", "betas")
    for beta in betas:
        check_float(owner, "betas", beta, minimum=0, below=1)


def _check_muon_arguments(
    owner: str, lr: float, weight_decay: float, momentum: float, adjust_lr_fn: str | None, ns_steps: int
):
    _check_hyperparameters(owner, lr=lr, weight_decay=weight_decay, momentum=momentum)
    check_int(owner, "ns_steps", ns_steps)
    if ns_steps > 99:
        raise ConfigValueError(f"{owner}.ns_steps must be in 1..99, got {ns_steps}", "ns_steps")
    muon_lr_scale((1, 1), adjust_lr_fn)  # raises on an unknown adjust_lr_fn


def _muon_group_step(optimizer: torch.optim.Optimizer, group: dict, eps: float, split: bool = False) -> None:
    """`muon_update` for every matrix of a group that has a gradient; with `split`, the Newton–Schulz
    iterations are shared out among the processes (`_orthogonalise_shared`)."""
    params = [param for param in group["params"] if param.grad is not None]
    if any(param.grad.is_sparse for param in params):
        raise TypeError("Muon does not support sparse gradients")
    updates = [
        muon_momentum(param.grad, optimizer.state[param], group["momentum"], group["nesterov"])
        for param in params
    ]
    ns_args = (group["ns_steps"], tuple(group["ns_coefficients"]), eps, _dtype(group["ns_dtype"]))
    orthogonal = (
        _orthogonalise_shared(updates, ns_args) if split else [newton_schulz(u, *ns_args) for u in updates]
    )
    for param, update in zip(params, orthogonal, strict=True):
        muon_apply(param, update, group["lr"], group["weight_decay"], group["adjust_lr_fn"])


def _dtype(value: torch.dtype | str) -> torch.dtype:
    # A checkpoint's JSON stores the dtype as its name ("torch.float32").
    return value if isinstance(value, torch.dtype) else getattr(torch, str(value).removeprefix("torch."))


class MuonAdamW(torch.optim.Optimizer):
    """Muon for the param groups marked ``use_muon=True``, AdamW for the others: one optimizer, one state.

    Build the groups with `muon_param_groups`. Every group has its own ``lr``; a training loop that sets
    one schedule for all multiplies it by each group's ``lr_scale`` (1 unless given).

    ``split_across_processes``: under torch.distributed, where every process holds the same averaged
    gradients (DistributedDataParallel), each process orthogonalises only its share of the matrices and
    receives the others' results (`_orthogonalise_shared`): the same numbers as every process doing all
    of them, for 1/world_size of the Newton–Schulz work, the larger part of this optimizer's cost.
    """

    def __init__(
        self,
        param_groups: list[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        adjust_lr_fn: str | None = "match_rms_adamw",
        ns_dtype: torch.dtype = torch.float32,
        split_across_processes: bool = False,
    ) -> None:
        _check_muon_arguments("MuonAdamW", lr, weight_decay, momentum, adjust_lr_fn, ns_steps)
        _check_hyperparameters("MuonAdamW", betas=betas, eps=eps)
        self.split_across_processes = split_across_processes
        for group in param_groups:
            if "use_muon" not in group:
                raise ValueError("every MuonAdamW param group needs use_muon=True or False")
        defaults = {
            "lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay, "lr_scale": 1.0,
            "momentum": momentum, "nesterov": nesterov, "ns_coefficients": NS_COEFFICIENTS,
            "ns_eps": 1e-7, "ns_steps": ns_steps, "adjust_lr_fn": adjust_lr_fn,
            "ns_dtype": str(ns_dtype).removeprefix("torch."),  # a name: checkpoints keep groups as JSON
        }  # fmt: skip
        super().__init__(param_groups, defaults)
        for group in self.param_groups:
            if group["use_muon"] and any(param.ndim != 2 for param in group["params"]):
                raise ValueError("a use_muon=True group may hold 2-D weight matrices only")

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Update every parameter that has a gradient, each with its group's algorithm."""
        loss = _evaluate_closure(closure)
        for group in self.param_groups:
            if group["use_muon"]:  # group["eps"] is AdamW's
                split = self.split_across_processes and _world_size() > 1
                _muon_group_step(self, group, group["ns_eps"], split)
                continue
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is not None:
                    adamw_update(
                        param, param.grad, self.state[param], group["lr"], beta1, beta2, group["eps"],
                        group["weight_decay"],
                    )  # fmt: skip
        return loss


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _orthogonalise_shared(updates: list[Tensor], ns_args: tuple) -> list[Tensor]:
    """`newton_schulz` of every update, each computed by one process and gathered by all.

    The updates are taken world_size at a time among those of one shape; in each such chunk, process r
    orthogonalises the r-th, and an all-gather hands every process the whole chunk's results. The gathers
    run in the background while the next chunk is computed.
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for index, update in enumerate(updates):
        by_shape.setdefault(tuple(update.shape), []).append(index)
    orthogonal: list[Tensor | None] = [None] * len(updates)
    pending = []
    for indices in by_shape.values():
        for start in range(0, len(indices), world):
            chunk = indices[start : start + world]
            if rank < len(chunk):
                mine = newton_schulz(updates[chunk[rank]], *ns_args).contiguous()
            else:  # a short last chunk: this process has no matrix of it, and sends a placeholder
                mine = torch.zeros_like(updates[chunk[0]], dtype=ns_args[-1])
            gathered = [torch.empty_like(mine) for _ in range(world)]
            pending.append((chunk, gathered, dist.all_gather(gathered, mine, async_op=True)))
    for chunk, gathered, work in pending:
        work.wait()
        for index, result in zip(chunk, gathered, strict=False):
            orthogonal[index] = result
    return orthogonal  # type: ignore[return-value]


def cosine_schedule(step: int, max_lr: float, min_lr: float, warmup_steps: int, cosine_steps: int) -> float:
    """Learning rate at `step`: linear warm-up 0 -> max_lr over `warmup_steps`, cosine decay to min_lr
    at step `cosine_steps` (counted from 0, warm-up included), then flat at min_lr."""
    progress = _decay_progress(step, max_lr, min_lr, warmup_steps, cosine_steps, "cosine_steps")
    if progress is None:
        return max_lr * step / warmup_steps
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


def linear_schedule(step: int, max_lr: float, min_lr: float, warmup_steps: int, decay_steps: int) -> float:
    """`cosine_schedule` with a straight-line decay: max_lr falls to min_lr at a constant rate. Decayed to
    0, it spends more of the run at a high rate than the cosine, then lands as steeply (Bergsma et al.,
    2025, "Straight to Zero", find it the better of the two at equal compute)."""
    progress = _decay_progress(step, max_lr, min_lr, warmup_steps, decay_steps, "decay_steps")
    if progress is None:
        return max_lr * step / warmup_steps
    return min_lr + (1.0 - progress) * (max_lr - min_lr)


def _decay_progress(
    step: int, max_lr: float, min_lr: float, warmup_steps: int, decay_steps: int, decay_name: str
) -> float | None:
    """Validate a schedule's arguments; None during warm-up, else how far the decay has gone (0 -> 1)."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if decay_steps < warmup_steps:
        raise ValueError(f"{decay_name} ({decay_steps}) must be >= warmup_steps ({warmup_steps})")
    if not 0.0 <= min_lr <= max_lr:
        raise ValueError(f"need 0 <= min_lr <= max_lr, got min_lr={min_lr}, max_lr={max_lr}")
    if step < warmup_steps:
        return None
    if step <= decay_steps and decay_steps > warmup_steps:
        return (step - warmup_steps) / (decay_steps - warmup_steps)
    return 1.0


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


def _groups_by_kind(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """The model's own `parameter_groups()` (`TransformerLM`'s); for any other module, by type: a
    parameter of an nn.Embedding is an embedding, any other 1-D one a gain, the rest matrices."""
    if hasattr(model, "parameter_groups"):
        return model.parameter_groups()
    embeddings = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    groups: dict[str, list[nn.Parameter]] = {"matrices": [], "embeddings": [], "gains": []}
    for param in model.parameters():  # a tied (shared) weight is listed once
        if param.requires_grad:
            kind = "embeddings" if id(param) in embeddings else "gains" if param.ndim < 2 else "matrices"
            groups[kind].append(param)
    return groups


def _in_model_order(model: nn.Module, members: list[nn.Parameter]) -> list[nn.Parameter]:
    # The order model.parameters() gives, so an optimizer's state is indexed as it always was.
    wanted = {id(p) for p in members}
    return [p for p in model.parameters() if id(p) in wanted]


# Weight decay pulls towards zero the weights that are multiplied: matrices, tables and adapters; not the
# rows that are looked up (embeddings) nor the gains, whose natural value is one.
DECAYED_KINDS = ("matrices", "tables", "adapters")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW's two groups from the model's parameter groups: decayed (`DECAYED_KINDS`: weight matrices,
    an untied LM head or position table, adapters) and undecayed (the token embedding, gains, biases)."""
    if not weight_decay >= 0.0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    groups = _groups_by_kind(model)
    decay = [p for kind in DECAYED_KINDS for p in groups.get(kind, [])]
    no_decay = [p for kind, params in groups.items() if kind not in DECAYED_KINDS for p in params]
    return [
        {"params": _in_model_order(model, decay), "weight_decay": weight_decay},
        {"params": _in_model_order(model, no_decay), "weight_decay": 0.0},
    ]


def muon_param_groups(model: nn.Module, weight_decay: float, lr_scale: float = 1.0) -> list[dict]:
    """`MuonAdamW`'s groups: the model's "matrices" (the blocks' attention and feed-forward projections)
    for Muon, with weight decay; everything else (token embeddings, a learned position table, an untied LM
    head, gains, adapters) for AdamW, decayed and undecayed as in `param_groups`.

    The embedding and the LM head stay with AdamW because they are not maps between hidden vectors: an
    embedding row is looked up, not multiplied, and the head's rows are scored one per token.
    """
    if not hasattr(model, "parameter_groups"):
        raise TypeError(
            f"muon_param_groups needs a model that names its matrices (parameter_groups()), "
            f"such as TransformerLM; got {type(model).__name__}"
        )
    matrices = _in_model_order(model, model.parameter_groups()["matrices"])
    in_muon = {id(param) for param in matrices}
    groups = []
    for group in param_groups(model, weight_decay):
        rest = [param for param in group["params"] if id(param) not in in_muon]
        groups.append({**group, "params": rest, "use_muon": False})
    return [{"params": matrices, "weight_decay": weight_decay, "use_muon": True, "lr_scale": lr_scale},
            *groups]  # fmt: skip
