import pytest
import torch
from conftest import tiny_model

from llmbook.errors import ConfigValueError
from llmbook.sample import generate, sample_next_token, top_k_filter, top_p_filter


def _model(dtype=torch.float64, **overrides):
    model = tiny_model(**(dict(vocab_size=50, context_length=16, n_kv_heads=2) | overrides)).train()
    # Larger weights than the init: sharper distributions, so sampling differences would show.
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    return model.to(dtype)


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- filters -------------------------------------------------------------------------------------


def test_top_k_filter_keeps_the_k_largest_per_row():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0], [0.0, -1.0, 2.0, 1.0]])
    filtered = top_k_filter(logits, 2)
    inf = float("-inf")
    assert torch.equal(filtered, torch.tensor([[inf, 5.0, inf, 4.0], [inf, inf, 2.0, 1.0]]))
    assert torch.equal(top_k_filter(logits, 10), logits)


def test_top_p_filter_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()
    kept = lambda p: torch.isfinite(top_p_filter(logits, p)).tolist()  # noqa: E731
    assert kept(0.5) == [True, False, False, False]
    assert kept(0.6) == [True, True, False, False]
    assert kept(0.79) == [True, True, False, False]
    assert kept(0.81) == [True, True, True, False]
    assert kept(1.0) == [True, True, True, True]
    assert kept(1e-9) == [True, False, False, False]  # the top token always survives


def test_top_p_filter_works_on_unsorted_batched_logits():
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 2.5]])
    filtered = top_p_filter(logits, 0.7)
    probs = logits.softmax(-1)
    for row in range(2):
        keep = torch.isfinite(filtered[row])
        order = probs[row].argsort(descending=True)
        n_kept = int(keep.sum())
        assert keep[order[:n_kept]].all()
        assert probs[row][order[: n_kept - 1]].sum() < 0.7 <= probs[row][order[:n_kept]].sum()


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_top_k_filter_rejects_bad_k(bad):
    with pytest.raises(ValueError, match="top_k"):
        top_k_filter(torch.zeros(3), bad)


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5])
def test_top_p_filter_rejects_bad_p(bad):
    with pytest.raises(ValueError, match="top_p"):
        top_p_filter(torch.zeros(3), bad)


def test_sampling_frequencies_follow_the_filtered_distribution():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0]).expand(20000, 4)
    draws = sample_next_token(logits, temperature=1.0, top_k=2, generator=_generator())
    frequencies = torch.bincount(draws, minlength=4).float() / draws.numel()
    expected = torch.tensor([2.0, 1.0]).softmax(-1)
    assert frequencies[2:].sum() == 0
    torch.testing.assert_close(frequencies[:2], expected, atol=0.015, rtol=0)


def test_low_temperature_approaches_greedy_and_zero_is_argmax():
    logits = torch.tensor([[0.0, 1.0, 0.5]]).expand(1000, 3)
    assert (sample_next_token(logits, temperature=0) == 1).all()
    assert (sample_next_token(logits, temperature=0.01, generator=_generator()) == 1).all()
    hot = sample_next_token(logits, temperature=100.0, generator=_generator())
    assert len(set(hot.tolist())) == 3


# ---- generate ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [{"temperature": 0}, {"temperature": 1.0}, {"temperature": 0.8, "top_k": 5}, {"top_p": 0.9}],
)
def test_cache_and_no_cache_generate_the_same_tokens(kwargs):
    model = _model()
    prompt = [3, 1, 4, 1, 5]
    with_cache = generate(model, prompt, 10, use_cache=True, generator=_generator(1), **kwargs)
    without = generate(model, prompt, 10, use_cache=False, generator=_generator(1), **kwargs)
    assert with_cache == without
    assert with_cache[:5] == prompt and len(with_cache) == 15


def test_generation_past_the_context_crops_the_window_identically_with_and_without_cache():
    model = _model()  # context_length 16
    with_cache = generate(model, [7, 8], 30, generator=_generator(2))
    without = generate(model, [7, 8], 30, use_cache=False, generator=_generator(2))
    assert with_cache == without and len(with_cache) == 32


def test_generate_greedy_equals_the_argmax_of_a_full_forward():
    model = _model()
    out = generate(model, torch.tensor([2, 7, 1]), 6, temperature=0)
    assert isinstance(out, torch.Tensor) and out.shape == (9,)
    for length in range(3, 9):
        logits = model(out[None, :length])
        assert int(logits[0, -1].argmax()) == int(out[length])


