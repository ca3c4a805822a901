"""Chat with a model: the chat template turns a conversation into one token sequence, and the reply is
sampled token by token (with `llmbook.sample.sample_next_token`) and streamed as text while it grows.

A chat template is a Jinja program that comes from the model file, so it is data, not trusted code:
`ChatTemplate` compiles it once (a syntax error is refused when the file loads, not at the first message)
and renders it in Jinja's sandbox with bounds on what it may build (`TemplateLimits`: loop steps, the
length of any string or list, and of the whole output).

A `ChatSession` keeps the KV cache between turns: a conversation only grows at the end, so each new turn
feeds just the tokens the cache has not seen. A message that would not fit in the cache is refused with
`ContextFullError` and leaves the conversation as it was. ``python -m llmbook chat`` is this loop in a
terminal, where Ctrl-C stops the reply being written, not the program.
"""

import codecs
import functools
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from jinja2 import TemplateSyntaxError, nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import pass_environment

from llmbook.errors import CorruptFileError, check_int
from llmbook.gguf import GGUFFile, read_gguf, smollm2_path
from llmbook.model import TransformerLM
from llmbook.sample import _check_generate_args, sample_next_token
from llmbook.tokenizer import Tokenizer

__all__ = [
    "apply_chat_template", "ChatSession", "ChatTemplate", "ChatTemplateError", "ContextFullError",
    "TemplateLimits", "load_chat_template", "chat_loop", "DEFAULT_MAX_LENGTH",
]  # fmt: skip

Message = dict[str, str]
DEFAULT_MAX_LENGTH = 8192  # tokens a session's KV cache holds unless asked (or the model's context, if less)


class ChatTemplateError(ValueError):
    """A chat template is not a string, does not compile, or failed (or broke a bound) while rendering."""


class ContextFullError(ValueError):
    """A message would make the conversation longer than the session's cache; it was not added."""


@dataclass(frozen=True)
class TemplateLimits:
    """What one rendering may do beyond the conversation's own size (its messages, its characters):
    ``max_steps`` loop iterations in all; ``max_size`` for any integer, the length of any string or list it
    builds, and the length of the output. Real chat templates loop once over the messages and print them."""

    max_steps: int = 100_000
    max_size: int = 1_000_000

    def __post_init__(self) -> None:
        check_int("TemplateLimits", "max_steps", self.max_steps, minimum=0)
        check_int("TemplateLimits", "max_size", self.max_size, minimum=0)


