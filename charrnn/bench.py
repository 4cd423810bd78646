"""Throughput measurement: steady-state training and sampling chars/s, compile time, peak memory."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from charrnn import cells, data, distributed, model, runtime, sample, steps
from charrnn.config import Config
from charrnn.task import TextTask

VOCAB_SIZE = 65  # Tiny Shakespeare's


def _synthetic_ids(num_chars: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB_SIZE, num_chars).astype(np.uint8)


_clock = time.perf_counter  # one name for the tests to replace


def _timed(function) -> float:
    began = _clock()
    function()
    return _clock() - began


class TrainingBench:
    """A compiled train call on synthetic text, ready to be timed call by call.

    The streams are placed on devices as `charrnn train` places them.
    """

    def __init__(self, config: Config, num_devices: int | None = None):
        self.config = config
        train_config = config.train
        self.placement = steps.placement(config, num_devices)
        chars_per_call = train_config.batch_size * train_config.seq_len * train_config.steps_per_call
        ids = _synthetic_ids(chars_per_call * 4 + train_config.seq_len + 1, train_config.seed)
        self.task = TextTask(config, data.Corpus(data.Vocab("".join(map(chr, range(VOCAB_SIZE)))), ids, ids, ""))
        optimizer = steps.make_optimizer(train_config)
        self.call = steps.compile_train_call(self.task.batch_loss, train_config, optimizer, self.placement)
        self.state, self.carry = steps.place(*steps.fresh_state(config, optimizer, self.task.init_params,
                                                                self.task.initial_carry),
                                             self.placement, train_config.batch_size)
        self.lrs = np.full((train_config.steps_per_call,), train_config.lr, np.float32)
        self.step = 0
        self.chars_per_call = chars_per_call

    def run_call(self) -> None:
        train_config = self.config.train
        batches = distributed.put_batches(self.task.batches(self.step, train_config.steps_per_call, slice(None)),
                                          self.placement)
        self.state, self.carry, metrics = self.call(self.state, self.carry, batches, self.lrs)
        self.step += train_config.steps_per_call
        return metrics

    def compile(self) -> float:
        """Compile and warm up; return the compile time."""
        compile_s = _timed(lambda: jax.block_until_ready(self.run_call()))
        jax.block_until_ready(self.run_call())
        return compile_s

    def chars_per_second(self, seconds: float) -> float:
        """Throughput of back-to-back calls over at least `seconds` (see `calls_per_second`)."""
        queued = []  # the metrics of the calls since the last wait

        def wait():
            jax.block_until_ready(queued[-1])  # calls run in order: the last done means all are
            queued.clear()

        return calls_per_second(lambda: queued.append(self.run_call()), wait, seconds) * self.chars_per_call


def calls_per_second(call, wait, seconds: float) -> float:
    """Rate of `call`s queued back to back for at least `seconds`, `wait` returning once all queued are done.

    Calls go out in groups that double (1, 1, 2, 4, ...), each waited for at its
    end to read the clock: the device is never left idle between calls, the
    waits are a handful however long the window, and the window lasts between
    `seconds` and about twice that. (One waited-for call would underrate what
    queued calls achieve, and a count made from it cut the window short.)
    """
    calls, began = 0, _clock()
    while True:
        group = max(1, calls)
        for _ in range(group):
            call()
        wait()
        calls += group
        elapsed = _clock() - began
        if elapsed >= seconds:
            return calls / elapsed


def measure_training(configs: list[Config], repeats: int, seconds: float) -> list[dict[str, Any]]:
    """Each config's compile time and median steady-state training chars/s of `repeats` timed windows.

    The configs take their windows in turn, one window each a round, so that a
    machine whose speed drifts slows every config alike; `train_repeats` lists
    each config's windows in round order, for `ratio_to_first`.
    """
    benches = [TrainingBench(config) for config in configs]
    compile_times = [training.compile() for training in benches]
    rounds = [[training.chars_per_second(seconds) for training in benches] for _ in range(repeats)]
    return [{"compile_s": compile_s, "train_chars_per_s": statistics.median(rates), "train_repeats": rates,
             "train_devices": training.placement.num_devices}
            for training, compile_s, rates in zip(benches, compile_times, map(list, zip(*rounds)), strict=True)]


def ratio_to_first(repeats: list[float], first: list[float]) -> float:
    """The median over rounds of one config's window over the first config's window of the same round."""
    return statistics.median([rate / base for rate, base in zip(repeats, first, strict=True)])


PEAK_MATMUL_SIZE = 1024  # [N, N] x [N, N]: large enough to keep every core at its matmul peak


def measure_matmul_peak(dtype: str, repeats: int, seconds: float = 0.3) -> float:
    """GFLOP/s of back-to-back [N, N] x [N, N] matmuls in `dtype` with float32 sums, as the model's.

    This is the limit a training step's matmuls are measured against: each product
    feeds the next inside one compiled loop, so neither dispatch nor the host counts.
    The best of `repeats` windows, not the median: a limit is what the device can
    do, and a busy machine only ever slows a window down.
    """
    size = PEAK_MATMUL_SIZE
    return measure_matmul(size, size, size, dtype, repeats, seconds)


def measure_matmul(rows: int, inputs: int, outputs: int, dtype: str, repeats: int, seconds: float = 0.3,
                   transposed: bool = False) -> float:
    """GFLOP/s of back-to-back [rows, inputs] x [inputs, outputs] matmuls (`cells.matmul`), as `measure_matmul_peak`
    times its square ones; each product's first `inputs` columns feed the next. `transposed`: the weights held
    as `cells.TransposedWeight`, as generation multiplies."""
    weights = jnp.eye(inputs, outputs, dtype=dtype)  # keeps the values where they are, however many products
    operand = cells.TransposedWeight(weights.T) if transposed else weights

    @jax.jit
    def chain(x, count):
        return jax.lax.fori_loop(0, count, lambda _, y: cells.matmul(y, operand)[:, :inputs].astype(dtype), x)

    x = jnp.ones((rows, inputs), dtype)
    products = 2
    _timed(lambda: jax.block_until_ready(chain(x, products)))  # compiles
    warm = _timed(lambda: jax.block_until_ready(chain(x, products)))
    products = max(1, round(products * seconds / max(warm, 1e-6)))
    fastest = min(_timed(lambda: jax.block_until_ready(chain(x, products))) for _ in range(repeats))
    return 2 * rows * inputs * outputs * products / fastest / 1e9


def train_matmul_flops_per_char(config: Config) -> float:
    """A training step's matmul work (`model.training_matmul_flops`, every member's) per character it trains on."""
    train = config.train
    return train.members * model.training_matmul_flops(config.model, VOCAB_SIZE, train.batch_size, train.seq_len) / (
        train.batch_size * train.seq_len)


def matmul_figures(config: Config, train_chars_per_s: float, peak_gflops: float) -> dict[str, float]:
    """Training's matmul work per character, the rate it ran at and its fraction of the matmul peak."""
    flops_per_char = train_matmul_flops_per_char(config)
    gflops = flops_per_char * train_chars_per_s / 1e9
    return {"train_matmul_mflop_per_char": flops_per_char / 1e6, "train_matmul_gflops": gflops,
            "matmul_peak_gflops": peak_gflops, "train_fraction_of_matmul_peak": gflops / peak_gflops}


