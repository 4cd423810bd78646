"""Process-wide JAX settings: platform, CPU cores and the persistent compilation cache.

These must be set before JAX starts its backends, so the CLI calls `configure`
before the first computation.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import os
import platform
import re
import resource
import tempfile
import warnings
from itertools import takewhile
from pathlib import Path

from charrnn.atomic import probe_writable
from charrnn.errors import UsageError

CACHE_ENV = "CHARRNN_CACHE_DIR"
# XLA CPU options that make training faster (figures in benchmarks/README.md): copy
# insertion that looks into while-loop bodies, so the time loops copy their carries
# less, and 512-bit vectors for elementwise code such as the gate arithmetic (LLVM's
# 256-bit default spares older CPUs' clocks, but the matmul kernels use 512 bits anyway).
CPU_XLA_FLAGS = {"xla_cpu_copy_insertion_use_region_analysis": "true", "xla_cpu_prefer_vector_width": "512"}
# XLA aborts at start on a flag it does not know, so they go only to the jaxlib
# release they were measured with; a later one gets them once measured again.
CPU_XLA_FLAGS_JAXLIB = (0, 10)


def peak_rss_mb() -> float:
    """The most memory this process has held so far, in MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def cache_dir() -> Path:
    """Where compiled programs are kept between runs (shared by parallel runs of a sweep)."""
    if CACHE_ENV in os.environ:
        return Path(os.environ[CACHE_ENV])
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "charrnn" / "jax"


def usable_cores() -> int:
    """The cores this process may run on (its affinity where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@functools.cache
def multiplies_bfloat16_natively() -> bool:
    """Whether JAX's default device multiplies bfloat16 faster than float32: any accelerator, or a CPU
    with AVX-512 BF16 or AMX instructions (without them XLA converts bfloat16 to float32 and back)."""
    import jax

    return jax.default_backend() != "cpu" or cpu_multiplies_bfloat16(read_cpuinfo())


@functools.cache
def read_cpuinfo() -> str:
    """/proc/cpuinfo's text; empty where the OS has none."""
    try:
        return Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def resident_programs() -> int | None:
    """How many kernel programs JAX's default device runs at once: a GPU's multiprocessors; None off a GPU."""
    import jax

    if jax.default_backend() != "gpu":
        return None
    return getattr(jax.devices()[0], "core_count", None) or 16  # the smallest current GPUs have more


def cpu_multiplies_bfloat16(cpuinfo: str) -> bool:
    """Whether /proc/cpuinfo's text lists AVX-512 BF16 or AMX BF16."""
    return re.search(r"\b(avx512_bf16|amx_bf16)\b", cpuinfo) is not None


def cpu_model(cpuinfo: str) -> str:
    """The CPU's name from /proc/cpuinfo's text, or the little `platform` knows where it lists none."""
    match = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    return match.group(1).strip() if match else (platform.processor() or platform.machine())


def cpu_has_avx512(cpuinfo: str) -> bool:
    """Whether /proc/cpuinfo's text lists AVX-512's foundation instructions."""
    return re.search(r"\bavx512f\b", cpuinfo) is not None


def jaxlib_version() -> tuple[int, ...] | None:
    """The installed jaxlib's (major, minor), read without importing it; None when it has no metadata."""
    try:
        release = importlib.metadata.version("jaxlib").split(".")[:2]
    except importlib.metadata.PackageNotFoundError:
        return None
    return tuple(int("".join(takewhile(str.isdigit, part)) or 0) for part in release)


def xla_flag_names(flags: str) -> set[str]:
    """The options an XLA_FLAGS string sets (`--flag` alone counts: it means true)."""
    return {word.lstrip("-").split("=")[0] for word in flags.split()}


def with_xla_flags(flags: str, defaults: dict[str, str]) -> str:
    """XLA_FLAGS `flags` with each of `defaults` added unless `flags` sets it already (the user's choice stands)."""
    named = xla_flag_names(flags)
    added = [f"--{name}={value}" for name, value in defaults.items() if name not in named]
    return " ".join([flags.strip(), *added]).strip()


def set_xla_flags(single_threaded: bool = False) -> None:
    """Add charrnn's XLA options to XLA_FLAGS; they take effect if JAX has not started its backends yet."""
    flags = dict(CPU_XLA_FLAGS) if jaxlib_version() == CPU_XLA_FLAGS_JAXLIB else {}
    if single_threaded:
        flags["xla_cpu_multi_thread_eigen"] = "false"
    os.environ["XLA_FLAGS"] = with_xla_flags(os.environ.get("XLA_FLAGS", ""), flags)


