"""Shared test settings: strict shapes, and small corpora made on the fly."""

import atexit
import itertools
import os
import shutil
import tempfile

import jax
import pytest
from clihelp import QUICK_COMPILES

from charrnn import runtime

# One compilation cache for the whole session (subprocesses included), away from the user's, removed at the end.
if "CHARRNN_CACHE_DIR" not in os.environ:
    os.environ["CHARRNN_CACHE_DIR"] = tempfile.mkdtemp(prefix="charrnn-test-cache-")
    atexit.register(shutil.rmtree, os.environ["CHARRNN_CACHE_DIR"], ignore_errors=True)
# The XLA options and the cache `charrnn` runs with, in this process too: in-process runs compare bit for bit
# with subprocess ones, and library calls (`charrnn.train`) load the programs other tests compiled.
runtime.configure()
os.environ["XLA_FLAGS"] = runtime.with_xla_flags(os.environ["XLA_FLAGS"], QUICK_COMPILES)

# Implicit rank broadcasting hides shape bugs; every broadcast in charrnn is explicit.
jax.config.update("jax_numpy_rank_promotion", "raise")

SAMPLE_TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "All:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n\n"
    "All:\nResolved. resolved.\n\n"
)


@pytest.fixture
def pallas_interpreted(monkeypatch):
    """Off a GPU, models that ask for the Pallas kernels (`model.kernel = "pallas"`) get them, interpreted."""
    from charrnn import model  # imported once the XLA flags above are set

    monkeypatch.setattr(model, "fuses_layers", lambda config: config.kernel == "pallas")


@pytest.fixture
def small_corpus(tmp_path):
    """A few kilobytes of dialogue in a temp file."""
    path = tmp_path / "corpus.txt"
    path.write_text(SAMPLE_TEXT * 40, encoding="utf-8")
    return path


@pytest.fixture
def reversal_pairs(tmp_path):
    """A pairs file of every four-letter word over "abc" and its reverse: 81 pairs, enough for a validation split."""
    path = tmp_path / "pairs.tsv"
    words = ["".join(letters) for letters in itertools.product("abc", repeat=4)]
    path.write_text("".join(f"{word}\t{word[::-1]}\n" for word in words), encoding="utf-8")
    return path


@pytest.fixture
def cli(capsys, tmp_path, monkeypatch):
    """Run `charrnn ARGS...` in this process, in tmp_path; returns (code, out, err)."""
    from clihelp import run_in_process

    monkeypatch.chdir(tmp_path)
    return lambda *args: run_in_process(capsys, *args)
