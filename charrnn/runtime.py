"""Process-wide JAX settings: platform, CPU threads and the persistent compilation cache.

These must be set before JAX starts its backends, so the CLI calls `configure`
before the first computation.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "CHARRNN_CACHE_DIR"


def cache_dir() -> Path:
    """Where compiled programs are kept between runs (shared by parallel runs of a sweep)."""
    if CACHE_ENV in os.environ:
        return Path(os.environ[CACHE_ENV])
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "charrnn" / "jax"


def usable_cores() -> int:
    """The cores this process may run on (its affinity where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def configure(platform: str | None = None, threads: int | None = None, compilation_cache: bool = True,
              cpu_device_per_core: bool = False) -> None:
    """Pick the platform, cap CPU threads, and turn on the shared compilation cache.

    With `cpu_device_per_core`, JAX sees each core this process may use as a CPU
    device of its own, so that training can split its streams over them
    (`distributed.default_device_count` decides whether it does).
    """
    if threads == 1:
        # Single-threaded matmuls: several runs can share a machine, one per core.
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_cpu_multi_thread_eigen=false".strip()
    elif threads:
        # XLA sizes its CPU thread pool from the cores this process may use (set before jax starts).
        allowed = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, allowed[:threads])
    import jax

    if platform:
        jax.config.update("jax_platforms", platform)
    if cpu_device_per_core and threads != 1 and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        try:
            jax.config.update("jax_num_cpu_devices", usable_cores())
        except RuntimeError:
            pass  # JAX has started already in this process (a library caller's): it keeps its devices
    if compilation_cache and os.environ.get(CACHE_ENV, "x") != "":
        directory = cache_dir()
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError:
            return  # an unwritable cache only costs compile time
        jax.config.update("jax_compilation_cache_dir", str(directory))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
