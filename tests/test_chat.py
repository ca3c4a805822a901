"""llmbook.chat: the chat template, a streamed reply equal to greedy generation, and Ctrl-C handling;
the template's bounds, the session's cache and the command line on a tiny random model."""

import io

import pytest
import torch
from conftest import tiny_config
from test_gguf import _parts, _with, _write_gguf, _write_raw

from llmbook import gguf
from llmbook.__main__ import main
from llmbook.chat import (
    DEFAULT_MAX_LENGTH,
    ChatSession,
    ChatTemplate,
    ChatTemplateError,
    ContextFullError,
    TemplateLimits,
    apply_chat_template,
    chat_loop,
    load_chat_template,
)  # fmt: skip
from llmbook.errors import CorruptFileError
from llmbook.model import TransformerLM
from llmbook.sample import generate
from llmbook.tokenizer import Tokenizer


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


# -- bounds: the template, the session's cache, the command line (a tiny random model, byte tokens) -------

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
USER = [{"role": "user", "content": "hi"}]
LOOP_TWICE = "{{% for i in range(100000) %}}{{% for j in range(100000) %}}{body}{{% endfor %}}{{% endfor %}}"


@pytest.fixture
def tiny_chat():
    """A random 259-token model with a 64-token context and a byte tokenizer with ChatML's special tokens."""
    torch.manual_seed(0)
    model = TransformerLM(tiny_config(vocab_size=259, context_length=64)).eval()
    tokenizer = Tokenizer({i: bytes([i]) for i in range(256)}, [], ["ab", "<|im_start|>", "<|im_end|>"])
    return model, tokenizer


@pytest.mark.parametrize(
    "source, expected",
    [
        (LOOP_TWICE.format(body="x"), "ran more than 100,001 loop steps"),
        (LOOP_TWICE.format(body=""), "ran more than 100,001 loop steps"),  # no output: only steps bound it
        ("{% for i in range(20) %}{{ 'x' * 99999 }}{% endfor %}", "rendered more than 1,000,006 characters"),
        ("{{ 'x' * 10**10 }}", "computed the integer 10,000,000,000, beyond the limit of 1,000,006"),
        ("{{ [1] * 999999 * 2 }}", "repeats a sequence to more than 1,000,006 items"),
        ("{{ 7 ** 7 ** 7 }}", "raises 823543 to the power 7"),
        ("{% set ns = namespace(s='x') %}{% for i in range(30) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
         "built a str of 1,048,576 items"),
        ("{{ 'x'|center(10**9) }}", "computed the integer 1,000,000,000"),
        ("{{ '%0999999999d' % 1 }}", "formats with a width or precision of 7 digits"),
        ("{{ '{:>999999999}'.format(1) }}", "formats with a width or precision of 7 digits"),
        ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "recursed deeper than Python allows"),
        ("{{ 1 / 0 }}", "failed while rendering: ZeroDivisionError"),
        ("{{ raise_exception('roles must alternate') }}", "refused the conversation: roles must alternate"),
        ("{{ messages.__class__.__mro__ }}", "failed while rendering: SecurityError"),
    ],
)  # fmt: skip
def test_template_rendering_is_bounded_and_its_failures_are_named(source, expected):
    template = ChatTemplate(source, "the test's template")
    with pytest.raises(ChatTemplateError, match=f"the test's template {expected}"):
        template.render(USER)


def test_template_limits_grow_with_the_conversation():
    # A long message is not the template's doing: the size bound counts on top of the conversation.
    long = [{"role": "user", "content": "y" * 1_500_000}]
    assert len(apply_chat_template(CHATML, long)) == 1_500_000 + 50
    with pytest.raises(ChatTemplateError, match="the chat template ran more than 9 loop steps"):
        ChatTemplate("{% for i in range(10) %}{% endfor %}", limits=TemplateLimits(max_steps=9)).render([])
    assert (
        ChatTemplate("{% for i in range(9) %}{% endfor %}", limits=TemplateLimits(max_steps=9)).render([])
        == ""
    )


