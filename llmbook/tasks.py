"""Checkable skills for fine-tuning: problems a program generates from a seed and grades, with a train
split and a held-out split that never share a problem, rendered through the model's chat template.

A `Task` draws (question, answer) problems from a `random.Random`. Which split a problem belongs to is a
function of its question alone (a SHA-256 hash, one question in `HELDOUT_BUCKETS` goes to held-out), so
no question can be in both splits, whatever the seeds and sizes asked for.

A reply is scored twice: *exact* (the stripped reply is the answer, which is what SFT teaches) and
*extracted* (the task's extraction, e.g. the last number of the reply, is the answer), so a model that
talks before answering still gets credit for the skill. `evaluate` decodes greedily with the book's
sampler and KV cache and reports both with 95% Wilson intervals.

The system prompt: none is given, so SmolLM2's template adds its own default ("You are a helpful AI
assistant named SmolLM, trained by Hugging Face"), as ``python -m llmbook chat`` does; the instruction
to answer briefly is in the user's message.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from llmbook.chat import Message, apply_chat_template
from llmbook.model import TransformerLM
from llmbook.sample import generate
from llmbook.tokenizer import Tokenizer

__all__ = [
    "Problem", "Task", "TASKS", "SPLITS", "split_of", "problems", "last_integer", "first_word",
    "prompt_messages", "sft_conversation", "prompt_text", "wilson_interval", "Score", "evaluate",
]  # fmt: skip

SPLITS = ("train", "heldout")
HELDOUT_BUCKETS = 5  # one question in five is held out

# Common English words, for the letter-counting task (shipped, so nothing is downloaded).
WORDS = tuple(
    """
    about above across after again against almost alone along already always among animal answer
    apple around autumn baby back basket beach because become before begin behind believe better
    between bird black blanket bottle bread bridge bright brother brown butter button camera candle
    carrot castle cattle center chair change cheese cherry chicken child circle city class clean clock
    cloud coffee color cookie corner cotton country cousin cover cream dance danger daughter dinner
    doctor dollar donkey door double dragon dream dress early earth eight enough evening every family
    farmer father feather fellow finger flower follow forest forget friend garden giant glass golden
    grass green guitar happen happy hello hidden hollow honey horse house hundred hunter island jacket
    kettle kitchen ladder letter library little market matter middle mirror money monkey morning mother
    mountain number object office orange paper parrot pencil people pepper pillow planet pocket potato
    pretty puppy rabbit river rocket school season second seven shadow silver sister smile spring
    square street strong summer sunny supper table teacher thirteen tomato travel tree umbrella valley
    village water weather window winter yellow yesterday zebra balloon banana coconut dessert giraffe
    address committee mississippi bookkeeper tennessee strawberry success possess assessment
    """.split()
)
LETTERS = "abcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True)
class Problem:
    """One problem: the user's question and the exact reply that answers it."""

    question: str
    answer: str


@dataclass(frozen=True)
class Task:
    """A checkable skill: ``draw`` makes a problem from a random generator, ``extract`` finds the answer in
    a reply (None when there is none)."""

    name: str
    description: str
    draw: Callable[[random.Random], Problem] = field(repr=False)
    extract: Callable[[str], str | None] = field(repr=False)

    def is_exact(self, reply: str, problem: Problem) -> bool:
        """True when the reply, stripped of surrounding whitespace, is the answer and nothing else."""
        return reply.strip() == problem.answer

    def is_extracted(self, reply: str, problem: Problem) -> bool:
        """True when the answer extracted from the reply is the problem's answer."""
        return self.extract(reply) == problem.answer


def last_integer(reply: str) -> str | None:
    """The last whole number in ``reply`` ("1,234" -> "1234"; "-5" -> "-5"), None when it has none.

    The last, not the first: a model that talks restates the question first ("77 + 54 = 131")."""
    found = re.findall(r"-?\d{1,3}(?:,\d{3})+(?!\d)|-?\d+", reply)
    return None if not found else str(int(found[-1].replace(",", "")))


