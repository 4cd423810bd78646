"""The model a run's budget can train: a `train.larger_model` alternative where its run, timed first, ends within
`train.max_minutes`.

A larger model learns more from each pass over the text but takes longer over
each; on a machine fast enough for all of the run's passes (`train.max_epochs`)
it ends lower, on a slower one it is cut short by the clock and ends higher
(benchmarks/README.md, "A third layer"). Two members scoring together
(`train.members`) end lower still after fewer passes each, where those fit. So
before a new run starts, a few compiled steps of each alternative are timed on
synthetic text, and the run trains the first whose predicted run fits the
budget, or its first `train.fit_epochs` passes do where the key is set (two
members gain from every pass the clock gives them: they then train on to their
cap or the clock). The timing counts against the budget.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, NamedTuple

import jax

from charrnn import bench, config as config_lib, steps
from charrnn.config import Config, TrainConfig
from charrnn.errors import UsageError

PROBE_SECONDS = 2.0  # the timed window of compiled calls: `bench.calls_per_second` runs it for 2–4 s
# A run's share of wall time outside its steps (validation passes, checkpoints, compiling), with room to spare
# (benchmarks/README, "The recipe picks its size").
OVERHEAD = 0.05


class Choice(NamedTuple):
    config: Config  # what the run trains, `train.larger_model` cleared
    elapsed_s: float  # wall time the choice took, the run's first seconds
    note: str  # the choice in a line, for the run's log ("" where there was none to make)


def predicted_s(elapsed_s: float, steps_left: int, seconds_per_step: float) -> float:
    """When a run `elapsed_s` in, with `steps_left` steps to take, ends: its steps and the overhead of evaluating
    and saving."""
    return elapsed_s + steps_left * seconds_per_step / (1.0 - OVERHEAD)


def seconds_per_step(config: Config, devices: int | None) -> float:
    """A training step's steady wall time for `config`, on the devices a run of it would use."""
    probe = bench.TrainingBench(config, devices)
    probe.compile()
    return probe.chars_per_call / probe.chars_per_second(PROBE_SECONDS) / config.train.steps_per_call


def steps_to_fit(train: TrainConfig, steps_per_epoch: int) -> tuple[int, str]:
    """The steps of a run that must fit its budget for it to be chosen, and how the run's log names them: its first
    `train.fit_epochs` passes (the run goes on to its end or the clock), else the whole run, as where it has no
    more passes than those (an `--epochs` given below the recipe's)."""
    if not train.fit_epochs or (train.max_epochs and train.fit_epochs >= train.max_epochs):
        return steps.last_step(train, steps_per_epoch), ""
    return (steps.last_step(dataclasses.replace(train, max_epochs=train.fit_epochs), steps_per_epoch),
            f"its first {train.fit_epochs:g} passes, ")


def choose(config: Config, steps_per_epoch: int, time_step: Callable[[Config], float],
           runs_here: Callable[[Config], object] = lambda config: None) -> Choice:
    """The model a new run trains: the first of `config`'s `train.larger_model` alternatives whose run fits the
    budget, timed in turn, or `config`'s own where none does.

    `time_step(config)` times a training step of a config (`seconds_per_step`); `runs_here(config)` raises
    UsageError for one this run cannot train (`steps.placement`), which is passed over.
    """
    given = config_lib.apply_overrides(config, {"train": {"larger_model": ""}})
    alternatives = [larger for larger in config_lib.larger_models(config) if larger.config != given]
    if not alternatives:  # nothing to choose between
        return Choice(given, 0.0, "")
    named = f"train.larger_model ({config.train.larger_model})"
    if jax.process_count() > 1:
        return Choice(given, 0.0, f"{named}: a run of several processes trains the model as given")
    budget_s = config.train.max_minutes * 60.0
    began, notes = time.monotonic(), []
    step_times: dict[Config, float] = {}  # a step takes as long however many passes the run takes
    for larger in alternatives:
        label = "" if len(alternatives) == 1 else f"{larger.text!r}: "
        try:
            runs_here(larger.config)
        except UsageError as error:  # e.g. several members on a run given several devices: the others may run
            notes.append(f"{label}cannot run here ({error})")
            continue
        if not budget_s:
            return Choice(larger.config, 0.0, f"{named}: {'; '.join(notes + [label + 'no wall-clock budget to miss'])}"
                                              f", so training it")
        timed = config_lib.apply_overrides(larger.config, {"train": {"max_epochs": 0.0, "fit_epochs": 0.0}})
        if timed not in step_times:
            step_times[timed] = time_step(larger.config)
        elapsed_s = time.monotonic() - began
        fitting, first = steps_to_fit(larger.config.train, steps_per_epoch)
        ends_s = predicted_s(elapsed_s, fitting, step_times[timed])
        notes.append(f"{label}{first}{fitting:,} steps at {step_times[timed] * 1e3:.0f} ms each would end at about "
                     f"{ends_s:.0f} s of the {budget_s:.0f} s budget")
        if ends_s <= budget_s:
            return Choice(larger.config, elapsed_s, f"{named}: {'; '.join(notes)}, so training it")
    return Choice(given, time.monotonic() - began, f"{named}: {'; '.join(notes)}, so training the model as given")


def as_resumed(saved: Config, wanted: Config) -> Config:
    """`wanted` for resuming a run saved as `saved`: with the `train.larger_model` alternative the run chose, if any."""
    for larger in config_lib.larger_models(wanted):
        if all(getattr(getattr(saved, section), key) == getattr(getattr(larger.config, section), key)
               for section, keys in larger.overrides.items() for key in keys):
            return larger.config
    return wanted