@pytest.mark.parametrize(
    "source, expected",
    [
        ("{% for message in messages %}", "does not compile: Unexpected end of template"),
        ("{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}", "does not compile: it nests too deeply"),
        (5, "must be a string"),
        (["{{ messages }}"], "must be a string"),
    ],
)
def test_a_bad_template_in_the_file_is_refused_at_load_naming_file_and_key(
    tmp_path, tiny_chat, source, expected
):
    path = _write_gguf(tmp_path / "chat.gguf", tiny_chat[0], chat_template="{{ messages }}")
    metadata, tensors, data = _parts(path)
    bad = _write_raw(tmp_path / "bad.gguf", _with(metadata, tokenizer__chat_template=source), tensors, data)
    with pytest.raises(CorruptFileError, match=f"{bad}: tokenizer.chat_template {expected}"):
        load_chat_template(bad)


def test_a_bad_template_stops_the_cli_before_the_model_loads(tmp_path, tiny_chat, monkeypatch, capsys):
    path = _write_gguf(tmp_path / "chat.gguf", tiny_chat[0], chat_template="{% if %}")
    monkeypatch.setattr(gguf, "load_model", lambda *args: pytest.fail("the model was loaded"))
    assert main(["chat", "--model", str(path)]) == 2
    assert f"{path}: tokenizer.chat_template does not compile" in capsys.readouterr().err


def test_a_message_longer_than_the_cache_is_refused_and_not_kept(tiny_chat):
    model, tokenizer = tiny_chat
    session = ChatSession(model, tokenizer, CHATML, max_length=48)
    with pytest.raises(ContextFullError, match="exceeds the session's cache \\(48 tokens.*up to 64\\)"):
        session.reply("x" * 100, max_new_tokens=4)
    assert session.messages == []
    pieces = list(session.reply("hi", max_new_tokens=4, temperature=0))
    assert [m["role"] for m in session.messages] == ["user", "assistant"]
    assert session.messages[1]["content"] == "".join(pieces)
    with pytest.raises(ContextFullError):  # the conversation now fills the cache: later turns too long ...
        session.reply("y" * 20, max_new_tokens=4)
    session.reset()  # ... until it starts over
    assert session.messages == [] and session.cached_ids == []
    list(session.reply("y" * 20, max_new_tokens=4))


def test_chat_loop_reports_a_message_too_long_and_reads_the_next_line(tiny_chat):
    session = ChatSession(*tiny_chat, CHATML, max_length=48)
    lines, written = iter(["x" * 100, "hi", "/reset", "hello"]), []

    def read(prompt):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    chat_loop(
        session, read, lambda text="", end="\n", flush=False: written.append(text + end), max_new_tokens=4
    )
    output = "".join(written)
    assert "[not sent: this message makes the conversation" in output and "[conversation reset]" in output
    assert [m["content"] for m in session.messages if m["role"] == "user"] == ["hello"]


def test_cli_chat_goes_on_after_a_message_too_long(tmp_path, tiny_chat, monkeypatch, capsys):
    path = _write_gguf(tmp_path / "chat.gguf", tiny_chat[0], chat_template=CHATML)
    monkeypatch.setattr("sys.stdin", io.StringIO("x" * 100 + "\nhi\n"))
    assert main(["chat", "--model", str(path), "--max-new-tokens", "4", "--temperature", "0"]) == 0
    output = capsys.readouterr().out
    assert "[not sent: this message makes the conversation" in output
    assert output.count("assistant> ") == 1  # the second line was read and answered


