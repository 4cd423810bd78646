"""`charrnn bench`: training and sampling throughput, compile time and memory of a model."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Optional

import typer

from charrnn.cli.common import RUN, JsonOption, PlatformOption, ThreadsOption, app, err_console, setup
from charrnn.errors import UsageError
from charrnn.rundir import strict_json

MAX_WINDOW_S = 3600.0  # bench's timed windows: an hour each is already more than any measurement needs
MAX_CORPUS_MB = 100_000.0  # 100 GB: what a disk can hold for the memory measurement, and more than RAM


@app.command("bench")
def benchmark(
    config_file: Annotated[Optional[Path], typer.Option("--config", exists=True, dir_okay=False, help="TOML config of the model to measure.", rich_help_panel=RUN)] = None,
    assignments: Annotated[Optional[list[str]], typer.Option("--set", help="Override a config key (repeatable).", rich_help_panel=RUN)] = None,
    repeats: Annotated[int, typer.Option("--repeats", min=1, help="Timed windows; the median is reported.")] = 5,
    seconds: Annotated[float, typer.Option("--seconds", min=0.1, help="Length of each timed training window.")] = 2.0,
    corpus_mb: Annotated[float, typer.Option("--corpus-mb", min=0, help="Also measure peak memory of training on a corpus this large (0 = skip).")] = 0,
    versus: Annotated[Optional[list[str]], typer.Option("--versus", metavar="'KEY=VALUE ...'", help="Time training only, of the config and of the config with these space-separated overrides, their windows taken in turn; each variant's ratio is the median over rounds of its window over the config's (repeatable).")] = None,
    json_output: JsonOption = False,
    threads: ThreadsOption = None,
    platform: PlatformOption = None,
) -> None:
    """Measure training and sampling throughput (chars/s), compile time and memory of a model.

    With --versus, compare the training speed of variants of it instead, side by side.
    """
    from charrnn import config as config_lib

    config = config_lib.resolve(config_file, assignments or [], {})
    variants = [config_lib.resolve(config, variant.split(), {}) for variant in versus or []]
    if variants and corpus_mb:
        raise UsageError("--versus times training only; measure memory (--corpus-mb) in a run of its own")
    if any(measured.model.kind != "lm" for measured in [config, *variants]):
        raise UsageError("bench measures language models (model.kind = lm); time an encoder–decoder with "
                         "charrnn train, whose summary gives train_chars_per_s")
    if not math.isfinite(seconds) or seconds > MAX_WINDOW_S:
        raise UsageError(f"--seconds must be at most {MAX_WINDOW_S:g}, got {seconds}")
    from charrnn import bench as benchmarks, data

    if corpus_mb and not (2 * benchmarks.BASELINE_CORPUS_MB <= corpus_mb <= MAX_CORPUS_MB):
        raise UsageError(f"--corpus-mb must be at least twice the {benchmarks.BASELINE_CORPUS_MB:g} MB baseline and "
                         f"at most {MAX_CORPUS_MB:g}, got {corpus_mb}")
    # Training is measured as `charrnn train` runs it, but without the compilation cache: a
    # compile time read back from it would be the time to load a cached program.
    setup(platform, threads, cpu_device_per_core=True, compilation_cache=False)

    err_console.print(f"measuring {config.model.cell} {config.model.num_layers}x{config.model.hidden_size}, "
                      f"batch {config.train.batch_size}, seq {config.train.seq_len} ...")
    if config.train.larger_model:
        versus_options = " ".join(f"--versus '{text}'" for text, _ in config_lib.larger_model_overrides(config.train))
        err_console.print(f"train.larger_model is not measured here (train times it first): {versus_options} "
                          f"times it beside this model")
    if variants:
        _compare(benchmarks, [config, *variants], [None, *versus], repeats, seconds, json_output)
        return
    result = benchmarks.benchmark(config, repeats, seconds)
    if corpus_mb:
        result.update(benchmarks.measure_corpus_memory(corpus_mb, data.default_corpus().read_text(encoding="utf-8")))
    if json_output:
        print(strict_json(result))
        return
    width = max(len(key) for key in result)
    for key, value in result.items():
        shown = f"{value:,.2f}" if isinstance(value, float) else value
        print(f"{key:{width}} {shown}")


def _compare(benchmarks, configs: list, names: list[str | None], repeats: int, seconds: float, json_output: bool) -> None:
    """Training chars/s of each config, its windows alternating with the others', and its ratio to the first
    (named None: the config itself)."""
    results = benchmarks.measure_training(configs, repeats, seconds)
    for name, result in zip(names, results, strict=True):
        result["train_ratio"] = benchmarks.ratio_to_first(result["train_repeats"], results[0]["train_repeats"])
        result["versus"] = name
    if json_output:
        print(strict_json({"variants": results}))
        return
    shown = [name or "(the config)" for name in names]
    width = max(len(name) for name in shown)
    print(f"{'variant':{width}}  train chars/s  ratio  windows")
    for name, result in zip(shown, results, strict=True):
        windows = " ".join(f"{rate:,.0f}" for rate in result["train_repeats"])
        print(f"{name:{width}}  {result['train_chars_per_s']:13,.0f}  {result['train_ratio']:5.3f}  {windows}")
