"""Benchmark the Triton kernels against PyTorch eager and torch.compile, on a CUDA GPU.

`python -m llmbook.bench kernels [--quick] [--out PATH]`

For every kernel at LLM-sized shapes, forward and forward+backward: median time (triton.testing.do_bench),
achieved bandwidth (GB/s, from the bytes the op must move at minimum) or, for attention, TFLOP/s, and that
as a share of this device's *measured* copy bandwidth (a large device-to-device copy) or measured bf16
matmul rate, all in the same run; peak memory of each. Implementations compared: the Triton kernel,
the PyTorch reference in eager mode, and `torch.compile` of the same reference (plus SDPA for attention).
Then one optimizer step of the final chapter's GPU model with kernels on and off. Results go to
`llmbook/bench/results/kernels.json` (device name, versions, date) and a figure `kernels.png`.

Targets (checked and printed, H100 in mind): memory-bound kernels >= 80% of copy bandwidth and >= 1.0x
torch.compile; fused cross-entropy <= 1/4 of the reference's peak memory at vocab 32k+; flash attention
forward >= 0.8x SDPA's flash backend at seq 2048, head dim 64 and 128; a training step faster with kernels.
On a machine without CUDA it prints why and exits with status 2: CPU timings of the interpreter mean nothing.
"""

import argparse
import dataclasses
import datetime as dt
import math
import platform
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from llmbook.bench import write_results
from llmbook.bench.kernel_cases import all_cases
from llmbook.model import ModelConfig

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def training_model_config(**overrides) -> ModelConfig:
    """The final chapter's GPU model (`llmbook.train_config.PRESETS["cuda"]`), fields overridable."""
    from llmbook.train_config import PRESETS

    preset = PRESETS["cuda"]
    fields = {"vocab_size": preset["vocab_size"], **preset["model"], **overrides}
    return ModelConfig(**fields)


# ----------------------------------------------------------------------------------------- measuring


def _bench_ms(fn: Callable[[], object]) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def _peak_mib(fn: Callable[[], object]) -> float:
    """Peak memory allocated while running fn once, above what was allocated before, in MiB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def measure_copy_bandwidth(n_bytes: int = 2**30) -> float:
    """GB/s of a device-to-device copy of n_bytes (counting the read and the write)."""
    src = torch.empty(n_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = _bench_ms(lambda: dst.copy_(src))
    return 2 * n_bytes / (ms * 1e-3) / 1e9


def measure_matmul_tflops(n: int = 8192) -> float:
    """TFLOP/s of an n x n x n bf16 matmul."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = _bench_ms(lambda: a @ b)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def _forward_backward(fn: Callable, inputs: tuple, grad_out: torch.Tensor) -> Callable[[], object]:
    leaves = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]

    def run():
        out = fn(*inputs)
        return torch.autograd.grad(out, leaves, grad_out)

    return run


# ----------------------------------------------------------------------------------------- running


def _run_case(case: dict, copy_gbps: float, matmul_tflops: float, use_compile: bool) -> list[dict]:
    rows = []
    impls = dict(case["impls"])
    if use_compile:
        impls["compile"] = torch.compile(case["impls"]["eager"], dynamic=False)
    for impl_name, fn in impls.items():
        for mode in ("fwd", "fwd_bwd"):
            inputs = case["inputs"]
            if mode == "fwd":

                def run(fn=fn, inputs=inputs):
                    with torch.no_grad():
                        return fn(*inputs)
            else:
                run = _forward_backward(fn, inputs, case["grad_out"])
            row = dict(kernel=case["kernel"], shape=case["shape"], impl=impl_name, mode=mode)
            try:
                ms = _bench_ms(run)
                row["ms"] = ms
                row["peak_MiB"] = _peak_mib(run)
                if f"bytes_{mode}" in case:
                    row["GBps"] = case[f"bytes_{mode}"] / (ms * 1e-3) / 1e9
                    row["share_of_copy_bandwidth"] = row["GBps"] / copy_gbps
                else:
                    row["TFLOPs"] = case[f"flops_{mode}"] / (ms * 1e-3) / 1e12
                    row["share_of_matmul_peak"] = row["TFLOPs"] / matmul_tflops
            except Exception as err:  # an implementation that fails is recorded, not fatal
                row["error"] = f"{type(err).__name__}: {err}"[:300]
            rows.append(row)
            torch.cuda.empty_cache()
    return rows


