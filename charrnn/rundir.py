"""The run directory: its layout, the one-writer lock, status, metrics log and discovery."""

from __future__ import annotations

import fcntl
import json
import math
import os
import time
from pathlib import Path
from typing import Any

from charrnn.atomic import probe_writable, write_atomic
from charrnn.errors import BusyError, CheckpointError, StorageError

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
STATUS_FILE = "status.json"
CHECKPOINTS = "checkpoints"
BEST_FILE = "best.safetensors"
LOCK_FILE = ".lock"
TENSORBOARD_DIR = "tensorboard"  # `train --tensorboard`: the event files, inside the run directory
DEFAULT_RUNS = Path("runs")  # where new runs go, and where the newest is looked for

# Values of status.json's "status"; "running" with no live lock holder reads as "interrupted".
RUNNING, FINISHED, INTERRUPTED, DIVERGED = "running", "finished", "interrupted", "diverged"


def checkpoints_dir(run_dir: Path) -> Path:
    return run_dir / CHECKPOINTS


def new_run_dir(root: Path) -> Path:
    """Create and return a fresh, empty directory under `root`, named by date and time.

    Made here, not only named: runs started together (a sweep's `&`) pick names
    in the same second, and only creating the directory claims one for good.
    """
    stamp = time.strftime("%Y%m%d-%H%M%S")
    candidate, suffix = root / stamp, 1
    try:
        root.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                candidate.mkdir()  # FileExistsError here can only mean this name is taken
                return candidate
            except FileExistsError:
                suffix += 1
                candidate = root / f"{stamp}-{suffix}"
    except OSError as error:
        raise StorageError(f"cannot create a run directory under {root}: {error.strerror}") from None


def create(run_dir: Path) -> None:
    """Create the run directory and prove it writable, before any training step."""
    try:
        checkpoints_dir(run_dir).mkdir(parents=True, exist_ok=True)
        probe_writable(run_dir)
    except OSError as error:
        raise StorageError(f"cannot write to run directory {run_dir}: {error.strerror}") from None


class RunLock:
    """An exclusive flock on the run directory, released by the kernel if the holder dies."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK_FILE
        self.descriptor: int | None = None

    def __enter__(self) -> RunLock:
        try:
            self.descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(self.descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if self.descriptor is not None:  # opened but not locked: `__exit__` will not run to close it
                os.close(self.descriptor)
                self.descriptor = None
            if isinstance(error, BlockingIOError):
                raise BusyError(f"run directory {self.path.parent} is in use by another charrnn train") from None
            raise StorageError(f"cannot lock run directory {self.path.parent}: {error.strerror}") from None
        os.ftruncate(self.descriptor, 0)
        os.write(self.descriptor, str(os.getpid()).encode())
        return self

    def __exit__(self, *exc_info) -> None:
        if self.descriptor is not None:
            fcntl.flock(self.descriptor, fcntl.LOCK_UN)
            os.close(self.descriptor)
            self.descriptor = None


def is_locked(run_dir: Path) -> bool:
    """True while a live process holds the run's lock."""
    path = run_dir / LOCK_FILE
    if not path.exists():
        return False
    descriptor = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(descriptor, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(descriptor)


def strict_json(value: Any, **options) -> str:
    """json.dumps with NaN and infinities written as null, so that strict parsers (jq, JavaScript) read every line."""
    return json.dumps(_nonfinite_as_none(value), allow_nan=False, **options)


def _nonfinite_as_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _nonfinite_as_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nonfinite_as_none(item) for item in value]
    return value


def write_json(path: Path, value: Any) -> None:
    write_atomic(path, (strict_json(value, indent=2) + "\n").encode())


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as file:
        return json.load(file)


def write_status(run_dir: Path, status: str, fields: dict[str, Any]) -> None:
    write_json(run_dir / STATUS_FILE, {**fields, "status": status, "updated": time.time()})


def read_status(run_dir: Path) -> dict[str, Any]:
    """The run's status; a "running" run whose process is gone is "interrupted"."""
    try:
        status = read_json(run_dir / STATUS_FILE)
    except (OSError, ValueError):
        return {"status": "unknown"}
    if status.get("status") == RUNNING and not is_locked(run_dir):
        status["status"] = INTERRUPTED
    return status


class MetricsLog:
    """Append-only JSON lines, flushed per record so a crash loses at most one line."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / METRICS_FILE

    def write(self, record: dict[str, Any]) -> None:
        line = (strict_json(record) + "\n").encode()
        try:
            with open(self.path, "a+b") as file:
                # After a crash mid-line, start on a fresh line so only the torn record is lost.
                if file.tell() > 0:
                    file.seek(-1, os.SEEK_END)
                    if file.read(1) != b"\n":
                        line = b"\n" + line
                file.write(line)
        except OSError as error:
            raise StorageError(f"cannot write {self.path}: {error.strerror}") from None


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Every record of metrics.jsonl; a torn last line (crash mid-write) is skipped."""
    records = []
    try:
        with open(run_dir / METRICS_FILE, encoding="utf-8") as file:
            for line in file:
                try:
                    records.append(json.loads(line))
                except ValueError:
                    continue
    except OSError:
        pass
    return records


def is_run_dir(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file() and checkpoints_dir(path).is_dir()


def newest_run(root: Path) -> Path:
    """The most recently modified run directory under `root` that holds a checkpoint."""
    runs = [path for path in root.glob("*") if is_run_dir(path) and any(checkpoints_dir(path).glob("step-*"))]
    if not runs:
        raise CheckpointError(f"no trained run under {root}/ (train one, or name a run directory or checkpoint file)")
    return max(runs, key=lambda path: (path / STATUS_FILE).stat().st_mtime if (path / STATUS_FILE).exists() else 0)

