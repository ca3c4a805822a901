"""SFT data (llmbook.sft) on SmolLM2's real chat template and tokenizer: exactly the assistant's tokens
are trained, batches pad with ignored targets, and templates the method cannot read are refused."""

import pytest
import torch

from llmbook import gguf
from llmbook.sft import IGNORE, SFTExample, pad_batch, show_mask, tokenize_conversation

CONVERSATION = [
    {"role": "user", "content": "What is 2+3?"},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": "And 4+4?"},
    {"role": "assistant", "content": "It is 8."},
]


@pytest.fixture(scope="module")
def smollm2():
    file = gguf.read_gguf(gguf.smollm2_path())
    return gguf.load_tokenizer(file), file.metadata["tokenizer.chat_template"]


def test_only_the_assistant_replies_and_their_end_tokens_are_trained(smollm2):
    tokenizer, template = smollm2
    example = tokenize_conversation(tokenizer, template, CONVERSATION)
    trained = [tokenizer.decode([t]) for t, keep in zip(example.ids, example.trained, strict=True) if keep]
    assert trained == ["5", "<|im_end|>", "It", " is", " ", "8", ".", "<|im_end|>"]
    # The whole text is the template's, untouched: system prompt, headers and all.
    assert tokenizer.decode(example.ids).startswith("<|im_start|>system\nYou are a helpful AI assistant")
    assert tokenizer.decode(example.ids).endswith("<|im_start|>assistant\nIt is 8.<|im_end|>\n")
    assert show_mask(tokenizer, example).endswith(
        "<|im_start|>user\nAnd 4+4?<|im_end|>\n<|im_start|>assistant\n[It is 8.<|im_end|>]\n"
    )
    assert show_mask(tokenizer, example).count("[") == 2


def test_targets_are_the_next_tokens_with_ignore_outside_the_replies(smollm2):
    tokenizer, template = smollm2
    example = tokenize_conversation(tokenizer, template, CONVERSATION[:2])
    targets = example.targets()
    assert len(targets) == len(example.ids) - 1
    kept = [(position, target) for position, target in enumerate(targets) if target != IGNORE]
    end = tokenizer.special_tokens["<|im_end|>"]
    # "5" is predicted from the assistant header's last token ("\n"), then the end token from "5".
    assert [target for _, target in kept] == [tokenizer.encode("5")[0], end]
    assert tokenizer.decode([example.ids[kept[0][0]]]) == "\n"


def test_pad_batch_right_pads_inputs_and_ignores_padded_targets():
    short = SFTExample(ids=[1, 2, 3], trained=[False, True, True])
    long = SFTExample(ids=[4, 5, 6, 7, 8], trained=[False, False, False, True, False])
    inputs, targets = pad_batch([short, long], pad_id=0)
    assert inputs.tolist() == [[1, 2, 0, 0], [4, 5, 6, 7]]
    assert targets.tolist() == [[2, 3, IGNORE, IGNORE], [IGNORE, IGNORE, 7, IGNORE]]
    with pytest.raises(ValueError, match="more than max_length=3"):
        pad_batch([short, long], pad_id=0, max_length=3)


def test_the_padded_batch_loss_is_the_mean_over_assistant_tokens_only(tiny_model):
    model = tiny_model()
    examples = [SFTExample(ids=[1, 2, 3, 4], trained=[False, False, True, True]),
                SFTExample(ids=[5, 6, 7], trained=[False, True, False])]  # fmt: skip
    inputs, targets = pad_batch(examples, pad_id=0)
    logits = model(inputs)
    by_hand = -torch.stack([
        torch.log_softmax(logits[0, 1], -1)[3], torch.log_softmax(logits[0, 2], -1)[4],
        torch.log_softmax(logits[1, 0], -1)[6],
    ]).mean()  # fmt: skip
    torch.testing.assert_close(model(inputs, targets), by_hand)


def test_templates_the_method_cannot_read_are_refused(smollm2):
    tokenizer, template = smollm2
    with pytest.raises(ValueError, match="no assistant message"):
        tokenize_conversation(tokenizer, template, CONVERSATION[:1])
    with pytest.raises(ValueError, match="not a special token"):
        tokenize_conversation(tokenizer, template, CONVERSATION, end_token="</s>")
    # A template that writes the number of messages first changes the start of the text at every turn.
    counting = "{{ messages|length }}" + template
    with pytest.raises(ValueError, match="does not render message 1 by appending"):
        tokenize_conversation(tokenizer, counting, CONVERSATION)
    no_end = template.replace("'<|im_end|>' + ", "")
    with pytest.raises(ValueError, match="renders without the end token"):
        tokenize_conversation(tokenizer, no_end, CONVERSATION)
