"""Checkpoints: how one is written, rotated, found and loaded.

A checkpoint is one `.safetensors` file. Its arrays are named by their pytree
path (`params/layers/0/w_h`); its metadata holds the format version, a SHA-256
of every array, the config, vocabulary and progress. Files are written
atomically (`atomic.write_atomic`), so a kill at any moment leaves either the
old file or the new one. The model is rebuilt from what the file stores.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as load_arrays
from safetensors.numpy import save as save_arrays

from charrnn import calibration, config as config_lib, members, model, rundir, steps
from charrnn.atomic import FAULT_ENV, TEMP_PREFIX, write_atomic  # noqa: F401  (FAULT_ENV: for tests)
from charrnn.data import Vocab
from charrnn.errors import CheckpointError, UsageError
from charrnn.seq2seq import model as seq2seq_model
from charrnn.seq2seq.pairs import TokenVocab, stored_symbols, target_vocab

FORMAT_VERSION = 1
SUFFIX = ".safetensors"


def _named_leaves(tree: Any, prefix: str) -> list[tuple[str, Any]]:
    """Every leaf of a pytree with its path as a name: [("prefix/layers/0/w_x", leaf)]."""
    named = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        parts = [str(getattr(key, "key", getattr(key, "idx", getattr(key, "name", key)))) for key in path]
        named.append(("/".join([prefix, *parts]), leaf))
    return named


def flatten(tree: Any, prefix: str) -> dict[str, np.ndarray]:
    """Host copies of every leaf, named by path; no device information is kept."""
    return {name: np.asarray(jax.device_get(leaf)) for name, leaf in _named_leaves(tree, prefix)}


def unflatten(template: Any, prefix: str, arrays: dict[str, np.ndarray]) -> Any:
    """Rebuild a pytree shaped like `template` (arrays or ShapeDtypeStructs) from named arrays."""
    leaves = []
    for name, like in _named_leaves(template, prefix):
        if name not in arrays:
            raise CheckpointError(f"checkpoint lacks array {name}")
        array = arrays[name]
        if array.shape != tuple(like.shape) or array.dtype != np.dtype(like.dtype):
            raise CheckpointError(
                f"checkpoint array {name} is {array.dtype}{list(array.shape)}, expected {np.dtype(like.dtype)}{list(like.shape)}"
            )
        leaves.append(array)
    return jax.tree.unflatten(jax.tree.structure(template), leaves)


def _contiguous(array: np.ndarray) -> np.ndarray:
    """C order, keeping 0-d arrays 0-d (np.ascontiguousarray would make them [1])."""
    return np.require(array, requirements="C")


def _digest(arrays: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for name in sorted(arrays):
        array = _contiguous(arrays[name])
        digest.update(f"{name}:{array.dtype.str}:{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def _metadata_digest(header: dict[str, Any]) -> str:
    """SHA-256 of the header's JSON but its own entry, as it reads back (tuples as lists, keys as strings)."""
    rest = json.loads(json.dumps({key: value for key, value in header.items() if key != "metadata_sha256"}))
    return hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()


def encode(arrays: dict[str, np.ndarray], metadata: dict[str, Any]) -> bytes:
    """Serialise arrays and metadata (with format version and checksums) to bytes."""
    header = {**metadata, "format_version": FORMAT_VERSION, "sha256": _digest(arrays)}
    header["metadata_sha256"] = _metadata_digest(header)
    contiguous = {name: _contiguous(array) for name, array in arrays.items()}
    return save_arrays(contiguous, metadata={"charrnn": json.dumps(header)})


