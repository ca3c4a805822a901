"""Triton kernels against their PyTorch references, forward and backward, and the model's kernel switch.

On a machine without CUDA every kernel runs in Triton's CPU interpreter. Triton fixes the mode of its own
library when *it* is imported, so the variable is set here, first thing. Importing `llmbook.model` does
not import Triton (only `llmbook.kernels` does, and only a model built with kernels=True imports that), so
other test modules in the same xdist worker do no harm; if something did import Triton earlier in this
process (torch.compile, say), the interpreter cannot work here and the whole file re-runs in a fresh
process instead
(`test_whole_file_in_a_fresh_process_when_triton_was_imported_early`).
Shapes are tiny and awkward (1, 17, 33 rows; widths that are not powers of two) because the interpreter runs
each program in NumPy. The float16/bfloat16 tests at realistic shapes and the training comparison need a
GPU and are skipped here with the reason "needs a CUDA device".
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import dataclasses
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="Triton is not installed (pip install triton; Linux only)")

from conftest import tiny_model  # noqa: E402

import llmbook.kernels as K  # noqa: E402
from llmbook.kernels import _triton  # noqa: E402
from llmbook.kernels._triton import tl  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
ATOL = RTOL = 2e-5  # float32 under the interpreter: differences are a few ulps of summation order
# Triton was imported before TRITON_INTERPRET=1 was set in this process: its library is in compiled mode.
TRITON_IMPORTED_EARLY = not CUDA and not _triton.interpreter_ready()
FRESH_PROCESS_TEST = "test_whole_file_in_a_fresh_process_when_triton_was_imported_early"


@pytest.fixture(autouse=True)
def _interpreter_usable_in_this_process(request):
    if TRITON_IMPORTED_EARLY and request.node.name != FRESH_PROCESS_TEST:
        pytest.skip(f"Triton was imported before TRITON_INTERPRET=1; the file runs in {FRESH_PROCESS_TEST}")


def test_whole_file_in_a_fresh_process_when_triton_was_imported_early():
    if not TRITON_IMPORTED_EARLY:
        pytest.skip("Triton's interpreter works in this process: the tests of this file ran here")
    env = os.environ | {"TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-p", "no:xdist"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:]


def _close(actual, expected, atol=ATOL, rtol=RTOL):
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


def _grads(fn, inputs, grad_out):
    """Run fn on fresh leaf copies of `inputs`; return (output, gradients of the floating inputs)."""
    leaves = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
    out = fn(*leaves)
    out.backward(grad_out)
    return out.detach(), [x.grad for x in leaves if x.is_floating_point()]


def _generator(seed=0):
    return torch.Generator(device="cpu").manual_seed(seed)


# ----------------------------------------------------------------------------------------------- RMSNorm


@pytest.mark.parametrize("shape", [(1, 7), (17, 33), (33, 100), (2, 3, 65)])
def test_rms_norm_matches_reference_forward_and_backward(shape):
    g = _generator()
    x = torch.randn(*shape, generator=g) * 3
    weight = torch.randn(shape[-1], generator=g)
    grad_y = torch.randn(*shape, generator=g)
    y, (grad_x, grad_w) = _grads(lambda a, b: K.rms_norm(a, b, 1e-5), (x, weight), grad_y)
    reference = lambda a, b: K.rms_norm_reference(a, b, 1e-5)
    y_ref, (grad_x_ref, grad_w_ref) = _grads(reference, (x, weight), grad_y)
    _close(y, y_ref)
    _close(grad_x, grad_x_ref)
    _close(grad_w, grad_w_ref)


def test_rms_norm_kernel_equals_the_norms_module():
    from llmbook.norms import RMSNorm

    norm = RMSNorm(24, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, 24))
    x = torch.randn(3, 5, 24, generator=_generator(1))
    _close(K.rms_norm(x, norm.weight, norm.eps), norm(x))


def test_rms_norm_weight_gradient_sums_partials_of_uneven_slabs():
    # 33 rows over 4 programs: slabs of 9, 9, 9 and 6 rows; a dropped or doubled row would show in dW.
    x = torch.randn(33, 20, generator=_generator(2))
    weight = torch.ones(20, requires_grad=True)
    K.rms_norm(x, weight).sum().backward()
    x_hat = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
    _close(weight.grad, x_hat.sum(0))


def test_rms_norm_rejects_mismatched_weight():
    with pytest.raises(ValueError, match="weight must have shape"):
        K.rms_norm(torch.randn(2, 8), torch.ones(7))


# ------------------------------------------------------------------------------------------------ SwiGLU


@pytest.mark.parametrize("shape", [(1, 7), (17, 33), (2, 3, 1100)])
def test_swiglu_matches_reference_forward_and_backward(shape):
    g = _generator(3)
    gate, value = torch.randn(*shape, generator=g) * 4, torch.randn(*shape, generator=g)
    grad_out = torch.randn(*shape, generator=g)
    out, grads = _grads(K.swiglu, (gate, value), grad_out)
    out_ref, grads_ref = _grads(K.swiglu_reference, (gate, value), grad_out)
    _close(out, out_ref)
    for grad, grad_ref in zip(grads, grads_ref, strict=True):
        _close(grad, grad_ref)


def test_swiglu_reads_the_halves_of_a_fused_projection_in_place():
    # gate and value as the two halves of one (rows, 2 * d_ff) "Up" projection: strided row views.
    fused = torch.randn(17, 2 * 45, generator=_generator(4), requires_grad=True)
    gate, value = fused.chunk(2, dim=-1)
    assert not gate.is_contiguous()
    grad_out = torch.randn(17, 45, generator=_generator(5))
    K.swiglu(gate, value).backward(grad_out)
    grad_kernel = fused.grad.clone()
    fused.grad = None
    K.swiglu_reference(*fused.chunk(2, dim=-1)).backward(grad_out)
    _close(grad_kernel, fused.grad)


def test_swiglu_equals_the_ffn_module():
    from llmbook.ffn import SwiGLU

    torch.manual_seed(0)
    ffn = SwiGLU(12, 20)
    x = torch.randn(2, 3, 12, generator=_generator(6))
    with torch.no_grad():
        expected = ffn(x)
        _close(ffn.down_proj(K.swiglu(ffn.gate_proj(x), ffn.up_proj(x))), expected)


# -------------------------------------------------------------------------------------------------- RoPE


@pytest.mark.parametrize(
    "x_shape, positions",
    [
        ((2, 4, 17, 12), torch.arange(17)),
        ((2, 2, 5, 12), torch.arange(5) + 9),  # KV-cache style offset
        ((2, 1, 3, 12), torch.tensor([[0, 1, 2], [30, 31, 32]])),  # per-batch positions
        ((17, 12), torch.arange(17)),
        ((1, 1, 1, 12), torch.tensor([0])),
    ],
)
def test_rope_matches_rotary_embedding_forward_and_backward(x_shape, positions):
    from llmbook.position import RotaryEmbedding

    rotary = RotaryEmbedding(12, theta=500.0, max_positions=8)  # small cache: forces it to extend
    cos, sin = rotary.cos_sin(positions)
    g = _generator(7)
    x = torch.randn(*x_shape, generator=g)
    grad_out = torch.randn(*x_shape, generator=g)
    out, (grad_x,) = _grads(lambda t: K.rope(t, cos, sin), (x,), grad_out)
    out_ref, (grad_x_ref,) = _grads(lambda t: rotary(t, positions), (x,), grad_out)
    _close(out, out_ref)
    _close(grad_x, grad_x_ref)
    _close(K.rope_reference(x, cos, sin), out_ref)


def test_rope_rotates_grouped_query_and_key_heads_at_the_same_positions():
    from llmbook.position import RotaryEmbedding

    rotary = RotaryEmbedding(16)
    positions = torch.arange(9)
    cos, sin = rotary.cos_sin(positions)
    q = torch.randn(2, 6, 9, 16, generator=_generator(8)).transpose(1, 2).contiguous().transpose(1, 2)
    k = torch.randn(2, 2, 9, 16, generator=_generator(9))
    q_rot, k_rot = K.rope_qk(q, k, cos, sin)
    _close(q_rot, rotary(q, positions))
    _close(k_rot, rotary(k, positions))
    # Rotations preserve length: a quick independent check that nothing was scaled.
    _close(q_rot.norm(dim=-1), q.norm(dim=-1))


def test_rope_rejects_odd_head_dim_and_wrong_tables():
    with pytest.raises(ValueError, match="even head_dim"):
        K.rope(torch.randn(3, 5), torch.ones(3, 2), torch.ones(3, 2))
    with pytest.raises(ValueError, match="cos and sin"):
        K.rope(torch.randn(3, 6), torch.ones(4, 3), torch.ones(4, 3))


# ------------------------------------------------------------------------------------------ cross-entropy


@pytest.mark.parametrize("rows, vocab", [(1, 7), (17, 33), (5, 5000)])  # 5000 > one 4096 block
def test_cross_entropy_matches_reference_forward_and_backward(rows, vocab):
    g = _generator(10)
    logits = torch.randn(rows, vocab, generator=g) * 5
    targets = torch.randint(0, vocab, (rows,), generator=g)
    if rows > 1:
        targets[1] = -100  # an ignored token contributes neither loss nor gradient
    grad = torch.tensor(1.7)
    loss, (grad_logits,) = _grads(K.cross_entropy, (logits, targets), grad)
    loss_ref, (grad_ref,) = _grads(K.cross_entropy_reference, (logits, targets), grad)
    _close(loss, loss_ref)
    _close(grad_logits, grad_ref, atol=1e-7, rtol=1e-5)
    if rows > 1:
        assert torch.all(grad_logits[1] == 0)


def test_cross_entropy_is_stable_for_huge_logits_and_matches_llmbook_loss():
    from llmbook.loss import cross_entropy

    logits = torch.randn(2, 3, 50, generator=_generator(11)) * 1e4  # naive exp would overflow
    targets = torch.randint(0, 50, (2, 3), generator=_generator(12))
    loss = K.cross_entropy(logits, targets)
    assert torch.isfinite(loss)
    _close(loss, cross_entropy(logits, targets), atol=1e-2, rtol=1e-5)


def test_cross_entropy_all_ignored_is_nan_like_pytorch():
    loss = K.cross_entropy(torch.randn(3, 5), torch.full((3,), -100))
    assert torch.isnan(loss)
    assert torch.isnan(K.cross_entropy_reference(torch.randn(3, 5), torch.full((3,), -100)))


def test_cross_entropy_rejects_targets_outside_the_vocabulary():
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 5\)"):
        K.cross_entropy(torch.randn(2, 5), torch.tensor([1, 5]))


@pytest.mark.parametrize(
    "rows, d_model, vocab, chunk_size", [(1, 8, 7, None), (17, 12, 33, 5), (20, 16, 300, 1)]
)
def test_linear_cross_entropy_matches_unfused_head_and_loss(rows, d_model, vocab, chunk_size):
    g = _generator(13)
    hidden = torch.randn(rows, d_model, generator=g)
    weight = torch.randn(vocab, d_model, generator=g) * 0.5
    targets = torch.randint(0, vocab, (rows,), generator=g)
    if rows > 2:
        targets[2] = -100
    grad = torch.tensor(0.5)
    fused = lambda h, w: K.linear_cross_entropy(h, w, targets, chunk_size=chunk_size)
    unfused = lambda h, w: K.linear_cross_entropy_reference(h, w, targets)
    loss, (grad_h, grad_w) = _grads(fused, (hidden, weight), grad)
    loss_ref, (grad_h_ref, grad_w_ref) = _grads(unfused, (hidden, weight), grad)
    _close(loss, loss_ref)
    _close(grad_h, grad_h_ref)
    _close(grad_w, grad_w_ref)


def test_linear_cross_entropy_without_grad_only_computes_the_loss():
    hidden, weight = torch.randn(9, 8, generator=_generator(14)), torch.randn(20, 8, generator=_generator(15))
    targets = torch.randint(0, 20, (9,), generator=_generator(16))
    with torch.no_grad():
        _close(
            K.linear_cross_entropy(hidden, weight, targets, chunk_size=4),
            K.linear_cross_entropy_reference(hidden, weight, targets),
        )


# ---------------------------------------------------------------------------------------- flash attention


@pytest.mark.parametrize(
    "batch, n_heads, n_kv_heads, q_len, k_len, head_dim, causal",
    [
        (1, 1, 1, 1, 1, 16, True),
        (2, 4, 2, 17, 17, 24, True),  # grouped-query, head_dim not a power of two
        (1, 3, 1, 33, 33, 16, True),  # three query heads share one key/value head
        (1, 2, 2, 5, 21, 16, True),  # queries continue a KV cache: bottom-right causal alignment
        (2, 2, 1, 19, 23, 32, False),
    ],
)
def test_flash_attention_matches_reference_forward_and_backward(
    batch, n_heads, n_kv_heads, q_len, k_len, head_dim, causal
):
    g = _generator(17)
    q = torch.randn(batch, n_heads, q_len, head_dim, generator=g)
    k = torch.randn(batch, n_kv_heads, k_len, head_dim, generator=g)
    v = torch.randn(batch, n_kv_heads, k_len, head_dim, generator=g)
    grad_out = torch.randn(batch, n_heads, q_len, head_dim, generator=g)
    out, grads = _grads(lambda *t: K.flash_attention(*t, causal=causal), (q, k, v), grad_out)
    reference = lambda *t: K.flash_attention_reference(*t, causal=causal)
    out_ref, grads_ref = _grads(reference, (q, k, v), grad_out)
    _close(out, out_ref)
    for grad, grad_ref in zip(grads, grads_ref, strict=True):
        _close(grad, grad_ref)


def test_flash_attention_with_the_gpu_tile_sizes(monkeypatch):
    # The GPU launches use larger tiles (128 x 64 forward); run those exact configurations in the
    # interpreter so the masking of partial tiles at GPU sizes is checked here too (num_stages is ignored).
    # (import_module: the package attribute `flash_attention` is the function, not the file)
    fa_module = importlib.import_module("llmbook.kernels.flash_attention")
    gpu_config = fa_module._launch_config
    forced = lambda head_dim, dtype, backward: gpu_config(head_dim, dtype, backward, interpreted=False)
    monkeypatch.setattr(fa_module, "_launch_config", forced)
    g = _generator(23)
    q = torch.randn(1, 4, 70, 16, generator=g)
    k, v = torch.randn(1, 2, 75, 16, generator=g), torch.randn(1, 2, 75, 16, generator=g)
    grad_out = torch.randn(1, 4, 70, 16, generator=g)
    for dtype in (torch.float32, torch.float16):  # fp32 and 16-bit inputs get different tiles
        assert gpu_config(16, dtype, False, False)["BLOCK_M"] > 16
        inputs = (q.to(dtype), k.to(dtype), v.to(dtype))
        out, grads = _grads(K.flash_attention, inputs, grad_out.to(dtype))
        out_ref, grads_ref = _grads(K.flash_attention_reference, (q, k, v), grad_out)
        tol = 2e-5 if dtype == torch.float32 else 2e-2
        _close(out.float(), out_ref, atol=tol, rtol=tol)
        for grad, grad_ref in zip(grads, grads_ref, strict=True):
            _close(grad.float(), grad_ref, atol=tol, rtol=tol)


def test_flash_attention_equals_the_attention_module_formula():
    from llmbook.attention import causal_mask, scaled_dot_product_attention

    g = _generator(18)
    q, k, v = (torch.randn(1, 2, 20, 16, generator=g) for _ in range(3))
    expected = scaled_dot_product_attention(q, k, v, causal_mask(20, 20))
    _close(K.flash_attention(q, k, v), expected)


def test_flash_attention_rejects_inconsistent_heads():
    q, k = torch.randn(1, 3, 4, 16), torch.randn(1, 2, 4, 16)
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        K.flash_attention(q, k, k)
    with pytest.raises(ValueError, match="k_len >= q_len"):
        K.flash_attention(torch.randn(1, 2, 5, 16), q[:, :2, :3], q[:, :2, :3])


# ------------------------------------------------------------------------------------------- the switch


def _tiny_model(**overrides):
    # Grouped-query heads, a vocabulary that is not a power of two, and the kernels' odd shapes.
    return tiny_model(**(dict(vocab_size=37, context_length=16, n_kv_heads=2) | overrides))


def _count_kernel_calls(monkeypatch):
    calls = {}
    for name in ("rms_norm", "rope", "swiglu", "flash_attention", "cross_entropy", "linear_cross_entropy"):
        original = getattr(K, name)

        def counting(*args, _original=original, _name=name, **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(K, name, counting)
    return calls


def test_model_with_kernels_gives_the_same_logits_and_gradients(monkeypatch):
    plain = _tiny_model()
    fast = _tiny_model(kernels=True)
    fast.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 37, (2, 11), generator=_generator(19))
    targets = torch.randint(0, 37, (2, 11), generator=_generator(20))

    def run(model):
        with torch.no_grad():
            logits = model(ids)
        loss = model(ids, targets)  # the fused LM head + loss on the patched model
        loss.backward()
        return logits.detach(), loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    logits_ref, loss_ref, grads_ref = run(plain)
    calls = _count_kernel_calls(monkeypatch)
    logits, loss, grads = run(fast)
    # Every kernel really ran, in each of the two forwards: 2 layers x (2 norms, q and k RoPE, attention,
    # SwiGLU) + final norm; and the fused LM head + loss once.
    assert calls == {"rms_norm": 10, "rope": 8, "flash_attention": 4, "swiglu": 4, "linear_cross_entropy": 1}
    _close(logits, logits_ref)
    _close(loss, loss_ref)
    for name in grads_ref:
        _close(grads[name], grads_ref[name], atol=1e-5, rtol=1e-4)


def test_patched_model_loss_equals_the_plain_one_with_masked_targets(monkeypatch):
    plain = _tiny_model()
    fast = _tiny_model(kernels=True)
    fast.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 37, (2, 11), generator=_generator(21))
    targets = torch.randint(0, 37, (2, 11), generator=_generator(22))
    targets[0, :6] = -100  # a prompt's positions carry no loss
    calls = _count_kernel_calls(monkeypatch)
    fused = fast(ids, targets)
    assert calls.get("linear_cross_entropy") == 1  # the fused head really ran
    _close(fused, plain(ids, targets))
    _close(fused, torch.nn.functional.cross_entropy(plain(ids).flatten(0, 1), targets.flatten()))
    # Soft-capped logits: the kernel does not cap, so the patched model falls back to the package loss.
    capped_plain, capped_fast = _tiny_model(logit_softcap=3.0), _tiny_model(logit_softcap=3.0, kernels=True)
    capped_fast.load_state_dict(capped_plain.state_dict())
    _close(capped_fast(ids, targets), capped_plain(ids, targets))


def test_patched_head_loss_runs_under_autocast_as_the_unfused_head_does():
    plain = _tiny_model()
    head_only = _tiny_model()  # only the LM head + loss patched: the bf16 comparison is about the head
    head_only.head_loss = K.patch.__globals__["kernel_linear_cross_entropy"]
    ids = torch.randint(0, 37, (2, 11), generator=_generator(23))
    targets = torch.randint(0, 37, (2, 11), generator=_generator(24))
    losses = []
    for model in (plain, head_only):
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the kernel writes float32 buffers inside
            losses.append(model(ids, targets))
        losses[-1].backward()
        assert model.lm_head.weight.grad.dtype == torch.float32
    _close(losses[1], losses[0], atol=1e-4, rtol=1e-4)


def test_patch_swaps_modules_in_place_and_keeps_the_state_dict():
    model = _tiny_model()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    assert K.patch(model) is model
    kinds = {type(m).__name__ for m in model.modules()}
    assert {"KernelRMSNorm", "KernelSwiGLU", "KernelRotaryEmbedding", "KernelAttention"} <= kinds
    assert not kinds & {"RMSNorm", "SwiGLU", "RotaryEmbedding", "MultiHeadSelfAttention"}
    assert model.head_loss is K.patch.__globals__["kernel_linear_cross_entropy"]
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)
    with pytest.raises(TypeError, match="nn.Module"):
        K.patch("not a model")


def test_model_config_kernels_switch_and_kv_cache_decoding(monkeypatch):
    model = _tiny_model()
    kernel_model = _tiny_model(kernels=True)
    kernel_model.load_state_dict(model.state_dict())
    ids = torch.randint(0, 37, (2, 9), generator=_generator(21))
    with torch.no_grad():
        expected = model(ids)
        calls = _count_kernel_calls(monkeypatch)
        cache = kernel_model.make_kv_cache(2)
        kernel_model(ids[:, :6], kv_cache=cache)
        step = kernel_model(ids[:, 6:7], kv_cache=cache)  # one query against 7 cached keys
    assert calls["flash_attention"] == 4
    assert model(ids[:, :1]).shape == (2, 1, 37)  # the unpatched model is untouched
    _close(step[:, 0], expected[:, 6])


def test_kernels_fall_back_to_the_package_code_where_they_cannot_run(monkeypatch):
    x = torch.randn(3, 8)
    ids = torch.randint(0, 37, (1, 5), generator=_generator(22))
    expected = _tiny_model()(ids)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU tensors and no interpreter: kernels cannot run
    assert not K.available(x)
    calls = _count_kernel_calls(monkeypatch)
    _close(_tiny_model(kernels=True)(ids), expected)  # the same result, through the package code
    assert calls == {}
    with pytest.raises(RuntimeError, match="interpreter is off"):
        K.rms_norm(x, torch.ones(8))
    monkeypatch.setattr(_triton, "HAS_TRITON", False)  # as if Triton were not installed
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not K.available(x)
    with pytest.raises(RuntimeError, match="Triton is not installed"):
        K.swiglu(x, x)


def test_the_teaching_modules_import_no_kernels():
    # A fresh process: building and running a model (kernels=False) must not import Triton at all.
    script = (
        "import sys, torch\n"
        "from llmbook.model import ModelConfig, TransformerLM\n"
        "TransformerLM(ModelConfig(vocab_size=11, context_length=4, d_model=8, n_layers=1, n_heads=2))"
        "(torch.zeros(1, 3, dtype=torch.long))\n"
        "print(sorted(m for m in sys.modules if m == 'triton' or m.startswith('llmbook.kernels')))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


@pytest.mark.skipif(CUDA, reason="checks the CPU interpreter switch; irrelevant on a GPU machine")
def test_importing_the_model_leaves_the_interpreter_switch_open():
    # A fresh process imports the model BEFORE setting TRITON_INTERPRET (the order another test module or
    # a notebook could cause): the model does not import Triton, so the kernels still run interpreted.
    late_switch = (
        "import os, sys, torch\n"
        "import llmbook.model\n"
        "print('triton imported:', 'triton' in sys.modules)\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "import llmbook.kernels as K\n"
        "x, w = torch.randn(4, 6), torch.ones(6)\n"
        "torch.testing.assert_close(K.rms_norm(x, w), K.rms_norm_reference(x, w))\n"
        "print('ok')\n"
    )
    # ...whereas once Triton itself was imported in compiled mode, the kernels refuse with a clear message
    # and the model quietly uses the references.
    too_late = (
        "import os, torch, triton.language\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "import llmbook.kernels as K\n"
        "x = torch.randn(4, 6)\n"
        "print('active:', K.available(x))\n"
        "try:\n"
        "    K.rms_norm(x, torch.ones(6))\n"
        "except RuntimeError as err:\n"
        "    print('refused:', 'before anything imports triton' in str(err))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    outputs = []
    for script in (late_switch, too_late):
        result = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300
        )
        assert result.returncode == 0, result.stderr[-2000:]
        outputs.append(result.stdout.split())
    assert outputs == [["triton", "imported:", "False", "ok"], ["active:", "False", "refused:", "True"]]


def test_benchmark_refuses_without_a_gpu_and_judges_targets_from_measurements(tmp_path, capsys):
    from llmbook.bench import kernels as bench

    if not CUDA:
        assert bench.main([]) == 2  # nothing is measured (or faked) on a CPU
        assert "needs a CUDA GPU" in capsys.readouterr().err
    # The verdicts come from the rows measured in the run: made-up rows, one passing and one failing target.
    rows = [
        dict(kernel="rms_norm", impl="triton", mode="fwd", ms=1.0, share_of_copy_bandwidth=0.85, peak_MiB=1),
        dict(kernel="rms_norm", impl="compile", mode="fwd", ms=0.9, share_of_copy_bandwidth=0.9, peak_MiB=1),
        dict(kernel="linear_cross_entropy", impl="triton", mode="fwd_bwd", ms=5.0, peak_MiB=100.0),
        dict(kernel="linear_cross_entropy", impl="eager", mode="fwd_bwd", ms=4.0, peak_MiB=1000.0),
    ]
    training = [dict(kernels=True, ms_per_step=90.0), dict(kernels=False, ms_per_step=100.0)]
    verdicts = bench._targets(rows, training)
    assert verdicts["rms_norm_fwd_>=80%_copy_bandwidth"] is True
    assert verdicts["rms_norm_fwd_>=1.0x_compile"] is False
    assert verdicts["rms_norm_fwd_bwd_>=1.0x_compile"] is None  # not measured: no verdict
    assert verdicts["cross_entropy_peak_memory_<=1/4"] is True
    assert verdicts["training_step_faster_with_kernels"] is True
    bench._plot(rows, tmp_path / "kernels.png", "test device", "2026-01-01")
    assert (tmp_path / "kernels.png").stat().st_size > 0


def test_benchmark_cases_name_each_kernel_once_with_what_run_case_needs():
    from llmbook.bench.kernel_cases import all_cases

    cases = all_cases(quick=True, dtype=torch.bfloat16, device="meta")  # shapes only, no memory
    assert [c["kernel"] for c in cases] == [
        "rms_norm", "swiglu", "rope", "cross_entropy", "linear_cross_entropy",
        "flash_attention_d64", "flash_attention_d128",
    ]  # fmt: skip
    for case in cases:
        assert {"triton", "eager"} <= set(case["impls"]), case["kernel"]
        counts = [key for key in ("bytes", "flops") if f"{key}_fwd" in case and f"{key}_fwd_bwd" in case]
        assert len(counts) == 1, f"{case['kernel']} needs exactly one of bytes or flops, forward and both"
        assert case[f"{counts[0]}_fwd_bwd"] > case[f"{counts[0]}_fwd"] > 0
    # bfloat16 moves 2 bytes per element: rms_norm's forward reads and writes (4096, 4096) once each.
    assert cases[0]["bytes_fwd"] == 2 * 4096 * 4096 * 2


# ------------------------------------------------------------------------------------ GPU-only checks


GPU_DTYPES = [(torch.float32, 1e-4), (torch.float16, 2e-2), (torch.bfloat16, 5e-2)]


def _gpu_randn(*shape, dtype, scale=1.0, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return (torch.randn(*shape, generator=g, device="cuda") * scale).to(dtype)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype, tol", GPU_DTYPES, ids=["fp32", "fp16", "bf16"])
def test_gpu_memory_bound_kernels_match_reference_at_real_shapes(dtype, tol):
    rows, d_model, d_ff, vocab = 4 * 1024, 2048, 5632, 32768
    x = _gpu_randn(rows, d_model, dtype=dtype)
    weight = _gpu_randn(d_model, dtype=dtype, seed=1)
    for fn, ref, inputs in [
        (K.rms_norm, K.rms_norm_reference, (x, weight)),
        (
            K.swiglu,
            K.swiglu_reference,
            (_gpu_randn(rows, d_ff, dtype=dtype, seed=2), _gpu_randn(rows, d_ff, dtype=dtype, seed=3)),
        ),
    ]:
        grad_out = _gpu_randn(*inputs[0].shape, dtype=dtype, seed=4)
        out, grads = _grads(fn, inputs, grad_out)
        out_ref, grads_ref = _grads(ref, tuple(t.float() for t in inputs), grad_out.float())
        _close(out.float(), out_ref, atol=tol, rtol=tol)
        for grad, grad_ref in zip(grads, grads_ref, strict=True):
            # dW sums over 4096 rows: compare relative to its scale.
            _close(grad.float(), grad_ref, atol=tol * max(1.0, grad_ref.abs().max().item()), rtol=tol)
    logits = _gpu_randn(rows, vocab, dtype=dtype, scale=4.0, seed=5)
    targets = torch.randint(0, vocab, (rows,), device="cuda")
    loss, (grad,) = _grads(K.cross_entropy, (logits, targets), torch.tensor(1.0, device="cuda"))
    one = torch.tensor(1.0, device="cuda")
    loss_ref, (grad_ref,) = _grads(K.cross_entropy_reference, (logits.float(), targets), one)
    _close(loss, loss_ref, atol=tol, rtol=tol)
    _close(grad.float(), grad_ref, atol=tol / rows, rtol=tol)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype, tol", GPU_DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gpu_flash_attention_and_rope_match_reference_at_real_shapes(dtype, tol, head_dim):
    from llmbook.position import RotaryEmbedding

    batch, n_heads, n_kv_heads, seq = 2, 16, 4, 1024
    q = _gpu_randn(batch, n_heads, seq, head_dim, dtype=dtype)
    k = _gpu_randn(batch, n_kv_heads, seq, head_dim, dtype=dtype, seed=1)
    v = _gpu_randn(batch, n_kv_heads, seq, head_dim, dtype=dtype, seed=2)
    grad_out = _gpu_randn(batch, n_heads, seq, head_dim, dtype=dtype, seed=3)
    out, grads = _grads(K.flash_attention, (q, k, v), grad_out)
    fp32_inputs = (q.float(), k.float(), v.float())
    out_ref, grads_ref = _grads(K.flash_attention_reference, fp32_inputs, grad_out.float())
    _close(out.float(), out_ref, atol=tol, rtol=tol)
    for grad, grad_ref in zip(grads, grads_ref, strict=True):
        _close(grad.float(), grad_ref, atol=tol * max(1.0, grad_ref.abs().max().item()), rtol=tol)
    rotary = RotaryEmbedding(head_dim).cuda()
    positions = torch.arange(seq, device="cuda")
    cos, sin = rotary.cos_sin(positions)
    _close(K.rope(q, cos, sin).float(), rotary(q.float(), positions), atol=tol, rtol=tol)


@pytest.mark.gpu
@needs_cuda
def test_gpu_cross_entropy_peak_memory_is_a_quarter_of_the_reference():
    rows, d_model, vocab = 8192, 2048, 32768
    hidden = _gpu_randn(rows, d_model, dtype=torch.bfloat16).requires_grad_()
    weight = _gpu_randn(vocab, d_model, dtype=torch.bfloat16, scale=0.02, seed=1).requires_grad_()
    targets = torch.randint(0, vocab, (rows,), device="cuda")

    def peak(fn):
        hidden.grad = weight.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(hidden, weight, targets).backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    fused, unfused = peak(K.linear_cross_entropy), peak(K.linear_cross_entropy_reference)
    assert fused <= unfused / 4, f"fused peak {fused / 2**20:.0f} MiB vs unfused {unfused / 2**20:.0f} MiB"


@pytest.mark.gpu
@pytest.mark.slow  # a few seconds on a GPU: 30 optimizer steps, twice
@needs_cuda
def test_gpu_training_with_kernels_matches_without():
    from llmbook.bench.kernels import training_model_config
    from llmbook.data import load_text
    from llmbook.model import TransformerLM

    torch.backends.cuda.matmul.allow_tf32 = False
    text = load_text("tinyshakespeare").encode("utf-8")
    tokens = torch.tensor(list(text[:200_000]), dtype=torch.long, device="cuda")
    config = training_model_config(dropout=0.0)  # the final chapter's GPU model; bytes as tokens

    def losses(kernels):
        torch.manual_seed(0)
        model = TransformerLM(dataclasses.replace(config, kernels=kernels)).cuda()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        g = torch.Generator(device="cuda").manual_seed(0)
        curve = []
        for _ in range(30):
            high = tokens.numel() - config.context_length - 1
            starts = torch.randint(0, high, (8,), generator=g, device="cuda")
            window = torch.stack([tokens[s : s + config.context_length + 1] for s in starts.tolist()])
            loss = model(window[:, :-1], window[:, 1:])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            curve.append(loss.item())
        return torch.tensor(curve)

    with_kernels, without = losses(True), losses(False)
    assert with_kernels[-1] < with_kernels[0] - 0.5  # it learned
    _close(with_kernels, without, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernels_and_package_functions_follow_one_dtype_rule(dtype):
    # Computed in float32, returned in the input's dtype (RMSNorm: promoted with the gain's dtype).
    from llmbook.ffn import swiglu
    from llmbook.loss import cross_entropy
    from llmbook.norms import rms_norm
    from llmbook.position import RotaryEmbedding, rotate

    g = _generator(40)
    x = torch.randn(5, 24, generator=g).to(dtype)
    # Two units in the last place: a float32 difference in 1/rms may flip one rounding of the result.
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=2e-3, rtol=2e-3)
    for gain in (torch.randn(24, generator=g).to(dtype), torch.randn(24, generator=g)):  # own dtype, float32
        out, ref = K.rms_norm(x, gain), rms_norm(x, gain)
        assert out.dtype == ref.dtype == torch.promote_types(dtype, gain.dtype)
        torch.testing.assert_close(out, ref, **tol)
    cos, sin = RotaryEmbedding(8).cos_sin(torch.arange(5))
    q = torch.randn(2, 3, 5, 8, generator=g).to(dtype)
    out, ref = K.rope(q, cos, sin), rotate(q, cos, sin)
    assert out.dtype == ref.dtype == dtype
    torch.testing.assert_close(out, ref, **tol)
    gate, value = torch.randn(5, 24, generator=g).to(dtype), torch.randn(5, 24, generator=g).to(dtype)
    out, ref = K.swiglu(gate, value), swiglu(gate, value)
    assert out.dtype == ref.dtype == dtype
    torch.testing.assert_close(out, ref, **tol)
    logits, targets = torch.randn(6, 33, generator=g).to(dtype), torch.randint(0, 33, (6,), generator=g)
    out, ref = K.cross_entropy(logits, targets), cross_entropy(logits, targets)
    assert out.dtype == ref.dtype == torch.float32  # a loss is a float32 number whatever the logits were
    torch.testing.assert_close(out, ref, atol=1e-3, rtol=1e-3)


# ---- chapter 7's Triton exercise: the reader's RMSNorm kernel, graded under the interpreter ----------


@_triton.jit
def _exercise_rms_norm_kernel(x_ptr, weight_ptr, y_ptr, n_cols, eps, BLOCK_SIZE: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    inv_rms = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    tl.store(y_ptr + row * n_cols + cols, x * inv_rms * weight, mask=mask)


@_triton.jit
def _exercise_kernel_averaging_over_the_block(
    x_ptr, weight_ptr, y_ptr, n_cols, eps, BLOCK_SIZE: tl.constexpr
):
    # The classic slip: the masked lanes are zeros, but the mean divides by the block, not the row.
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    inv_rms = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / BLOCK_SIZE + eps)
    tl.store(y_ptr + row * n_cols + cols, x * inv_rms * weight, mask=mask)


def _launcher(kernel):
    def triton_rms_norm(x, weight, eps):
        y = torch.empty_like(x)
        n_rows, n_cols = x.shape
        kernel[(n_rows,)](x, weight, y, n_cols, eps, BLOCK_SIZE=_triton.next_power_of_2(n_cols))
        return y

    return triton_rms_norm


def test_the_triton_rms_norm_exercise_passes_a_masked_kernel_and_fails_one_that_averages_over_the_block():
    from llmbook.exercises import run_check

    assert run_check("07.triton_rms_norm", _launcher(_exercise_rms_norm_kernel), seed=1).passed
    wrong = run_check("07.triton_rms_norm", _launcher(_exercise_kernel_averaging_over_the_block), seed=1)
    assert not wrong.passed and "width 100" in wrong.message  # a power-of-two width alone would pass it


def test_the_triton_rms_norm_exercise_reports_an_answer_written_in_pytorch():
    from llmbook.exercises import run_check

    def in_pytorch(x, weight, eps):
        return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps) * weight

    result = run_check("07.triton_rms_norm", in_pytorch, seed=1)
    assert not result.passed and "you called torch." in result.message


@pytest.mark.slow  # starts a Jupyter kernel, as `python -m llmbook grade` does
def test_the_grader_runs_chapter_7_kernels_with_the_triton_interpreter_on(tmp_path):
    import json

    from llmbook.exercises.grade import main_grade

    # This notebook imports triton first thing and never sets TRITON_INTERPRET itself: only the grader's
    # environment for chapter 7 can put Triton in interpreter mode, which CPU tensors need.
    kernel = (
        "import torch, triton\nimport triton.language as tl\nfrom llmbook.exercises import check\n\n"
        "@triton.jit\ndef k(x_ptr, w_ptr, y_ptr, n_cols, eps, BLOCK_SIZE: tl.constexpr):\n"
        "    row = tl.program_id(0)\n    cols = tl.arange(0, BLOCK_SIZE)\n    mask = cols < n_cols\n"
        "    x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0)\n"
        "    w = tl.load(w_ptr + cols, mask=mask, other=0.0)\n"
        "    r = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)\n"
        "    tl.store(y_ptr + row * n_cols + cols, x * r * w, mask=mask)\n\n"
        "def launch(x, w, eps):\n    y = torch.empty_like(x)\n"
        "    k[(x.shape[0],)](x, w, y, x.shape[1], eps, BLOCK_SIZE=triton.next_power_of_2(x.shape[1]))\n"
        "    return y\n"
    )
    cells = [kernel, 'check("07.triton_rms_norm", launch)']
    notebook = {
        "cells": [{"cell_type": "code", "id": f"c{i}", "metadata": {}, "source": s, "outputs": [],
                   "execution_count": None}
                  for i, s in enumerate(cells)],
        "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
        "nbformat": 4, "nbformat_minor": 5,
    }  # fmt: skip
    (tmp_path / "07_mine.ipynb").write_text(json.dumps(notebook))
    out = tmp_path / "report"
    assert main_grade(str(tmp_path), str(out), time_limit=300) == 0
    grades = (out / "grades.csv").read_text()
    assert "07.triton_rms_norm,pass" in grades, (out / "messages" / "07_mine.txt").read_text()


@pytest.mark.skipif(CUDA, reason="checks the CPU interpreter switch; irrelevant on a GPU machine")
def test_the_exercise_notebooks_import_of_triton_switches_the_interpreter_on_or_says_it_cannot():
    # What exercise notebook 7's first cell runs, in a fresh process without TRITON_INTERPRET: the kernels
    # then run on CPU tensors. Imported after triton, it says to restart; without Triton, that it cannot run.
    ask = (
        "from llmbook.exercises.ch07 import switch_triton_interpreter_on\n"
        "have = switch_triton_interpreter_on()\n"
        "from llmbook.kernels._triton import interpreter_ready\n"
        "print('ready', have, interpreter_ready())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    no_triton = "import sys\nsys.modules['triton'] = None\n"  # as on macOS: `import triton` fails
    for first, expected in (
        ("", "ready True True"),
        ("import triton\n", "restart the kernel"),
        (no_triton, "exercise 6 cannot run here.\nready False False"),
    ):  # fmt: skip
        result = subprocess.run(
            [sys.executable, "-c", first + ask], capture_output=True, text=True, env=env, cwd=ROOT,
            timeout=300,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-2000:]
        assert expected in result.stdout, result.stdout