def first_word(reply: str) -> str | None:
    """The first run of letters in ``reply``, lowercased, None when it has none."""
    found = re.search(r"[A-Za-z]+", reply)
    return None if found is None else found.group().lower()


_NUMBER_ONLY = "Reply with the number only."


def _addition(digits: int) -> Callable[[random.Random], Problem]:
    def draw(rng: random.Random) -> Problem:
        a, b = (rng.randrange(10 ** (digits - 1), 10**digits) for _ in range(2))
        return Problem(f"What is {a} + {b}? {_NUMBER_ONLY}", str(a + b))

    return draw


def _multiplication(rng: random.Random) -> Problem:
    a, b = rng.randrange(10, 100), rng.randrange(10, 100)
    return Problem(f"What is {a} * {b}? {_NUMBER_ONLY}", str(a * b))


def _count_letter(rng: random.Random) -> Problem:
    # Two words, so that there are enough distinct questions for a held-out split of 500 and more; the
    # letter is picked by position, so letters that repeat (answers 2, 3, 4) come up in proportion.
    text = f"{rng.choice(WORDS)} {rng.choice(WORDS)}"
    letter = rng.choice(text.replace(" ", ""))
    return Problem(
        f'How many times does the letter "{letter}" appear in "{text}"? {_NUMBER_ONLY}',
        str(text.count(letter)),
    )


def _reverse_letters(rng: random.Random) -> Problem:
    letters = "".join(rng.choice(LETTERS) for _ in range(5))
    return Problem(
        f'Write the letters of "{letters}" in reverse order, as one word. Reply with that word only.',
        letters[::-1],
    )


def _hours_to_minutes(rng: random.Random) -> Problem:
    hours, minutes = rng.randrange(2, 100), rng.randrange(1, 60)
    return Problem(
        f"How many minutes are there in {hours} hours and {minutes} minutes? {_NUMBER_ONLY}",
        str(hours * 60 + minutes),
    )


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task("add2", "adding two 2-digit numbers", _addition(2), last_integer),
        Task("add3", "adding two 3-digit numbers", _addition(3), last_integer),
        Task("mul2", "multiplying two 2-digit numbers", _multiplication, last_integer),
        Task("count_letter", "counting a letter in two common English words", _count_letter, last_integer),
        Task("reverse5", "reversing a string of 5 random letters", _reverse_letters, first_word),
        Task(
            "hours_to_minutes",
            "converting 2-99 hours and 1-59 minutes to minutes",
            _hours_to_minutes,
            last_integer,
        ),
    )
}


def split_of(question: str) -> str:
    """ "heldout" or "train": a fixed function of the question's text, so the splits cannot overlap."""
    digest = hashlib.sha256(question.encode("utf-8")).digest()
    return "heldout" if int.from_bytes(digest[:8], "big") % HELDOUT_BUCKETS == 0 else "train"


