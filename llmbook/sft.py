"""Supervised fine-tuning data: conversations through the model's chat template, with the loss only on
the assistant's tokens.

A conversation is rendered by the chat template (`llmbook.chat.apply_chat_template`) and tokenized; the
targets are the next tokens, with -100 (ignored by the loss, `TransformerLM.forward(ids, targets)`)
everywhere except on what the assistant says: its reply and the end-of-turn token that stops it, not the
system prompt, the user's words or the template's headers. Examples are batched by right-padding.

How the assistant's tokens are found: the template renders the conversation up to an assistant message
with the generation prompt (``<|im_start|>assistant\\n``), then with the message; what the second adds is
the reply. Each piece is tokenized on its own, and the concatenation is checked to be exactly the
tokenization of the whole text, so no token straddles a boundary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Int
from torch import Tensor

from llmbook.chat import Message, apply_chat_template
from llmbook.tokenizer import Tokenizer

__all__ = ["IGNORE", "SFTExample", "tokenize_conversation", "pad_batch", "show_mask"]

IGNORE = -100  # the target the loss skips (torch.nn.functional.cross_entropy's default ignore_index)


@dataclass
class SFTExample:
    """One tokenized conversation: ``ids`` and ``trained`` (same length), True where a token is the
    assistant's and so a target of the loss (it is predicted from the tokens before it)."""

    ids: list[int]
    trained: list[bool]

    def targets(self) -> list[int]:
        """The targets for inputs ids[:-1]: ids[1:], with IGNORE where the token is not the assistant's."""
        return [token if keep else IGNORE for token, keep in zip(self.ids[1:], self.trained[1:], strict=True)]


def _pieces(template: str, messages: list[Message], end_token: str) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, is the assistant's) pieces, in order."""
    pieces: list[tuple[str, bool]] = []
    done = ""  # the text of the pieces so far
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = apply_chat_template(template, messages[:index], add_generation_prompt=True)
        full = apply_chat_template(template, messages[: index + 1], add_generation_prompt=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise ValueError(
                f"the chat template does not render message {index} by appending to the conversation before "
                "it, so the assistant's tokens cannot be located"
            )
        reply = full[len(prompt) :]
        end = reply.find(end_token)
        if end < 0:
            raise ValueError(
                f"assistant message {index} renders without the end token {end_token!r}: {reply!r}"
            )
        end += len(end_token)  # what the template writes after the end token (a newline) is not trained
        pieces += [(prompt[len(done) :], False), (reply[:end], True), (reply[end:], False)]
        done = full
    whole = apply_chat_template(template, messages, add_generation_prompt=False)
    if not whole.startswith(done):
        raise ValueError("the chat template renders the whole conversation differently from its turns")
    pieces.append((whole[len(done) :], False))
    return [(text, trained) for text, trained in pieces if text]


def tokenize_conversation(
    tokenizer: Tokenizer, template: str, messages: list[Message], end_token: str = "<|im_end|>"
) -> SFTExample:
    """Render ``messages`` with the chat ``template``, tokenize, and mark the assistant's tokens (each reply
    and its ``end_token``) as trained."""
    if end_token not in tokenizer.special_tokens:
        raise ValueError(f"end_token {end_token!r} is not a special token of the tokenizer")
    if not any(message.get("role") == "assistant" for message in messages):
        raise ValueError("the conversation has no assistant message: there would be nothing to learn")
    ids: list[int] = []
    trained: list[bool] = []
    for text, is_reply in _pieces(template, messages, end_token):
        piece = tokenizer.encode(text)
        ids += piece
        trained += [is_reply] * len(piece)
    if ids != tokenizer.encode(apply_chat_template(template, messages, add_generation_prompt=False)):
        raise ValueError("tokenizing the conversation piece by piece differs from tokenizing it whole")
    return SFTExample(ids=ids, trained=trained)


def pad_batch(
    examples: Sequence[SFTExample], pad_id: int, max_length: int | None = None
) -> tuple[Int[Tensor, "batch seq"], Int[Tensor, "batch seq"]]:
    """Inputs (ids[:-1], right-padded with ``pad_id``) and targets (ids[1:] with IGNORE where not trained
    and on the padding), both (batch, longest - 1). Right padding is safe under the causal mask: no real
    token attends to a pad after it. ``max_length`` refuses a longer example rather than cutting it."""
    if not examples:
        raise ValueError("pad_batch needs at least one example")
    longest = max(len(example.ids) for example in examples)
    if longest < 2:
        raise ValueError("every example needs at least two tokens (one input, one target)")
    if max_length is not None and longest - 1 > max_length:
        raise ValueError(f"an example has {longest - 1} input tokens, more than max_length={max_length}")
    inputs = torch.full((len(examples), longest - 1), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), longest - 1), IGNORE, dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.ids) - 1
        inputs[row, :n] = torch.tensor(example.ids[:-1])
        targets[row, :n] = torch.tensor(example.targets())
    return inputs, targets


def show_mask(tokenizer: Tokenizer, example: SFTExample, open_mark: str = "[", close_mark: str = "]") -> str:
    """The conversation as text with every run of trained tokens inside ``open_mark`` ... ``close_mark``."""
    out, inside = [], False
    for token, trained in zip(example.ids, example.trained, strict=True):
        if trained != inside:
            out.append(open_mark if trained else close_mark)
            inside = trained
        out.append(tokenizer.decode([token]))
    if inside:
        out.append(close_mark)
    return "".join(out)