def decode(payload: bytes, name: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Parse and verify checkpoint bytes; raise CheckpointError saying what is wrong."""
    if len(payload) == 0:
        raise CheckpointError(f"{name} is empty")
    try:
        (header_size,) = struct.unpack("<Q", payload[:8])
        header = json.loads(payload[8 : 8 + header_size])
        metadata = json.loads(header["__metadata__"]["charrnn"])
        if not isinstance(metadata, dict):
            raise ValueError("the metadata is not an object")
        arrays = load_arrays(payload)
    except (struct.error, ValueError, KeyError, TypeError, SafetensorError):
        raise CheckpointError(f"{name} is truncated or not a charrnn checkpoint") from None
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{name} has format version {version}; this charrnn reads version {FORMAT_VERSION}")
    if _digest(arrays) != metadata.get("sha256"):
        raise CheckpointError(f"{name} is corrupted (checksum mismatch)")
    expected = metadata.get("metadata_sha256")  # None in checkpoints written before it: they still load
    if expected is not None and expected != _metadata_digest(metadata):
        raise CheckpointError(f"{name} is corrupted (metadata checksum mismatch)")
    return arrays, metadata


def read(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Load and verify one checkpoint file."""
    return decode(read_bytes(path), str(path))


def read_bytes(path: Path) -> bytes:
    """The bytes of a checkpoint file, with one-line errors for a path that cannot be read."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path} is a directory with no checkpoints") from None
    except OSError as error:
        raise CheckpointError(f"cannot read checkpoint {path}: {error.strerror}") from None


def write(path: Path, arrays: dict[str, np.ndarray], metadata: dict[str, Any]) -> None:
    write_atomic(path, encode(arrays, metadata))


def step_path(directory: Path, step: int) -> Path:
    return directory / f"step-{step:09d}{SUFFIX}"


def step_files(directory: Path) -> list[Path]:
    """Step checkpoints in `directory`, oldest first (temporary files are never listed)."""
    # Steps are padded to nine digits: past them a longer name is a later step, though it sorts first by name.
    return sorted(directory.glob(f"step-*{SUFFIX}"), key=lambda path: (len(path.name), path.name))


def rotate(directory: Path, keep: int) -> None:
    """Delete all but the newest `keep` step checkpoints (call only after a new one is in place)."""
    for old in step_files(directory)[:-keep]:
        old.unlink(missing_ok=True)
    for temp in directory.glob(f"{TEMP_PREFIX}*"):
        temp.unlink(missing_ok=True)


def read_latest(directory: Path) -> tuple[Path, dict[str, np.ndarray], dict[str, Any], list[str]]:
    """Load the newest step checkpoint that verifies; also say which newer ones did not."""
    files = step_files(directory)
    if not files:
        raise CheckpointError(f"no checkpoint in {directory}")
    problems = []
    for path in reversed(files):
        try:
            arrays, metadata = read(path)
            return path, arrays, metadata, problems
        except CheckpointError as error:
            problems.append(str(error))
    raise CheckpointError(f"no checkpoint in {directory} loads: {problems[0]}")


def save(run_dir: Path, step: int, arrays: dict[str, np.ndarray], metadata: dict[str, Any], best: bool,
         keep: int) -> Path:
    """Write the best copy (when `best`) and the step checkpoint, then rotate older ones away.

    The best copy goes first: a step checkpoint records the best loss so far, so
    one written before a crash that lost the best copy would make a resumed run
    believe that copy exists. The other way round, a resume starts from the step
    before, evaluates the same step again and rewrites the same best copy.
    """
    directory = rundir.checkpoints_dir(run_dir)
    path = step_path(directory, step)
    payload = encode(arrays, metadata)
    if best:
        write_atomic(directory / rundir.BEST_FILE, payload)
    write_atomic(path, payload)
    rotate(directory, keep)
    return path


def find(path: Path | None) -> Path:
    """A checkpoint file from a file, a run directory, a folder of runs or (None) the newest run under ./runs."""
    if path is None:
        path = rundir.newest_run(rundir.DEFAULT_RUNS)
    if path.is_dir():
        if rundir.is_run_dir(path):
            files = step_files(rundir.checkpoints_dir(path))
            if not files:
                raise CheckpointError(f"run {path} has no checkpoint yet")
            return files[-1]
        files = step_files(path)
        if files:
            return files[-1]
        if any(rundir.is_run_dir(child) for child in path.iterdir()):
            return find(rundir.newest_run(path))
        raise CheckpointError(f"{path} is neither a run directory nor holds checkpoints or runs")
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint or run directory")
    return path


class Loaded(NamedTuple):
    """A verified checkpoint file: the model it holds, rebuilt from its own metadata."""

    config: config_lib.Config
    vocab: Vocab | TokenVocab  # TokenVocab: a seq2seq run with model.target = tokens
    params: dict
    metadata: dict[str, Any]
    path: Path
    file_bytes: int  # the size of the file when it was read
    source_vocab: Vocab | None = None  # an encoder–decoder's source side (`vocab` is its target side)


class FromCheckpoint:
    """What every trained model offers: the config, vocabulary, params and file it was rebuilt from.

    Given several checkpoints of runs with the same symbols, or one of a run of
    several members (`train.members`), it is an ensemble: they predict together,
    from the mean of their distributions. `config`, `params` and `path` are then
    the first model's.
    """

    def __init__(self, loaded: Loaded, *others: Loaded):
        def symbols(one: Loaded) -> tuple:
            source = None if one.source_vocab is None else one.source_vocab.chars
            return one.config.model.target, source, stored_symbols(one.vocab)

        for other in others:
            if symbols(other) != symbols(loaded):
                raise UsageError(f"{other.path} and {loaded.path} have different vocabularies: "
                                 "only runs with the same symbols can predict together")
        self._loaded = loaded
        self._runs = (loaded, *others)
        self._members = tuple(member for one in self._runs for member in member_models(one))

    @property
    def paths(self) -> list[Path]:
        """The checkpoint file of each run predicting together (one, unless an ensemble of runs)."""
        return [run.path for run in self._runs]

    @property
    def _params(self) -> tuple[dict, ...]:
        return tuple(member.params for member in self._members)

    @property
    def _configs(self) -> tuple[config_lib.ModelConfig, ...]:
        return tuple(member.config.model for member in self._members)

    def _members_suffix(self) -> str:
        """What `repr` adds for an ensemble."""
        return f" and {len(self._runs) - 1} more" if len(self._runs) > 1 else ""

    @property
    def config(self) -> config_lib.Config:
        return self._loaded.config

    @property
    def vocab(self) -> Vocab | TokenVocab:
        """The symbols the model writes: characters, or an encoder–decoder's target tokens."""
        return self._loaded.vocab

    @property
    def params(self) -> dict:
        return self._members[0].params

    @property
    def path(self) -> Path:
        """The checkpoint file the model was read from."""
        return self._loaded.path

    def _sampling(self, temperature: float | None, top_k: int | None, top_p: float | None, length: int | None,
                  default_length: int) -> tuple[float, int, float, int]:
        """Sampling settings checked, each one unset taken from the run's `sample` config (`length`: `default_length`)."""
        defaults = self.config.sample
        settings = (defaults.temperature if temperature is None else temperature,
                    defaults.top_k if top_k is None else top_k,
                    defaults.top_p if top_p is None else top_p,
                    default_length if length is None else length)
        config_lib.check_sampling(*settings)
        return settings

    def describe(self) -> dict[str, Any]:
        """What the checkpoint holds: config, vocabulary, step, validation loss, parameter shapes (JSON-ready).

            >>> model.describe()["parameter_count"]
        """
        return describe(self._loaded)


def load(path: Path | None, attempts: int = 5) -> Loaded:
    """Find, read and verify a checkpoint (see `find`) and rebuild its parameters.

    A run still training deletes its older step checkpoints as it saves new ones,
    so the file just listed can be gone by the time it is read: then the run is
    listed again, for its newer checkpoint.
    """
    for attempt in range(attempts):
        file = find(path)
        try:
            payload = read_bytes(file)  # one read: the size and the arrays are of one version
        except CheckpointError:
            if file == path or file.exists() or attempt == attempts - 1:
                raise
            continue
        arrays, metadata = decode(payload, str(file))
        try:
            config = config_lib.from_dict(metadata["config"])
            seq2seq = config.model.kind == "seq2seq"
            vocab = target_vocab(config.model.target, metadata["vocab"]) if seq2seq else Vocab(metadata["vocab"])
            source_vocab = Vocab(metadata["source_vocab"]) if seq2seq else None
            # The temperatures the run fitted (`train.calibration_fraction`), folded into the model it predicts with.
            temperatures = calibration.checked(metadata.get("temperatures"), config.train.members)
        except (KeyError, TypeError, ValueError, UsageError) as error:
            raise CheckpointError(f"{file} has unreadable metadata: {error}") from None
        template = jax.eval_shape(lambda: members.combine(
            [init_params(jax.random.key(0), config.model, vocab, source_vocab)] * config.train.members))
        params = calibration.apply(jax.device_put(unflatten(template, "params", arrays)), temperatures)
        return Loaded(config, vocab, params, metadata, file, len(payload), source_vocab)
    raise AssertionError("unreachable")


def member_models(loaded: Loaded) -> tuple[Loaded, ...]:
    """The models a checkpoint holds: one, or each member of a run of several (`train.members`)."""
    return tuple(loaded._replace(params=params)
                 for params in members.split(loaded.params, loaded.config.train.members))


def init_params(key: jax.Array, model_config: config_lib.ModelConfig, vocab: Vocab | TokenVocab,
                source_vocab: Vocab | None = None) -> dict:
    """Fresh parameters of the model `model_config` describes: the shapes a checkpoint's arrays fill."""
    if model_config.kind == "seq2seq":  # id 0 is reserved on both sides
        return seq2seq_model.init_params(key, model_config, len(source_vocab) + 1, len(vocab) + 1)
    return model.init_params(key, model_config, len(vocab))


def restore_training(arrays: dict[str, np.ndarray], task, optimizer, batch_size: int, step: int,
                     averaged: bool = False, num_members: int = 1) -> tuple[steps.TrainState, tuple]:
    """The training state and carried state stored in `arrays` (host arrays), shaped as `task` makes them for a
    run of `num_members` members (`train.members`).

    `averaged` (`train.ema`): "params" holds the weights' average and "iterate" the optimizer's weights.
    """
    def member(key: jax.Array):
        params = task.init_params(key)
        return params, optimizer.init(params), task.initial_carry(params, batch_size)

    template = jax.eval_shape(lambda key: members.combine([member(key)] * num_members), jax.random.key(0))
    params_template, opt_template, carry_template = template
    params = unflatten(params_template, "iterate" if averaged else "params", arrays)
    average = unflatten(params_template, "params", arrays) if averaged else None
    opt_state = unflatten(opt_template, "opt_state", arrays)
    carry = unflatten(carry_template, "carry", arrays)
    return steps.TrainState(params, opt_state, np.asarray(step, np.int32), average), carry


def training_arrays(state: steps.TrainState, carry: tuple) -> dict[str, np.ndarray]:
    """Everything a resume needs as named host arrays: `restore_training`'s inverse.

    "params" are the model's weights (the average, with `train.ema`), what sampling and evaluation load.
    """
    iterate = flatten(state.params, "iterate") if state.average is not None else {}
    return {**flatten(state.model_params, "params"), **iterate, **flatten(state.opt_state, "opt_state"),
            **flatten(carry, "carry")}


def describe(loaded: Loaded) -> dict[str, Any]:
    """A JSON-ready summary of a loaded checkpoint: architecture, vocabulary, progress, parameter shapes."""
    metadata = loaded.metadata
    return {
        "path": str(loaded.path),
        "file_bytes": loaded.file_bytes,
        "format_version": metadata.get("format_version"),
        "step": metadata.get("step"),
        "val_loss": metadata.get("val_loss"),
        "val_fraction": metadata.get("val_fraction", 1.0),  # the share of the validation split val_loss scored
        "best_val_loss": metadata.get("best_val_loss"),
        **({"temperatures": metadata["temperatures"]} if "temperatures" in metadata else {}),  # train.calibration_fraction
        "config": config_lib.to_dict(loaded.config),
        "vocab": metadata["vocab"],  # characters (a string), or a seq2seq run's target tokens (a list)
        "vocab_size": len(loaded.vocab),
        **({"source_vocab": loaded.source_vocab.chars} if loaded.source_vocab else {}),
        "parameter_count": model.parameter_count(loaded.params),
        "parameter_shapes": {name: list(array.shape) for name, array in flatten(loaded.params, "params").items()},
    }
