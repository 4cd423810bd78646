"""Run configuration: frozen dataclasses, TOML files, `--set` overrides, validation."""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from charrnn.errors import UsageError

CELL_NAMES = ("rnn", "gru", "lstm")
MODEL_KINDS = ("lm", "seq2seq")
ATTENTIONS = ("none", "additive", "dot")
TARGETS = ("chars", "tokens")
SCHEDULES = ("constant", "cosine", "linear", "exponential")
DTYPES = ("float32", "bfloat16", "auto")
KERNELS = ("xla", "pallas")
NORMS = ("none", "layer")
INPUT_INITS = ("fan_in", "hidden")
# Cells whose gates see only z = x_proj + h W_h: the fused kernel runs them (charrnn/fused_layer.py).
ADDITIVE_CELLS = ("rnn", "lstm")
PALLAS_UNIT = 16  # the kernel's smallest block of units: hidden_size must be a multiple


# The defaults of ModelConfig and TrainConfig are configs/shakespeare.toml's but for its epoch cap, which fits that
# corpus's size, and the larger model it trains where the cap comes within the budget: plain `charrnn train CORPUS`
# trains the recipe's model for as many passes as its budget allows.
@dataclass(frozen=True)
class ModelConfig:
    kind: str = "lm"  # lm: continue text | seq2seq: map each source line to its target (a pairs file)
    cell: str = "lstm"  # rnn | gru | lstm; gated cells carry information further
    num_layers: int = 2  # stacked recurrent layers
    hidden_size: int = 512  # units per layer; with dropout, the best size for 10 CPU minutes
    embedding_size: int = 64  # characters need few dimensions; folded into layer 0
    dropout: float = 0.25  # on each layer's output, the top one's too (as char-rnn), in training; Tiny Shakespeare overfits without it
    locked_dropout: bool = False  # one dropout mask per stream for a whole chunk (variational), not one per character
    embedding_dropout: float = 0.0  # drop whole characters' embedding rows, one mask per chunk, in training
    weight_drop: float = 0.0  # DropConnect on each recurrent matrix W_h, one mask per chunk, in training (AWD-LSTM)
    norm: str = "layer"  # none | layer: layer normalisation of each gate's summed inputs (and of the LSTM's memory cell)
    input_init: str = "fan_in"  # input weights W_x drawn from U(±1/√fan_in) | hidden: U(±1/√H), as W_h (PyTorch's nn.LSTM, torch-rnn)
    learn_initial_state: bool = False  # learn h0 (and c0) instead of zeros
    residual: bool = False  # add each layer's input to its output (layers >= 2)
    dtype: str = "auto"  # matmul inputs: float32 | bfloat16 (state stays float32) | auto: bfloat16 where the device multiplies it natively
    scan_unroll: int = 1  # time steps per loop iteration; more helps GPUs (8), not CPUs
    kernel: str = "xla"  # the time loops of layers and of generation: xla (a launch per step) | pallas (one fused launch, on a GPU; rnn, lstm; xla elsewhere)
    encoder_layers: int = 2  # seq2seq: stacked encoder layers (num_layers is the decoder's)
    bidirectional: bool = True  # seq2seq: the encoder reads forwards and backwards, each layer's states joined
    attention: str = "additive"  # seq2seq: none | additive (Bahdanau's score) | dot (Luong's general score)
    attention_size: int = 0  # seq2seq, additive: units of the score's tanh layer (W_q, W_k, v); 0 = hidden_size
    target: str = "chars"  # seq2seq: the decoder writes characters | tokens (space-separated: one g2p phoneme per step)
    input_feeding: bool = False  # seq2seq: the decoder reads its previous attentional output with each symbol (Luong et al. 2015)
    reverse_target: bool = False  # seq2seq: the decoder writes each target last symbol first; outputs read forwards again


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 64  # parallel contiguous streams per minibatch
    seq_len: int = 50  # characters per chunk; gradients stop at chunk edges
    lr: float = 6e-3  # peak learning rate of Adam
    schedule: str = "cosine"  # constant | cosine | linear | exponential, over the whole run
    warmup_steps: int = 50  # linear warm-up from 0 to lr
    final_lr_fraction: float = 0.0  # lr at the end of the run, as a fraction of lr
    beta1: float = 0.9  # Adam first-moment decay
    beta2: float = 0.99  # Adam second-moment decay; 0.99 adapts faster than 0.999
    weight_decay: float = 0.1  # AdamW decoupled decay per step, times lr: a little lower at five passes of the recipe
    label_smoothing: float = 0.0  # training targets: 1 - this on the true symbol, this spread over all; validation is plain cross-entropy
    dropout_from_epoch: float = 1.0  # every dropout (model.dropout, embedding_dropout, weight_drop) starts after this many epochs: a first pass meets only new text
    ema: float = 0.0  # evaluate and save an average of the weights with this decay per step (0.999: ~the last 1000 steps); 0 = off
    clip_norm: float = 1.0  # global gradient-norm clip; 0 disables
    steps: int = 100_000  # total optimizer steps of the run (max_minutes may end it first)
    max_minutes: float = 10.0  # wall-clock budget; 0 = no budget, the schedule follows steps
    max_epochs: float = 0.0  # passes over the training data that end the run, if before steps and minutes; 0 = no cap
    larger_model: str = ""  # "model.key=value train.members=N ...; ...": train the first of these alternatives whose run, timed first, ends within max_minutes
    fit_epochs: float = 0.0  # a larger_model alternative is trained where its first this-many passes fit max_minutes, then to max_epochs or the clock; 0 (or max_epochs or more) = all of its passes
    seed: int = 0  # parameters, dropout and epoch offsets all derive from it
    members: int = 1  # models trained side by side, from seeds seed, seed + 1, ...; they predict together (an ensemble)
    val_fraction: float = 0.1  # last fraction of the corpus, contiguous, held out
    calibration_fraction: float = 0.01  # this fraction of the corpus, its start, held out to fit each model's softmax temperature: a lower loss than training on it; 0 = none; language models only
    eval_every: int = 500  # steps between validation passes and checkpoints
    eval_batch_size: int = 16  # validation streams; fewer streams = fewer cold starts
    eval_fraction: float = 1.0  # share of the validation data the evaluations during the run score (its first part); the final one scores all of it
    log_every: int = 50  # steps between log lines / metrics records
    steps_per_call: int = 4  # optimizer steps per compiled call: fewer dispatches and syncs
    keep: int = 1  # step checkpoints kept besides best
    save_minutes: float = 0.0  # also checkpoint every this many minutes; 0 = only at evals
    random_offset: bool = True  # new random stream offset (and reset state) each epoch
    max_length: int = 100  # seq2seq: the longest source or target, in characters; longer pairs are errors
    pad_multiple: int = 4  # seq2seq: batches are padded to lengths that are multiples of this; larger: fewer shapes to compile, more padding
    skip_bad_pairs: bool = False  # seq2seq: skip (and count) malformed or too-long lines instead of refusing the file
    scheduled_sampling: float = 0.0  # seq2seq: chance the decoder reads its own choice of the previous symbol, not the true one
    tensorboard: str = ""  # TensorBoard event files: "" = none; a relative path is inside the run directory


