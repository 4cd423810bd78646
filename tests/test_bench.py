"""`charrnn bench`: what --json reports, and the arithmetic behind the matmul figures."""

import json
import subprocess
import sys

import numpy as np
import pytest
from clihelp import TINY, run_in_process, run_subprocess

from charrnn import bench, cells, config as config_lib, model, runtime

ISSUE_KEYS = {"train_chars_per_s", "sample_chars_per_s_b1", "sample_chars_per_s_b64", "compile_s", "peak_rss_mb"}


def test_bench_json_reports_throughputs_and_the_fraction_of_the_matmul_peak(capsys):
    result = run_in_process(capsys, "bench", "--config", TINY, "--repeats", "1", "--seconds", "0.2", "--json")
    assert result.code == 0, result.err
    figures = json.loads(result.out)
    assert ISSUE_KEYS <= set(figures)
    assert all(figures[key] > 0 for key in ISSUE_KEYS)

    config = config_lib.resolve(TINY, [], {})
    chars_per_step = config.train.batch_size * config.train.seq_len
    flops_per_char = model.training_matmul_flops(config.model, bench.VOCAB_SIZE, config.train.batch_size,
                                                 config.train.seq_len) / chars_per_step
    assert figures["train_matmul_mflop_per_char"] == pytest.approx(flops_per_char / 1e6)
    assert figures["train_matmul_gflops"] == pytest.approx(flops_per_char * figures["train_chars_per_s"] / 1e9)
    assert figures["matmul_peak_gflops"] > 0
    assert figures["train_fraction_of_matmul_peak"] == pytest.approx(
        figures["train_matmul_gflops"] / figures["matmul_peak_gflops"])


def test_bench_table_lists_every_figure(capsys):
    result = run_in_process(capsys, "bench", "--config", TINY, "--repeats", "1", "--seconds", "0.2")
    assert result.code == 0, result.err
    names = [line.split()[0] for line in result.out.splitlines()]
    assert ISSUE_KEYS | {"train_fraction_of_matmul_peak"} <= set(names)


def test_matmul_peak_counts_the_products_it_times_and_keeps_the_fastest_window(monkeypatch):
    """With a clock that says 0.1 s for the calibration call, 0.3 s windows hold 6 products of 2 N³ each."""
    windows = iter([0.1, 0.1, 0.5, 0.25, 0.4])  # compile, warm, then three timed windows
    monkeypatch.setattr(bench, "_timed", lambda function: (function(), next(windows))[1])
    monkeypatch.setattr(bench, "PEAK_MATMUL_SIZE", 32)
    peak = bench.measure_matmul_peak("float32", repeats=3, seconds=0.3)
    assert peak == pytest.approx(2 * 32**3 * 6 / 0.25 / 1e9)


@pytest.mark.parametrize("transposed", [False, True])
def test_matmul_of_one_shape_counts_its_own_products(monkeypatch, transposed):
    """The same clock: 6 products of [3, 4] x [4, 8], 2 * 3 * 4 * 8 FLOPs each, in the fastest 0.25 s window,
    multiplied by the weights in the form asked for."""
    windows = iter([0.1, 0.1, 0.5, 0.25, 0.4])
    monkeypatch.setattr(bench, "_timed", lambda function: (function(), next(windows))[1])
    forms = []
    monkeypatch.setattr(cells, "matmul", lambda x, w, original=cells.matmul:
                        forms.append(isinstance(w, cells.TransposedWeight)) or original(x, w))
    rate = bench.measure_matmul(3, 4, 8, "float32", repeats=3, seconds=0.3, transposed=transposed)
    assert rate == pytest.approx(2 * 3 * 4 * 8 * 6 / 0.25 / 1e9)
    assert forms and set(forms) == {transposed}


def test_training_chars_per_s_counts_every_character_of_every_call_in_a_window_of_at_least_the_seconds(monkeypatch):
    """Calls of 0.125 s in doubling groups (1, 1, 2): 4 calls reach a 0.5 s window; each trains B x T x K characters."""
    now = [0.0]
    monkeypatch.setattr(bench, "_clock", lambda: now[0])
    config = config_lib.resolve(TINY, ["train.steps_per_call=3"], {})
    training = bench.TrainingBench(config)
    calls = []

    def run_call():  # the arithmetic, not the train step, is under test
        calls.append(1)
        now[0] += 0.125

    training.run_call = run_call
    rate = training.chars_per_second(0.5)
    assert len(calls) == 4
    assert rate == pytest.approx(4 * config.train.batch_size * config.train.seq_len * 3 / 0.5)
    calls.clear()
    rate = training.chars_per_second(0.51)  # just past 4 calls: the next group doubles to 8
    assert len(calls) == 8
    assert rate == pytest.approx(8 * config.train.batch_size * config.train.seq_len * 3 / 1.0)  # over the 1 s taken


