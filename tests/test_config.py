"""Config: defaults, `--set` parsing, type coercion, precedence, validation, presets."""

import dataclasses
from pathlib import Path

import pytest

from charrnn import config as config_lib
from charrnn.config import Config, ModelConfig
from charrnn.errors import UsageError

CONFIGS_DIR = Path(__file__).parent.parent / "configs"
CONFIGS = sorted(CONFIGS_DIR.glob("*.toml"))


def _usage_error(function, *args) -> str:
    """Call `function`, expect UsageError with exit code 2, return its message."""
    with pytest.raises(UsageError) as caught:
        function(*args)
    assert caught.value.exit_code == 2
    return str(caught.value)


def _with(*assignments: str) -> Config:
    return config_lib.apply_overrides(Config(), config_lib.parse_set(list(assignments)))


def test_defaults_validate():
    config_lib.validate(Config())


@pytest.mark.parametrize(
    "assignments, expected",
    [
        (["model.cell=gru"], {"model": {"cell": "gru"}}),
        ([" model.cell = gru "], {"model": {"cell": "gru"}}),
        (["train.lr=1e-3", "model.cell=rnn", "train.seq_len=64"],
         {"train": {"lr": "1e-3", "seq_len": "64"}, "model": {"cell": "rnn"}}),
        (["train.seed=1", "train.seed=2"], {"train": {"seed": "2"}}),  # the last one wins
        (["sample.top_p=a=b"], {"sample": {"top_p": "a=b"}}),  # only the first "=" splits
        (["model.cell="], {"model": {"cell": ""}}),
        ([], {}),
    ],
)
def test_parse_set(assignments, expected):
    assert config_lib.parse_set(assignments) == expected


@pytest.mark.parametrize("assignment", ["model.cell", "cell=gru", "=x", "model.=gru", "", "=", "modelcell=gru"])
def test_parse_set_rejects_malformed(assignment):
    assert repr(assignment) in _usage_error(config_lib.parse_set, ["train.lr=1", assignment])


@pytest.mark.parametrize(
    "assignment, section, key, value",
    [
        ("model.hidden_size=256", "model", "hidden_size", 256),
        ("model.hidden_size=1_024", "model", "hidden_size", 1024),
        ("train.lr=3e-4", "train", "lr", 3e-4),
        ("train.lr=1", "train", "lr", 1.0),
        ("train.max_minutes=0", "train", "max_minutes", 0.0),
        ("model.residual=true", "model", "residual", True),
        ("model.residual=True", "model", "residual", True),
        ("model.residual=yes", "model", "residual", True),
        ("model.residual=1", "model", "residual", True),
        ("train.random_offset=false", "train", "random_offset", False),
        ("train.random_offset=no", "train", "random_offset", False),
        ("train.random_offset=0", "train", "random_offset", False),
        ("model.cell=gru", "model", "cell", "gru"),
        ("sample.top_k=40", "sample", "top_k", 40),
        ("train.steps=100_000", "train", "steps", 100000),
    ],
)
def test_overrides_coerce_strings(assignment, section, key, value):
    got = getattr(getattr(_with(assignment), section), key)
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"model": {"hidden_size": "abc"}}, "model.hidden_size"),
        ({"model": {"hidden_size": "3.5"}}, "model.hidden_size"),
        ({"model": {"hidden_size": "_5_"}}, "model.hidden_size"),  # underscores only between digits, as Python's
        ({"model": {"hidden_size": 32.0}}, "model.hidden_size"),  # TOML float for an int
        ({"model": {"hidden_size": True}}, "model.hidden_size"),
        ({"train": {"lr": "fast"}}, "train.lr"),
        ({"train": {"lr": False}}, "train.lr"),
        ({"model": {"residual": "maybe"}}, "model.residual"),
        ({"model": {"residual": 1}}, "model.residual"),
        ({"model": {"cell": 5}}, "model.cell"),
        ({"model": {"hidden": 32}}, "model.hidden"),  # unknown key
        ({"train": {"cell": "gru"}}, "train.cell"),  # a key of another section
        ({"optim": {"lr": 1.0}}, "optim"),  # unknown section
        ({"seed": 3}, "seed"),  # a top-level key, not a section
    ],
)
def test_overrides_reject_unknown_keys_and_wrong_types(overrides, key):
    assert key in _usage_error(config_lib.apply_overrides, Config(), overrides)


