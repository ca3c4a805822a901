"""Config construction is the one place a model's or run's settings are checked (issue 17)."""

import dataclasses
import math

import pytest
import torch

from llmbook.errors import ConfigError, ConfigTypeError, ConfigValueError
from llmbook.model import ModelConfig, TransformerLM
from llmbook.train_config import TrainConfig

SMALL = dict(vocab_size=64, context_length=8, d_model=16, n_layers=2, n_heads=2)

# (field, bad value, error class): every one of these was accepted (or failed obscurely) before.
MODEL_BAD_VALUES = [
    ("norm_eps", math.nan, ConfigValueError),
    ("norm_eps", math.inf, ConfigValueError),
    ("norm_eps", "1e-5", ConfigTypeError),
    ("rope_theta", math.nan, ConfigValueError),
    ("rope_theta", -math.inf, ConfigValueError),
    ("rope_theta", math.inf, ConfigValueError),
    ("dropout", math.nan, ConfigValueError),
    ("tie_embeddings", "no", ConfigTypeError),
    ("tie_embeddings", 1, ConfigTypeError),
    ("tie_embeddings", None, ConfigTypeError),
    ("kernels", "yes", ConfigTypeError),
    ("kernels", 0, ConfigTypeError),
    ("n_kv_heads", 2.0, ConfigTypeError),
    ("n_kv_heads", 0, ConfigValueError),
    ("n_kv_heads", True, ConfigTypeError),
    ("d_ff", 64.0, ConfigTypeError),
    ("d_ff", 0, ConfigValueError),
    ("d_ff", "64", ConfigTypeError),
    ("n_heads", True, ConfigTypeError),
    ("n_layers", 2.0, ConfigTypeError),
    ("d_model", "16", ConfigTypeError),
    ("vocab_size", False, ConfigTypeError),
    ("context_length", 8.5, ConfigTypeError),
    ("norm", None, ConfigValueError),
    ("positions", ["rope"], ConfigValueError),
    ("qk_norm", 1, ConfigTypeError),
    ("qk_norm", "true", ConfigTypeError),
    ("logit_softcap", 0.0, ConfigValueError),
    ("logit_softcap", -30.0, ConfigValueError),
    ("logit_softcap", math.inf, ConfigValueError),
    ("logit_softcap", "30", ConfigTypeError),
    ("ffn", "relu", ConfigValueError),
]


@pytest.mark.parametrize(("field", "value", "error"), MODEL_BAD_VALUES)
def test_model_config_refuses_nonsense_naming_the_field(field, value, error):
    with pytest.raises(error, match=f"ModelConfig.{field}") as caught:
        ModelConfig(**(SMALL | {field: value}))
    assert caught.value.field == field


def test_model_config_with_nan_norm_eps_never_reaches_a_model():
    with pytest.raises(ValueError, match="finite"):
        TransformerLM(ModelConfig(**SMALL, norm_eps=float("nan")))


