"""Chapter 8 exercises: batches, an AdamW step to debug, the learning-rate schedule, and one Newton–Schulz
orthogonalisation (Muon's)."""

import torch

from llmbook.exercises.core import Case, draw, exercise
from llmbook.optim import AdamW, cosine_schedule, newton_schulz

# ----------------------------------------------------------------------------------------------------
# 08.batch_windows


def _batch_windows(tokens: torch.Tensor, starts: torch.Tensor, context_length: int):
    x = torch.stack([tokens[s : s + context_length] for s in starts.tolist()])
    y = torch.stack([tokens[s + 1 : s + 1 + context_length] for s in starts.tolist()])
    return x, y


def _batch_windows_hidden(g):
    tokens = torch.randint(0, 1024, (200,), generator=g)
    context_length = draw(g, 1, 40)
    starts = torch.randint(0, 200 - context_length, (draw(g, 1, 6),), generator=g)
    yield Case((tokens, starts, context_length), note="random starts and context length")


@exercise(
    "08.batch_windows",
    reference=_batch_windows,
    hidden=_batch_windows_hidden,
    hint=(
        "Each start gives one input window and the same window shifted by one token as its targets.",
        "Row i of x is tokens[starts[i] : starts[i] + context_length]; row i of y is the same window moved "
        "one token to the right. Stack the rows with torch.stack; both come out (len(starts), "
        "context_length).",
    ),
)
def _batch_windows_cases():
    tokens = torch.arange(100, 120)
    yield Case(
        (tokens, torch.tensor([0]), 4),
        expected=_batch_windows(tokens, torch.tensor([0]), 4),
        note="one window",
    )
    starts = torch.tensor([3, 0, 3])
    yield Case((tokens, starts, 5), expected=_batch_windows(tokens, starts, 5), note="a repeated start")
    starts = torch.tensor([19 - 6])
    yield Case(
        (tokens, starts, 6), expected=_batch_windows(tokens, starts, 6), note="the last possible window"
    )
    g = torch.Generator().manual_seed(8)
    tokens = torch.randint(0, 1024, (500,), generator=g)
    starts = torch.randint(0, 500 - 33, (8,), generator=g)
    yield Case((tokens, starts, 32), expected=_batch_windows(tokens, starts, 32), note="batch 8, context 32")
    yield Case(
        (tokens, starts[:2], 1), expected=_batch_windows(tokens, starts[:2], 1), note="context length 1"
    )


# ----------------------------------------------------------------------------------------------------
# 08.adamw_step


