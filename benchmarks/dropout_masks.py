"""What a dropout mask costs: charrnn's words from a hash of each element's index (`dropout.random_words`) against
jax.random's threefry words, 16 bits an element either way, alone and in a language model's compiled train call,
with a train call that drops nothing beside them, in one process, windows in turn.

    python benchmarks/dropout_masks.py                                          # configs/shakespeare.toml
    python benchmarks/dropout_masks.py --set model.num_layers=3 --rounds 10     # its larger model

The train calls are built the same way but for the words drawn inside `dropout.keep_mask`;
every call drops (the recipe's first epoch, which does not, is not timed) but the one
with `model.dropout=0`.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

import charrnn
from charrnn import entry

RECIPE = Path(__file__).resolve().parent.parent / "configs" / "shakespeare.toml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=RECIPE)
    parser.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--rounds", type=int, default=6, help="timed windows of each train call, taken in turn")
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each window")
    parser.add_argument("--plain-malloc", action="store_true",
                        help="without the huge-page tunable that `charrnn train` sets: as a library caller's process runs")
    args = parser.parse_args()
    if not args.plain_malloc:
        entry.rerun_with_huge_pages()
    charrnn.configure(cpu_device_per_core=True)

    import jax
    import jax.numpy as jnp

    from charrnn import bench, config as config_lib, dropout

    def threefry_words(key, shape):
        return jax.random.bits(key, shape, jnp.uint32)

    config = config_lib.resolve(args.config, args.assignments, {})
    train = config.train
    shape = (train.seq_len, train.batch_size, config.model.hidden_size)  # one layer's output mask
    levels = dropout.kept_levels(config.model.dropout or 0.25)
    draws = {"hash": dropout.random_words, "threefry": threefry_words}

    print(f"one mask of {shape}, ms (median of 30):")
    for name, draw in draws.items():
        dropout.random_words = draw  # read when the call is traced
        masks = jax.jit(lambda key: jnp.sum(dropout.keep_mask(key, levels, shape)))
        masks(jax.random.key(0)).block_until_ready()
        times = []
        for index in range(30):
            began = time.perf_counter()
            masks(jax.random.key(index)).block_until_ready()
            times.append(time.perf_counter() - began)
        print(f"  {name:12s} {statistics.median(times) * 1e3:7.2f}")

    benches = {}
    for name, draw in draws.items():
        dropout.random_words = draw  # read when the call is traced, during compile()
        benches[name] = bench.TrainingBench(config)
        benches[name].compile()
    dropout.random_words = draws["hash"]
    benches["no dropout"] = bench.TrainingBench(dataclasses.replace(
        config, model=dataclasses.replace(config.model, dropout=0.0)))
    benches["no dropout"].compile()
    rates = {name: [] for name in benches}
    for index in range(args.rounds):
        order = list(benches.items())
        for name, timed in order if index % 2 == 0 else order[::-1]:
            rates[name].append(timed.chars_per_second(args.seconds))
    print(f"train call, chars/s (median of {args.rounds} windows; ratio: the median over rounds to threefry's):")
    for name, values in rates.items():
        print(f"  {name:12s} {statistics.median(values):9,.0f}  {bench.ratio_to_first(values, rates['threefry']):.3f}")


if __name__ == "__main__":
    main()