def test_generate_batched_rows_match_single_rows():
    model = _model()
    prompts = torch.tensor([[1, 2, 3], [9, 9, 4]])
    batch = generate(model, prompts, 5, temperature=0)
    assert batch.shape == (2, 8)
    for row in range(2):
        assert batch[row].tolist() == generate(model, prompts[row].tolist(), 5, temperature=0)


def test_generate_stops_at_a_stop_id_and_keeps_it():
    model = _model()
    free = generate(model, [1, 2], 12, temperature=0)
    stop_token = free[5]
    stopped = generate(model, [1, 2], 12, temperature=0, stop_ids=[stop_token])
    first = free.index(stop_token, 2)
    assert stopped == free[: first + 1]


def test_generate_pads_rows_that_stopped_early_with_their_stop_id():
    model = _model()
    prompts = torch.tensor([[1, 2], [30, 31]])
    free = generate(model, prompts, 8, temperature=0)
    stop_token = int(free[0, 3])
    stopped = generate(model, prompts, 8, temperature=0, stop_ids=[stop_token])
    row0 = stopped[0].tolist()
    first = row0.index(stop_token, 2)
    assert row0[: first + 1] == free[0, : first + 1].tolist()
    assert all(token == stop_token for token in row0[first:])


def test_generate_is_reproducible_and_restores_training_mode():
    model = _model().train()
    a = generate(model, [1], 8, generator=_generator(5))
    b = generate(model, [1], 8, generator=_generator(5))
    c = generate(model, [1], 8, generator=_generator(6))
    assert a == b and a != c
    assert model.training


def test_generate_with_zero_new_tokens_returns_the_prompt():
    assert generate(_model(), [4, 5, 6], 0) == [4, 5, 6]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_new_tokens": -1}, "max_new_tokens"),
        ({"temperature": -0.5}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_p": 1.5}, "top_p"),
        ({"stop_ids": ["a"]}, "stop_ids"),
    ],
)
def test_generate_rejects_bad_arguments(kwargs, match):
    arguments = {"max_new_tokens": 3} | kwargs
    with pytest.raises(ValueError, match=match):
        generate(_model(), [1, 2], **arguments)


def test_generate_rejects_an_empty_prompt():
    with pytest.raises(ValueError, match="at least one token"):
        generate(_model(), [], 3)


# ---- the sampler's inputs (issue 17) -------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt",
    [
        torch.tensor([1.0, 2.0]),
        torch.tensor([[1.0, 2.0]], dtype=torch.float64),
        torch.tensor([True, False]),
        [1.0, 2.0],
        [1, 2.5],
        [True, 3],
        [[1, 2], [3, 4.0]],
    ],
)
def test_generate_refuses_prompts_that_are_not_integer_ids(prompt):
    with pytest.raises(TypeError, match="integer"):
        generate(_model(), prompt, 2, temperature=0)


def test_generate_tells_to_encode_a_string_prompt_first():
    with pytest.raises(TypeError, match="encode it to token ids first"):
        generate(_model(), "ROMEO:", 2, temperature=0)


def test_generate_accepts_uint16_ids_as_read_from_a_token_file():
    ids = torch.tensor([[3, 1, 4, 1, 5]], dtype=torch.uint16)
    out = generate(_model(), ids, 3, temperature=0)
    assert torch.equal(out[:, :5], ids.long())
    assert torch.equal(out, generate(_model(), ids.long(), 3, temperature=0))


def test_the_model_accepts_uint16_ids():
    ids = torch.tensor([[3, 1, 4]], dtype=torch.uint16)
    assert torch.equal(_model()(ids), _model()(ids.long()))


@pytest.mark.parametrize("temperature", [-1.0, -1e-9, float("nan"), float("-inf"), True])
def test_sample_next_token_refuses_a_bad_temperature(temperature):
    with pytest.raises(ValueError, match="temperature"):
        sample_next_token(torch.zeros(1, 5), temperature=temperature, generator=_generator())


@pytest.mark.parametrize("temperature", [0, 1.0])
def test_sampling_from_nan_logits_raises_instead_of_returning_the_nan_position(temperature):
    logits = torch.tensor([[0.0, float("nan"), 1.0]])
    with pytest.raises(ValueError, match="logits contain NaN"):
        sample_next_token(logits, temperature=temperature, generator=_generator())


def test_sample_next_token_refuses_bad_top_k_and_top_p():
    with pytest.raises(ValueError, match="top_k"):
        sample_next_token(torch.zeros(1, 5), top_k=0)
    with pytest.raises(ValueError, match="top_p"):
        sample_next_token(torch.zeros(1, 5), top_p=1.5)


