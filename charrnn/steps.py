"""The optimizer, the learning-rate schedule, and the compiled train and eval steps."""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from charrnn import averaging, distributed, members, model
from charrnn.config import Config, ModelConfig, TrainConfig, steps_in
from charrnn.data import Batch, EvalChunk, evaluation_chunks


# Evaluation has no gradient to truncate: long chunks mean fewer dispatches.
EVAL_SEQ_LEN = 256


class TrainState(NamedTuple):
    params: dict
    opt_state: optax.OptState
    step: jax.Array  # [] int32, optimizer steps taken
    average: dict | None = None  # the weights' moving average (`train.ema`), or None without averaging

    @property
    def model_params(self) -> dict:
        """The weights the run evaluates and a checkpoint's model holds: the average, where there is one."""
        return self.params if self.average is None else self.average


class StepMetrics(NamedTuple):
    loss: jax.Array  # [K] mean nats/char of each step's chunk
    grad_norm: jax.Array  # [K] global gradient norm before clipping
    finite: jax.Array  # [K] bool: the step's loss and gradients were finite (else it was skipped)


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """Clip by global norm, then Adam's direction (and AdamW decay); the step size is applied per step.

    The learning rate is not inside the optimizer because it follows the run's
    progress, which under a wall-clock budget is time, not a step count. The chain
    has the same parts whatever the settings, so its state has one layout and a
    run can be resumed with another clip or decay.
    """
    return optax.chain(
        optax.clip_by_global_norm(config.clip_norm if config.clip_norm > 0 else float("inf")),
        optax.scale_by_adam(b1=config.beta1, b2=config.beta2),
        optax.add_decayed_weights(config.weight_decay),
    )


def last_step(config: TrainConfig, steps_per_epoch: int) -> int:
    """The step that ends the run if the wall clock does not: `train.steps`, or `train.max_epochs` passes if fewer."""
    if not config.max_epochs:
        return config.steps
    return min(config.steps, max(1, steps_in(config.max_epochs, steps_per_epoch)))  # a positive cap: a step at least


def learning_rate(config: TrainConfig, step: int, progress: float) -> float:
    """lr at optimizer step `step`, `progress` in [0, 1] through the run (steps or time)."""
    warmup = min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps else 1.0
    progress = min(max(progress, 0.0), 1.0)
    final = config.final_lr_fraction
    if config.schedule == "cosine":
        decay = final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * progress))
    elif config.schedule == "linear":
        decay = final + (1.0 - final) * (1.0 - progress)
    elif config.schedule == "exponential":
        decay = final**progress  # validation keeps final > 0 here
    else:
        decay = 1.0
    return config.lr * warmup * decay


def initial_state(params: dict, optimizer, averaged: bool = False) -> TrainState:
    """The training state before the first step: `params`, the optimizer's fresh state, step 0 (and the
    average, a copy of `params`, when `averaged`: a train call donates each buffer once)."""
    average = jax.tree.map(jnp.copy, params) if averaged else None
    return TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32), average)


def fresh_state(config: Config, optimizer, init_params, initial_carry) -> tuple[TrainState, tuple]:
    """A new run's training state and carried state as host arrays, the same on every process (from the seed);
    with `train.members`, each member's from its own seed, stacked (`charrnn.members`).

    `init_params(key) -> params`, `initial_carry(params, batch_size) -> carry`: the task's.
    """
    @jax.jit  # one compiled program rather than an eager dispatch (and compilation) of each initialiser's operations
    def fresh(key: jax.Array) -> tuple[TrainState, tuple]:
        params = init_params(key)
        return initial_state(params, optimizer, config.train.ema > 0), initial_carry(params, config.train.batch_size)

    made = [fresh(jax.random.fold_in(jax.random.key(seed), 0)) for seed in members.seeds(config.train)]
    state, carry = members.combine(made)
    return jax.device_get((state._replace(step=made[0][0].step), carry))  # one step count for the run


def placement(config: Config, devices: int | None) -> distributed.Placement:
    """Where a run's training arrays live: its streams split over `devices` (default: as many as pay), or one
    device where the run cannot be split."""
    if model.fuses_layers(config.model):
        one_device = "model.kernel = pallas runs on one device (model.kernel = xla splits)"
    elif config.train.members > 1:
        one_device = "train.members > 1 trains its models on one device, one after another"
    else:
        one_device = ""
    # An encoder–decoder's loops, differentiated by JAX, sum weight gradients step by step: split over a CPU's
    # cores, its step all-reduces inside them at every time step, and one device trains as fast or faster.
    return distributed.make_placement(devices, config.train.batch_size,
                                      model.recurrent_step_macs(config.model, config.train.batch_size), one_device,
                                      cpu_split=config.model.kind != "seq2seq")


