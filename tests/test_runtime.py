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