def configure(platform: str | None = None, threads: int | None = None, compilation_cache: bool = True,
              cpu_device_per_core: bool = False, multi_process: bool = False) -> None:
    """Pick the platform, give the process `threads` CPU cores, and turn on the shared compilation cache.

    `threads` below the cores this process may use pins it to that many, chosen by
    `claim_cores`: runs started side by side on one machine each take cores of
    their own. XLA keeps every core it may use busy, so a run given no such cap
    shares all of them with any other.

    With `cpu_device_per_core`, JAX sees each core this process may use as a CPU
    device of its own, so that training can split its streams over them
    (`distributed.default_device_count` decides whether it does). A platform asked
    for is started at once, so that a missing one is a usage error, except in a
    `multi_process` run, whose backend must not start before jax.distributed does.
    Call it before the first computation (as `--platform` and `--threads` do):

        >>> charrnn.configure(platform="cpu", threads=1)
    """
    set_xla_flags(single_threaded=threads == 1)
    if threads and hasattr(os, "sched_setaffinity"):
        # XLA sizes its CPU thread pool from the cores this process may use (set before jax starts); its
        # concurrent operations keep every one of those busy, whatever its threading options say.
        allowed = sorted(os.sched_getaffinity(0))
        if threads < len(allowed):
            os.sched_setaffinity(0, claim_cores(allowed, threads))
    import jax

    if platform:
        jax.config.update("jax_platforms", platform)
    forced_count = "xla_force_host_platform_device_count" in xla_flag_names(os.environ.get("XLA_FLAGS", ""))
    if cpu_device_per_core and threads != 1 and not forced_count:
        try:
            jax.config.update("jax_num_cpu_devices", usable_cores())
        except RuntimeError:
            pass  # JAX has started already in this process (a library caller's): it keeps its devices
    if compilation_cache and os.environ.get(CACHE_ENV, "x") != "":
        _use_compilation_cache(jax, cache_dir())
    if platform and not multi_process:
        _check_platform(jax, platform)


_CLAIMED_CORES: list = []  # the open lock files of this process's cores: closed only when it exits


def cores_dir() -> Path:
    """Where runs on this machine claim their cores: one lock file per core, per user."""
    return Path(tempfile.gettempdir()) / f"charrnn-{os.getuid()}" / "cores"


def claim_cores(allowed: list[int], count: int) -> list[int]:
    """`count` of the `allowed` cores that no other process of this user has claimed, held until this process ends
    (its lock files close with it, killed or not), so that runs started side by side with `--threads` take cores
    of their own; where fewer are free, or no lock can be taken, the first `count` allowed."""
    import fcntl  # POSIX only, as pinning to cores is

    claimed = []
    try:
        directory = cores_dir()
        directory.mkdir(parents=True, exist_ok=True)
        for core in allowed:
            handle = open(directory / f"{core}.lock", "a")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # another process holds it
                handle.close()
                continue
            claimed.append((core, handle))
            if len(claimed) == count:
                _CLAIMED_CORES.extend(handle for _, handle in claimed)
                return [core for core, _ in claimed]
    except OSError:
        pass
    for _, handle in claimed:
        handle.close()
    return allowed[:count]


def _use_compilation_cache(jax, directory: Path) -> None:
    """Keep compiled programs in `directory`, if it can be written; a cache that fails only costs compile time.

    JAX never replaces an entry whose file exists, so one left empty by a full disk
    or a killed writer would be read, fail and be recompiled by every later run:
    such entries are removed first. JAX warns of each entry it cannot read or
    write; those warnings are silenced, since the only consequence is a compile.
    """
    try:
        probe_writable(directory)
    except OSError:
        return
    for entry in directory.glob("*-cache"):
        with contextlib.suppress(OSError):
            if entry.stat().st_size == 0:
                entry.unlink()
    warnings.filterwarnings("ignore", message="Error (reading|writing) persistent compilation cache entry")
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _check_platform(jax, platform: str) -> None:
    """A usage error, now, for a platform JAX cannot start (--platform gpu with no GPU or no CUDA wheels)."""
    try:
        jax.devices()
    except RuntimeError:
        hint = " (install JAX's CUDA wheels: pip install -e '.[cuda]')" if platform == "gpu" else ""
        raise UsageError(f"--platform {platform}: JAX finds no such device here{hint}") from None
