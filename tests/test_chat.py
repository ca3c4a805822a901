"""llmbook.chat: the chat template, a streamed reply equal to greedy generation, and Ctrl-C handling."""

import pytest

from llmbook import gguf
from llmbook.chat import ChatSession, apply_chat_template, chat_loop
from llmbook.sample import generate


@pytest.fixture(scope="module")
def smollm():
    file = gguf.read_gguf(gguf.smollm2_path())
    return gguf.load_model(file.path), gguf.load_tokenizer(file), file.metadata["tokenizer.chat_template"]


CONVERSATION = [
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "Name a colour."},
]


def test_template_renders_like_transformers(smollm):
    transformers = pytest.importorskip("transformers")
    _, _, template = smollm
    path = gguf.smollm2_path()
    reference = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for messages in (CONVERSATION, [{"role": "system", "content": "Be brief."}, *CONVERSATION]):
        for add in (True, False):
            expected = reference.apply_chat_template(messages, add_generation_prompt=add, tokenize=False)
            assert apply_chat_template(template, messages, add) == expected


def test_template_inserts_the_default_system_prompt_and_ends_with_the_assistant_header(smollm):
    text = apply_chat_template(smollm[2], CONVERSATION[:1])
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n")


def test_bad_message_is_refused():
    with pytest.raises(ValueError, match="message 0 must be a dict with 'role' and 'content'"):
        apply_chat_template("{{ messages }}", [{"role": "user", "text": "hi"}])


def test_streamed_greedy_reply_equals_generate_and_the_cache_carries_over(smollm):
    model, tokenizer, template = smollm
    session = ChatSession(model, tokenizer, template, system_prompt="Answer in one short sentence.")
    first = "".join(session.reply("What is the capital of France?", 30, temperature=0))
    prompt = tokenizer.encode(apply_chat_template(template, session.messages[:2]))
    expected = generate(model, prompt, 30, temperature=0, stop_ids=[session.end_id])[len(prompt) :]
    assert first == tokenizer.decode([i for i in expected if i != session.end_id])
    assert "Paris" in first
    cached_before = len(session.cached_ids)
    second = "".join(session.reply("And of Italy?", 30, temperature=0))
    assert "Rome" in second
    assert len(session.cached_ids) > cached_before  # the second turn extended the cache, not restarted


def test_ctrl_c_stops_the_reply_not_the_loop(smollm):
    model, tokenizer, template = smollm
    session = ChatSession(model, tokenizer, template)
    lines = iter(["Tell me a long story.", "What is 2+2?"])
    written, pieces = [], [0]

    def write(text="", end="\n", flush=False):
        if len(session.messages) == 2 and end == "" and text not in ("assistant> ", " [stopped]"):
            pieces[0] += 1
            if pieces[0] == 3:  # the user presses Ctrl-C during the first reply
                raise KeyboardInterrupt
        written.append(text + end)

    def read_then_eof(prompt):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    chat_loop(session, read_then_eof, write, max_new_tokens=20, temperature=0)
    output = "".join(written)
    assert " [stopped]" in output
    assert [m["role"] for m in session.messages] == ["user", "assistant", "user", "assistant"]
    assert session.messages[3]["content"]  # the loop went on to answer the second question