def test_precedence_defaults_file_set_options(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[model]\ncell = "gru"\nhidden_size = 64\nnum_layers = 3\n\n'
                    '[train]\nlr = 0.01\nseq_len = 20\n', encoding="utf-8")
    config = config_lib.resolve(path, ["model.hidden_size=128", "train.lr=0.02"], {"model": {"hidden_size": 256}})
    defaults = Config()
    assert config.model.hidden_size == 256  # option beats --set beats file
    assert config.train.lr == 0.02  # --set beats file
    assert config.model.cell == "gru" and config.model.num_layers == 3 and config.train.seq_len == 20  # file
    assert config.train.batch_size == defaults.train.batch_size  # untouched default
    assert config.sample == defaults.sample


def test_resolve_starts_from_a_base_config():
    base = dataclasses.replace(Config(), model=dataclasses.replace(Config().model, cell="rnn"))
    config = config_lib.resolve(None, ["train.seed=5"], {}, base=base)
    assert config.model.cell == "rnn" and config.train.seed == 5


@pytest.mark.parametrize(
    "content, key",
    [
        ("[model]\nhidden = 3\n", "model.hidden"),
        ('[model]\nhidden_size = "big"\n', "model.hidden_size"),
        ("[train]\nlr = [1]\n", "train.lr"),
        ("[model\ncell = 1\n", "not valid TOML"),
        ("[model]\nhidden_size = 0\n", "model.hidden_size"),  # validated after loading
        ("model = 3\n", "must be a section ([model])"),
        (b"\xff\xfe[model]\n", "not UTF-8 text: byte 0xff at offset 0"),
    ],
)
def test_bad_config_files_name_the_problem(content, key, tmp_path):
    path = tmp_path / "bad.toml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    assert key in _usage_error(config_lib.resolve, path, [], {})


def test_missing_config_file(tmp_path):
    path = tmp_path / "absent.toml"
    assert str(path) in _usage_error(config_lib.resolve, path, [], {})