def test_each_timed_call_trains_on_the_next_steps_of_the_text_as_a_run_does():
    config = config_lib.resolve(TINY, ["train.steps_per_call=3"], {})
    training = bench.TrainingBench(config)
    fed = []

    def call(state, carry, batches, lrs):  # what each call is given, not the train step, is under test
        fed.append(np.asarray(batches.inputs))
        return state, carry, None

    training.call = call
    for _ in range(3):
        training.run_call()
    for inputs, step in zip(fed, (0, 3, 6), strict=True):  # chunk k + 1 of each stream continues chunk k
        np.testing.assert_array_equal(inputs, training.task.batches(step, 3, slice(None)).inputs)
    assert not np.array_equal(fed[0], fed[1])


def test_versus_takes_the_variants_windows_in_turn_and_reports_the_median_ratio_of_each_round(capsys, monkeypatch):
    """Ratios of each round 1.5, 2.0, 1.0: the median is 1.5, where the ratio of the medians would be 1.25."""
    windows = {16: iter([100.0, 50.0, 80.0]), 12: iter([150.0, 100.0, 80.0])}
    order = []

    def chars_per_second(self, seconds):
        order.append(self.config.model.hidden_size)
        return next(windows[self.config.model.hidden_size])

    monkeypatch.setattr(bench.TrainingBench, "compile", lambda self: 0.0)
    monkeypatch.setattr(bench.TrainingBench, "chars_per_second", chars_per_second)
    result = run_in_process(capsys, "bench", "--config", TINY, "--set", "model.hidden_size=16", "--repeats", "3",
                            "--versus", "model.hidden_size=12", "--json")
    assert result.code == 0, result.err
    assert order == [16, 12, 16, 12, 16, 12]
    first, variant = json.loads(result.out)["variants"]
    assert (first["versus"], first["train_repeats"], first["train_ratio"]) == (None, [100.0, 50.0, 80.0], 1.0)
    assert (variant["versus"], variant["train_repeats"]) == ("model.hidden_size=12", [150.0, 100.0, 80.0])
    assert variant["train_chars_per_s"] == 100.0
    assert variant["train_ratio"] == pytest.approx(1.5)


def test_the_ratio_to_the_first_is_the_median_of_each_rounds_ratio():
    """Rounds whose ratios are 1, 1 and 4: the median is 1, where the mean would be 2."""
    assert bench.ratio_to_first([100.0, 60.0, 400.0], [100.0, 60.0, 100.0]) == 1.0


def test_the_matmul_work_per_character_counts_every_member():
    one, three = (config_lib.resolve(TINY, [f"train.members={count}"], {}) for count in (1, 3))
    assert bench.train_matmul_flops_per_char(three) == pytest.approx(3 * bench.train_matmul_flops_per_char(one))


def test_corpus_memory_is_the_peak_over_the_baseline_per_megabyte_beyond_it(monkeypatch):
    """Peaks of 300 MB on the 1 MB corpus and 345 MB on a 4 MB one: 45 MB more for 3 MB more, 15x the file."""
    monkeypatch.setattr(bench, "_peak_rss_of_training", lambda corpus, run_dir: {"small.txt": 300.0,
                                                                                  "large.txt": 345.0}[corpus.name])
    figures = bench.measure_corpus_memory(4.0, "abc\n" * 1000)
    assert figures == {"corpus_mb": 4.0, "corpus_peak_rss_mb": 345.0, "baseline_peak_rss_mb": 300.0,
                       "corpus_overhead_x_file": pytest.approx(15.0)}


def test_the_benchmark_samples_one_stream_and_sixty_four_and_takes_the_peak_in_the_models_dtype(monkeypatch):
    peaks = []
    monkeypatch.setattr(bench, "measure_training", lambda configs, repeats, seconds: [{"train_chars_per_s": 1.0}])
    monkeypatch.setattr(bench, "measure_matmul_peak", lambda dtype, repeats: peaks.append(dtype) or 2.0)
    monkeypatch.setattr(bench, "measure_sampling",
                        lambda config, batch_size, length, repeats: 1000.0 * batch_size + length)
    result = bench.benchmark(config_lib.resolve(TINY, ["model.dtype=bfloat16"], {}), repeats=1, sample_length=7)
    assert (result["sample_chars_per_s_b1"], result["sample_chars_per_s_b64"]) == (1007.0, 64007.0)
    assert peaks == ["bfloat16"]


