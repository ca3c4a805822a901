"""The pieces of `python -m llmbook.bench quality`: the split, exact evaluation, presets, and a tiny run."""

import json
import math

import pytest
import torch
from torch import nn

from llmbook.baselines import all_baselines
from llmbook.bench import quality, quality_run, quality_sweep
from llmbook.data import load_text
from llmbook.evaluation import evaluate_exact
from llmbook.model import ModelConfig
from llmbook.tokens import split_text
from llmbook.train_config import PRESETS, TrainConfig

# A preset small enough to train in a second: the same code path as the chapter's.
TINY = {
    "vocab_size": 300,
    "model": dict(context_length=16, d_model=16, n_layers=1, n_heads=2, tie_embeddings=True),
    "train": dict(batch_size=4, steps=3, warmup_steps=1, eval_interval=2, eval_batches=1, max_lr=1e-3),
}


class Bigram(nn.Module):
    """Logits depend only on the current token: the exact loss can be computed without windows."""

    def __init__(self, vocab_size: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = nn.Parameter(torch.randn(vocab_size, vocab_size, generator=g))

    def forward(self, ids):
        return self.table[ids]


def test_split_text_holds_out_the_last_tenth():
    text = "".join(chr(97 + i % 26) for i in range(1000))
    train, val = split_text(text)
    assert train + val == text
    assert len(val) == 100 and val == text[-100:]
    with pytest.raises(ValueError, match="val_fraction"):
        split_text(text, 1.5)


@pytest.mark.parametrize("n_tokens, context_length", [(50, 8), (49, 8), (2, 8), (100, 1), (33, 32)])
def test_evaluate_exact_predicts_every_token_after_the_first_once(n_tokens, context_length):
    g = torch.Generator().manual_seed(n_tokens)
    stream = torch.randint(0, 11, (n_tokens,), generator=g)
    model = Bigram(11, seed=context_length)
    nats, count = evaluate_exact(model, stream.numpy(), context_length, batch_size=3)
    expected = torch.nn.functional.cross_entropy(model.table[stream[:-1]], stream[1:]).item()
    assert count == n_tokens - 1
    assert math.isclose(nats, expected, rel_tol=1e-5)


def test_evaluate_exact_rejects_a_stream_too_short_to_predict_anything():
    with pytest.raises(ValueError, match="at least 2"):
        evaluate_exact(Bigram(5, 0), torch.tensor([3]).numpy(), 4)


def test_evaluate_exact_restores_training_mode():
    model = Bigram(5, 0).train()
    evaluate_exact(model, torch.arange(5).numpy(), 2)
    assert model.training


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_make_valid_configs(name):
    preset = PRESETS[name]
    config = TrainConfig(
        model=ModelConfig(vocab_size=preset["vocab_size"], **preset["model"]),
        train_data="x",
        **preset["train"],
    )
    assert config.steps == preset["train"]["steps"]


def test_variant_changes_only_the_named_fields():
    base = PRESETS["cpu"]
    changed = quality_sweep.variant(base, vocab_size=512, n_layers=8, max_lr=1e-4)
    assert (
        changed["vocab_size"] == 512
        and changed["model"]["n_layers"] == 8
        and changed["train"]["max_lr"] == 1e-4
    )
    assert {k: v for k, v in changed["model"].items() if k != "n_layers"} == {
        k: v for k, v in base["model"].items() if k != "n_layers"
    }
    assert base["model"]["n_layers"] != 8, "the base preset must not be modified"
    with pytest.raises(ValueError, match="neither"):
        quality_sweep.variant(base, not_a_field=1)


def test_sweep_and_ablations_change_one_thing_each():
    base = PRESETS["cpu"]
    for variants in (quality_sweep.sweep_variants(base), quality_sweep.ablation_variants(base)):
        first = next(iter(variants.values()))[1]
        assert first == base
        for name, (_, preset) in list(variants.items())[1:]:
            assert preset != base, f"{name} does not change anything"


def test_a_tiny_run_reports_exact_bits_per_byte(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMBOOK_CACHE", str(tmp_path))
    tiny = TINY
    torch.set_num_threads(1)
    summary = quality_run.run_preset(tiny, progress=False, device="cpu")
    assert summary["steps"] == 3 and summary["tokens_seen"] == 3 * 4 * 16
    data = quality_run.prepare_shakespeare(300)  # reused from the cache the run wrote
    expected = summary["val_nats_per_token"] * data.n_val_tokens / (data.val_bytes * math.log(2))
    assert math.isclose(summary["val_bits_per_byte"], expected, rel_tol=1e-9)
    # A barely trained model is close to uniform over 300 tokens.
    assert abs(summary["val_nats_per_token"] - math.log(300)) < 0.5
    json.dumps(summary)  # JSON-ready


def test_run_many_reuses_an_identical_run_and_writes_it(tmp_path):
    base = PRESETS["cpu"]
    done = {"runs": {"old name": {"preset": json.loads(json.dumps(base)), "val_bits_per_byte": 2.0}}}
    other = tmp_path / "quality_ablations.json"
    other.write_text(json.dumps(done))
    out = tmp_path / "quality_sweep.json"
    results = quality_sweep.run_many({"baseline": ("the base", base)}, out, threads=1, reuse=(other,))
    saved = json.loads(out.read_text())
    assert saved["runs"]["baseline"]["val_bits_per_byte"] == 2.0
    assert saved["runs"]["baseline"]["changed"] == "the base"
    assert results["runs"] == saved["runs"]


def test_the_benchmark_prints_and_stores_the_baselines_beside_the_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LLMBOOK_CACHE", str(tmp_path))
    text = load_text("tinyshakespeare")[:20_000]  # a small text: the same code path, in seconds
    monkeypatch.setattr(quality_run, "load_text", lambda name: text)
    out = tmp_path / "quality.json"
    tiny = ["vocab_size=280", "context_length=16", "d_model=16", "n_layers=1", "n_heads=2", "batch_size=2"]
    argv = ["--steps", "3", "--threads", "1", "--processes", "1", "--skip-nanogpt", "--out", str(out),
            "--set", *tiny, "eval_interval=2"]  # fmt: skip
    assert quality.main(argv) == 0
    saved = json.loads(out.read_text())
    train, val = split_text(text, quality_run.VAL_FRACTION)
    assert saved["baselines_bits_per_byte"] == pytest.approx(all_baselines(train, val), rel=1e-12)
    expected = {"gzip -9", "bz2 -9", "lzma -9e", "unigram bytes (add-one)", "bigram bytes (add-one)"}
    assert expected <= set(saved["baselines_bits_per_byte"])
    printed = capsys.readouterr().out
    for name, bits in saved["baselines_bits_per_byte"].items():
        assert f"{name:32s} {bits:6.3f}" in printed
    assert f"{'this run (preset cpu)':32s} {saved['val_bits_per_byte']:6.3f}   <- this run" in printed


def test_recipe_variants_add_one_change_each_to_the_adamw_base_then_the_kept_ones_together():
    base = PRESETS["cpu-adamw"]
    variants = quality_sweep.recipe_variants(base)
    assert variants["baseline (AdamW)"][1] == base
    for name, (_, preset) in variants.items():
        if name in ("baseline (AdamW)", "all kept changes"):
            continue
        changed = [
            (part, key) for part in ("model", "train") for key in set(preset[part]) | set(base[part])
            if preset[part].get(key) != base[part].get(key)
        ]  # fmt: skip
        assert changed, f"{name} changes nothing"
        if name == "context x 2, batch / 2":  # one change, the shape of a batch: the same tokens per step
            assert sorted(changed) == [("model", "context_length"), ("train", "batch_size")]
            tokens = [p["model"]["context_length"] * p["train"]["batch_size"] for p in (preset, base)]
            assert tokens[0] == tokens[1]
            continue
        assert len({part for part, _ in changed}) == 1, f"{name} changes both model and training"
    together = variants["all kept changes"][1]
    for name in quality_sweep.KEPT:
        for part in ("model", "train"):
            for key, value in variants[name][1][part].items():
                if base[part].get(key) != value and key != "min_lr":
                    assert together[part][key] == value, (name, key)
    # The chapter's CPU preset is the kept recipe, with its own number of steps.
    cpu = PRESETS["cpu"]
    assert cpu["model"] == together["model"] and cpu["vocab_size"] == together["vocab_size"]
    assert {k: v for k, v in cpu["train"].items() if k != "steps"} == {
        k: v for k, v in together["train"].items() if k != "steps"
    }


def test_calibrate_steps_fits_the_steps_to_the_budget(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMBOOK_CACHE", str(tmp_path))
    text = load_text("tinyshakespeare")[:20_000]
    monkeypatch.setattr(quality_run, "load_text", lambda name: text)
    tiny = quality_sweep.variant(TINY, vocab_size=280, batch_size=2, eval_interval=5)
    torch.set_num_threads(1)
    data = quality_run.prepare_shakespeare(280)
    calibration = quality_run.calibrate_steps(tiny, data, seconds=2.0)
    assert calibration["step_seconds"] > 0 and calibration["eval_seconds"] > 0
    per_step = calibration["step_seconds"] + calibration["eval_seconds"] / 5
    assert calibration["steps"] == int((2.0 - calibration["eval_seconds"]) / per_step)
    with pytest.raises(ValueError, match="not more than the preset's warm-up"):
        quality_run.calibrate_steps(quality_sweep.variant(tiny, warmup_steps=10**6), data, seconds=2.0)
    summary = quality_run.run_preset(tiny, progress=False, device="cpu", seconds=2.0)
    assert summary["budget_seconds"] == 2.0 and summary["steps"] == summary["calibration"]["steps"]
    assert summary["train_seconds"] < 20  # the same order as the budget, not the preset's step count


@pytest.mark.slow  # spawns a worker process
def test_run_seeded_keeps_each_seed_and_reports_mean_and_spread(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMBOOK_CACHE", str(tmp_path))
    tiny = TINY
    out = tmp_path / "recipe.json"
    results = quality_sweep.run_seeded({"tiny": ("nothing", tiny)}, out, None, seeds=(0, 1), jobs=1)
    run = results["runs"]["tiny"]
    values = [run["seeds"][seed]["val_bits_per_byte"] for seed in ("0", "1")]
    assert values[0] != values[1]  # two seeds, two initialisations
    assert run["val_bits_per_byte"] == pytest.approx(sum(values) / 2)
    assert run["spread"] == pytest.approx(abs(values[0] - values[1]))
    assert json.loads(out.read_text())["runs"] == results["runs"]
    again = quality_sweep.run_seeded({"tiny": ("nothing", tiny)}, out, None, seeds=(0, 1), jobs=1)
    assert again["runs"] == results["runs"]  # both seeds were kept, nothing reran


def test_the_benchmark_trains_nanogpts_cpu_recipe_for_the_same_time_and_the_same_flops(
    tmp_path, monkeypatch, capsys
):
    calls = []

    def fake_run(preset, progress=True, device="auto", seconds=None, processes=1):
        calls.append((preset, seconds, processes))
        nanogpt = preset["vocab_size"] == PRESETS["nanogpt-cpu"]["vocab_size"]
        bits = {None: 2.05, True: 2.31}.get(seconds is not None if nanogpt else None, 2.42)
        flops = quality_run.train_flops_per_step(preset) * 1400 if not nanogpt else 1.0
        return {"steps": 7, "tokens_seen": 70, "epochs": 0.1, "train_seconds": 123.0, "tokens_per_second": 1,
                "val_nats_per_token": 1.0, "val_bits_per_byte": bits, "val_bytes_per_token": 2.0,
                "train_flops": flops, "history": {"step": [], "loss": [], "eval_step": [], "train_loss": [],
                                                  "val_loss": [], "val_bpb": []}}  # fmt: skip

    monkeypatch.setattr(quality, "run_preset", fake_run)
    monkeypatch.setattr(quality, "plot_history", lambda summary, path: None)
    monkeypatch.setattr(quality, "all_baselines", lambda train, val: {"gzip -9": 3.0})
    out = tmp_path / "quality.json"
    assert quality.main(["--out", str(out)]) == 0
    (chapter, chapter_seconds, processes), (same_time, seconds, same_time_processes), same_flops = calls
    assert chapter == PRESETS["cpu"] and chapter_seconds is None and processes == 2
    assert same_time is PRESETS["nanogpt-cpu"] and seconds == 123.0 and same_time_processes == 1
    # Equal compute: nanoGPT's steps x its FLOPs per step = the chapter run's steps x its FLOPs per step.
    flops = quality_run.train_flops_per_step(PRESETS["cpu"]) * 1400
    nanogpt_steps = same_flops[0]["train"]["steps"]
    per_step = quality_run.train_flops_per_step(PRESETS["nanogpt-cpu"])
    assert abs(nanogpt_steps * per_step - flops) <= per_step / 2 and same_flops[1] is None
    assert same_flops[0] == quality_sweep.variant(PRESETS["nanogpt-cpu"], steps=nanogpt_steps)
    saved = json.loads(out.read_text())
    assert saved["nanogpt_cpu"]["val_bits_per_byte"] == 2.31
    assert saved["nanogpt_cpu_same_compute"]["val_bits_per_byte"] == 2.42
    assert "load_average_1min" in saved["environment"]
    printed = capsys.readouterr().out
    assert (
        f"{quality.NANOGPT_ROW:32s}  2.310" in printed
        and f"{quality.NANOGPT_COMPUTE_ROW:32s}  2.420" in printed
    )


def test_stored_train_flops_are_steps_times_the_flops_of_one_step():
    stored = json.loads((quality.RESULTS / "quality.json").read_text())
    assert stored["train_flops"] == quality_run.train_flops_per_step(stored["preset"]) * stored["steps"]
    assert quality_run.steps_for_flops(stored["preset"], stored["train_flops"]) == stored["steps"]


def test_leave_one_out_undoes_one_change_each_back_to_the_plain_value():
    recipe, plain = PRESETS["cpu"], PRESETS["cpu-adamw"]
    variants = quality_sweep.leave_one_out_variants(recipe, plain)
    assert variants["recipe"][1] == recipe
    undone = {
        "without lr x 4, decay to 0": ("max_lr", "min_lr"),
        "without weight decay x 10": ("weight_decay",),
        "without Muon's lr x 4": ("muon_lr",),
    }
    for name, fields in undone.items():
        preset = variants[name][1]
        assert preset["model"] == recipe["model"]
        changed = {k for k in recipe["train"] if preset["train"][k] != recipe["train"][k]}
        assert changed == set(fields), name
        plain_key = {"muon_lr": "max_lr"}
        assert all(preset["train"][f] == plain["train"][plain_key.get(f, f)] for f in fields), name


def test_run_leave_one_out_copies_stored_runs_and_trains_the_rest_seed_by_seed(tmp_path, monkeypatch):
    recipe = PRESETS["cpu"]
    stored = tmp_path / "quality.json"
    stored.write_text(json.dumps({
        "environment": {"date": "2026-01-01T00:00:00+00:00"}, "preset": json.loads(json.dumps(recipe)),
        "processes": 2, "val_bits_per_byte": 2.09, "nanogpt_cpu": {"steps": 1},
        "history": {"eval_step": [], "val_loss": [], "val_bpb": []},
    }))  # fmt: skip
    trained = []

    def fake_run(preset, progress=True, device="auto", seconds=None, processes=1):
        trained.append((preset["train"]["seed"], preset["train"]["weight_decay"], processes))
        bits = 2.0 + preset["train"]["seed"] / 100 + (preset["train"]["weight_decay"] < 1) / 10
        return {"preset": json.loads(json.dumps(preset)), "val_bits_per_byte": bits,
                "history": {"eval_step": [], "val_loss": [], "val_bpb": [], "loss": []}}  # fmt: skip

    monkeypatch.setattr(quality_sweep, "run_preset", fake_run)
    monkeypatch.setattr(quality_sweep, "print_summary", lambda name, summary: None)
    variants = {
        "recipe": ("nothing", recipe),
        "no wd": ("wd", quality_sweep.variant(recipe, weight_decay=0.1)),
    }
    out = tmp_path / "loo.json"
    results = quality_sweep.run_leave_one_out(variants, out, seeds=(0, 1), processes=2, reuse=(stored,))
    # Seed 0 of the recipe is the stored run; everything else trains, seed 0 of each variant first.
    assert trained == [(0, 0.1, 2), (1, 1.0, 2), (1, 0.1, 2)]
    runs = results["runs"]
    assert runs["recipe"]["seeds"]["0"]["val_bits_per_byte"] == 2.09
    assert "nanogpt_cpu" not in runs["recipe"]["seeds"]["0"]
    assert runs["no wd"]["val_bits_per_byte"] == pytest.approx(2.105)
    assert runs["no wd"]["spread"] == pytest.approx(0.01)
    assert json.loads(out.read_text())["runs"] == runs
    trained.clear()
    quality_sweep.run_leave_one_out(variants, out, seeds=(0, 1), processes=2, reuse=(stored,))
    assert trained == []  # a second call finds every run done


def test_the_nanogpt_preset_is_nanogpts_cpu_recipe():
    preset = PRESETS["nanogpt-cpu"]
    model = ModelConfig(vocab_size=preset["vocab_size"], **preset["model"])
    assert (model.vocab_size, model.positions, model.norm, model.ffn) == (256, "learned", "layer", "gelu")
    assert (model.n_layers, model.n_heads, model.d_model, model.context_length) == (4, 4, 128, 64)
    assert model.dropout == 0.0 and preset["train"]["batch_size"] == 12 and preset["train"]["max_lr"] == 1e-3
