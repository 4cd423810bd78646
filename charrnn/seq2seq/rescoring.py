"""Models writing targets in opposite directions (`model.reverse_target`) choosing one target together.

They cannot share a step: one writes a target's first symbol where another writes its last. So the models of each
direction propose their most likely targets together (beam search), every model scores every proposal teacher-forced,
and each source takes the proposal with the highest mean of the models' log-probabilities: the one that their product
ranks first, so that every model must find it likely (ahead of the mean of their probabilities in every pair measured:
benchmarks/README, "a pair writing both ways").
"""

from __future__ import annotations

import jax
import numpy as np

from charrnn.config import ModelConfig
from charrnn.seq2seq import generate, model as seq2seq_model, pairs as pairs_lib
from charrnn.seq2seq.pairs import PairBatch
from charrnn.seq2seq.task import EVAL_BATCH_SIZE, batches_of

_pair_log_probs = jax.jit(seq2seq_model.pair_log_probs, static_argnames=("config",))


def directions(configs: tuple[ModelConfig, ...]) -> list[list[int]]:
    """The models' indices grouped by the direction they write in, forwards first; one group if they all agree."""
    groups = [[i for i, config in enumerate(configs) if config.reverse_target == reverse] for reverse in (False, True)]
    return [group for group in groups if group]


def _widened(batch: PairBatch, size: int) -> PairBatch:
    """The batch filled out to `size` pairs with copies of its first, whose results are dropped: every call then has
    one of a few shapes to compile, whatever the number of proposals."""
    return PairBatch(*(np.concatenate([part, np.repeat(part[:, :1], size - part.shape[1], axis=1)], axis=1)
                       for part in batch))


def log_probs(params: tuple[dict, ...], configs: tuple[ModelConfig, ...], sources: list[np.ndarray],
              targets: list[np.ndarray]) -> np.ndarray:
    """[models, pairs]: each model's teacher-forced log-probability of each whole target (ids, first symbol first),
    the end symbol's included."""
    result = np.empty((len(params), len(sources)))
    for index, (member, config) in enumerate(zip(params, configs, strict=True)):
        written = [pairs_lib.written_order(ids, config.reverse_target) for ids in targets]
        for rows, batch in batches_of(sources, written, EVAL_BATCH_SIZE):
            scores = _pair_log_probs(member, config, _widened(batch, EVAL_BATCH_SIZE))
            result[index, rows] = np.asarray(scores)[: len(rows)]
    return result


def mean_nats(params: tuple[dict, ...], configs: tuple[ModelConfig, ...], sources: list[np.ndarray],
              targets: list[np.ndarray]) -> float:
    """Nats per target symbol (end symbols included) of the mean of the models' distributions over whole targets
    (their product, which chooses, has no normaliser to compute)."""
    mixed = np.logaddexp.reduce(log_probs(params, configs, sources, targets), axis=0) - np.log(len(params))
    return float(-mixed.sum() / sum(len(ids) + 1 for ids in targets))


def choose(params: tuple[dict, ...], configs: tuple[ModelConfig, ...], source: np.ndarray, length: int,
           beam: int) -> list[np.ndarray]:
    """For sources [S, B] (padded), the chosen target of each as vocabulary indices, first symbol first.

    Each direction's models propose their `beam` most likely targets of up to `length` symbols and the end
    symbol; proposals cut at `length` are scored as though they ended there.
    """
    proposals: list[set[tuple[int, ...]]] = [set() for _ in range(source.shape[1])]
    for group in directions(configs):
        tokens, _ = generate.beam_search(tuple(params[i] for i in group), tuple(configs[i] for i in group), source,
                                         length + 1, beam)
        for column, hypotheses in enumerate(np.asarray(tokens)):
            for hypothesis in hypotheses:
                indices = pairs_lib.written(hypothesis[:length])
                proposals[column].add(tuple(pairs_lib.written_order(indices, configs[group[0]].reverse_target)))
    candidates = [sorted(one) for one in proposals]
    lengths = (source != pairs_lib.PAD).sum(axis=0)
    sources = [source[: lengths[column], column] for column, one in enumerate(candidates) for _ in one]
    targets = [np.array(candidate, np.int32) + 1 for one in candidates for candidate in one]
    scores = log_probs(params, configs, sources, targets).mean(axis=0)
    bounds = np.cumsum([0, *map(len, candidates)])
    return [np.array(one[int(np.argmax(scores[begin:end]))], np.int32)
            for one, begin, end in zip(candidates, bounds[:-1], bounds[1:])]