def _adamw_step(param, grad, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay):
    # Run the package's optimizer for one update from the given state.
    p = torch.nn.Parameter(param.clone())
    p.grad = grad.clone()
    optimizer = AdamW([p], lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    optimizer.state[p] = {
        "step": torch.tensor(float(step - 1)),
        "exp_avg": exp_avg.clone(),
        "exp_avg_sq": exp_avg_sq.clone(),
    }
    optimizer.step()
    state = optimizer.state[p]
    return p.detach().clone(), state["exp_avg"].clone(), state["exp_avg_sq"].clone()


def _broken_adamw_step(param, grad, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay):
    """One AdamW update; returns new (param, exp_avg, exp_avg_sq). step counts from 1."""
    beta1, beta2 = betas
    grad = grad + weight_decay * param  # weight decay
    exp_avg = beta1 * exp_avg + (1 - beta1) * grad
    exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * grad * grad
    param = param - lr * exp_avg / (exp_avg_sq.sqrt() + eps)
    return param, exp_avg, exp_avg_sq


@exercise(
    "08.adamw_step",
    reference=_adamw_step,
    kind="debug",
    broken=_broken_adamw_step,
    forbid=(
        "llmbook.optim.AdamW",
        "torch.optim.AdamW",
    ),
    hint=(
        "Two bugs. One is what makes AdamW differ from Adam with L2 regularisation; the other shows on step "
        "1.",
        "Adding weight_decay * param to the gradient is L2 regularisation, which Adam then rescales per "
        "coordinate; AdamW decays the weights directly, p * (1 - lr * weight_decay), outside the moments. "
        "And "
        "m and v start at zero, so they need the bias corrections m / (1 - b1**step), v / (1 - b2**step).",
        "Look at lines 4 and 7. Line 4 folds the decay into the gradient (L2 regularisation, which "
        "the moments then rescale), where AdamW shrinks the parameter itself, outside the moments; "
        "and line 7 divides `exp_avg` by the root of `exp_avg_sq` as they are, without the bias "
        "corrections that undo their start at zero (they depend on `step`).",
    ),
)
def _adamw_step_cases():
    g = torch.Generator().manual_seed(81)

    def case(
        shape,
        step,
        lr=1e-3,
        betas=(0.9, 0.95),
        eps=1e-8,
        weight_decay=0.1,
        scale=1.0,
        zero_state=False,
        note="",
    ):
        param = torch.randn(shape, generator=g)
        grad = scale * torch.randn(shape, generator=g)
        if zero_state:
            exp_avg, exp_avg_sq = torch.zeros(shape), torch.zeros(shape)
        else:
            exp_avg = 0.1 * torch.randn(shape, generator=g)
            exp_avg_sq = 0.01 * torch.rand(shape, generator=g)
        args = (param, grad, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay)
        return Case(args, expected=_adamw_step(*args), note=note)

    yield case((5,), step=1, zero_state=True, note="the very first step (moments start at zero)")
    yield case((3, 4), step=10, note="step 10 of a (3, 4) weight")
    yield case((1,), step=1, zero_state=True, weight_decay=0.0, note="one number, no weight decay")
    yield case((6,), step=200, lr=3e-4, betas=(0.9, 0.999), note="a late step with beta2 = 0.999")
    yield case((4, 2), step=3, scale=1e3, note="huge gradients (Adam's update size does not care)")
    yield case((2, 3), step=5, scale=0.0, note="zero gradient: only decay and the old moments act")


# ----------------------------------------------------------------------------------------------------
# 08.cosine_schedule


def _cosine_schedule_hidden(g):
    warmup, decay = draw(g, 0, 50), draw(g, 60, 400)
    for _ in range(3):
        kwargs = dict(step=draw(g, 0, 500), max_lr=3e-3, min_lr=2e-4, warmup_steps=warmup, cosine_steps=decay)
        yield Case(kwargs=kwargs, note="a random step of a random schedule", atol=1e-12, rtol=1e-9)


@exercise(
    "08.cosine_schedule",
    reference=cosine_schedule,
    forbid=("llmbook.optim.cosine_schedule",),
    hidden=_cosine_schedule_hidden,
    hint=(
        "Three phases: a linear warm-up, a half cosine from max_lr down to min_lr, then constant min_lr.",
        "Below warmup_steps: max_lr * step / warmup_steps. Between warmup_steps and cosine_steps: "
        "progress = (step - warmup_steps) / (cosine_steps - warmup_steps) and "
        "lr = min_lr + 0.5 * (1 + cos(pi * progress)) * (max_lr - min_lr). After cosine_steps: min_lr.",
    ),
)
def _cosine_schedule_cases():
    base = dict(max_lr=1e-3, min_lr=1e-4, warmup_steps=100, cosine_steps=1000)
    for step, note in [
        (0, "step 0: warm-up starts at zero"),
        (30, "in the warm-up"),
        (100, "the end of the warm-up: the peak"),
        (550, "halfway down the cosine: the mean of max_lr and min_lr"),
        (999, "the last step of the decay"),
        (1000, "step cosine_steps: min_lr"),
        (5000, "long after the decay: stays at min_lr"),
    ]:
        kwargs = dict(step=step, **base)
        yield Case(kwargs=kwargs, expected=cosine_schedule(**kwargs), note=note, atol=1e-12, rtol=1e-9)
    for kwargs, note in [
        (
            dict(step=0, max_lr=6e-4, min_lr=6e-5, warmup_steps=0, cosine_steps=50),
            "no warm-up: starts at the peak",
        ),
        (dict(step=25, max_lr=6e-4, min_lr=0.0, warmup_steps=0, cosine_steps=50), "min_lr = 0, halfway"),
        (
            dict(step=7, max_lr=1.0, min_lr=1.0, warmup_steps=10, cosine_steps=10),
            "a constant schedule with warm-up",
        ),
    ]:
        yield Case(kwargs=kwargs, expected=cosine_schedule(**kwargs), note=note, atol=1e-12, rtol=1e-9)


# ----------------------------------------------------------------------------------------------------
# 08.newton_schulz


def _newton_schulz(matrix: torch.Tensor) -> torch.Tensor:
    # The package's iteration, in float32 (what the chapter's CPU run uses).
    return newton_schulz(matrix, dtype=torch.float32)


def _newton_schulz_hidden(g):
    rows, cols = draw(g, 2, 40), draw(g, 2, 40)
    yield Case((torch.randn(rows, cols, generator=g),), note="a random shape")


@exercise(
    "08.newton_schulz",
    reference=_newton_schulz,
    forbid=("llmbook.optim.newton_schulz", "torch.linalg.svd", "torch.svd"),
    hidden=_newton_schulz_hidden,
    hint=(
        "Work on the wide orientation (transpose a tall matrix, and transpose the result back), divide by "
        "the Frobenius norm, then apply p(X) = a·X + (b·X·Xᵀ + c·(X·Xᵀ)²)·X five times.",
        "(a, b, c) = (3.4445, -4.7750, 2.0315). In code: x = matrix.T if rows > cols else matrix; "
        "x = x / x.norm().clamp(min=1e-7); five times: gram = x @ x.T; x = a * x + (b * gram + c * gram @ "
        "gram) @ x. Return x.T if you transposed.",
    ),
)
def _newton_schulz_cases():
    g = torch.Generator().manual_seed(88)
    for shape, note in [
        ((4, 8), "a wide matrix"),
        ((8, 4), "a tall matrix: work on its transpose"),
        ((6, 6), "a square matrix"),
        ((1, 5), "one row: a vector, scaled to length about 1"),
    ]:
        matrix = torch.randn(shape, generator=g)
        yield Case((matrix,), expected=_newton_schulz(matrix), note=note)
    scaled = 1e3 * torch.randn(5, 3, generator=g)
    yield Case((scaled,), expected=_newton_schulz(scaled), note="a large matrix: the scale must not matter")
    steep = torch.diag(torch.tensor([1.0, 0.1, 0.01]))
    yield Case((steep,), expected=_newton_schulz(steep), note="singular values 1, 0.1, 0.01")


# ---------------------------------------------------------------------------------------------
# Predict: the memory AdamW keeps for one weight matrix, measured from the optimizer's own state.

ADAMW_STATE_SETUP = {"rows": 1024, "cols": 256}


def measured_adamw_state_bytes() -> int:
    """Bytes of AdamW's two moment tensors for one float32 (rows, cols) weight, after one step."""
    weight = torch.nn.Parameter(torch.zeros(ADAMW_STATE_SETUP["rows"], ADAMW_STATE_SETUP["cols"]))
    weight.grad = torch.ones_like(weight)
    optimizer = AdamW([weight], lr=1e-3)
    optimizer.step()
    state = optimizer.state[weight]
    return sum(state[key].nelement() * state[key].element_size() for key in ("exp_avg", "exp_avg_sq"))


@exercise(
    "08.predict_adamw_state_bytes",
    reference=measured_adamw_state_bytes,
    kind="predict",
    hint=(
        "AdamW keeps two running averages for every weight: of the gradient and of its square.",
        "Each average is a tensor of the weight's shape and dtype: 1024 · 256 float32 numbers, 4 bytes each.",
        "2 · 1024 · 256 · 4 bytes.",
    ),
)
def _predict_adamw_state_bytes_cases():
    yield Case(
        (), expected=measured_adamw_state_bytes(), note="one float32 (1024, 256) weight, after one step"
    )