@dataclass(frozen=True)
class SampleConfig:
    temperature: float = 0.8  # < 1 sharper, > 1 more varied, 0 = argmax
    length: int = 1000  # characters to generate
    top_k: int = 0  # keep the k most likely characters; 0 = all
    top_p: float = 1.0  # keep the smallest set with this much probability
    beam: int = 1  # seq2seq: beam width; 1 = one output chosen character by character (greedy at temperature 0)


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)


def steps_in(epochs: float, steps_per_epoch: int) -> int:
    """The steps that `epochs` passes take, a part-step counting whole; 1.1 passes of 100 steps are 110, not the 111
    that the product's rounding (110.00000000000001) would give."""
    return math.ceil(round(epochs * steps_per_epoch, 9))


def to_dict(config: Config) -> dict[str, dict[str, Any]]:
    """Return the config as nested plain dicts (for JSON and TOML)."""
    return dataclasses.asdict(config)


def _section_types(section: Any) -> dict[str, type]:
    return {f.name: type(getattr(section, f.name)) for f in dataclasses.fields(section)}


def _coerce(key: str, value: Any, wanted: type) -> Any:
    """Return `value` as `wanted`, or raise UsageError naming `key`."""
    if wanted is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
    elif wanted is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif wanted is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif wanted is str:
        if isinstance(value, str):
            return value
    raise UsageError(f"config key {key} wants {wanted.__name__}, got {value!r}")


