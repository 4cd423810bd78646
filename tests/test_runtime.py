"""Process-wide settings: the XLA options charrnn adds, and that XLA accepts them."""

import subprocess
import sys

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
