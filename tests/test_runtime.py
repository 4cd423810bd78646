"""Process-wide settings: the XLA options charrnn adds, and that XLA accepts them."""

import importlib.metadata
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

from charrnn import runtime
from clihelp import subprocess_env


def test_xla_flags_are_added_and_a_users_own_value_stands():
    flags = runtime.with_xla_flags(" --xla_cpu_prefer_vector_width=256 --other=1 ", runtime.CPU_XLA_FLAGS)
    assert flags.split() == ["--xla_cpu_prefer_vector_width=256", "--other=1",
                             "--xla_cpu_copy_insertion_use_region_analysis=true"]
    assert runtime.with_xla_flags("", {}) == ""
    assert runtime.with_xla_flags("--xla_cpu_multi_thread_eigen", {"xla_cpu_multi_thread_eigen": "false"}) == (
        "--xla_cpu_multi_thread_eigen")  # a bare flag is set to true


def test_configure_sets_the_flags_and_xla_starts_with_them():
    script = ("import os; from charrnn import runtime; runtime.configure(threads=1, compilation_cache=False); "
              "import jax.numpy as jnp; assert float(jnp.tanh(jnp.ones(3)).sum()) > 2; print(os.environ['XLA_FLAGS'])")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=subprocess_env(XLA_FLAGS=""),
                          timeout=120)
    assert done.returncode == 0, done.stderr  # XLA aborts at start on a flag it does not know
    flags = done.stdout.split()
    assert "--xla_cpu_multi_thread_eigen=false" in flags
    if runtime.jaxlib_version() == runtime.CPU_XLA_FLAGS_JAXLIB:
        assert {f"--{name}={value}" for name, value in runtime.CPU_XLA_FLAGS.items()} <= set(flags)


def test_importing_charrnn_adds_the_flags_before_jax_starts():
    """A library caller who never calls `configure` compiles with the options the command line uses."""
    script = ("import os, charrnn; import jax.numpy as jnp; assert float(jnp.ones(3).sum()) == 3; "
              "print(os.environ['XLA_FLAGS'])")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env=subprocess_env(XLA_FLAGS="--xla_cpu_prefer_vector_width=256"))
    assert done.returncode == 0, done.stderr
    flags = done.stdout.split()
    assert "--xla_cpu_prefer_vector_width=256" in flags and "--xla_cpu_prefer_vector_width=512" not in flags
    if runtime.jaxlib_version() == runtime.CPU_XLA_FLAGS_JAXLIB:  # the caller's own value stands, the rest is added
        assert "--xla_cpu_copy_insertion_use_region_analysis=true" in flags


def test_a_damaged_compilation_cache_costs_only_compile_time(small_corpus, tmp_path):
    """Entries left empty (full disk, killed writer) or corrupted: runs stay quiet, and empty ones are replaced."""
    from clihelp import TINY, run_subprocess

    cache = tmp_path / "cache"
    args = ["train", small_corpus, "--config", TINY, "--steps", "2", "--quiet"]
    first = run_subprocess(*args, "--out", "first", cwd=tmp_path, **{runtime.CACHE_ENV: str(cache)})
    assert first.code == 0, first.err
    entries = sorted(cache.glob("*-cache"))
    assert len(entries) >= 2
    entries[0].write_bytes(b"")
    for entry in entries[1:]:
        entry.write_bytes(b"not a compiled program")

    second = run_subprocess(*args, "--out", "second", cwd=tmp_path, **{runtime.CACHE_ENV: str(cache)})
    assert second.code == 0, second.err
    assert second.err == ""  # --quiet: nothing but errors, and a bad cache entry is none
    assert entries[0].stat().st_size > 0  # compiled again and written back


def test_the_cpu_model_is_read_from_its_own_line(monkeypatch):
    cpuinfo = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13 \nflags\t\t: fpu\n"
    assert runtime.cpu_model(cpuinfo) == "AMD EPYC 7B13"
    monkeypatch.setattr("platform.processor", lambda: "")
    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    assert runtime.cpu_model("flags\t\t: fpu model name\n") == "x86_64"


def test_peak_memory_is_the_kernels_high_water_mark_in_mib():
    status = Path("/proc/self/status")
    if not status.exists():
        pytest.skip("no /proc")
    high_water_kib = int(re.search(r"^VmHWM:\s*(\d+) kB", status.read_text(), re.MULTILINE).group(1))
    assert runtime.peak_rss_mb() == pytest.approx(high_water_kib / 1024, rel=0.005)