def apply_overrides(config: Config, overrides: dict[str, dict[str, Any]]) -> Config:
    """Return `config` with `{section: {key: value}}` applied; unknown keys are errors."""
    sections = {}
    for section_name, values in overrides.items():
        if section_name not in ("model", "train", "sample"):
            raise UsageError(f"unknown config section {section_name!r} (model, train, sample)")
        if not isinstance(values, dict):
            raise UsageError(f"config {section_name!r} must be a section ([{section_name}]), got {values!r}")
        section = getattr(config, section_name)
        types = _section_types(section)
        changes = {}
        for key, value in values.items():
            if key not in types:
                raise UsageError(f"unknown config key {section_name}.{key}")
            changes[key] = _coerce(f"{section_name}.{key}", value, types[key])
        sections[section_name] = dataclasses.replace(section, **changes)
    return dataclasses.replace(config, **sections)


def parse_set(assignments: list[str]) -> dict[str, dict[str, Any]]:
    """Turn `["model.cell=gru", ...]` into `{"model": {"cell": "gru"}}` (values as strings)."""
    overrides: dict[str, dict[str, Any]] = {}
    for assignment in assignments:
        key, sep, value = assignment.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not name:
            raise UsageError(f"--set wants section.key=value, got {assignment!r}")
        overrides.setdefault(section, {})[name] = value.strip()
    return overrides


def load_toml(path: Path) -> dict[str, dict[str, Any]]:
    """Read a TOML config file into `{section: {key: value}}`."""
    try:
        with open(path, "rb") as file:
            return tomllib.load(file)
    except OSError as error:
        raise UsageError(f"cannot read config {path}: {error.strerror}") from error
    except tomllib.TOMLDecodeError as error:
        raise UsageError(f"config {path} is not valid TOML: {error}") from error
    except UnicodeDecodeError as error:
        raise UsageError(f"config {path} is not UTF-8 text: byte 0x{error.object[error.start]:02x} "
                         f"at offset {error.start}") from error