def _training_step(kernels_on: bool, steps: int, dtype: torch.dtype) -> dict:
    from llmbook.model import TransformerLM

    config = training_model_config(kernels=kernels_on)
    torch.manual_seed(0)
    model = TransformerLM(config).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    # The chapter's GPU batch size (64 sequences of context_length tokens).
    ids = torch.randint(0, config.vocab_size, (64, config.context_length + 1), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=dtype):
            loss = model(ids[:, :-1], ids[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.reset_peak_memory_stats()
    start.record()
    for _ in range(steps):
        step()
    end.record()
    torch.cuda.synchronize()
    return dict(
        kernels=kernels_on,
        ms_per_step=start.elapsed_time(end) / steps,
        peak_MiB=torch.cuda.max_memory_allocated() / 2**20,
    )


def _targets(rows: list[dict], training: list[dict]) -> dict:
    def get(kernel, impl, mode, key):
        for r in rows:
            if r["kernel"] == kernel and r["impl"] == impl and r["mode"] == mode and key in r:
                return r[key]
        return None

    verdicts = {}
    for kernel in ("rms_norm", "swiglu", "rope", "cross_entropy"):
        for mode in ("fwd", "fwd_bwd"):
            share = get(kernel, "triton", mode, "share_of_copy_bandwidth")
            t_triton, t_compile = get(kernel, "triton", mode, "ms"), get(kernel, "compile", mode, "ms")
            verdicts[f"{kernel}_{mode}_>=80%_copy_bandwidth"] = None if share is None else share >= 0.8
            verdicts[f"{kernel}_{mode}_>=1.0x_compile"] = (
                None if None in (t_triton, t_compile) else t_compile / t_triton >= 1.0
            )
    fused, unfused = (get("linear_cross_entropy", i, "fwd_bwd", "peak_MiB") for i in ("triton", "eager"))
    verdicts["cross_entropy_peak_memory_<=1/4"] = None if None in (fused, unfused) else fused <= unfused / 4
    for head_dim in (64, 128):
        mine, sdpa = (get(f"flash_attention_d{head_dim}", i, "fwd", "ms") for i in ("triton", "sdpa_flash"))
        ok = None if None in (mine, sdpa) else sdpa / mine >= 0.8
        verdicts[f"flash_d{head_dim}_fwd_>=0.8x_sdpa_flash"] = ok
    if len(training) == 2:
        with_kernels, without = training[0]["ms_per_step"], training[1]["ms_per_step"]
        verdicts["training_step_faster_with_kernels"] = with_kernels < without
    return verdicts


def _plot(rows: list[dict], out_png: Path, device: str, date: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kernels = sorted({r["kernel"] for r in rows if "share_of_copy_bandwidth" in r})
    impls = ["triton", "compile", "eager"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), dpi=100)
    for ax, mode in zip(axes, ("fwd", "fwd_bwd"), strict=True):
        width = 0.8 / len(impls)
        for i, impl in enumerate(impls):
            shares = []
            for kernel in kernels:
                match = [r for r in rows if (r["kernel"], r["impl"], r["mode"]) == (kernel, impl, mode)]
                shares.append(100 * match[0].get("share_of_copy_bandwidth", 0.0) if match else 0.0)
            ax.bar([k + i * width for k in range(len(kernels))], shares, width, label=impl)
        ax.axhline(80, color="gray", linestyle="--", linewidth=1, label="80% target")
        ax.set_xticks([k + width for k in range(len(kernels))], kernels, rotation=15)
        ax.set_ylabel("achieved bandwidth (% of measured copy bandwidth)")
        ax.set_title(f"memory-bound kernels, {mode.replace('_', '+')}")
        ax.legend()
    fig.suptitle(f"{device}, {date}")
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)


def _print_table(rows: list[dict]) -> None:
    header = f"{'kernel':<24}{'impl':<12}{'mode':<9}{'ms':>9}{'GB/s':>9}{'TFLOP/s':>9}{'share':>8}"
    print(header + f"{'peak MiB':>10}")
    for r in rows:
        if "error" in r:
            print(f"{r['kernel']:<24}{r['impl']:<12}{r['mode']:<9}  error: {r['error'][:60]}")
            continue
        share = r.get("share_of_copy_bandwidth", r.get("share_of_matmul_peak", math.nan))
        print(
            f"{r['kernel']:<24}{r['impl']:<12}{r['mode']:<9}{r['ms']:>9.3f}{r.get('GBps', math.nan):>9.0f}"
            f"{r.get('TFLOPs', math.nan):>9.1f}{100 * share:>7.0f}%{r['peak_MiB']:>10.0f}"
        )


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m llmbook.bench kernels", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="smaller shapes, fewer training steps")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "kernels.json", help="JSON output path")
    return parser.parse_args(argv)


def _why_not_runnable() -> str | None:
    """Why compiled kernels cannot be timed here (no CUDA, no Triton, the interpreter on), or None."""
    if not torch.cuda.is_available():
        return (
            "python -m llmbook.bench kernels needs a CUDA GPU: it times the compiled Triton kernels against "
            "PyTorch on the device. No CUDA device is visible here, so nothing was measured."
        )
    try:
        import triton  # noqa: F401
    except ImportError:
        return "python -m llmbook.bench kernels needs Triton: pip install triton"
    from llmbook.kernels import interpreter_on

    if interpreter_on():
        return "TRITON_INTERPRET=1 is set: unset it to benchmark compiled kernels."
    return None


def _measure_training(quick: bool) -> list[dict]:
    """One optimizer step of the final chapter's GPU model, kernels on then off, printed."""
    steps = 5 if quick else 20
    training = [_training_step(True, steps, torch.bfloat16), _training_step(False, steps, torch.bfloat16)]
    for t in training:
        print(
            f"training step, kernels={t['kernels']}: {t['ms_per_step']:.1f} ms, peak {t['peak_MiB']:.0f} MiB"
        )
    print(f"speed-up with kernels: {training[1]['ms_per_step'] / training[0]['ms_per_step']:.2f}x")
    return training


def main(argv: list[str] | None = None) -> int:
    """Run the kernel benchmark (CUDA only); write JSON and PNG results; return a process exit status."""
    args = _parse_args(argv)
    reason = _why_not_runnable()
    if reason is not None:
        print(reason, file=sys.stderr)
        return 2
    import triton

    dtype = getattr(torch, args.dtype)
    device = torch.cuda.get_device_name()
    date = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(f"device: {device}; torch {torch.__version__}; triton {triton.__version__}; {args.dtype}")
    copy_gbps = measure_copy_bandwidth()
    matmul_tflops = measure_matmul_tflops()
    print(f"measured copy bandwidth {copy_gbps:.0f} GB/s; bf16 matmul {matmul_tflops:.0f} TFLOP/s")

    rows = []
    for case in all_cases(args.quick, dtype):
        rows += _run_case(case, copy_gbps, matmul_tflops, use_compile=not args.no_compile)
        torch.cuda.empty_cache()
    _print_table(rows)
    training = _measure_training(args.quick)
    verdicts = _targets(rows, training)
    for name, ok in verdicts.items():
        print(f"  {'PASS' if ok else ('n/a ' if ok is None else 'FAIL')}  {name}")

    result = dict(
        device=device, date=date, torch=torch.__version__, triton=triton.__version__,
        cuda=torch.version.cuda, python=platform.python_version(), dtype=args.dtype, quick=args.quick,
        copy_bandwidth_GBps=copy_gbps, matmul_bf16_TFLOPs=matmul_tflops,
        training_config=dataclasses.asdict(training_model_config()), training=training,
        results=rows, targets=verdicts,
    )  # fmt: skip
    write_results(args.out, result)
    _plot(rows, args.out.with_suffix(".png"), device, date)
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