def place(state: TrainState, carry: tuple, placement, batch_size: int) -> tuple[TrainState, tuple]:
    """The state replicated over the placement's devices, the carry split with its streams."""
    return distributed.put(state, placement.replicated), distributed.put_streams(carry, placement, batch_size)


def language_model_loss(model_config: ModelConfig, smoothing: float = 0.0):
    """`loss(params, carry, batch, dropout_key, dropout=True) -> (mean nats/char, carry)` of a chunk of text, labels
    smoothed by `smoothing`; with `dropout` false, the key drops nothing.

    The carry is reset at epoch starts inside the differentiated function, so that
    a learned initial state gets its gradient from the chunks that start from it.
    """
    def chunk_loss(params: dict, carry: tuple, batch: Batch, dropout_key: jax.Array, dropout: bool = True):
        fresh = model.initial_carry(params, model_config, batch.inputs.shape[1])
        start = model.reset_where(batch.reset, fresh, carry)
        return model.loss(params, model_config, start, batch.inputs, batch.targets, dropout_key if dropout else None,
                          smoothing)

    return chunk_loss


def make_train_call(model_config: ModelConfig, train_config: TrainConfig, optimizer, placement=None):
    """The language model's compiled train call (see `compile_train_call`)."""
    return compile_train_call(language_model_loss(model_config, train_config.label_smoothing), train_config, optimizer,
                              placement)


def compile_train_call(batch_loss, train_config: TrainConfig, optimizer, placement=None):
    """Compile `call(state, carry, batches, lrs) -> (state, carry, metrics)` for K stacked steps.

    `batch_loss(params, carry, batch, dropout_key) -> (loss, carry)`. This is where
    truncated BPTT happens: the carry enters each step as data (no gradient flows
    into the previous chunk) and leaves through stop_gradient to become the next
    step's starting state. A step whose loss or gradient is not finite changes
    nothing, so non-finite numbers never reach the parameters. With `train.ema`,
    the weights' average follows each step (`charrnn.averaging`). With
    `train.members`, state, carry and batches hold a leading member axis; each
    member takes the K steps in turn, as a run of its seed alone would, and the
    metrics are the members' mean loss and gradient norm, finite where every
    member's step was.
    """
    def run_steps(state: TrainState, carry: tuple, batches, lrs: jax.Array, dropout_root: jax.Array):
        def one_step(state_and_carry, step_inputs):
            state, carry = state_and_carry
            batch, lr = step_inputs
            dropout_key = jax.random.fold_in(dropout_root, state.step)
            (loss, new_carry), grads = jax.value_and_grad(batch_loss, has_aux=True)(state.params, carry, batch,
                                                                                    dropout_key)
            grad_norm = optax.tree.norm(grads)
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
            params = jax.tree.map(lambda param, update: param - lr * update, state.params, updates)
            finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
            keep_finite = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
            params = keep_finite(params, state.params)
            average = state.average
            if average is not None:
                average = keep_finite(averaging.update(average, params, train_config.ema, state.step + 1), average)
            new_state = TrainState(params, keep_finite(opt_state, state.opt_state), state.step + 1, average)
            new_carry = keep_finite(jax.lax.stop_gradient(new_carry), carry)
            return (new_state, new_carry), StepMetrics(loss, grad_norm, finite)

        (state, carry), metrics = jax.lax.scan(one_step, (state, carry), (batches, lrs))
        return state, carry, metrics

    dropout_roots = [jax.random.fold_in(jax.random.key(seed), 1) for seed in members.seeds(train_config)]

    def call(state: TrainState, carry: tuple, batches, lrs: jax.Array):
        return run_steps(state, carry, batches, lrs, dropout_roots[0])

    def members_call(state: TrainState, carry: tuple, batches, lrs: jax.Array):
        def member(parts):
            params, opt_state, average, member_carry, member_batches, dropout_root = parts
            member_state, member_carry, metrics = run_steps(TrainState(params, opt_state, state.step, average),
                                                            member_carry, member_batches, lrs, dropout_root)
            return (member_state.params, member_state.opt_state, member_state.average, member_carry), metrics

        (params, opt_state, average, carry), metrics = jax.lax.map(
            member, (state.params, state.opt_state, state.average, carry, batches, jnp.stack(dropout_roots)))
        metrics = StepMetrics(metrics.loss.mean(axis=0), metrics.grad_norm.mean(axis=0), metrics.finite.all(axis=0))
        return TrainState(params, opt_state, state.step + lrs.shape[0], average), carry, metrics

    compiled = call if train_config.members == 1 else members_call
    if placement is None:
        return jax.jit(compiled, donate_argnums=(0, 1))
    # State stays replicated and the carry stays split with its streams, call after call.
    out_shardings = (placement.replicated, placement.batch, placement.replicated)
    return jax.jit(compiled, donate_argnums=(0, 1), out_shardings=out_shardings)