def problems(task: Task, split: str, n: int, seed: int = 0, max_draws: int | None = None) -> list[Problem]:
    """``n`` distinct problems of ``split``, drawn in a fixed order from ``seed`` (same arguments, same list).

    Draws that fall in the other split, or repeat a question, are skipped; a split with fewer than ``n``
    distinct questions is refused after ``max_draws`` draws (default 50 * n + 1000)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an integer >= 0, got {n!r}")
    rng = random.Random(f"{task.name}/{split}/{seed}")  # a string seed: stable across runs and platforms
    max_draws = 50 * n + 1000 if max_draws is None else max_draws
    found: dict[str, Problem] = {}
    for _ in range(max_draws):
        if len(found) == n:
            break
        problem = task.draw(rng)
        if split_of(problem.question) == split:
            found.setdefault(problem.question, problem)
    if len(found) < n:
        raise ValueError(
            f"task {task.name!r} gave only {len(found)} distinct {split} problems in {max_draws} draws, "
            f"fewer than n={n}; ask for fewer"
        )
    return list(found.values())


def prompt_messages(problem: Problem, system_prompt: str | None = None) -> list[Message]:
    """The conversation that asks the problem (a system message only when ``system_prompt`` is given)."""
    system = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
    return [*system, {"role": "user", "content": problem.question}]


def sft_conversation(problem: Problem, system_prompt: str | None = None) -> list[Message]:
    """The conversation SFT trains on: the question, and the bare answer as the assistant's reply
    (for `llmbook.sft.tokenize_conversation`)."""
    return [*prompt_messages(problem, system_prompt), {"role": "assistant", "content": problem.answer}]


def prompt_text(template: str, problem: Problem, system_prompt: str | None = None) -> str:
    """The chat-templated prompt, ending with the assistant's header, ready for the model to answer."""
    return apply_chat_template(template, prompt_messages(problem, system_prompt), add_generation_prompt=True)


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval (95% for the default z) for a proportion ``successes / n``."""
    if n <= 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n >= 1, got successes={successes}, n={n}")
    p = successes / n
    scale = 1 + z * z / n
    center = (p + z * z / (2 * n)) / scale
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / scale
    return max(0.0, center - half), min(1.0, center + half)


@dataclass
class Score:
    """How a model did on a list of problems: counts, accuracies with 95% intervals, and every reply."""

    n: int
    exact: int
    extracted: int
    replies: list[str]

    def summary(self) -> dict:
        """The counts, accuracies and Wilson intervals as a JSON-ready dict (no replies)."""
        out: dict = {"n": self.n}
        for name, count in (("exact", self.exact), ("extracted", self.extracted)):
            low, high = wilson_interval(count, self.n)
            out[name] = {"correct": count, "accuracy": count / self.n, "interval_95": [low, high]}
        return out


def _replies(
    model: TransformerLM,
    tokenizer: Tokenizer,
    prompts: Sequence[list[int]],
    max_new_tokens: int,
    stop_id: int,
) -> list[str]:
    """Greedy replies to prompts of equal length, decoded up to (without) the stop token."""
    out = generate(model, torch.tensor(prompts), max_new_tokens, temperature=0, stop_ids=[stop_id])
    replies = []
    for row in out[:, len(prompts[0]) :].tolist():
        reply = row[: row.index(stop_id)] if stop_id in row else row
        replies.append(tokenizer.decode(reply))
    return replies


def evaluate(
    model: TransformerLM,
    tokenizer: Tokenizer,
    template: str,
    task: Task,
    problem_list: Sequence[Problem],
    max_new_tokens: int = 24,
    batch_size: int = 32,
    system_prompt: str | None = None,
    end_token: str = "<|im_end|>",
) -> Score:
    """Greedy replies to every problem (KV cache, batches of prompts that have the same number of tokens,
    so no padding changes an answer), scored exact and extracted."""
    if not problem_list:
        raise ValueError("evaluate needs at least one problem")
    if end_token not in tokenizer.special_tokens:
        raise ValueError(f"end_token {end_token!r} is not a special token of the tokenizer")
    stop_id = tokenizer.special_tokens[end_token]
    prompts = [tokenizer.encode(prompt_text(template, problem, system_prompt)) for problem in problem_list]
    by_length: dict[int, list[int]] = {}
    for index, prompt in enumerate(prompts):
        by_length.setdefault(len(prompt), []).append(index)
    replies: list[str] = [""] * len(prompts)
    for indices in by_length.values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            texts = _replies(model, tokenizer, [prompts[i] for i in chunk], max_new_tokens, stop_id)
            for index, text in zip(chunk, texts, strict=True):
                replies[index] = text
    return Score(
        n=len(problem_list),
        exact=sum(task.is_exact(reply, p) for reply, p in zip(replies, problem_list, strict=True)),
        extracted=sum(task.is_extracted(reply, p) for reply, p in zip(replies, problem_list, strict=True)),
        replies=replies,
    )