def test_the_cache_lives_where_it_is_asked_for_or_under_the_users_cache(monkeypatch, tmp_path):
    monkeypatch.delenv(runtime.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert runtime.cache_dir() == tmp_path / "charrnn" / "jax"
    monkeypatch.setenv(runtime.CACHE_ENV, str(tmp_path / "shared"))
    assert runtime.cache_dir() == tmp_path / "shared"


@pytest.mark.parametrize("version, expected", [("0.10.2", (0, 10)), ("0.4.36.dev20241231", (0, 4)),
                                               ("1.0rc1", (1, 0))])
def test_the_jaxlib_release_is_its_major_and_minor_number(monkeypatch, version, expected):
    monkeypatch.setattr(importlib.metadata, "version", lambda name: version)
    assert runtime.jaxlib_version() == expected


class AffinityAndConfig:
    """Stand-ins for the calls `configure` makes to the OS and to jax.config, which record them."""

    def __init__(self, monkeypatch, cores: list[int]):
        import jax

        self.cores, self.calls = cores, []
        monkeypatch.setenv("XLA_FLAGS", "")
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(self.cores))
        monkeypatch.setattr(os, "sched_setaffinity", self.pin)
        monkeypatch.setattr(jax.config, "update", lambda name, value: self.calls.append((name, value)))

    def pin(self, pid, cores):
        self.cores = list(cores)
        self.calls.append(("affinity", self.cores))


@pytest.fixture
def own_claims(monkeypatch, tmp_path):
    """Cores claimed in a directory of the test's own, each claim's lock released at the end."""
    held = []
    monkeypatch.setattr(runtime, "cores_dir", lambda: tmp_path / "cores")
    monkeypatch.setattr(runtime, "_CLAIMED_CORES", held)
    yield held
    for handle in held:
        handle.close()


@pytest.mark.parametrize("threads, expected", [
    (None, [("jax_num_cpu_devices", 4)]),
    (1, [("affinity", [3])]),  # one core: not split into devices
    (2, [("affinity", [3, 5]), ("jax_num_cpu_devices", 2)]),  # the first `threads` cores free
    (4, [("jax_num_cpu_devices", 4)]),  # all it may use: nothing to pin
])
def test_configure_pins_threads_to_cores_and_makes_a_device_per_core(monkeypatch, own_claims, threads, expected):
    recorded = AffinityAndConfig(monkeypatch, [3, 5, 8, 9])
    runtime.configure(threads=threads, compilation_cache=False, cpu_device_per_core=True)
    assert recorded.calls == expected


def test_runs_side_by_side_claim_cores_of_their_own_until_they_end(own_claims):
    allowed = [3, 5, 8]
    assert runtime.claim_cores(allowed, 1) == [3]
    assert runtime.claim_cores(allowed, 1) == [5]  # 3 is held
    assert runtime.claim_cores(allowed, 2) == [3, 5]  # one free core is not two: the first two, and 8 stays free
    assert runtime.claim_cores(allowed, 1) == [8]
    assert runtime.claim_cores(allowed, 1) == [3]  # none free: the first
    assert len(own_claims) == 3
    own_claims.pop(0).close()  # the run on core 3 ends
    assert runtime.claim_cores(allowed, 1) == [3]


def test_a_core_is_claimed_across_processes_and_freed_when_its_process_is_killed(tmp_path):
    if runtime.usable_cores() < 2 or not hasattr(os, "sched_setaffinity"):
        pytest.skip("needs two cores and an OS that pins processes to them")
    script = ("import os; from charrnn import runtime; runtime.configure(threads=1, compilation_cache=False); "
              "print(*os.sched_getaffinity(0), flush=True); input()")
    env = subprocess_env(TMPDIR=str(tmp_path))  # where `tempfile` and so the claims live

    def start():
        process = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   text=True, env=env)
        return process, [int(core) for core in process.stdout.readline().split()]

    started = []
    try:
        for _ in range(2):
            started.append(start())
        (first, first_cores), (_, second_cores) = started
        assert len(first_cores) == len(second_cores) == 1 and first_cores != second_cores
        first.kill()
        first.wait(timeout=60)
        started.append(start())
        assert started[-1][1] == first_cores  # the killed run's core is free again
    finally:
        for process, _ in started:
            process.kill()
            process.wait(timeout=60)


def test_resident_programs_are_the_gpus_multiprocessors(monkeypatch):
    import jax

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax, "devices", lambda: [types.SimpleNamespace(core_count=132)])
    assert runtime.resident_programs() == 132
    monkeypatch.setattr(jax, "devices", lambda: [types.SimpleNamespace()])  # a jaxlib that does not say
    assert runtime.resident_programs() == 16