def make_eval_call(model_config: ModelConfig):
    """Compile `call(params, carry, chunk) -> (carry, nats summed, targets counted)`."""

    def call(params: dict, carry: tuple, chunk: EvalChunk):
        carry, logits = model.forward(params, model_config, carry, chunk.inputs)
        return carry, *model.masked_sums(model.token_losses(logits, chunk.targets), chunk.mask)

    return jax.jit(call)


@functools.partial(jax.jit, static_argnames=("configs",))
def _ensemble_summed_loss(params: tuple[dict, ...], carry: tuple, chunk: EvalChunk,
                          configs: tuple[ModelConfig, ...]):
    """`make_eval_call`'s call for models predicting together: each target's loss is -log of the mean of their
    probabilities of it. `params`, `configs` and `carry` hold one entry per model."""
    carries, log_probs = [], []
    for member_params, member_config, member_carry in zip(params, configs, carry, strict=True):
        member_carry, logits = model.forward(member_params, member_config, member_carry, chunk.inputs)
        carries.append(member_carry)
        log_probs.append(-model.token_losses(logits, chunk.targets))  # [T, B]
    return tuple(carries), *model.masked_sums(-model.mixture(jnp.stack(log_probs)), chunk.mask)


def _evaluation_placers(placement, streams: int):
    """Functions putting an evaluation carry [B, H] and a chunk [T, B] on the placement's devices."""
    if placement is None:
        return (lambda tree: tree,) * 2
    if streams % placement.num_devices:  # every device evaluates every stream
        return (functools.partial(distributed.put, sharding=placement.replicated),) * 2
    return (functools.partial(distributed.put_streams, placement=placement, num_streams=streams, axis=0),
            functools.partial(distributed.put_streams, placement=placement, num_streams=streams, axis=1))


def evaluate(params: dict, model_config: ModelConfig, ids: np.ndarray, num_streams: int,
             seq_len: int = EVAL_SEQ_LEN, eval_call=None, placement=None) -> float:
    """Mean nats/char over every prediction in `ids`, state carried along each stream.

    With a `placement` (several devices), the streams are split over the devices
    when they divide evenly, and every device evaluates all of them otherwise.
    """
    eval_call = eval_call or make_eval_call(model_config)
    chunks = evaluation_chunks(ids, num_streams, seq_len)
    streams = chunks[0].inputs.shape[1]
    place_carry, place_chunk = _evaluation_placers(placement, streams)
    carry = place_carry(jax.device_get(model.initial_carry(params, model_config, streams)))
    return _mean_over_chunks(eval_call, params, carry, map(place_chunk, chunks))


def evaluate_together(params: tuple[dict, ...], configs: tuple[ModelConfig, ...], ids: np.ndarray,
                      num_streams: int, seq_len: int = EVAL_SEQ_LEN) -> float:
    """`evaluate` for models predicting together (one entry per model): mean nats/char under the mean of their
    distributions, each model's state carried along each stream."""
    chunks = evaluation_chunks(ids, num_streams, seq_len)
    streams = chunks[0].inputs.shape[1]
    carry = tuple(model.initial_carry(member_params, member_config, streams)
                  for member_params, member_config in zip(params, configs, strict=True))
    return _mean_over_chunks(functools.partial(_ensemble_summed_loss, configs=configs), params, carry, chunks)


def evaluate_models(params: tuple[dict, ...], configs: tuple[ModelConfig, ...], ids: np.ndarray, num_streams: int,
                    eval_call=None, placement=None) -> float:
    """`evaluate` of one model (one entry in `params` and `configs`), `evaluate_together` of several."""
    if len(params) == 1:
        return evaluate(params[0], configs[0], ids, num_streams, eval_call=eval_call, placement=placement)
    return evaluate_together(params, configs, ids, num_streams)


def _mean_over_chunks(eval_call, params, carry, chunks) -> float:
    """Mean nats per target over `chunks`, each call's carry passed to the next."""
    total, count = 0.0, 0.0
    for index, chunk in enumerate(chunks):
        carry, chunk_total, chunk_count = eval_call(params, carry, chunk)
        total, count = total + chunk_total, count + chunk_count
        if index % 32 == 31:
            jax.block_until_ready(total)  # bounds the chunks queued on the device, and their memory
    return float(total / count)
