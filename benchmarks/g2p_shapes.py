"""How many batch shapes a pairs run compiles, and how long its calls are, for each `train.pad_multiple`.

    python benchmarks/g2p_shapes.py data/g2p --config configs/g2p-gpu.toml --multiples 4,8,16

Each distinct (source length, target length) of a compiled training call, and of a
validation batch, is a program of its own to compile. This walks a run's first
`--epochs` passes through the task's own batching (no model, no device) and
prints, for each multiple, the shapes met and the mean padded time steps
(source + target) of a training call: what a larger multiple saves in compiling
and costs in sequential steps.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from charrnn import config as config_lib
from charrnn.seq2seq import task as task_lib

GPU_RECIPE = Path(__file__).resolve().parent.parent / "configs" / "g2p-gpu.toml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_dir", type=Path, help="folder with train.tsv (examples/cmudict_pairs.py)")
    parser.add_argument("--config", type=Path, default=GPU_RECIPE, help="the run's config (its batch size, steps per call)")
    parser.add_argument("--multiples", default="4,8,16", help="comma-separated values of train.pad_multiple")
    parser.add_argument("--epochs", type=int, default=2, help="passes over the training pairs to walk")
    args = parser.parse_args()
    print("| train.pad_multiple | training call shapes | validation batch shapes | mean padded steps a call |")
    print("| --- | --- | --- | --- |")
    for multiple in (int(value) for value in args.multiples.split(",")):
        config = config_lib.resolve(args.config, [f"train.pad_multiple={multiple}"], {})
        task = task_lib.PairsTask(config, task_lib.load_pairs(args.data_dir / "train.tsv", config))
        per_call = config.train.steps_per_call
        calls = (task.batches(step, per_call, slice(None))
                 for step in range(0, args.epochs * task.steps_per_epoch - per_call + 1, per_call))
        lengths = [(batch.source.shape[1], batch.target_in.shape[1]) for batch in calls]  # [K, S, B], [K, T, B]
        validation = {(batch.source.shape[0], batch.target_in.shape[0])
                      for _, batch in task_lib.batches_of(*task.corpus.val, task_lib.EVAL_BATCH_SIZE, multiple)}
        print(f"| {multiple} | {len(set(lengths))} | {len(validation)} | {np.mean([sum(shape) for shape in lengths]):.1f} |")


if __name__ == "__main__":
    main()