# ---- issue 29: boundary values of the sampler's arguments ------------------------------------------


@pytest.mark.parametrize("temperature", [1e-45, 1e-300, 5e-324, 1e-38])
def test_a_tiny_temperature_samples_the_likeliest_token_instead_of_crashing(temperature):
    logits = torch.tensor([[1.0, 3.0, 2.0], [5.0, -1.0, 4.0]])
    for seed in range(5):
        chosen = sample_next_token(logits, temperature=temperature, generator=_generator(seed))
        assert chosen.tolist() == [1, 0]


def test_a_tiny_temperature_draws_among_tied_likeliest_tokens():
    logits = torch.tensor([[2.0, 7.0, 7.0, -3.0]])
    drawn = {int(sample_next_token(logits, 1e-45, generator=_generator(seed))) for seed in range(40)}
    assert drawn == {1, 2}


@pytest.mark.parametrize("temperature", [float("inf"), float("nan"), -1e-45])
def test_a_non_finite_or_negative_temperature_is_refused_naming_it(temperature):
    with pytest.raises(ConfigValueError, match="temperature must be a finite number >= 0") as caught:
        sample_next_token(torch.zeros(1, 4), temperature=temperature)
    assert caught.value.field == "temperature"


@pytest.mark.parametrize("bad_logits", [[[0.0, float("inf")]], [[float("-inf"), float("-inf")]]])
def test_logits_with_inf_or_no_finite_value_are_refused(bad_logits):
    with pytest.raises(ValueError, match=r"NaN or \+inf, or a row has no finite logit"):
        sample_next_token(torch.tensor(bad_logits), temperature=1.0)


@pytest.mark.parametrize("stop_id", [50, -1, 10**20])
def test_stop_ids_outside_the_vocabulary_are_refused_naming_them(stop_id):
    with pytest.raises(ConfigValueError, match=r"stop_ids must be token ids in \[0, 50\)") as caught:
        generate(_model(), [1, 2], 3, stop_ids=[stop_id])
    assert caught.value.field == "stop_ids"


@pytest.mark.parametrize("prompt", [[50], [-1], [[]], torch.zeros(0, 3, dtype=torch.long)])
def test_prompt_ids_outside_the_vocabulary_or_empty_are_refused_naming_them(prompt):
    with pytest.raises(ConfigValueError, match="prompt_ids must") as caught:
        generate(_model(), prompt, 3)
    assert caught.value.field == "prompt_ids"


def test_a_max_new_tokens_beyond_memory_is_refused_before_allocating():
    with pytest.raises(
        ConfigValueError, match=r"max_new_tokens=1000000000000000.*needs at least.*free"
    ) as caught:
        generate(_model(), [1, 2], 10**15)
    assert caught.value.field == "max_new_tokens"


# ---- the temperature is applied once (issue 29) --------------------------------------------------


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_sampling_frequencies_follow_softmax_of_logits_over_temperature(temperature):
    # At temperature 1 dividing once or twice is the same; at 0.5 and 2 softmax(logits / T²) differs
    # from softmax(logits / T) by tens of binomial standard deviations per entry, so a sampler that
    # tempers twice fails, while the seeded honest sampler stays well inside 5 standard deviations.
    logits = torch.tensor([1.5, 0.5, 0.0, -0.5, -1.5])
    n_draws = 40_000
    draws = sample_next_token(logits.expand(n_draws, 5), temperature=temperature, generator=_generator(7))
    frequencies = torch.bincount(draws, minlength=5).double() / n_draws
    expected = (logits.double() / temperature).softmax(-1)
    binomial_std = (expected * (1 - expected) / n_draws).sqrt()
    assert ((frequencies - expected).abs() <= 5 * binomial_std).all(), (frequencies, expected)


# ---- paths the mutation run found untested (issue 29) --------------------------------------------


def test_the_default_temperature_is_one():
    logits = torch.tensor([1.0, 0.0, -1.0, 0.5]).expand(2000, 4)
    default = sample_next_token(logits, generator=_generator(3))
    assert torch.equal(default, sample_next_token(logits, temperature=1.0, generator=_generator(3)))


def test_sampling_without_a_generator_draws_from_the_global_generator():
    logits = torch.tensor([[1.0, 0.0, -1.0]]).expand(500, 3)
    with torch.random.fork_rng():
        torch.manual_seed(11)
        first = sample_next_token(logits)
        torch.manual_seed(11)
        again = sample_next_token(logits)
    assert torch.equal(first, again) and len(set(first.tolist())) == 3