def test_model_config_fields_cannot_change_after_construction():
    config = ModelConfig(**SMALL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.n_heads = 3  # would make d_model % n_heads != 0 behind the check's back
    assert config.n_heads == 2


def test_dataclasses_replace_validates_the_new_config():
    config = ModelConfig(**SMALL)
    assert dataclasses.replace(config, ffn="gelu").ffn_dim == 64
    with pytest.raises(ConfigTypeError, match="tie_embeddings"):
        dataclasses.replace(config, tie_embeddings="no")


def _train(**overrides) -> TrainConfig:
    return TrainConfig(**({"model": SMALL, "train_data": "train.bin"} | overrides))


TRAIN_BAD_VALUES = [
    ("optimizer", "sgd", ConfigValueError),
    ("optimizer", None, ConfigValueError),
    ("lr_decay", "step", ConfigValueError),
    ("muon_lr", 0.0, ConfigValueError),
    ("muon_lr", math.nan, ConfigValueError),
    ("muon_momentum", 1.0, ConfigValueError),
    ("muon_momentum", "0.95", ConfigTypeError),
    ("steps", "abc", ConfigTypeError),
    ("steps", 10.0, ConfigTypeError),
    ("steps", True, ConfigTypeError),
    ("batch_size", 0, ConfigValueError),
    ("max_lr", math.inf, ConfigValueError),
    ("max_lr", math.nan, ConfigValueError),
    ("max_lr", "inf", ConfigTypeError),
    ("min_lr", math.nan, ConfigValueError),
    ("weight_decay", -0.1, ConfigValueError),
    ("eps", 0.0, ConfigValueError),
    ("grad_clip", math.inf, ConfigValueError),
    ("betas", (0.9, 1.5), ConfigValueError),
    ("betas", (0.9,), ConfigTypeError),
    ("betas", "0.9", ConfigTypeError),
    ("warmup_steps", -1, ConfigValueError),
    ("checkpoint_interval", 0, ConfigValueError),
    ("seed", 1.5, ConfigTypeError),
    ("resume", "no", ConfigTypeError),
    ("compile", 1, ConfigTypeError),
    ("progress", "false", ConfigTypeError),
    ("overwrite", "yes", ConfigTypeError),
    ("dtype", "float16", ConfigValueError),
    ("device", "gpu7", ConfigValueError),
    ("train_data", 3, ConfigTypeError),
    ("train_data", "", ConfigTypeError),
    ("bytes_per_token", math.nan, ConfigValueError),
    ("cosine_steps", 1.5, ConfigTypeError),
]


@pytest.mark.parametrize(("field", "value", "error"), TRAIN_BAD_VALUES)
def test_train_config_refuses_nonsense_naming_the_field(field, value, error):
    with pytest.raises(error, match=f"TrainConfig.{field}|{field}") as caught:
        _train(**{field: value})
    assert caught.value.field == field


def test_train_config_fields_cannot_change_after_construction():
    config = _train()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.max_lr = float("inf")
    assert dataclasses.replace(config, steps=500).steps == 500


def test_train_config_from_dict_refuses_a_list_and_unknown_model_fields():
    with pytest.raises(ConfigTypeError, match="JSON object"):
        TrainConfig.from_dict(["steps", 3])
    with pytest.raises(ConfigValueError, match="unknown ModelConfig field") as caught:
        TrainConfig.from_dict({"train_data": "x.bin", "model": SMALL | {"n_head": 2}})
    assert caught.value.field == "model.n_head"


def test_config_errors_are_still_value_and_type_errors():
    assert issubclass(ConfigValueError, ValueError) and issubclass(ConfigTypeError, TypeError)
    assert issubclass(ConfigValueError, ConfigError) and issubclass(ConfigTypeError, ConfigError)


def test_a_path_like_train_data_is_kept_as_a_string(tmp_path):
    assert _train(train_data=tmp_path / "t.bin").train_data == str(tmp_path / "t.bin")


# ---- issue 29 ------------------------------------------------------------------------------------


def test_steps_shorter_than_the_warmup_names_steps_when_cosine_steps_follows_it():
    with pytest.raises(
        ConfigValueError, match=r"TrainConfig.steps \(5\) must be >= warmup_steps \(100\)"
    ) as e:
        _train(steps=5, warmup_steps=100)
    assert e.value.field == "steps"
    with pytest.raises(ConfigValueError, match=r"cosine_steps \(5\) must be >= warmup_steps") as e:
        _train(steps=500, cosine_steps=5, warmup_steps=100)
    assert e.value.field == "cosine_steps"


@pytest.mark.parametrize("seed", [2**63, 10**20])
def test_a_seed_beyond_int64_is_refused_naming_seed(seed):
    with pytest.raises(ConfigValueError, match=r"seed must be <= 9223372036854775807") as e:
        _train(seed=seed)
    assert e.value.field == "seed"


def test_the_largest_seed_runs_every_seed_a_run_derives_from_it():
    config = _train(seed=2**63 - 1)
    torch.manual_seed(config.seed + 1 + 7)  # dropout seed of rank 7: still a valid torch seed


def test_a_run_too_big_for_memory_names_the_size_field_furthest_above_its_default():
    from llmbook.train_config import oversized_field

    def largest(**overrides):
        model = {k.removeprefix("model."): v for k, v in overrides.items() if k.startswith("model.")}
        train = {k: v for k, v in overrides.items() if not k.startswith("model.")}
        config = _train(**train, model=ModelConfig(**(dict(vocab_size=64, context_length=8, d_model=16,
                                                                n_layers=1, n_heads=2) | model)))  # fmt: skip
        return oversized_field(config)

    assert largest(batch_size=10**9) == "batch_size"
    assert largest(**{"model.context_length": 2**40}) == "model.context_length"
    assert largest(**{"model.vocab_size": 10**12}) == "model.vocab_size"
    assert largest(**{"model.d_model": 2**30}) == "model.d_model"
    assert largest(**{"model.n_layers": 10**9}) == "model.n_layers"
    assert largest(**{"model.d_ff": 10**11}) == "model.d_ff"
