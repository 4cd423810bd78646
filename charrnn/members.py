"""Several models in one run (`train.members`): trained side by side, each from its own seed, predicting together.

Member i is the model a run with `train.seed + i` would train alone given the
same steps and learning rates: its own initial weights, dropout masks and epoch
offsets (a wall-clock budget is the run's, shared by its members). A run of
several keeps each array of its weights, optimizer state and carried state with
a leading member axis; a run of one keeps them as they are, so its checkpoints
are those of any other run. Evaluation, sampling and `charrnn.load` use the
members as an ensemble: the mean of their distributions.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from charrnn.config import TrainConfig


def seeds(train: TrainConfig) -> range:
    """The seed of each member, in member order."""
    return range(train.seed, train.seed + train.members)


def combine(trees: Sequence[Any]) -> Any:
    """One tree for a run's members: the member's own where there is one, else each leaf stacked on a new axis 0."""
    if len(trees) == 1:
        return trees[0]
    # Host arrays (minibatches) stay on the host; device arrays and traced values stack where they are.
    return jax.tree.map(lambda *leaves: np.stack(leaves) if isinstance(leaves[0], np.ndarray) else jnp.stack(leaves),
                        *trees)


def split(tree: Any, count: int) -> tuple[Any, ...]:
    """`combine`'s inverse: each of `count` members' trees."""
    if count == 1:
        return (tree,)
    return tuple(jax.tree.map(lambda leaf: leaf[index], tree) for index in range(count))
