"""Chat with a model: the chat template turns a conversation into one token sequence, and the reply is
sampled token by token (with `llmbook.sample.sample_next_token`) and streamed as text while it grows.

A `ChatSession` keeps the KV cache between turns: a conversation only grows at the end, so each new turn
feeds just the tokens the cache has not seen. ``python -m llmbook chat`` is this loop in a terminal, where
Ctrl-C stops the reply being written, not the program.
"""

import codecs
from collections.abc import Iterator

import torch
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llmbook.model import TransformerLM
from llmbook.sample import sample_next_token
from llmbook.tokenizer import Tokenizer

__all__ = ["apply_chat_template", "ChatSession"]

Message = dict[str, str]


def apply_chat_template(template: str, messages: list[Message], add_generation_prompt: bool = True) -> str:
    """Render a Jinja chat template (a GGUF's ``tokenizer.chat_template``) for ``messages`` as text."""
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) != {"role", "content"}:
            raise ValueError(f"message {index} must be a dict with 'role' and 'content', got {message!r}")
    # Sandboxed, as transformers renders templates: a template is data from a file, not trusted code.
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    compiled = environment.from_string(template)
    return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt)


class ChatSession:
    """A conversation with ``model``: `reply` streams the assistant's answer to each user message."""

    def __init__(
        self,
        model: TransformerLM,
        tokenizer: Tokenizer,
        template: str,
        system_prompt: str | None = None,
        end_token: str = "<|im_end|>",
        max_length: int = 2048,
    ):
        if end_token not in tokenizer.special_tokens:
            raise ValueError(f"end_token {end_token!r} is not a special token of the tokenizer")
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.end_id = tokenizer.special_tokens[end_token]
        self.messages: list[Message] = []
        if system_prompt is not None:
            self.messages.append({"role": "system", "content": system_prompt})
        self.cache = model.make_kv_cache(1, max_length=min(max_length, model.config.context_length))
        self.cached_ids: list[int] = []  # the tokens whose keys/values the cache holds

    def prompt_ids(self) -> list[int]:
        """The whole conversation so far, templated and tokenized, ending with the assistant's header."""
        return self.tokenizer.encode(apply_chat_template(self.template, self.messages))

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

        Stops at the end token, after ``max_new_tokens``, or when the caller stops iterating (Ctrl-C).
        """
        self.messages.append({"role": "user", "content": user_message})
        prompt = self.prompt_ids()
        cached = self.cached_ids
        if prompt[: len(cached)] != cached or len(prompt) + max_new_tokens > self.cache.max_length:
            self.cache.reset()  # the text changed before the end (or no room): start the cache over
            self.cached_ids = []
        if len(prompt) + max_new_tokens > self.cache.max_length:
            raise ValueError(
                f"the conversation ({len(prompt)} tokens) plus max_new_tokens={max_new_tokens} exceeds the "
                f"cache ({self.cache.max_length} tokens); start a new session"
            )
        answer = {"role": "assistant", "content": ""}
        self.messages.append(answer)
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
    """Read user lines until EOF or "/quit" and stream each reply; Ctrl-C ends a reply, not the loop."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        try:
            line = read_line("you> ")
        except (EOFError, KeyboardInterrupt):
            write("")
            return
        if line.strip() in ("/quit", "/exit"):
            return
        if not line.strip():
            continue
        write("assistant> ", end="", flush=True)
        try:
            for piece in session.reply(line, max_new_tokens, temperature, top_p, generator):
                write(piece, end="", flush=True)
        except KeyboardInterrupt:
            write(" [stopped]", end="")
        write("")
