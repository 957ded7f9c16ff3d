"""SweepConfig: documented defaults, presets and flags, and validation errors that name the flag."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from sweep.config import (DTYPES, PlanSpec, SweepConfig, build_config, command_fields, field_docs, field_names, flag,
                          group_fields, load_preset, plan_spec, setting)
from sweep.errors import ConfigError, UnknownNameError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PRESETS = sorted(CONFIGS.glob("*.yaml"))
NO_PRESETS = [pytest.param(None, marks=pytest.mark.skip(reason="no configs/*.yaml yet"))]


def preset_id(preset: Path | None) -> str:
    return preset.name if preset else "none"


def write_preset(tmp_path: Path, text: str, name: str = "preset.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------------ fields


def test_every_field_has_a_default():
    missing = [f.name for f in dataclasses.fields(SweepConfig)
               if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    assert missing == []


def test_defaults_alone_make_a_valid_config():
    assert SweepConfig() == build_config()


def test_every_field_has_a_one_line_docstring():
    docs = field_docs()
    assert set(docs) == set(field_names())
    for name, doc in docs.items():
        assert doc.strip(), name
        assert "\n" not in doc.strip(), name


def test_config_is_frozen():
    cfg = SweepConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model = "other"  # type: ignore[misc]


def test_an_unknown_field_group_is_refused_naming_the_groups():
    with pytest.raises(ValueError, match="unknown field group 'plann'.*strategy"):
        setting(1, "plann")


def test_plan_spec_holds_the_fields_plan_reads_with_the_config_defaults():
    assert [f.name for f in dataclasses.fields(PlanSpec)] == ["strategy", "k", "n", "remove", "force", "budget_params",
                                                             "unit", "span", "positions", "allow_last"]
    assert PlanSpec() == plan_spec(SweepConfig())
    cfg = SweepConfig(strategy="exhaustive", unit="mix", allow_last=True, max_tokens=64)
    assert plan_spec(cfg) == PlanSpec(strategy="exhaustive", unit="mix", allow_last=True)


def test_export_offers_the_model_alone_and_tasks_and_heal_their_own_fields():
    assert command_fields("export") == ("model", "revision", "dtype", "device", "tokenizer", "random_init",
                                         "trust_remote_code")
    assert set(command_fields("tasks")) == set(command_fields("export")) | {
        "batch_size", "db", "seed", "strategy", "k", "n", "remove", "force", "tasks", "task_include", "num_fewshot",
        "limit", "best", "pareto"}
    # heal: every setting of `sweep run` that defines its setup (so its rows link), the variant, tasks and LoRA
    assert set(command_fields("run")) - set(command_fields("heal")) == {
        "strategy", "k", "n", "force", "unit", "span", "positions", "budget_params", *group_fields("search")}
    assert set(command_fields("heal")) - set(command_fields("run")) == set(group_fields("tasks", "heal"))
    assert "lora_r" in group_fields("heal") and "best" not in command_fields("heal")


def test_flag_spelling_uses_dashes():
    assert flag("max_length") == "max-length"
    assert flag("model") == "model"


# ------------------------------------------------------------------------------------------ precedence


def test_preset_overrides_defaults(tmp_path):
    cfg = build_config(write_preset(tmp_path, "strategy: blocks\nbatch_size: 4\n"))
    assert (cfg.strategy, cfg.batch_size) == ("blocks", 4)
    assert cfg.seed == SweepConfig().seed


def test_flags_override_preset(tmp_path):
    preset = write_preset(tmp_path, "strategy: blocks\nmax_length: 64\n")
    cfg = build_config(preset, max_length=32, seed=7)
    assert (cfg.strategy, cfg.max_length, cfg.seed) == ("blocks", 32, 7)


def test_flags_given_as_none_keep_the_preset_value(tmp_path):
    cfg = build_config(write_preset(tmp_path, "strategy: blocks\n"), strategy=None, max_length=None)
    assert cfg.strategy == "blocks"
    assert cfg.max_length is None


def test_yaml_keys_may_use_dashes(tmp_path):
    cfg = build_config(write_preset(tmp_path, "max-length: 64\nbatch-size: 2\nrandom-init: true\n"))
    assert (cfg.max_length, cfg.batch_size, cfg.random_init) == (64, 2, True)


def test_empty_preset_gives_defaults(tmp_path):
    assert build_config(write_preset(tmp_path, "# nothing differs\n")) == SweepConfig()


# ------------------------------------------------------------------------------------------ preset errors


def test_unknown_preset_key_names_the_key_and_lists_valid_keys(tmp_path):
    with pytest.raises(UnknownNameError) as info:
        load_preset(write_preset(tmp_path, "strategy: single\nbogus_key: 3\n"))
    message = str(info.value)
    assert "'bogus_key'" in message
    for name in field_names():
        assert flag(name) in message


def test_misspelled_preset_key_suggests_the_close_one(tmp_path):
    with pytest.raises(UnknownNameError, match="did you mean 'max-length'"):
        load_preset(write_preset(tmp_path, "max_lenght: 64\n"))


@pytest.mark.parametrize("text, line", [
    ("model: gpt2\nstrategy: single: blocks\n", 2),
    ("model: gpt2\nstrategy: [single\nk: 2\n", 3),
])
def test_malformed_yaml_raises_with_the_line_number(tmp_path, text, line):
    path = write_preset(tmp_path, text)
    with pytest.raises(ConfigError, match=f"line {line}") as info:
        load_preset(path)
    assert str(path) in str(info.value)


def test_preset_that_is_not_a_mapping_raises(tmp_path):
    with pytest.raises(ConfigError, match="mapping"):
        load_preset(write_preset(tmp_path, "- single\n- blocks\n"))


def test_missing_preset_raises_naming_the_path(tmp_path):
    with pytest.raises(ConfigError, match="no-such.yaml"):
        load_preset(tmp_path / "no-such.yaml")


# ------------------------------------------------------------------------------------------ coercion


def test_yaml_int_for_a_string_field_becomes_a_string(tmp_path):
    cfg = build_config(write_preset(tmp_path, "k: 2\nn: 3\n"))
    assert (cfg.k, cfg.n) == ("2", "3")


def test_yaml_string_for_an_int_field_becomes_an_int(tmp_path):
    cfg = build_config(write_preset(tmp_path, 'max_length: "64"\n'))
    assert cfg.max_length == 64


def test_yaml_string_for_a_bool_field_is_read_as_a_bool(tmp_path):
    assert build_config(write_preset(tmp_path, 'force: "yes"\n')).force is True
    assert build_config(write_preset(tmp_path, 'force: "no"\n')).force is False


def test_non_numeric_value_for_an_int_field_names_the_key_and_the_preset(tmp_path):
    with pytest.raises(ConfigError, match=r"`max_length` in .*preset.yaml expects int"):
        build_config(write_preset(tmp_path, "max_length: abc\n"))


@pytest.mark.parametrize("text, key, expected", [
    ("max_length: 64.9\n", "max_length", "expects int"),  # not silently 64
    ("force: maybe\n", "force", "expects bool"),  # not silently False
    ("batch_size: true\n", "batch_size", "expects int"),  # a bool is not a number
    ("strategy: yes\n", "strategy", "expects str"),  # YAML's yes is a bool, not a strategy name "True"
    ("strategy: [single, blocks]\n", "strategy", "expects str"),
    ("heal_lr: fast\n", "heal_lr", "expects float"),
])
def test_preset_value_of_the_wrong_type_is_refused_naming_the_key(tmp_path, text, key, expected):
    with pytest.raises(ConfigError, match=f"`{key}` in .*preset.yaml {expected}"):
        build_config(write_preset(tmp_path, text))


@pytest.mark.parametrize("key", ["device", "strategy", "max_tokens_typo"])
def test_preset_null_for_a_field_that_needs_a_value_is_refused_naming_the_key(tmp_path, key):
    if key == "max_tokens_typo":  # a field that may be null keeps null: all tokens
        assert build_config(write_preset(tmp_path, "max_tokens: null\n")).max_tokens is None
        return
    with pytest.raises(ConfigError, match=f"`{key}` in .*preset.yaml cannot be null"):
        build_config(write_preset(tmp_path, f"{key}: null\n"))


def test_lossless_preset_values_are_still_accepted(tmp_path):
    cfg = build_config(write_preset(tmp_path, "max_length: '64'\nforce: on\nk: 2\nheal_lr: 1e-4\nlora_dropout: 0\n"))
    assert (cfg.max_length, cfg.force, cfg.k, cfg.heal_lr, cfg.lora_dropout) == (64, True, "2", 1e-4, 0.0)


def test_max_length_of_one_is_refused_as_a_window_that_scores_nothing():
    with pytest.raises(ConfigError, match="`--max-length` must be at least 2"):
        build_config(max_length=1)
    assert build_config(max_length=2).max_length == 2


# ------------------------------------------------------------------------------------------ validation


def test_stride_larger_than_max_length_names_stride():
    with pytest.raises(ConfigError, match="`--stride`"):
        build_config(max_length=64, stride=65)


def test_stride_equal_to_max_length_is_accepted():
    assert build_config(max_length=64, stride=64).stride == 64


def test_bad_dtype_lists_valid_dtypes():
    with pytest.raises(UnknownNameError) as info:
        build_config(dtype="fp16")
    for dtype in DTYPES:
        assert dtype in str(info.value)


@pytest.mark.parametrize("name", ["max_length", "stride", "max_tokens", "batch_size", "latency_seq"])
def test_non_positive_sizes_name_the_flag(name):
    with pytest.raises(ConfigError, match=f"`--{flag(name)}`"):
        build_config(**{name: -1 if name == "batch_size" else 0})  # batch size 0 means auto


def test_batch_size_zero_is_auto_and_compile_modes_are_checked():
    assert build_config(batch_size=0).batch_size == 0
    with pytest.raises(UnknownNameError, match="valid: auto, off, on"):
        build_config(compile="sometimes")


def test_bad_latency_mode_lists_valid_modes():
    with pytest.raises(UnknownNameError, match="per-variant"):
        build_config(latency="sometimes")


def test_bad_device_lists_valid_devices():
    with pytest.raises(UnknownNameError, match="cuda:N"):
        build_config(device="tpu")


def test_validation_also_applies_to_direct_construction():
    with pytest.raises(ConfigError, match="`--stride`"):
        SweepConfig(max_length=8, stride=9)


# ------------------------------------------------------------------------------------------ presets in configs/


@pytest.mark.parametrize("preset", PRESETS or NO_PRESETS, ids=preset_id)
def test_shipped_preset_loads(preset):
    assert isinstance(build_config(preset), SweepConfig)


@pytest.mark.parametrize("preset", PRESETS or NO_PRESETS, ids=preset_id)
def test_shipped_preset_holds_only_values_that_differ_from_defaults(preset):
    cfg, defaults = build_config(preset), SweepConfig()
    # A preset always names its model, even when that is the default, so it keeps its meaning if defaults change.
    same = [key for key in load_preset(preset) if key != "model" and getattr(cfg, key) == getattr(defaults, key)]
    assert same == [], f"{preset.name} repeats defaults: {same}"


@pytest.mark.parametrize("preset", PRESETS or NO_PRESETS, ids=preset_id)
def test_shipped_preset_starts_with_the_command_that_uses_it(preset):
    first = preset.read_text().splitlines()[0]
    assert first.startswith("#"), f"{preset.name}: first line is not a comment"
    assert "sweep " in first and "--config" in first and preset.stem in first, (
        f"{preset.name}: first line should give the exact command, e.g. # sweep run --config configs/{preset.name}"
    )


def test_every_config_field_is_documented_in_the_command_line_reference():
    from sweep.config import field_names, flag

    reference = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text()
    missing = [f"--{flag(name)}" for name in field_names() if f"`--{flag(name)} " not in reference
               and f"`--{flag(name)}`" not in reference]
    assert not missing, f"docs/cli.md lacks {missing}; run `make docs`"
