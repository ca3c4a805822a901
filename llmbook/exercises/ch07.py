"""Chapter 7 exercises: the online softmax update to debug, a row-wise RMSNorm, the gradient of
cross-entropy, the merge of two softmax states, and attention's score memory.
"""

import torch

from llmbook.exercises.core import Case, draw, exercise

# The package references that the Triton kernels are tested against. Imported from the model modules
# (not llmbook.kernels.*) so that grading never imports Triton: in a notebook, Triton must be imported
# only after TRITON_INTERPRET is set.
from llmbook.loss import cross_entropy as cross_entropy_reference
from llmbook.norms import rms_norm as _package_rms_norm


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """llmbook.norms.rms_norm (float32 statistics), the reference the RMSNorm kernel is tested against."""
    return _package_rms_norm(x, weight, eps)


def _online_softmax_update(
    running_max: torch.Tensor, running_sum: torch.Tensor, block: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    # The state (m, l) means: m = max of every logit seen so far, l = sum of exp(logit - m) over them.
    new_max = torch.maximum(running_max, block.max(dim=-1).values)
    new_sum = running_sum * torch.exp(running_max - new_max) + torch.exp(block - new_max[:, None]).sum(dim=-1)
    return new_max, new_sum


def _state_of(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(max, sum of exp(values - max)) of each row, computed directly: what a correct update must keep."""
    row_max = values.max(dim=-1).values
    return row_max, torch.exp(values - row_max[:, None]).sum(dim=-1)


def _broken_online_softmax_update(running_max, running_sum, block):
    """Fold a (rows, block) tile of logits into the running (max, sum of exp(x - max)) of each row."""
    new_max = torch.maximum(running_max, block.max(dim=-1).values)
    new_sum = running_sum + torch.exp(block - new_max[:, None]).sum(dim=-1)
    return new_max, new_sum


@exercise(
    "07.online_softmax_update",
    reference=_online_softmax_update,
    kind="debug",
    broken=_broken_online_softmax_update,
    hint=(
        "The new maximum is right. Is the old sum still a sum of exp(x - max) once the maximum has moved?",
        "running_sum holds Σ exp(x - old_max). After the max grows to new_max, each of those terms must "
        "become "
        "exp(x - new_max) = exp(x - old_max) · exp(old_max - new_max).",
        "Look at line 4: `running_sum` is a sum of exp(x - running_max), yet it is added unchanged to"
        " terms of exp(x - new_max). By what factor does each old term change when the maximum moves "
        "from running_max to new_max?",
    ),
    atol=1e-5,
    rtol=1e-5,
)
def _online_softmax_update_cases():
    g = torch.Generator().manual_seed(7)
    seen, block = torch.randn(3, 5, generator=g), torch.randn(3, 4, generator=g)
    # Expected values are the state of (seen ++ block) computed in one go: the update must reproduce it.
    yield Case((*_state_of(seen), block), expected=_state_of(torch.cat([seen, block], -1)), note="3 rows")
    empty_max, empty_sum = torch.full((2,), float("-inf")), torch.zeros(2)
    first = torch.randn(2, 6, generator=g)
    yield Case((empty_max, empty_sum, first), expected=_state_of(first), note="first block (max -inf, sum 0)")
    seen, block = torch.randn(1, 3, generator=g), torch.randn(1, 1, generator=g) + 5.0
    yield Case(
        (*_state_of(seen), block),
        expected=_state_of(torch.cat([seen, block], -1)),
        note="a one-element block holding a new maximum",
    )
    seen, block = torch.randn(2, 4, generator=g) * 50 + 500, torch.randn(2, 3, generator=g) * 50 + 500
    yield Case(
        (*_state_of(seen), block),
        expected=_state_of(torch.cat([seen, block], -1)),
        note="logits near 500, where a naive exp overflows",
    )


def _rms_norm_rows(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return rms_norm_reference(x, weight, eps)


@exercise(
    "07.rms_norm_rows",
    reference=_rms_norm_rows,
    forbid=(
        "llmbook.norms.rms_norm",
        "torch.nn.functional.rms_norm",
    ),
    hint=(
        "Each row is normalised on its own: its mean square, then a division, then the weight.",
        "Per row (last axis): divide by sqrt(mean(x**2) + eps), then multiply by weight. Keep the row "
        "axis with keepdim=True so the division broadcasts.",
    ),
)
def _rms_norm_rows_cases():
    g = torch.Generator().manual_seed(8)
    shapes = [((4, 7), "4 rows of width 7"), ((1, 1), "one row of width 1"), ((2, 3, 33), "3-d input")]
    for shape, note in shapes:
        x, weight = torch.randn(*shape, generator=g), torch.randn(shape[-1], generator=g)
        yield Case((x, weight, 1e-5), expected=rms_norm_reference(x, weight, 1e-5), note=note)
    x = torch.zeros(2, 5)
    yield Case(
        (x, torch.ones(5), 1e-6),
        expected=rms_norm_reference(x, torch.ones(5), 1e-6),
        note="an all-zero row: eps keeps it finite",
    )
    x = torch.randn(3, 9, generator=g) * 1e4
    yield Case(
        (x, torch.ones(9), 1e-5), expected=rms_norm_reference(x, torch.ones(9), 1e-5), note="large values"
    )


def _cross_entropy_grad(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100):
    leaf = logits.detach().clone().requires_grad_()
    cross_entropy_reference(leaf, targets, ignore_index).backward()
    return leaf.grad


@exercise(
    "07.cross_entropy_grad",
    reference=_cross_entropy_grad,
    hint=(
        "The gradient of -log softmax(z)[t] with respect to z is softmax(z) minus the one-hot of t.",
        "For a kept row: (softmax(logits) - onehot(target)) / n_kept, where n_kept counts targets != "
        "ignore_index. Ignored rows get a zero gradient. Compute the softmax stably (subtract the row max).",
    ),
    atol=1e-6,
    rtol=1e-4,
)
def _cross_entropy_grad_cases():
    g = torch.Generator().manual_seed(9)
    logits, targets = torch.randn(4, 6, generator=g), torch.randint(0, 6, (4,), generator=g)
    yield Case((logits, targets), expected=_cross_entropy_grad(logits, targets), note="4 rows, vocab 6")
    logits = torch.randn(1, 3, generator=g)
    one_target = torch.tensor([2])
    yield Case((logits, one_target), expected=_cross_entropy_grad(logits, one_target), note="one row")
    logits, targets = torch.randn(5, 11, generator=g), torch.tensor([3, -100, 0, -100, 10])
    yield Case((logits, targets), expected=_cross_entropy_grad(logits, targets), note="two ignored rows")
    logits, targets = torch.randn(3, 7, generator=g) * 100, torch.tensor([1, 2, 3])
    yield Case((logits, targets), expected=_cross_entropy_grad(logits, targets), note="large logits (x100)")


# ---------------------------------------------------------------------------------------------
# Derive: merging two partial softmax states, which is what lets blocks run in parallel.


def _merge_states(max_a, sum_a, max_b, sum_b):
    merged_max = torch.maximum(max_a, max_b)
    merged_sum = sum_a * torch.exp(max_a - merged_max) + sum_b * torch.exp(max_b - merged_max)
    return merged_max, merged_sum


def _merge_case(a: torch.Tensor, b: torch.Tensor, note: str) -> Case:
    # The expected state is that of both parts' logits together, computed in one go.
    return Case((*_state_of(a), *_state_of(b)), expected=_state_of(torch.cat([a, b], -1)), note=note)


def _merge_states_hidden(g):
    for _ in range(2):
        rows = draw(g, 1, 5)
        a = torch.randn(rows, draw(g, 1, 9), generator=g) * draw(g, 1, 30)
        b = torch.randn(rows, draw(g, 1, 9), generator=g) * draw(g, 1, 30) + draw(g, -20, 20)
        yield _merge_case(a, b, "random parts")


@exercise(
    "07.merge_states",
    reference=_merge_states,
    kind="derive",
    hidden=_merge_states_hidden,
    hint=(
        "Write both sums over the same reference point: the combined maximum M = max(m_a, m_b).",
        "Σ_a exp(x - M) = exp(m_a - M) · Σ_a exp(x - m_a) = exp(m_a - M) · l_a, and likewise for b; the "
        "combined sum is the two added.",
        "M = torch.maximum(m_a, m_b); return M, l_a * torch.exp(m_a - M) + l_b * torch.exp(m_b - M).",
    ),
    atol=1e-5,
    rtol=1e-5,
)
def _merge_states_cases():
    g = torch.Generator().manual_seed(8)
    yield _merge_case(torch.randn(3, 4, generator=g), torch.randn(3, 6, generator=g), "3 rows")
    yield _merge_case(
        torch.randn(2, 5, generator=g), torch.randn(2, 1, generator=g) + 9, "b holds the maximum"
    )
    yield _merge_case(
        torch.randn(1, 3, generator=g) * 50 + 600,
        torch.randn(1, 3, generator=g) * 50 + 600,
        "logits near 600, where exp overflows",
    )
    a = torch.randn(2, 4, generator=g)
    yield _merge_case(a, a.clone(), "two equal halves: the same maximum, twice the sum")


# ---------------------------------------------------------------------------------------------
# Predict: the memory naive attention spends on its score matrix.

SCORES_SETUP = dict(batch=1, n_heads=8, seq=512, head_dim=64)


def measured_score_bytes() -> int:
    """Bytes of the float32 (batch, heads, seq, seq) score matrix q @ kᵀ for SCORES_SETUP, by building it."""
    s = SCORES_SETUP
    q = torch.zeros(s["batch"], s["n_heads"], s["seq"], s["head_dim"])
    scores = q @ q.transpose(-2, -1)
    return scores.nelement() * scores.element_size()


@exercise(
    "07.predict_score_bytes",
    reference=measured_score_bytes,
    kind="predict",
    hint=(
        "Naive attention stores one score for every (query, key) pair, in every head of every sequence.",
        "The scores have shape (batch, n_heads, seq, seq), 4 bytes each in float32; head_dim does not "
        "appear.",
        "1 · 8 · 512 · 512 · 4 bytes.",
    ),
)
def _predict_score_bytes_cases():
    yield Case((), expected=measured_score_bytes(), note="batch 1, 8 heads, seq 512, float32")