def options_from_names(values: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Turn keys named without their section, `{"hidden_size": 256}`, into `{"model": {"hidden_size": 256}}`."""
    sections = {field.name: _section_types(field.default_factory()) for field in dataclasses.fields(Config)}
    options: dict[str, dict[str, Any]] = {}
    for name, value in values.items():
        section = next((section for section, types in sections.items() if name in types), None)
        if section is None:
            raise UsageError(f"unknown config key {name!r} (a key of {', '.join(sections)})")
        options.setdefault(section, {})[name] = value
    return options


def resolve(source: Config | Path | str | None, assignments: list[str], options: dict[str, dict[str, Any]],
            base: Config | None = None) -> Config:
    """Build the run's config: defaults (or `base`) < `source` (a Config or TOML file) < `--set` < options."""
    config = base or Config()
    if isinstance(source, Config):
        config = apply_overrides(config, to_dict(source))
    elif source is not None:
        config = apply_overrides(config, load_toml(Path(source)))
    named = parse_set(assignments)
    config = apply_overrides(config, named)
    config = apply_overrides(config, options)
    validate(config)
    return without_alternatives_setting(config, set(dotted(named)) | set(dotted(options)))


def dotted(sections: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Settings by section, {"model": {"cell": "lstm"}}, by the names `--set` gives them: {"model.cell": "lstm"}."""
    return {f"{section}.{key}": value for section, values in sections.items() for key, value in values.items()}


# A run saved before one of these keys existed ran with this value, not today's default.
EARLIER_DEFAULTS = {"model": {"norm": "none", "dtype": "float32", "input_init": "hidden"},
                    "train": {"dropout_from_epoch": 0.0, "calibration_fraction": 0.0}}


def saved_defaults() -> Config:
    """The values a saved config's missing keys stand for: the defaults of when it was saved."""
    return apply_overrides(Config(), EARLIER_DEFAULTS)


def from_dict(values: dict[str, dict[str, Any]]) -> Config:
    """Rebuild a config saved with `to_dict` (checkpoints, run directories)."""
    config = apply_overrides(saved_defaults(), values)
    validate(config)
    return config


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise UsageError(message)


def validate(config: Config) -> None:
    """Raise UsageError naming the first key whose value cannot work."""
    model, train, sample = config.model, config.train, config.sample
    _require(model.kind in MODEL_KINDS, f"model.kind must be one of {', '.join(MODEL_KINDS)}, got {model.kind!r}")
    _require(model.attention in ATTENTIONS,
             f"model.attention must be one of {', '.join(ATTENTIONS)}, got {model.attention!r}")
    _require(model.attention_size >= 0, "model.attention_size must be at least 0 (0: hidden_size)")
    _require(model.attention_size == 0 or model.attention == "additive",
             "model.attention_size sizes the additive score's layer: it needs model.attention = additive")
    _require(model.target in TARGETS, f"model.target must be one of {', '.join(TARGETS)}, got {model.target!r}")
    _require(model.kind == "seq2seq" or model.target == "chars",
             "model.target = tokens is for seq2seq models; a language model writes characters")
    _require(not model.input_feeding or (model.kind == "seq2seq" and model.attention != "none"),
             "model.input_feeding feeds a seq2seq decoder its attention's output: it needs model.attention")
    _require(model.kind == "seq2seq" or not model.reverse_target,
             "model.reverse_target is for seq2seq models; a language model writes forwards")
    _require(model.kind == "lm" or not model.learn_initial_state,
             "model.learn_initial_state is for language models; a seq2seq decoder starts from the encoder's state")
    _require(model.cell in CELL_NAMES, f"model.cell must be one of {', '.join(CELL_NAMES)}, got {model.cell!r}")
    _require(model.norm in NORMS, f"model.norm must be one of {', '.join(NORMS)}, got {model.norm!r}")
    _require(model.input_init in INPUT_INITS,
             f"model.input_init must be one of {', '.join(INPUT_INITS)}, got {model.input_init!r}")
    _require(model.norm == "none" or model.kernel != "pallas",
             "model.kernel = pallas runs cells without model.norm: set model.norm = none or model.kernel = xla")
    _require(model.dtype in DTYPES, f"model.dtype must be one of {', '.join(DTYPES)}, got {model.dtype!r}")
    _require(model.kernel in KERNELS, f"model.kernel must be one of {', '.join(KERNELS)}, got {model.kernel!r}")
    _require(model.kernel != "pallas" or model.cell in ADDITIVE_CELLS,
             f"model.kernel = pallas runs {' and '.join(ADDITIVE_CELLS)} cells, not {model.cell}")
    _require(model.kernel != "pallas" or model.hidden_size % PALLAS_UNIT == 0,
             f"model.kernel = pallas needs model.hidden_size to be a multiple of {PALLAS_UNIT}, got {model.hidden_size}")
    for key in ("num_layers", "hidden_size", "embedding_size", "scan_unroll", "encoder_layers"):
        _require(getattr(model, key) >= 1, f"model.{key} must be at least 1")
    for key in ("dropout", "embedding_dropout", "weight_drop"):
        _require(0.0 <= getattr(model, key) < 1.0, f"model.{key} must be in [0, 1)")
    for key in ("batch_size", "seq_len", "steps", "eval_every", "eval_batch_size", "log_every",
                "steps_per_call", "keep", "max_length", "pad_multiple"):
        _require(getattr(train, key) >= 1, f"train.{key} must be at least 1")
    _require(train.schedule in SCHEDULES, f"train.schedule must be one of {', '.join(SCHEDULES)}, got {train.schedule!r}")
    _require(math.isfinite(train.lr) and train.lr > 0, "train.lr must be a positive number")
    _require(train.warmup_steps >= 0, "train.warmup_steps must not be negative")
    _require(0.0 <= train.final_lr_fraction <= 1.0, "train.final_lr_fraction must be in [0, 1]")
    _require(0.0 <= train.beta1 < 1.0 and 0.0 <= train.beta2 < 1.0, "train.beta1 and train.beta2 must be in [0, 1)")
    _require(math.isfinite(train.weight_decay) and train.weight_decay >= 0, "train.weight_decay must be a finite number >= 0")
    _require(math.isfinite(train.dropout_from_epoch) and train.dropout_from_epoch >= 0,
             "train.dropout_from_epoch must be a finite number >= 0 (0 = dropout from the first step)")
    _require(0.0 < train.eval_fraction <= 1.0, "train.eval_fraction must be in (0, 1] (1 = every evaluation scores all of the validation data)")
    _require(0.0 <= train.ema < 1.0, "train.ema must be in [0, 1) (0 = no averaging)")
    _require(0.0 <= train.label_smoothing < 1.0, "train.label_smoothing must be in [0, 1) (0 = none)")
    _require(0.0 <= train.scheduled_sampling <= 1.0, "train.scheduled_sampling must be in [0, 1] (0 = teacher forcing)")
    _require(train.scheduled_sampling == 0 or model.kind == "seq2seq",
             "train.scheduled_sampling applies to model.kind = seq2seq only")
    _require(train.clip_norm >= 0, "train.clip_norm must not be negative (0 disables clipping)")
    _require(math.isfinite(train.max_minutes) and train.max_minutes >= 0, "train.max_minutes must be >= 0 (0 = no budget)")
    _require(math.isfinite(train.max_epochs) and train.max_epochs >= 0, "train.max_epochs must be a finite number >= 0 (0 = no cap)")
    _require(math.isfinite(train.fit_epochs) and train.fit_epochs >= 0,
             "train.fit_epochs must be a finite number >= 0 (0 = all of train.max_epochs)")
    _require(train.save_minutes >= 0, "train.save_minutes must not be negative")
    _require(train.schedule != "exponential" or train.final_lr_fraction > 0,
             "train.final_lr_fraction must be > 0 for the exponential schedule")
    _require(0.0 < train.val_fraction < 1.0, "train.val_fraction must be in (0, 1)")
    _require(0.0 <= train.calibration_fraction and train.val_fraction + train.calibration_fraction < 1.0,
             "train.calibration_fraction must be >= 0 (0 = none) and leave text to train on beside train.val_fraction")
    check_seed(train.seed, "train.seed")
    _require(train.members >= 1, "train.members must be at least 1")
    check_seed(train.seed + train.members - 1, "train.seed + train.members - 1")
    _require(train.members == 1 or model.kind == "lm", "train.members > 1 is for language models (model.kind = lm)")
    if train.larger_model:
        _require(model.kind == "lm", "train.larger_model is for language models (model.kind = lm)")
        try:
            for larger in larger_models(config):
                validate(larger.config)
        except UsageError as error:  # name the key the user wrote, not only the setting inside it
            raise UsageError(f"train.larger_model ({train.larger_model!r}): {error}") from None
    check_sampling(sample.temperature, sample.top_k, sample.top_p, sample.length)
    _require(sample.beam >= 1, f"sample.beam must be at least 1, got {sample.beam}")


SEED_LIMIT = 2**32  # JAX's default PRNG keys hold 32 bits: seeds s and s + 2**32 would be the same key


def check_seed(seed: int, name: str) -> None:
    """Raise UsageError for a seed that two different numbers would share, or one NumPy refuses (negative)."""
    _require(0 <= seed < SEED_LIMIT, f"{name} must be in [0, {SEED_LIMIT - 1}], got {seed}")


def check_sampling(temperature: float, top_k: int, top_p: float, length: int) -> None:
    """Raise UsageError for sampling settings that have no meaning."""
    _require(math.isfinite(temperature) and temperature >= 0, f"temperature must be a finite number >= 0, got {temperature}")
    _require(top_k >= 0, f"top-k must be >= 0 (0 = off), got {top_k}")
    _require(0.0 < top_p <= 1.0, f"top-p must be in (0, 1], got {top_p}")
    _require(length >= 0, f"length must be >= 0, got {length}")


# What a larger model may set besides model keys: several models scoring together, their passes over the text,
# and how many of those must fit the budget.
LARGER_MODEL_TRAIN_KEYS = ("members", "max_epochs", "fit_epochs")


class LargerModel(NamedTuple):
    """One of `train.larger_model`'s alternatives."""

    text: str  # as written
    overrides: dict[str, dict[str, Any]]  # its settings
    config: Config  # the run's config training it, train.larger_model cleared


def larger_model_overrides(train: TrainConfig) -> list[tuple[str, dict[str, dict[str, Any]]]]:
    """`train.larger_model`'s alternatives (separated by ";"): each as written and its space-separated settings as
    overrides; keys other than model keys and LARGER_MODEL_TRAIN_KEYS are errors (`validate` names the key in front
    of them)."""
    alternatives = [(text.strip(), parse_set(text.split())) for text in train.larger_model.split(";") if text.strip()]
    _require(bool(alternatives) or not train.larger_model, "it names no settings")
    allowed = ", ".join(f"train.{key}" for key in LARGER_MODEL_TRAIN_KEYS)
    for _, overrides in alternatives:
        _require(set(overrides) <= {"model", "train"} and set(overrides.get("train", {})) <= set(LARGER_MODEL_TRAIN_KEYS),
                 f"it sets model keys and {allowed} only (model.key=value ...)")
    return alternatives


def larger_models(config: Config) -> list[LargerModel]:
    """`config`'s `train.larger_model` alternatives, in the order a run tries them."""
    return [LargerModel(text, overrides, apply_overrides(config, {**overrides, "train": {
                **overrides.get("train", {}), "larger_model": ""}}))
            for text, overrides in larger_model_overrides(config.train)]


def without_alternatives_setting(config: Config, named: set[str]) -> Config:
    """`config` keeping only the `train.larger_model` alternatives that set none of the `named` keys
    ("section.key"): a setting the user gave stands over the recipe's alternatives."""
    kept = [text for text, overrides in larger_model_overrides(config.train)
            if not set(dotted(overrides)) & named]
    return apply_overrides(config, {"train": {"larger_model": "; ".join(kept)}})


def differences(old: Config, new: Config, sections: tuple[str, ...]) -> list[str]:
    """Name every key of `sections` whose value differs: ["model.hidden_size: 256 -> 512"]."""
    old_values, new_values = to_dict(old), to_dict(new)
    return [
        f"{section}.{key}: {old_values[section][key]!r} -> {new_values[section][key]!r}"
        for section in sections
        for key in old_values[section]
        if old_values[section][key] != new_values[section][key]
    ]


def summary_lines(config: Config) -> list[str]:
    """One line per section, `key=value` pairs: how a run shows its resolved config."""
    return [f"{section}: " + " ".join(f"{key}={value}" for key, value in values.items())
            for section, values in to_dict(config).items()]
