"""Checkable skills (llmbook.tasks): seeded problems with correct answers, train and held-out splits that
never share a question, exact and extracted scoring, Wilson intervals, and prompts and SFT conversations
through SmolLM2's real chat template."""

import re

import pytest

from llmbook import gguf
from llmbook.sft import show_mask, tokenize_conversation
from llmbook.tasks import (
    TASKS,
    Problem,
    evaluate,
    last_integer,
    problems,
    prompt_text,
    sft_conversation,
    split_of,
    wilson_interval,
)


@pytest.fixture(scope="module")
def smollm2():
    file = gguf.read_gguf(gguf.smollm2_path())
    return gguf.load_tokenizer(file), file.metadata["tokenizer.chat_template"]


@pytest.mark.parametrize("name", list(TASKS))
def test_problems_are_the_same_for_a_seed_and_differ_between_seeds(name):
    task = TASKS[name]
    assert problems(task, "train", 50, seed=3) == problems(task, "train", 50, seed=3)
    assert problems(task, "train", 50, seed=3) != problems(task, "train", 50, seed=4)
    assert len({p.question for p in problems(task, "train", 50, seed=3)}) == 50  # distinct


@pytest.mark.parametrize("name", list(TASKS))
def test_train_and_heldout_never_share_a_question_and_heldout_has_500(name):
    task = TASKS[name]
    heldout = problems(task, "heldout", 500)
    train = [p for seed in range(3) for p in problems(task, "train", 1000, seed=seed)]
    assert {p.question for p in heldout}.isdisjoint(p.question for p in train)
    assert all(split_of(p.question) == "heldout" for p in heldout)
    assert all(split_of(p.question) == "train" for p in train)


def test_a_split_too_small_for_n_is_refused_and_bad_arguments_are_named():
    with pytest.raises(ValueError, match="fewer than n=30"):
        problems(TASKS["add2"], "heldout", 30, max_draws=40)
    with pytest.raises(ValueError, match="split must be one of"):
        problems(TASKS["add2"], "test", 3)


def _recompute(name: str, question: str) -> str:
    """The answer to a question, worked out from its text independently of the generators."""
    numbers = [int(n) for n in re.findall(r"\d+", question)]
    if name in ("add2", "add3"):
        return str(numbers[0] + numbers[1])
    if name == "mul2":
        return str(numbers[0] * numbers[1])
    if name == "hours_to_minutes":
        return str(60 * numbers[0] + numbers[1])
    quoted = re.findall(r'"([^"]*)"', question)
    if name == "count_letter":
        return str(sum(character == quoted[0] for character in quoted[1]))
    return "".join(reversed(quoted[0]))  # reverse5


@pytest.mark.parametrize("name", list(TASKS))
def test_every_answer_is_what_its_question_asks(name):
    for problem in problems(TASKS[name], "heldout", 200):
        assert problem.answer == _recompute(name, problem.question), problem


def test_a_talking_reply_is_extracted_right_but_not_exact():
    task, problem = TASKS["add3"], Problem("What is 345 + 234? Reply with the number only.", "579")
    talking = "To solve this, we add 345 and 234, which gives 579."
    assert not task.is_exact(talking, problem) and task.is_extracted(talking, problem)
    assert task.is_exact(" 579\n", problem) and task.is_extracted("579", problem)
    assert not task.is_extracted("345 + 234 = 580", problem)
    assert last_integer("It is 1,234 minutes or -5") == "-5" and last_integer("It is 1,234.") == "1234"
    assert last_integer("no digits") is None
    reverse = TASKS["reverse5"]
    word = Problem('Write the letters of "abcde" in reverse order, as one word.', "edcba")
    assert reverse.is_extracted("Edcba.", word) and not reverse.is_exact("Edcba.", word)


def test_wilson_interval_matches_the_hand_computed_example():
    # 8 of 10: p = 0.8, z^2 = 3.8415; centre (0.8 + 0.19207) / 1.38415 = 0.71681,
    # half-width 1.95996 * sqrt(0.016 + 0.0096037) / 1.38415 = 0.22657.
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.71681 - 0.22657, abs=1e-4)
    assert high == pytest.approx(0.71681 + 0.22657, abs=1e-4)
    assert wilson_interval(0, 8) == (0.0, pytest.approx(0.3244, abs=1e-4))  # no success: the bound is not 0
    with pytest.raises(ValueError, match="successes <= n"):
        wilson_interval(3, 2)


def test_the_prompt_asks_the_question_and_ends_with_the_assistant_header(smollm2):
    _, template = smollm2
    problem = problems(TASKS["add3"], "heldout", 1)[0]
    text = prompt_text(template, problem)
    assert f"<|im_start|>user\n{problem.question}<|im_end|>\n" in text
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    assert prompt_text(template, problem, system_prompt="Be brief.").startswith(
        "<|im_start|>system\nBe brief.<|im_end|>"
    )


def test_the_sft_conversation_trains_exactly_the_bare_answer(smollm2):
    tokenizer, template = smollm2
    problem = problems(TASKS["count_letter"], "train", 1)[0]
    messages = sft_conversation(problem)
    assert messages[-1] == {"role": "assistant", "content": problem.answer}
    example = tokenize_conversation(tokenizer, template, messages)
    assert show_mask(tokenizer, example).endswith(f"<|im_start|>assistant\n[{problem.answer}<|im_end|>]\n")


def test_evaluate_in_batches_gives_the_replies_of_one_at_a_time(smollm2, tiny_model):
    tokenizer, template = smollm2
    model = tiny_model(vocab_size=len(tokenizer.vocab), context_length=128)
    task = TASKS["count_letter"]  # questions of several token lengths, so batches group by length
    chosen = problems(task, "heldout", 6)
    batched = evaluate(model, tokenizer, template, task, chosen, max_new_tokens=4, batch_size=4)
    single = evaluate(model, tokenizer, template, task, chosen, max_new_tokens=4, batch_size=1)
    assert batched.replies == single.replies and batched.n == 6
    assert batched.exact == sum(task.is_exact(r, p) for r, p in zip(batched.replies, chosen, strict=True))
    summary = batched.summary()
    assert summary["exact"]["interval_95"] == list(wilson_interval(batched.exact, 6))


def test_the_finetune_benchmark_writes_each_tasks_scores_and_baseline(
    smollm2, tiny_model, monkeypatch, tmp_path
):
    import json

    from llmbook.bench import finetune

    tokenizer, _ = smollm2
    model = tiny_model(vocab_size=len(tokenizer.vocab), context_length=128)
    monkeypatch.setattr(finetune, "load_model", lambda path: model)  # SmolLM2's tokenizer, a tiny model
    out = tmp_path / "zero_shot.json"
    argv = ["--zero-shot", "--problems", "3", "--tasks", "add2,count_letter", "--max-new-tokens", "2",
            "--out", str(out)]  # fmt: skip
    assert finetune.main(argv) == 0
    results = json.loads(out.read_text())
    assert list(results["tasks"]) == ["add2", "count_letter"] and results["problems"] == 3
    for name, scores in results["tasks"].items():
        assert scores["n"] == 3 and len(scores["examples"]) == 3
        assert scores["exact"]["interval_95"] == list(wilson_interval(scores["exact"]["correct"], 3))
        answers = [example["answer"] for example in scores["examples"]]
        assert scores["most_common_answer"]["accuracy"] == max(answers.count(a) for a in answers) / 3, name
    with pytest.raises(SystemExit, match="unknown task"):
        finetune.main(["--zero-shot", "--tasks", "add7"])
