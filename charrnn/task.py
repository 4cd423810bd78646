"""What a run learns from: the Task a loop trains, and the language model's task over a text corpus.

A task gives the loop its parameters, its carried state, its loss, its batches,
its validation score and what a checkpoint records of the data. The
encoder–decoder's task over a pairs file is `charrnn.seq2seq.task`.
"""

from __future__ import annotations

from typing import Any, Protocol

import jax

from charrnn import calibration, data, members, model, steps
from charrnn.config import Config


class Task(Protocol):
    chars_per_step: int  # characters one optimizer step learns from (targets)
    steps_per_epoch: int  # optimizer steps in one pass over the training data

    def init_params(self, key: jax.Array) -> dict: ...

    def initial_carry(self, params: dict, batch_size: int) -> tuple: ...

    def batch_loss(self, params: dict, carry: tuple, batch: Any, dropout_key: jax.Array,
                   dropout: bool = True) -> tuple[jax.Array, tuple]:
        """(mean loss, next carry) of one minibatch; with `dropout` false, no kind of dropout applies."""

    def batches(self, step: int, count: int, streams: slice) -> Any:
        """Host minibatches of steps [step, step + count), stacked [K, ...] ([M, K, ...] for `train.members` M > 1,
        which runs on one device), for the `streams` of this process."""

    def validation_loss(self, params: dict, placement, fraction: float = 1.0) -> float:
        """Mean loss per target over the validation data, or over the first `fraction` of it."""

    def temperatures(self, params: dict) -> list[float] | None:
        """Each model's temperature fitted on held-out data (`charrnn.calibration`), or None where the run fits
        none; `params` are host arrays."""

    def metadata(self) -> dict[str, Any]:
        """What a checkpoint records of the data: the vocabulary (or vocabularies) and the file's checksum."""

    def describe(self) -> str:
        """The data in a few words, for the run's first line."""


class TextTask:
    """Continue text: a character language model over a corpus, state carried along contiguous streams."""

    def __init__(self, config: Config, corpus: data.Corpus):
        self.config, self.corpus = config, corpus
        train = config.train
        self.layout = data.stream_layout(len(corpus.train_ids), train.batch_size, train.seq_len)
        self.chars_per_step = train.batch_size * train.seq_len
        self.steps_per_epoch = self.layout.chunks_per_epoch
        self.batch_loss = steps.language_model_loss(config.model, train.label_smoothing)
        self.eval_call = steps.make_eval_call(config.model)

    def init_params(self, key: jax.Array) -> dict:
        return model.init_params(key, self.config.model, len(self.corpus.vocab))

    def initial_carry(self, params: dict, batch_size: int) -> tuple:
        return model.initial_carry(params, self.config.model, batch_size)

    def batches(self, step: int, count: int, streams: slice) -> data.Batch:
        train = self.config.train
        return members.combine([data.stack_batches([
            data.training_batch(self.corpus.train_ids, self.layout, step + i, seed, train.random_offset, streams)
            for i in range(count)
        ]) for seed in members.seeds(train)])  # each member's epoch offsets follow its own seed

    def validation_loss(self, params: dict, placement, fraction: float = 1.0) -> float:
        train = self.config.train
        return steps.evaluate_models(members.split(params, train.members), (self.config.model,) * train.members,
                                     data.leading_part(self.corpus.val_ids, fraction), train.eval_batch_size,
                                     self.eval_call, placement)

    def temperatures(self, params: dict) -> list[float] | None:
        if self.corpus.calibration_ids is None:
            return None
        train = self.config.train
        return calibration.fit(params, self.config.model, self.corpus.calibration_ids, train.eval_batch_size,
                               train.members)

    def metadata(self) -> dict[str, Any]:
        return {"vocab": self.corpus.vocab.chars, "corpus_sha": self.corpus.checksum}

    def describe(self) -> str:
        corpus = self.corpus
        return f"{len(corpus.train_ids):,} + {len(corpus.val_ids):,} characters, {len(corpus.vocab)} symbols"
