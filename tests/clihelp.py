"""Running the charrnn CLI in-process or as a real subprocess, for the end-to-end tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np

from charrnn import checkpoint, rundir, runtime

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "tiny.toml"


class Result(NamedTuple):
    code: int
    out: str
    err: str


def run_in_process(capsys, *args: str) -> Result:
    """Call charrnn.cli.main as the console script would; return exit code and output."""
    from charrnn.cli import main

    capsys.readouterr()
    try:
        main([str(arg) for arg in args])
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    captured = capsys.readouterr()
    return Result(code, captured.out, captured.err)


# One CPU device, as the in-process `cli` fixture has (JAX starts there before any
# command can ask for one per core), so that runs made both ways compare bit for bit.
ONE_CPU_DEVICE = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
# Tests compile far more than they compute: LLVM at optimisation level 0 compiles their small functions
# about a third faster. Its numbers differ from a run's (level 3) in the last bits, so every process of the
# suite, subprocesses included, compiles at it; the suite passes at level 3 too (benchmarks/README.md).
QUICK_COMPILES = {"xla_backend_optimization_level": "0"}


def subprocess_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **ONE_CPU_DEVICE, **extra}
    env.pop(checkpoint.FAULT_ENV, None)
    env.update(extra)
    env["XLA_FLAGS"] = runtime.with_xla_flags(env["XLA_FLAGS"], QUICK_COMPILES)
    return env


def run_subprocess(*args: str, cwd: Path, timeout: float = 120, **env: str) -> Result:
    done = subprocess.run([sys.executable, "-m", "charrnn", *map(str, args)], cwd=cwd, env=subprocess_env(**env),
                          capture_output=True, text=True, timeout=timeout)
    return Result(done.returncode, done.stdout, done.stderr)


def start_subprocess(*args: str, cwd: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "charrnn", *map(str, args)], cwd=cwd, env=subprocess_env(**env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def checkpoint_arrays(path: Path) -> dict[str, np.ndarray]:
    arrays, _ = checkpoint.read(path)
    return arrays


def final_arrays(run_dir: Path) -> dict[str, np.ndarray]:
    """The arrays of the run's newest step checkpoint."""
    return checkpoint_arrays(checkpoint.step_files(run_dir / "checkpoints")[-1])


def logged_train_steps(run_dir: Path) -> list[int]:
    """The step of every train record in the run's metrics, in the order they were written."""
    return [record["step"] for record in rundir.read_metrics(run_dir) if record.get("event") == "train"]


def assert_identical_arrays(left: dict[str, np.ndarray], right: dict[str, np.ndarray]) -> None:
    assert left.keys() == right.keys()
    for name in left:
        assert left[name].dtype == right[name].dtype, name
        assert np.array_equal(left[name], right[name]), f"{name} differs"


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` with its bytes, to prove a failed command changed nothing."""
    if not directory.exists():
        return {}
    return {str(path.relative_to(directory)): path.read_bytes() for path in sorted(directory.rglob("*")) if path.is_file()}