def measure_sampling(config: Config, batch_size: int, length: int, repeats: int) -> float:
    """Median chars/s (all streams together) of generating `length` characters per stream."""
    params = model.init_params(jax.random.key(0), config.model, VOCAB_SIZE)
    prime = np.array([0], np.int32)

    def run():
        for block in sample.generate((params,), (config.model,), prime, length, batch_size, 0, 0.8):
            pass
        return block

    run()  # compile
    times = [_timed(run) for _ in range(repeats)]
    return batch_size * length / statistics.median(times)


def benchmark(config: Config, repeats: int = 5, seconds: float = 2.0, sample_length: int = 1024) -> dict[str, Any]:
    """Everything `charrnn bench` reports for one model configuration."""
    result = {"backend": jax.default_backend(), "device": str(jax.devices()[0]),
              **measure_training([config], repeats, seconds)[0]}
    result.update(matmul_figures(config, result["train_chars_per_s"], measure_matmul_peak(model.matmul_dtype(config.model), repeats)))
    result["sample_chars_per_s_b1"] = measure_sampling(config, 1, sample_length, repeats)
    result["sample_chars_per_s_b64"] = measure_sampling(config, 64, sample_length, repeats)
    result["peak_rss_mb"] = runtime.peak_rss_mb()
    return result


def _write_corpus(path: Path, size_mb: float, seed_text: str) -> None:
    """A corpus of `size_mb` MB (10^6 bytes, to the character) made of repeats of `seed_text`."""
    block = seed_text.encode("utf-8")
    remaining = round(size_mb * 1e6)
    with open(path, "wb") as file:
        while remaining >= len(block):
            file.write(block)
            remaining -= len(block)
        file.write(block[:remaining].decode("utf-8", errors="ignore").encode("utf-8"))  # whole characters only


def _peak_rss_of_training(corpus: Path, run_dir: Path) -> float:
    """Peak RSS (MB) of a 3-step training run of a small model in a fresh process."""
    command = [sys.executable, "-m", "charrnn", "train", str(corpus), "--out", str(run_dir), "--quiet",
               "--layers", "1", "--hidden", "32", "--embedding", "16", "--steps", "3", "--minutes", "0",
               "--set", "train.eval_batch_size=64"]
    # No compilation cache: both runs compile, so they differ only by the corpus.
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, runtime.CACHE_ENV: ""})
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "training failed")
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_mb"]


BASELINE_CORPUS_MB = 1.0


def measure_corpus_memory(size_mb: float, seed_text: str) -> dict[str, float]:
    """Peak memory of training on a `size_mb` MB corpus, against the same run on a 1 MB one.

    The difference is what the corpus costs beyond the baseline's; it should stay
    under twice the difference in file size.
    """
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        _write_corpus(scratch / "small.txt", BASELINE_CORPUS_MB, seed_text)
        _write_corpus(scratch / "large.txt", size_mb, seed_text)
        baseline = _peak_rss_of_training(scratch / "small.txt", scratch / "run-small")
        peak = _peak_rss_of_training(scratch / "large.txt", scratch / "run-large")
        file_mb = (scratch / "large.txt").stat().st_size / 1e6
    return {"corpus_mb": file_mb, "corpus_peak_rss_mb": peak, "baseline_peak_rss_mb": baseline,
            "corpus_overhead_x_file": (peak - baseline) / (file_mb - BASELINE_CORPUS_MB)}