# A width or precision of 7 digits or more in a "%" or "{}" format: Python would pad to that many characters.
_HUGE_WIDTH = re.compile(r"%[-#0 +]*\d*\.?\d{7}|\{[^{}]*:[^{}]*\d{7}[^{}]*\}")


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox, plus `TemplateLimits`: every for-loop counts its steps, and every
    operator, function and filter is refused integers and results larger than the size limit."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})  # intercepted ones are not folded at compile time

    def __init__(self, limits: TemplateLimits, origin: str):
        super().__init__(trim_blocks=True, lstrip_blocks=True)
        self.limits, self.origin = limits, origin
        self.max_steps, self.max_size = limits.max_steps, limits.max_size  # set for each render
        self.steps_left = self.max_steps
        self.filters = {name: self._bounded(f) for name, f in self.filters.items()}
        self.filters["llmbook_count_steps"] = pass_environment(_count_steps)
        self.filters["format"] = functools.partial(self._format, self.filters["format"])
        self.tests = {name: self._bounded(f) for name, f in self.tests.items()}
        del self.globals["lipsum"]  # lorem ipsum: a function whose small argument writes megabytes
        self.globals = {name: self._bounded(f) if callable(f) else f for name, f in self.globals.items()}
        self.globals["raise_exception"] = self._raise_exception  # as transformers, for templates that use it

    def fail(self, problem: str) -> ChatTemplateError:
        return ChatTemplateError(f"{self.origin} {problem}")

    def _raise_exception(self, message: str) -> None:
        raise self.fail(f"refused the conversation: {message}")

    def check(self, value: Any) -> Any:
        """``value`` if it is within the limits (an int, or the length of a string or list)."""
        limit = self.max_size
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > limit:
            shown = f"{value:,}" if value.bit_length() <= 64 else f"of {value.bit_length():,} bits"
            raise self.fail(f"computed the integer {shown}, beyond the limit of {limit:,}")
        if isinstance(value, str | list | tuple | dict) and len(value) > limit:
            raise self.fail(
                f"built a {type(value).__name__} of {len(value):,} items, beyond the limit of {limit:,}"
            )
        return value

    def _bounded(self, function: Callable) -> Callable:
        @functools.wraps(function)  # keeps jinja_pass_arg, so Jinja passes context/environment as before
        def bounded(*args, **kwargs):
            for value in (*args, *kwargs.values()):
                if isinstance(value, int):
                    self.check(value)
            return self.check(function(*args, **kwargs))

        return bounded

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (Jinja's own signature)
        for value in (*args, *kwargs.values()):
            if isinstance(value, int):
                __self.check(value)
        return __self.check(super().call(__context, __obj, *args, **kwargs))

    def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
        self._check_operands(operator, left, right)
        return self.check(super().call_binop(context, operator, left, right))

    def _check_operands(self, operator: str, left: Any, right: Any) -> None:
        # Refuse what would be too large before Python builds it (the result is checked after, too).
        limit = self.max_size
        numbers = [value for value in (left, right) if isinstance(value, int) and not isinstance(value, bool)]
        if operator == "*" and len(numbers) == 1:
            sized = right if numbers[0] is left else left
            if hasattr(sized, "__len__") and len(sized) * abs(numbers[0]) > limit:
                raise self.fail(f"repeats a sequence to more than {limit:,} items")
        if operator == "*" and len(numbers) == 2 and left.bit_length() + right.bit_length() > 64:
            raise self.fail(f"multiplies integers beyond the limit of {limit:,}")
        if operator == "**" and len(numbers) == 2 and abs(left) > 1 and right * left.bit_length() > 64:
            raise self.fail(f"raises {left} to the power {right}, beyond the limit of {limit:,}")
        if operator == "%" and isinstance(left, str) and _HUGE_WIDTH.search(left):
            raise self.fail("formats with a width or precision of 7 digits or more")

    def _format(self, format_filter: Callable, value: Any, *args, **kwargs) -> str:
        if isinstance(value, str) and _HUGE_WIDTH.search(value):  # the filter applies "%" itself
            raise self.fail("formats with a width or precision of 7 digits or more")
        return format_filter(value, *args, **kwargs)

    def wrap_str_format(self, value: Any) -> Callable | None:
        """``str.format`` as the sandbox wraps it, refusing the widths "%" is refused."""
        wrapped = super().wrap_str_format(value)
        if wrapped is not None and _HUGE_WIDTH.search(value.__self__):
            raise self.fail("formats with a width or precision of 7 digits or more")
        return wrapped


def _count_steps(environment: _BoundedEnvironment, iterable: Any) -> Iterator[Any]:
    """Every for-loop iterates through this (see `ChatTemplate`): it counts the render's loop steps."""
    for item in iterable:
        environment.steps_left -= 1
        if environment.steps_left < 0:
            raise environment.fail(f"ran more than {environment.max_steps:,} loop steps")
        yield item


class ChatTemplate:
    """A Jinja chat template compiled once (sandboxed, as transformers renders them) and rendered within
    `TemplateLimits`; ``origin`` names where it came from in every error. One render at a time: the
    budgets live on the template's environment."""

    def __init__(
        self, source: str, origin: str = "the chat template", limits: TemplateLimits = TemplateLimits()
    ):
        if not isinstance(source, str):
            raise ChatTemplateError(f"{origin} must be a string (Jinja source), got {type(source).__name__}")
        self.source, self.origin = source, origin
        self._environment = _BoundedEnvironment(limits, origin)
        try:
            tree = self._environment.parse(source)
            for loop in tree.find_all(nodes.For):  # every loop counts its steps against the render's budget
                loop.iter = nodes.Filter(
                    loop.iter, "llmbook_count_steps", [], [], None, None, lineno=loop.lineno
                )
            self._compiled = self._environment.from_string(tree)
        except TemplateSyntaxError as err:
            raise ChatTemplateError(f"{origin} does not compile: {err.message} (line {err.lineno})") from None
        except RecursionError:  # Jinja's parser and optimizer recurse through nested expressions
            raise ChatTemplateError(f"{origin} does not compile: it nests too deeply") from None

    def render(self, messages: list[Message], add_generation_prompt: bool = True) -> str:
        """The conversation as one text, ending with the assistant's header if ``add_generation_prompt``."""
        _check_messages(messages)
        environment, limits = self._environment, self._environment.limits
        environment.max_steps = environment.steps_left = limits.max_steps + len(messages)
        environment.max_size = limits.max_size + sum(len(m["content"]) + len(m["role"]) for m in messages)
        pieces, length = [], 0
        try:
            for piece in self._compiled.generate(
                messages=messages, add_generation_prompt=add_generation_prompt
            ):
                length += len(piece)
                if length > environment.max_size:
                    raise environment.fail(f"rendered more than {environment.max_size:,} characters")
                pieces.append(piece)
        except ChatTemplateError:
            raise
        except RecursionError:
            raise environment.fail("recursed deeper than Python allows") from None
        except Exception as err:  # the template's own failure (undefined name, 1/0, a type error): its fault
            raise environment.fail(f"failed while rendering: {type(err).__name__}: {err}") from None
        return "".join(pieces)


def _check_messages(messages: list[Message]) -> None:
    if not isinstance(messages, list):
        raise TypeError(f"messages must be a list of dicts, got {type(messages).__name__}")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) != {"role", "content"}:
            raise ValueError(f"message {index} must be a dict with 'role' and 'content', got {message!r:.80}")
        if not all(isinstance(value, str) for value in message.values()):
            raise TypeError(f"message {index}'s role and content must be strings, got {message!r:.80}")