def test_top_k_of_one_is_greedy_and_top_p_of_one_changes_nothing():
    logits = torch.randn(300, 7, generator=_generator(4))
    assert torch.equal(sample_next_token(logits, top_k=1, generator=_generator()), logits.argmax(-1))
    plain = sample_next_token(logits, generator=_generator(5))
    assert torch.equal(sample_next_token(logits, top_p=1.0, generator=_generator(5)), plain)


@pytest.mark.parametrize("bad", [True, 2.5])
def test_generate_refuses_a_max_new_tokens_that_is_not_an_integer(bad):
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(_model(), [1, 2], bad)


def test_generate_takes_a_nested_list_prompt_and_returns_nested_lists():
    model = _model()
    batch = generate(model, [[1, 2, 3], [9, 9, 4]], 5, temperature=0)
    assert batch == generate(model, torch.tensor([[1, 2, 3], [9, 9, 4]]), 5, temperature=0).tolist()


class _ScriptedModel(torch.nn.Module):
    """Greedy decoding of this model yields `script[row][length]` at each length (no cache)."""

    def __init__(self, script, vocab_size=8, context_length=32):
        super().__init__()
        self.script = script
        self.vocab_size = vocab_size
        self.config = type("Config", (), {"context_length": context_length, "vocab_size": vocab_size})()
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # generate reads the device from a parameter

    def forward(self, ids):
        logits = torch.zeros(ids.shape[0], ids.shape[1], self.vocab_size)
        for row in range(ids.shape[0]):
            logits[row, -1, self.script[row][ids.shape[1]]] = 1.0
        return logits


def test_a_stop_id_of_zero_ends_its_row_and_pads_it():
    # Row 0 produces the stop token 0 first, then row 1; the ended row repeats 0 until both ended.
    script = [[None, None, 5, 0, 6, 6, 6], [None, None, 4, 4, 0, 7, 7]]
    out = generate(_ScriptedModel(script), [[1, 2], [3, 3]], 5, temperature=0, stop_ids=[0], use_cache=False)
    assert out == [[1, 2, 5, 0, 0], [3, 3, 4, 4, 0]]


def test_generation_feeds_one_token_per_step_while_the_cache_holds_the_sequence():
    model = _model()  # context_length 16
    lengths = []
    hook = model.register_forward_pre_hook(lambda module, args, kwargs: lengths.append(args[0].shape[1]),
                                           with_kwargs=True)  # fmt: skip
    try:
        generate(model, [7, 8], 20, generator=_generator(2))
        cached = list(lengths)
        lengths.clear()
        generate(model, [7, 8], 20, use_cache=False, generator=_generator(2))
    finally:
        hook.remove()
    # Prompt once, then one token per step up to the context (length 16); past it the window is re-read.
    assert cached == [2] + [1] * 14 + [16] * 5
    assert lengths == [min(length, 16) for length in range(2, 22)]


# ---- found while merging issue 29's probes -----------------------------------------------------------


def test_top_p_below_float32_range_keeps_the_likeliest_token():
    logits = torch.tensor([[1.0, 3.0, 2.0]])
    assert top_p_filter(logits, 1e-300).isfinite().tolist() == [[False, True, False]]
    assert int(sample_next_token(logits, 1.0, top_p=1e-300, generator=_generator(0))) == 1


def test_top_p_filters_integer_logits():
    assert top_p_filter(torch.tensor([[1, 5, 2]]), 0.5).isfinite().tolist() == [[False, True, False]]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_logits_without_a_vocabulary_are_refused_by_name(temperature):
    with pytest.raises(ValueError, match="vocabulary axis of size >= 1"):
        sample_next_token(torch.zeros(2, 0), temperature)


def test_top_k_filters_integer_logits():
    assert top_k_filter(torch.tensor([[1, 5, 2]]), 1).isfinite().tolist() == [[False, True, False]]


def test_top_p_of_one_keeps_every_token_even_where_float32_sums_reach_one_early():
    # A peaked distribution over many tokens: the running sum rounds to 1.0 before its last tokens.
    logits = torch.cat([torch.tensor([20.0]), torch.linspace(0.0, -5.0, 1023)])
    mass_above = logits.softmax(-1).sort(descending=True).values.cumsum(-1)
    assert bool((mass_above[:-1] >= 1.0).any())  # the case this test is about
    assert bool(top_p_filter(logits, 1.0).isfinite().all())
