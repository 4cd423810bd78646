"""Checkpoint files: safetensors arrays + JSON metadata, written atomically, verified on load.

A checkpoint is one `.safetensors` file. Its arrays are named by their pytree
path (`params/layers/0/w_h`); its metadata holds the format version, a SHA-256
of every array, and whatever the caller stores (config, vocabulary, step).
Files are written to a temporary name in the same directory, fsynced, renamed
over the final name and the directory fsynced, so a kill at any moment leaves
either the old file or the new one, never a torn one.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import jax
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as load_arrays
from safetensors.numpy import save as save_arrays

from charrnn.atomic import FAULT_ENV, TEMP_PREFIX, write_atomic  # noqa: F401  (FAULT_ENV: for tests)
from charrnn.errors import CheckpointError

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


def encode(arrays: dict[str, np.ndarray], metadata: dict[str, Any]) -> bytes:
    """Serialise arrays and metadata (with format version and checksum) to bytes."""
    header = {**metadata, "format_version": FORMAT_VERSION, "sha256": _digest(arrays)}
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
        arrays = load_arrays(payload)
    except (struct.error, ValueError, KeyError, TypeError, SafetensorError):
        raise CheckpointError(f"{name} is truncated or not a charrnn checkpoint") from None
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{name} has format version {version}; this charrnn reads version {FORMAT_VERSION}")
    if _digest(arrays) != metadata.get("sha256"):
        raise CheckpointError(f"{name} is corrupted (checksum mismatch)")
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
    return sorted(directory.glob(f"step-*{SUFFIX}"))


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