def apply_chat_template(
    template: "str | ChatTemplate", messages: list[Message], add_generation_prompt: bool = True
) -> str:
    """Render a chat template (a GGUF's ``tokenizer.chat_template``, or a `ChatTemplate`) for ``messages``."""
    compiled = template if isinstance(template, ChatTemplate) else ChatTemplate(template)
    return compiled.render(messages, add_generation_prompt)


def load_chat_template(file: "GGUFFile | str | os.PathLike | None" = None) -> ChatTemplate:
    """The compiled ``tokenizer.chat_template`` of a GGUF file (default: SmolLM2's); a missing, non-string
    or uncompilable template is a `CorruptFileError` naming the file and the key."""
    gguf = file if isinstance(file, GGUFFile) else read_gguf(smollm2_path() if file is None else file)
    source = gguf.metadata.get("tokenizer.chat_template")
    if source is None:
        raise CorruptFileError(f"{gguf.path} has no tokenizer.chat_template, so it is not a chat model")
    try:
        return ChatTemplate(source, f"{gguf.path}: tokenizer.chat_template")
    except ChatTemplateError as err:
        raise CorruptFileError(str(err)) from None


class ChatSession:
    """A conversation with ``model``: `reply` streams the assistant's answer to each user message.

    ``max_length`` is how many tokens the session's KV cache holds (the conversation plus the reply being
    written): 1 to the model's context_length, by default `DEFAULT_MAX_LENGTH` or the context if shorter.
    """

    def __init__(
        self,
        model: TransformerLM,
        tokenizer: Tokenizer,
        template: "str | ChatTemplate",
        system_prompt: str | None = None,
        end_token: str = "<|im_end|>",
        max_length: int | None = None,
    ):
        if end_token not in tokenizer.special_tokens:
            raise ValueError(f"end_token {end_token!r} is not a special token of the tokenizer")
        if tokenizer.vocab_size > model.config.vocab_size:  # an id past the embedding table fails mid-reply
            raise ValueError(
                f"the tokenizer has {tokenizer.vocab_size} ids but the model embeds "
                f"{model.config.vocab_size}; they come from different models"
            )
        if system_prompt is not None and not isinstance(system_prompt, str):
            raise TypeError(f"system_prompt must be a string or None, got {type(system_prompt).__name__}")
        context = model.config.context_length
        max_length = min(DEFAULT_MAX_LENGTH, context) if max_length is None else max_length
        if isinstance(max_length, bool) or not isinstance(max_length, int):
            raise TypeError(f"max_length must be an integer or None, got {max_length!r}")
        if not 1 <= max_length <= context:
            raise ValueError(
                f"max_length must be from 1 to the model's context_length ({context}), got {max_length}"
            )
        self.model, self.tokenizer = model, tokenizer
        self.template = template if isinstance(template, ChatTemplate) else ChatTemplate(template)
        self.end_id = tokenizer.special_tokens[end_token]
        self.system_prompt = system_prompt
        self.messages: list[Message] = []
        self.cache = model.make_kv_cache(1, max_length=max_length)
        self.cached_ids: list[int] = []  # the tokens whose keys/values the cache holds
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays) and empty the cache."""
        self.messages = (
            [] if self.system_prompt is None else [{"role": "system", "content": self.system_prompt}]
        )
        self.cache.reset()
        self.cached_ids = []

    def prompt_ids(self, messages: list[Message] | None = None) -> list[int]:
        """A conversation (default: this one), templated and tokenized, ending with the assistant's header."""
        return self.tokenizer.encode(self.template.render(self.messages if messages is None else messages))

    @torch.no_grad()
    def _feed(self, ids: list[int]) -> torch.Tensor:
        """Run ``ids`` through the model after what the cache holds; the logits of the last position."""
        logits = self.model(torch.tensor([ids]), kv_cache=self.cache)
        self.cached_ids += ids
        return logits[0, -1]

    def reply(
        self,
        user_message: str,
        max_new_tokens: int = 256,
        temperature: float = 0.7,
        top_p: float | None = 0.9,
        generator: torch.Generator | None = None,
    ) -> Iterator[str]:
        """Stream the answer to ``user_message`` as text pieces; it joins the conversation as it grows.

        Stops at the end token, after ``max_new_tokens``, or when the caller stops iterating (Ctrl-C). A
        message for which the cache has no room (with ``max_new_tokens`` for the answer) raises
        `ContextFullError` here, before anything is streamed, and is not added to the conversation.
        """
        if not isinstance(user_message, str):
            raise TypeError(f"user_message must be a string, got {type(user_message).__name__}")
        _check_generate_args(max_new_tokens, temperature, None, top_p, [], self.model.config.vocab_size)
        messages = [*self.messages, {"role": "user", "content": user_message}]
        prompt = self.prompt_ids(messages)
        if len(prompt) + max_new_tokens > self.cache.max_length:
            raise ContextFullError(
                f"this message makes the conversation {len(prompt)} tokens, which with max_new_tokens="
                f"{max_new_tokens} exceeds the session's cache ({self.cache.max_length} tokens, max_length); "
                "the message was not added: send a shorter one, or reset the session"
                + (f" or give it a larger max_length (up to {self.model.config.context_length})"
                   if self.cache.max_length < self.model.config.context_length else "")
            )  # fmt: skip
        answer = {"role": "assistant", "content": ""}
        self.messages = [*messages, answer]
        return self._stream(prompt, answer, max_new_tokens, temperature, top_p, generator)

    def _stream(self, prompt, answer, max_new_tokens, temperature, top_p, generator) -> Iterator[str]:
        if prompt[: len(self.cached_ids)] != self.cached_ids:
            self.cache.reset()  # the text changed before the end: start the cache over
            self.cached_ids = []
        logits = self._feed(prompt[len(self.cached_ids) :])
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a character may span tokens
        for _ in range(max_new_tokens):
            next_id = int(sample_next_token(logits[None], temperature, None, top_p, generator)[0])
            if next_id == self.end_id:
                break
            piece = decoder.decode(self.tokenizer.decode_bytes([next_id]))
            answer["content"] += piece
            yield piece
            logits = self._feed([next_id])
        answer["content"] += decoder.decode(b"", final=True)


