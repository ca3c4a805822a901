"""The exercise checker's default tolerance (atol 1e-5, rtol 1e-4) is tight: an implement exercise's
answer off by 1e-3 relative fails, one off by 1e-7 relative passes. Asserts on the verdict, not its text."""

import pytest
import torch

from llmbook.exercises import run_check


def _rms_norm_off_by(relative_error):
    """A from-scratch RMSNorm whose every output is scaled by (1 + relative_error)."""

    def answer(x, weight, eps):
        normed = x / torch.sqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)
        return normed * weight * (1 + relative_error)

    return answer


@pytest.mark.parametrize("relative_error", [1e-3, -1e-3, 2e-3])
def test_an_answer_off_by_a_tenth_of_a_percent_fails_at_the_default_tolerance(relative_error):
    # 05.rms_norm uses the checker's default tolerance; its outputs are O(1), so an error of 1e-3
    # relative is ~1e-3 absolute: far above atol 1e-5 + rtol 1e-4, far below a loosened 1e-2.
    result = run_check("05.rms_norm", _rms_norm_off_by(relative_error), seed=0)
    assert not result.passed
    assert result.status == "fail"


def test_an_answer_off_by_float_rounding_passes_at_the_default_tolerance():
    result = run_check("05.rms_norm", _rms_norm_off_by(1e-7), seed=0)
    assert result.passed, result.message
    assert result.status == "pass"