@pytest.mark.parametrize(
    "assignments, key",
    [
        (["model.cell=cnn"], "model.cell"),
        (["model.cell="], "model.cell"),
        (["model.dtype=float16"], "model.dtype"),
        (["model.num_layers=0"], "model.num_layers"),
        (["model.hidden_size=0"], "model.hidden_size"),
        (["model.embedding_size=-1"], "model.embedding_size"),
        (["model.dropout=1.0"], "model.dropout"),
        (["model.dropout=-0.1"], "model.dropout"),
        (["model.dropout=nan"], "model.dropout"),
        (["model.weight_drop=1"], "model.weight_drop"),
        (["model.embedding_dropout=-0.1"], "model.embedding_dropout"),
        (["train.ema=1"], "train.ema"),
        (["train.eval_fraction=0"], "train.eval_fraction"),
        (["train.eval_fraction=1.5"], "train.eval_fraction"),
        (["train.eval_fraction=nan"], "train.eval_fraction"),
        (["train.ema=nan"], "train.ema"),
        (["train.label_smoothing=1"], "train.label_smoothing"),
        (["train.label_smoothing=-0.1"], "train.label_smoothing"),
        (["train.dropout_from_epoch=-1"], "train.dropout_from_epoch"),
        (["train.dropout_from_epoch=inf"], "train.dropout_from_epoch"),
        (["model.kind=seq2seq", "train.scheduled_sampling=1.5"], "train.scheduled_sampling"),
        (["model.kind=seq2seq", "train.scheduled_sampling=nan"], "train.scheduled_sampling"),
        (["train.scheduled_sampling=0.2"], "train.scheduled_sampling"),  # the language model reads its own text already
        (["model.kernel=triton"], "model.kernel"),
        (["model.kernel=pallas", "model.cell=gru"], "model.kernel"),
        (["model.kernel=pallas", "model.hidden_size=100"], "model.kernel"),
        (["model.norm=batch"], "model.norm"),
        (["model.input_init=glorot"], "model.input_init"),
        (["model.norm=layer", "model.kernel=pallas"], "model.kernel"),
        (["train.batch_size=0"], "train.batch_size"),
        (["train.seq_len=0"], "train.seq_len"),
        (["train.steps=0"], "train.steps"),
        (["train.eval_every=0"], "train.eval_every"),
        (["train.eval_batch_size=0"], "train.eval_batch_size"),
        (["train.log_every=0"], "train.log_every"),
        (["train.steps_per_call=0"], "train.steps_per_call"),
        (["train.keep=0"], "train.keep"),
        (["train.lr=-1"], "train.lr"),
        (["train.lr=0"], "train.lr"),
        (["train.lr=nan"], "train.lr"),
        (["train.lr=inf"], "train.lr"),
        (["train.schedule=step"], "train.schedule"),
        (["train.pad_multiple=0"], "train.pad_multiple"),
        (["train.warmup_steps=-1"], "train.warmup_steps"),
        (["train.final_lr_fraction=1.5"], "train.final_lr_fraction"),
        (["train.final_lr_fraction=-0.1"], "train.final_lr_fraction"),
        (["train.schedule=exponential", "train.final_lr_fraction=0"], "train.final_lr_fraction"),
        (["train.beta1=1"], "train.beta1"),
        (["train.beta2=-0.5"], "train.beta2"),
        (["train.weight_decay=-1"], "train.weight_decay"),
        (["train.clip_norm=-1"], "train.clip_norm"),
        (["train.max_minutes=-1"], "train.max_minutes"),
        (["train.max_minutes=inf"], "train.max_minutes"),
        (["train.max_minutes=nan"], "train.max_minutes"),
        (["train.max_epochs=-1"], "train.max_epochs"),
        (["train.max_epochs=inf"], "train.max_epochs"),
        (["train.fit_epochs=-1"], "train.fit_epochs"),
        (["train.fit_epochs=inf"], "train.fit_epochs"),
        (["train.calibration_fraction=-0.01"], "train.calibration_fraction"),
        (["train.val_fraction=0.5", "train.calibration_fraction=0.5"], "train.calibration_fraction"),  # nothing to train on
        (["train.save_minutes=-1"], "train.save_minutes"),
        (["train.val_fraction=0"], "train.val_fraction"),
        (["train.val_fraction=1"], "train.val_fraction"),
        (["train.seed=-1"], "train.seed"),
        ([f"train.seed={2**32}"], "train.seed"),  # the same PRNG key as seed 0
        (["sample.temperature=-0.5"], "temperature"),
        (["sample.temperature=nan"], "temperature"),
        (["sample.temperature=inf"], "temperature"),
        (["sample.top_k=-1"], "top-k"),
        (["sample.top_p=0"], "top-p"),
        (["sample.top_p=1.01"], "top-p"),
        (["sample.length=-1"], "length"),
        (["model.kind=translator"], "model.kind"),
        (["model.attention=multihead"], "model.attention"),
        (["model.encoder_layers=0"], "model.encoder_layers"),
        (["model.kind=seq2seq", "model.learn_initial_state=true"], "model.learn_initial_state"),
        (["model.input_feeding=true"], "model.input_feeding"),
        (["model.kind=seq2seq", "model.attention=none", "model.input_feeding=true"], "model.input_feeding"),
        (["train.max_length=0"], "train.max_length"),
        (["model.attention_size=-1"], "model.attention_size"),
        (["model.kind=seq2seq", "model.attention=dot", "model.attention_size=16"], "model.attention_size"),
        (["model.kind=seq2seq", "model.target=words"], "model.target"),
        (["model.target=tokens"], "model.target = tokens is for seq2seq"),
        (["model.reverse_target=true"], "model.reverse_target is for seq2seq"),
        (["sample.beam=0"], "sample.beam"),
    ],
)
def test_validate_rejects_bad_values(assignments, key):
    config = _with(*assignments)
    assert key in _usage_error(config_lib.validate, config)
    assert key in _usage_error(config_lib.resolve, None, assignments, {})


def test_validate_rejects_infinite_weight_decay():
    with pytest.raises(UsageError, match="train.weight_decay"):
        config_lib.validate(_with("train.weight_decay=inf"))