def test_the_memory_runs_compile_afresh_in_a_process_of_their_own(monkeypatch, tmp_path):
    """Without the compilation cache both runs compile, so they differ only by the corpus."""
    runs = []

    def run(command, env, **kwargs):
        runs.append((command, env))
        return subprocess.CompletedProcess(command, 0, stdout='{"peak_rss_mb": 123.0}\n', stderr="")

    monkeypatch.setenv(runtime.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(bench.subprocess, "run", run)
    assert bench._peak_rss_of_training(tmp_path / "corpus.txt", tmp_path / "run") == 123.0
    ((command, env),) = runs
    assert command[:4] == [sys.executable, "-m", "charrnn", "train"] and env[runtime.CACHE_ENV] == ""


@pytest.mark.parametrize("args", [["--versus", "model.no_such_key=1"], ["--versus", "model.kind=seq2seq"],
                                  ["--versus", "model.hidden_size=12", "--corpus-mb", "10"]])
def test_versus_refuses_what_it_cannot_time_in_one_line(capsys, args):
    result = run_in_process(capsys, "bench", "--config", TINY, *args)
    assert result.code == 2
    assert result.out == ""
    assert len(result.err.strip().splitlines()) == 1, result.err


def test_bench_compiles_rather_than_reading_the_compilation_cache(tmp_path):
    """compile_s is a compile: with a cache, a second bench would report the time to load the program."""
    cache = tmp_path / "cache"
    result = run_subprocess("bench", "--config", TINY, "--repeats", "1", "--seconds", "0.1", "--json", cwd=tmp_path,
                            **{runtime.CACHE_ENV: str(cache)})
    assert result.code == 0, result.err
    assert not cache.exists() or not any(cache.iterdir())


@pytest.mark.parametrize("size_mb", [1.5, 2.0000005])
def test_the_memory_corpus_is_the_size_asked_for_in_whole_characters(tmp_path, size_mb):
    path = tmp_path / "corpus.txt"
    bench._write_corpus(path, size_mb, "naïve café — 🙂\n" * 1000)
    size = path.stat().st_size
    assert round(size_mb * 1e6) - 4 < size <= round(size_mb * 1e6)  # cut before a character that would not fit
    path.read_text(encoding="utf-8")  # whole characters only


def test_sampling_chars_per_s_counts_every_stream_and_takes_the_median_window(monkeypatch):
    """3 streams of 10 characters in windows of 0.5, 0.1 and 0.4 s: 30 characters per median 0.4 s."""
    windows = iter([0.5, 0.1, 0.4])  # median, mean and fastest all differ
    monkeypatch.setattr(bench, "_timed", lambda function: (function(), next(windows))[1])
    config = config_lib.resolve(TINY, [], {})
    assert bench.measure_sampling(config, batch_size=3, length=10, repeats=3) == pytest.approx(3 * 10 / 0.4)


def test_a_larger_model_is_named_with_the_versus_that_times_it(capsys, monkeypatch):
    """bench measures the model as given; the line it prints about `train.larger_model` gives a --versus that works."""
    monkeypatch.setattr(bench.TrainingBench, "compile", lambda self: 0.0)
    monkeypatch.setattr(bench.TrainingBench, "chars_per_second", lambda self, seconds: float(self.config.model.num_layers))
    larger = "model.num_layers=3"
    given = ["bench", "--config", TINY, "--set", f"train.larger_model={larger}", "--repeats", "1", "--json"]
    result = run_in_process(capsys, *given, "--versus", "model.hidden_size=12")
    assert result.code == 0, result.err
    suggested = result.err.split("--versus '")[1].split("'")[0]
    assert suggested == larger

    timed = run_in_process(capsys, *given, "--versus", suggested)
    first, variant = json.loads(timed.out)["variants"]
    assert (first["train_chars_per_s"], variant["train_chars_per_s"]) == (2.0, 3.0)  # TINY's two layers, then three


def test_the_window_and_repeats_asked_for_reach_the_benchmark(capsys, monkeypatch):
    asked = []
    monkeypatch.setattr(bench, "benchmark", lambda config, repeats, seconds: asked.append((repeats, seconds)) or {"x": 1.0})
    result = run_in_process(capsys, "bench", "--config", TINY, "--repeats", "3", "--seconds", "0.25")
    assert result.code == 0, result.err
    assert asked == [(3, 0.25)] and result.out == "x 1.00\n"
