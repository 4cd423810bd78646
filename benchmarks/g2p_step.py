"""Where a g2p training step goes: milliseconds per step at each padded shape, and how often each shape comes.

    python benchmarks/g2p_step.py data/g2p                                  # the recipe, configs/g2p.toml
    python benchmarks/g2p_step.py data/g2p --set model.attention=dot        # one key changed

Trains nothing: it times the recipe's compiled train call (`train.steps_per_call`
steps of batch `train.batch_size`) on pairs from train.tsv padded to each
(source, target) length, the median of `--repeats` calls after one that compiles.
The shares are of one epoch's compiled calls, each padded to its longest batch,
so their weighted sum is the mean step of a run, compilation and validation aside.
"""

from __future__ import annotations

import argparse
import collections
import json
import time
from pathlib import Path

import jax
import numpy as np

from charrnn import steps
from charrnn.config import Config, apply_overrides, load_toml, parse_set
from charrnn.seq2seq import pairs as pairs_lib, task as pairs_task

RECIPE = Path(__file__).resolve().parent.parent / "configs" / "g2p.toml"


def shape_shares(task: pairs_task.PairsTask) -> dict[tuple[int, int], float]:
    """{(source length, target length): share of one epoch's steps} as the run pads them."""
    per_call = task.config.train.steps_per_call
    counts = collections.Counter()
    for step in range(0, task.schedule.batches_per_epoch - per_call + 1, per_call):
        batch = task.batches(step, per_call, slice(None))
        counts[batch.source.shape[1], batch.target_in.shape[1]] += per_call
    total = sum(counts.values())
    return {shape: count / total for shape, count in sorted(counts.items())}


def step_milliseconds(task: pairs_task.PairsTask, shape: tuple[int, int], repeats: int) -> float:
    """Median milliseconds per optimizer step with every batch padded to `shape`."""
    config, (sources, targets) = task.config, task.corpus.train
    fitting = [i for i in range(len(sources)) if len(sources[i]) <= shape[0] and len(targets[i]) < shape[1]]
    rng = np.random.default_rng(0)
    per_call = config.train.steps_per_call
    batches = pairs_lib.stack([
        pairs_lib.make_batch(*zip(*((sources[i], targets[i]) for i in rng.choice(fitting, config.train.batch_size))),
                             *shape) for _ in range(per_call)])
    optimizer = steps.make_optimizer(config.train)
    state, carry = steps.fresh_state(config, optimizer, task.init_params, task.initial_carry)
    call = steps.compile_train_call(task.batch_loss, config.train, optimizer)
    lrs = np.full((per_call,), config.train.lr, np.float32)
    times = []
    for _ in range(repeats + 1):  # the first call compiles
        start = time.perf_counter()
        state, carry, metrics = call(state, carry, batches, lrs)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    return float(np.median(times[1:])) / per_call * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", type=Path, help="the folder examples/cmudict_pairs.py wrote (train.tsv)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="change the recipe")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per shape")
    parser.add_argument("--min-share", type=float, default=0.01, help="time only shapes with at least this share")
    args = parser.parse_args()
    config = apply_overrides(apply_overrides(Config(), load_toml(RECIPE)), parse_set(args.set))
    task = pairs_task.PairsTask(config, pairs_task.load_pairs(args.data_dir / "train.tsv", config))
    rows, mean = [], 0.0
    for shape, share in shape_shares(task).items():
        if share < args.min_share:
            continue
        milliseconds = step_milliseconds(task, shape, args.repeats)
        mean += share * milliseconds
        rows.append({"source": shape[0], "target": shape[1], "share": round(share, 3), "ms_per_step": round(milliseconds, 1)})
        print(json.dumps(rows[-1]), flush=True)
    timed = sum(row["share"] for row in rows)
    print(json.dumps({"overrides": args.set, "mean_ms_per_step": round(mean / timed, 1), "share_timed": round(timed, 3)}))


if __name__ == "__main__":
    main()