@pytest.mark.parametrize(
    "assignments",
    [
        ["model.dropout=0"],
        ["model.dropout=0.99"],
        ["model.kind=seq2seq", "model.input_feeding=true"],
        ["model.kind=seq2seq", "model.reverse_target=true"],
        ["model.kind=seq2seq", "model.attention=additive", "model.attention_size=1"],
        ["model.weight_drop=0.99", "model.embedding_dropout=0.99", "train.ema=0.9999"],
        ["model.norm=layer", "model.cell=rnn"],
        ["model.norm=layer", "model.cell=gru"],
        ["train.label_smoothing=0.99", "model.kernel=pallas", "model.norm=none", "model.cell=rnn", "model.hidden_size=48"],
        ["train.final_lr_fraction=1", "train.schedule=exponential"],
        ["train.final_lr_fraction=0", "train.schedule=cosine"],
        ["train.warmup_steps=0"],
        ["train.dropout_from_epoch=2.5"],
        ["train.clip_norm=0"],
        ["train.max_minutes=0"],
        ["train.val_fraction=0.001"],
        ["train.calibration_fraction=0"],
        ["train.val_fraction=0.5", "train.calibration_fraction=0.49"],
        ["model.kind=seq2seq", "train.scheduled_sampling=1"],
        ["train.seed=0"],
        [f"train.seed={2**32 - 1}"],
        ["sample.temperature=0", "sample.top_k=0", "sample.top_p=1", "sample.length=0"],
        ["model.cell=rnn", "model.dtype=bfloat16"],
    ],
)
def test_validate_accepts_boundary_values(assignments):
    config_lib.validate(_with(*assignments))


def test_configs_directory_has_presets():
    assert CONFIGS, "configs/*.toml"


@pytest.mark.parametrize("path", CONFIGS, ids=[path.name for path in CONFIGS])
def test_preset_loads_and_means_what_it_says(path):
    config = config_lib.resolve(path, [], {})
    config_lib.validate(config)
    for section, values in config_lib.load_toml(path).items():
        for key, value in values.items():
            assert getattr(getattr(config, section), key) == value, f"{section}.{key}"


def test_defaults_are_the_shakespeare_recipe_without_its_epoch_cap():
    """Plain `charrnn train` trains what configs/shakespeare.toml asks for, but for as many passes as the time allows
    (and so never the larger model the recipe trains where its passes fit the time), and with every evaluation
    scoring all of validation (without an epoch cap, a run may be at its best before its end)."""
    assert config_lib.differences(Config(), config_lib.resolve(CONFIGS_DIR / "shakespeare.toml", [], {}),
                                  ("model", "train", "sample")) == [
        "train.max_epochs: 0.0 -> 5.0",
        "train.larger_model: '' -> 'train.members=2 train.fit_epochs=3.5 train.max_epochs=6 model.dropout=0.2; "
        "train.members=2 model.hidden_size=384 train.fit_epochs=3.5 train.max_epochs=6 model.dropout=0.15'",
        "train.eval_fraction: 1.0 -> 0.25"]


def test_a_saved_config_without_newer_keys_keeps_what_it_ran_with():
    older = config_lib.from_dict({"model": {"cell": "gru"}, "train": {"lr": 0.5}})
    assert (older.model.cell, older.train.lr) == ("gru", 0.5)
    assert (older.model.norm, older.model.dtype, older.model.input_init, older.train.dropout_from_epoch) == (
        "none", "float32", "hidden", 0.0)
    assert older.model.hidden_size == ModelConfig().hidden_size
    assert older.train.calibration_fraction == 0.0  # no text was held out to calibrate on
    newer = config_lib.from_dict({"model": {"norm": "layer", "dtype": "auto", "input_init": "fan_in"},
                                  "train": {"dropout_from_epoch": 1.0}})
    assert (newer.model.norm, newer.model.dtype, newer.model.input_init, newer.train.dropout_from_epoch) == (
        "layer", "auto", "fan_in", 1.0)


def test_differences_name_changed_keys():
    old = Config()
    new = _with("model.hidden_size=256", "train.lr=0.5", "sample.top_k=3")
    changed = config_lib.differences(old, new, ("model", "train"))
    assert [line.split(":")[0] for line in changed] == ["model.hidden_size", "train.lr"]
    assert "512" in changed[0] and "256" in changed[0]
    assert config_lib.differences(old, new, ("sample",))[0].startswith("sample.top_k")
    assert config_lib.differences(new, new, ("model", "train", "sample")) == []


@pytest.mark.parametrize(
    "config",
    [
        Config(),
        _with("model.cell=gru", "model.residual=true", "model.dropout=0.25", "train.lr=1e-3", "train.max_minutes=0.5",
              "train.random_offset=false", "sample.top_p=0.9", "model.dtype=bfloat16"),
    ],
)
def test_dict_round_trip(config):
    values = config_lib.to_dict(config)
    assert set(values) == {"model", "train", "sample"}
    assert config_lib.from_dict(values) == config
