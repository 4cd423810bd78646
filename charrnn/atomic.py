"""Files that are either wholly old or wholly new: temporary name, fsync, rename, fsync the directory.

Stdlib only, so that commands which only read run directories start without JAX.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
from pathlib import Path

from charrnn.errors import StorageError

TEMP_PREFIX = ".tmp-"
# Test-only fault injection: "PHASE" or "PHASE@N" SIGKILLs the process the (N-th) time a
# checkpoint write reaches PHASE of `write_atomic`; "enospc" fails it as a full disk would.
FAULT_ENV = "CHARRNN_TEST_FAULT"
_phases_reached: dict[str, int] = {}


def _fault_point(phase: str, path: Path) -> None:
    fault = os.environ.get(FAULT_ENV)
    if not fault or path.suffix != ".safetensors":
        return
    if fault == "enospc" and phase == "written":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    wanted_phase, _, nth = fault.partition("@")
    if wanted_phase == phase:
        _phases_reached[phase] = _phases_reached.get(phase, 0) + 1
        if _phases_reached[phase] >= int(nth or 1):
            os.kill(os.getpid(), signal.SIGKILL)


def fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def probe_writable(directory: Path) -> None:
    """Make `directory` (and its parents) and write and remove a file in it; OSError where either fails."""
    directory.mkdir(parents=True, exist_ok=True)
    probe = directory / f".probe-{os.getpid()}"
    probe.write_bytes(b"ok")
    probe.unlink()


def write_atomic(path: Path, payload: bytes) -> None:
    """Write bytes so that `path` holds either its old content or all of `payload`."""
    temp = path.with_name(f"{TEMP_PREFIX}{path.name}.{os.getpid()}")
    _fault_point("before_write", path)
    try:
        with open(temp, "wb") as file:
            file.write(payload[: len(payload) // 2])
            _fault_point("half_written", path)
            file.write(payload[len(payload) // 2 :])
            _fault_point("written", path)
            file.flush()
            os.fsync(file.fileno())
        _fault_point("synced", path)
        os.replace(temp, path)
        _fault_point("replaced", path)
        fsync_directory(path.parent)
    except OSError as error:
        with contextlib.suppress(OSError):  # also when the folder itself is the problem (a file, not a directory)
            temp.unlink()
        raise StorageError(f"cannot write {path}: {error.strerror or error}") from None