def chat_loop(
    session: ChatSession,
    read_line=input,
    write=print,
    max_new_tokens: int = 256,
    temperature: float = 0.7,
    top_p: float | None = 0.9,
    seed: int = 0,
) -> None:
    """Read user lines until EOF or "/quit" and stream each reply; "/reset" starts the conversation over.

    Ctrl-C ends a reply, not the loop; a message that does not fit (or that the template refuses) is
    reported and dropped, and the loop reads the next line.
    """
    _check_generate_args(max_new_tokens, temperature, None, top_p, [], session.model.config.vocab_size)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an integer from 0 to 2**64 - 1, got {seed!r}")
    generator = torch.Generator().manual_seed(seed)
    while True:
        try:
            line = read_line("you> ")
        except (EOFError, KeyboardInterrupt):
            write("")
            return
        command = line.strip()
        if command in ("/quit", "/exit"):
            return
        if command == "/reset":
            session.reset()
            write("[conversation reset]")
            continue
        if not command:
            continue
        try:
            pieces = session.reply(line, max_new_tokens, temperature, top_p, generator)
        except (ContextFullError, ChatTemplateError) as err:
            write(f"[not sent: {err}]")
            continue
        write("assistant> ", end="", flush=True)
        try:
            for piece in pieces:
                write(piece, end="", flush=True)
        except KeyboardInterrupt:
            write(" [stopped]", end="")
        write("")