def test_the_cache_length_is_an_option_bounded_by_the_context(tiny_chat, tmp_path, capsys):
    model, tokenizer = tiny_chat
    assert ChatSession(model, tokenizer, CHATML).cache.max_length == 64  # the whole (short) context
    long_context = TransformerLM(tiny_config(vocab_size=259, context_length=10_000))
    assert ChatSession(long_context, tokenizer, CHATML).cache.max_length == DEFAULT_MAX_LENGTH == 8192
    assert ChatSession(long_context, tokenizer, CHATML, max_length=10_000).cache.max_length == 10_000
    for bad in (0, -1, 65, 2**63):
        with pytest.raises(
            ValueError, match=f"max_length must be from 1 to the model's context_length \\(64\\), got {bad}"
        ):
            ChatSession(model, tokenizer, CHATML, max_length=bad)
    for bad in (True, 32.0, "32"):
        with pytest.raises(TypeError, match="max_length must be an integer or None"):
            ChatSession(model, tokenizer, CHATML, max_length=bad)
    path = _write_gguf(tmp_path / "chat.gguf", model, chat_template=CHATML)
    assert main(["chat", "--model", str(path), "--max-length", "65"]) == 2
    assert "max_length must be from 1 to the model's context_length (64), got 65" in capsys.readouterr().err


@pytest.mark.parametrize(
    "arguments, expected",
    [
        ({"max_new_tokens": -1}, "max_new_tokens must be an integer >= 0"),
        ({"max_new_tokens": 2.0}, "max_new_tokens must be an integer >= 0"),
        ({"temperature": -0.5}, "temperature must be a finite number >= 0"),
        ({"temperature": float("nan")}, "temperature must be a finite number >= 0"),
        ({"top_p": 0.0}, r"top_p must be None or in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be None or in \(0, 1\]"),
    ],
)
def test_reply_arguments_out_of_range_are_refused_before_the_message_joins(tiny_chat, arguments, expected):
    session = ChatSession(*tiny_chat, CHATML)
    with pytest.raises(ValueError, match=expected):
        session.reply("hi", **arguments)
    assert session.messages == []
    with pytest.raises(ValueError, match=expected):
        chat_loop(session, lambda prompt: "hi", **arguments)


def test_messages_and_seeds_of_the_wrong_kind_are_refused(tiny_chat):
    session = ChatSession(*tiny_chat, CHATML)
    small = TransformerLM(tiny_config(vocab_size=258, context_length=64))
    with pytest.raises(ValueError, match="the tokenizer has 259 ids but the model embeds 258"):
        ChatSession(small, tiny_chat[1], CHATML)
    with pytest.raises(TypeError, match="system_prompt must be a string or None, got int"):
        ChatSession(*tiny_chat, CHATML, system_prompt=5)
    with pytest.raises(TypeError, match="user_message must be a string, got int"):
        session.reply(5)
    with pytest.raises(TypeError, match="message 0's role and content must be strings"):
        apply_chat_template(CHATML, [{"role": "user", "content": 5}])
    for seed in (-1, 2**64, 1.5, True):
        with pytest.raises(ValueError, match="seed must be an integer from 0 to 2\\*\\*64 - 1"):
            chat_loop(session, lambda prompt: "/quit", seed=seed)


def test_template_limits_are_validated():
    for field in ("max_steps", "max_size"):
        with pytest.raises(ValueError, match=f"TemplateLimits.{field} must be >= 0, got -1"):
            TemplateLimits(**{field: -1})
        with pytest.raises(TypeError, match=f"TemplateLimits.{field} must be an integer"):
            TemplateLimits(**{field: 1.5})
    with pytest.raises(ChatTemplateError, match="rendered more than 0 characters"):
        ChatTemplate("{{ 'x' }}", limits=TemplateLimits(max_size=0)).render([])
    assert ChatTemplate("{{ 'x' }}", limits=TemplateLimits(max_size=1)).render([]) == "x"


def test_the_cli_prints_the_models_name_only_as_plain_text(tmp_path, tiny_chat, monkeypatch, capsys):
    metadata, tensors, data = _parts(_write_gguf(tmp_path / "chat.gguf", tiny_chat[0], chat_template=CHATML))
    path = _write_raw(
        tmp_path / "named.gguf", _with(metadata, general__name="\x1b[2J\x1b[Hevil"), tensors, data
    )
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert main(["chat", "--model", str(path)]) == 0
    output = capsys.readouterr().out
    assert "\x1b" not in output and output.startswith("named.gguf: type a message")
