"""The character model: embedding -> stacked recurrent layers -> linear -> softmax.

Params are a plain dict pytree:
    embedding [V, E]; layers: list of cell params; output {w [H, V], b [V]};
    initial: list of per-layer carries of [H] vectors (only with learn_initial_state).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax

from charrnn import dropout, runtime
from charrnn.cells import Cell, TransposedWeight, accumulation_dtype, cell_of, dense
from charrnn.config import ModelConfig
from charrnn.layer import project_input, recurrent_params, run_layer, run_stack


def recurrent_cell(config: ModelConfig) -> Cell:
    """The cell every recurrent layer of `config` runs: `model.cell`, with `model.norm`."""
    return cell_of(config.cell, config.norm)


def init_layer(key: jax.Array, config: ModelConfig, input_size: int) -> dict:
    """One recurrent layer's fresh params: the cell's, U(±1/√H) weights, with W_x rescaled to U(±1/√input_size)
    under `model.input_init = "fan_in"`, so that a narrow input (the embedding) weighs as much as the recurrent one."""
    params = recurrent_cell(config).init(key, input_size, config.hidden_size)
    if config.input_init == "fan_in":
        params["w_x"] = params["w_x"] * (config.hidden_size / input_size) ** 0.5
    return params


def init_params(key: jax.Array, config: ModelConfig, vocab_size: int) -> dict:
    """Return freshly initialised parameters for `config` over `vocab_size` characters."""
    cell = recurrent_cell(config)
    key_embedding, key_output, *layer_keys = jax.random.split(key, 2 + config.num_layers)
    layers = [init_layer(layer_key, config, config.embedding_size if index == 0 else config.hidden_size)
              for index, layer_key in enumerate(layer_keys)]
    bound = config.hidden_size**-0.5
    params = {
        "embedding": jax.random.normal(key_embedding, (vocab_size, config.embedding_size), jnp.float32),
        "layers": layers,
        "output": {
            "w": jax.random.uniform(key_output, (config.hidden_size, vocab_size), jnp.float32, -bound, bound),
            "b": jnp.zeros((vocab_size,), jnp.float32),
        },
    }
    if config.learn_initial_state:
        params["initial"] = [jax.tree.map(lambda leaf: leaf[0], cell.initial_carry(1, config.hidden_size)) for _ in layers]
    return params


def initial_carry(params: dict, config: ModelConfig, batch_size: int) -> tuple:
    """Return the state at the start of a stream: zeros, or the learned initial state."""
    cell = recurrent_cell(config)
    if not config.learn_initial_state:
        return tuple(cell.initial_carry(batch_size, config.hidden_size) for _ in range(config.num_layers))
    return tuple(
        jax.tree.map(lambda leaf: jnp.broadcast_to(leaf, (batch_size, config.hidden_size)), carry)
        for carry in params["initial"]
    )


def reset_where(reset: jax.Array, fresh: tuple, carry: tuple) -> tuple:
    """Carry where `reset` is false, `fresh` where it is true (a scalar, or [B] per stream)."""
    def choose(fresh_leaf, carried_leaf):
        flag = jnp.reshape(reset, jnp.shape(reset) + (1,) * (carried_leaf.ndim - jnp.ndim(reset)))
        return jnp.where(flag, fresh_leaf, carried_leaf)

    return jax.tree.map(choose, fresh, carry)


def _map_weight_matrices(function, tree: dict) -> dict:
    """A layer's or the output's params with `function` applied to each weight matrix (w_x, w_h, w), not the biases."""
    return {name: function(leaf) if name.startswith("w") else leaf for name, leaf in tree.items()}


def matmul_dtype(config: ModelConfig) -> str:
    """The dtype of the matmuls' inputs: `model.dtype`, with "auto" bfloat16 where the device multiplies it natively."""
    if config.dtype != "auto":
        return config.dtype
    return "bfloat16" if runtime.multiplies_bfloat16_natively() else "float32"


def cast_weights(tree: dict, config: ModelConfig) -> dict:
    """A layer's or the output's params with weight matrices in the matmul dtype (biases stay float32)."""
    dtype = matmul_dtype(config)
    if dtype == "float32":
        return tree
    return _map_weight_matrices(lambda leaf: leaf.astype(dtype), tree)


def prepare_layers(embedding: jax.Array, layers: list, config: ModelConfig) -> dict:
    """A recurrent stack's params as its forward pass multiplies with them.

    Weight matrices are cast to the matmul dtype, and the embedding and the first
    layer's input projection become one [V, G*H] table: each character's
    projection is a row lookup, no per-character matmul. Gradients flow back
    through the table into both the embedding and the weights.
    """
    first = layers[0]
    return {
        "projection_table": dense(embedding, cast_weights(first, config)["w_x"], first["b"]),  # [V, G*H]
        "layers": [cast_weights(layer, config) for layer in layers],
    }


def prepare(params: dict, config: ModelConfig) -> dict:
    """Turn params into what the forward pass multiplies with, once per compiled call (see `prepare_layers`)."""
    return {**prepare_layers(params["embedding"], params["layers"], config),
            "output": cast_weights(params["output"], config)}


def transpose_weights(prepared: dict) -> dict:
    """Prepared params with each weight matrix held transposed, for matmuls of one row at a time."""
    def transpose(tree: dict) -> dict:
        return _map_weight_matrices(lambda leaf: TransposedWeight(leaf.T), tree)

    return {**prepared, "layers": [transpose(layer) for layer in prepared["layers"]], "output": transpose(prepared["output"])}


def projects_per_step() -> bool:
    """Whether each layer projects its input inside its time loop rather than before it.

    On a CPU with AVX-512, projecting per step saves writing a [T, B, G*H] array to
    memory and reading it back, which costs as much as the matmul itself there.
    Without AVX-512, XLA multiplies one step's few rows far below its speed on a
    whole chunk, so one matmul before the loop is faster, as on a GPU.
    """
    return jax.default_backend() == "cpu" and runtime.cpu_has_avx512(runtime.read_cpuinfo())


def fuses_layers(config: ModelConfig) -> bool:
    """Whether each layer's time loop runs as one Pallas launch (charrnn/fused_layer.py): `model.kernel = "pallas"`
    on a GPU. Elsewhere the XLA loop runs; Pallas's interpreter is for the tests."""
    return config.kernel == "pallas" and runtime.resident_programs() is not None


def _stack(prepared: dict, config: ModelConfig, carry: tuple, inputs: jax.Array, run_one, dropout_key=None):
    """The recurrent layers one above the other, each run by `run_one(layer params, carry, input) -> (carry, h)`.

    Returns (carry, [per-layer outputs], top-layer output after dropout). Layers
    above the first add their input to their output when `residual`; dropout
    (training only, `charrnn.dropout`) applies to every layer's output, the top one's too.
    """
    layer_input = inputs
    new_carry, outputs = [], []
    for index, layer_carry in enumerate(carry):
        layer_carry, hidden = run_one(layer_params(prepared, index), layer_carry, layer_input)
        if config.residual and index > 0:
            hidden = hidden + layer_input
        new_carry.append(layer_carry)
        outputs.append(hidden)
        layer_input = dropout.outputs(hidden, config.dropout, dropout_key, index, config.locked_dropout)
    return tuple(new_carry), outputs, layer_input


def over_time(config: ModelConfig):
    """`run(layer params, carry, inputs [T, B, ...]) -> (carry, hidden [T, B, H])`: one layer over a whole chunk."""
    cell = recurrent_cell(config)

    def run(layer: dict, layer_carry, layer_input: jax.Array):
        if fuses_layers(config):  # the whole loop in one launch, projections first
            from charrnn import fused_layer  # Pallas loads only for the runs that use it

            projections = project_input(layer, layer_input)  # [T, B, G*H]
            blocks = fused_layer.choose_blocks(projections.shape[1], layer["w_h"].shape[0], runtime.resident_programs())
            if blocks is not None:  # else a layer too large for one launch: XLA's loop
                return fused_layer.run_layer(cell, recurrent_params(layer), layer_carry, projections, blocks)
        if projects_per_step():
            return run_layer(cell, layer, layer_carry, layer_input, config.scan_unroll)  # [T, B, H]
        # All steps' projections in one matmul (or gather) before the loop.
        projections = project_input(layer, layer_input)  # [T, B, G*H]
        return run_layer(cell, recurrent_params(layer), layer_carry, projections, config.scan_unroll)

    return run


def stacks_layers(config: ModelConfig) -> bool:
    """Whether the recurrent layers run together as one wavefront (`layer.run_stack`) rather than one after another:
    where each projects its input inside its XLA time loop (`projects_per_step`) and none adds its input to its output."""
    return projects_per_step() and not fuses_layers(config) and not config.residual


def run_layers(prepared: dict, config: ModelConfig, carry: tuple, inputs: jax.Array, dropout_key=None):
    """Run the recurrent stack over `inputs` [T, B] from `carry`.

    Returns (carry, [per-layer outputs [T, B, H]], top-layer output after dropout).
    """
    if not stacks_layers(config):
        return _stack(prepared, config, carry, inputs, over_time(config), dropout_key)
    num_layers = len(carry)
    shape = inputs.shape + carry[0].h.shape[-1:]  # [T, B, H]
    factors = tuple(dropout.output_factors(shape, config.dropout, dropout_key, index, config.locked_dropout)
                    for index in range(num_layers - 1))
    layers = tuple(layer_params(prepared, index) for index in range(num_layers))
    carry, hiddens = run_stack(recurrent_cell(config), layers, tuple(carry), inputs,
                               factors if factors and factors[0] is not None else None, config.scan_unroll)
    return carry, list(hiddens), dropout.outputs(hiddens[-1], config.dropout, dropout_key, num_layers - 1,
                                                 config.locked_dropout)


def forward_prepared(prepared: dict, config: ModelConfig, carry: tuple, inputs: jax.Array, dropout_key=None):
    """Return (carry, logits [T, B, V]) from prepared params."""
    carry, _, top = run_layers(prepared, config, carry, inputs, dropout_key)
    return carry, dense(top, prepared["output"]["w"], prepared["output"]["b"])  # [T, B, V]


def step_top(prepared: dict, config: ModelConfig, carry: tuple, ids: jax.Array, feed: jax.Array | None = None,
             dropout_key=None):
    """One character per stream, ids [B] -> (carry, top layer's output [B, H]).

    `feed` [B, G*H] is added to the first layer's input projection (a decoder's
    input feeding). A `dropout_key` drops each layer's output with its own mask
    for this step; with `model.locked_dropout`, the same key at every step gives
    `run_layers`'s masks exactly.
    """
    cell = recurrent_cell(config)

    def one_step(layer: dict, layer_carry, layer_input: jax.Array):  # a time axis of 1, as dropout's masks expect
        projection = project_input(layer, layer_input[0])
        if feed is not None and "table" in layer:
            projection = projection + feed
        layer_carry, hidden = cell.step(layer, layer_carry, projection)  # [B, H]
        return layer_carry, hidden[None]

    carry, _, top = _stack(prepared, config, carry, ids[None], one_step, dropout_key)
    return carry, top[0]


def step(prepared: dict, config: ModelConfig, carry: tuple, ids: jax.Array):
    """One character per stream, ids [B] -> (carry, logits [B, V]): the body of generation's time loop."""
    carry, top = step_top(prepared, config, carry, ids)
    return carry, dense(top, prepared["output"]["w"], prepared["output"]["b"])


def layer_params(prepared: dict, index: int) -> dict:
    """Layer `index`'s params; the first layer's table replaces its embedding and input weights."""
    layer = prepared["layers"][index]
    if index > 0:
        return layer
    return {**recurrent_params(layer), "table": prepared["projection_table"]}


def forward(params: dict, config: ModelConfig, carry: tuple, inputs: jax.Array, dropout_key=None):
    """Return (carry, logits [T, B, V]) for character ids `inputs` [T, B] from state `carry`.

    With a `dropout_key` (training), every kind of dropout the config asks for applies.
    """
    params = dropout.weights(params, config, dropout_key)
    return forward_prepared(prepare(params, config), config, carry, inputs, dropout_key)


def token_losses(logits: jax.Array, targets: jax.Array, smoothing: float = 0.0) -> jax.Array:
    """Cross-entropy in nats of each target under the logits: [T, B].

    With `smoothing` ε the target distribution is 1 - ε on the target plus ε
    spread evenly over the vocabulary (label smoothing, Szegedy et al. 2016):
    (1 - ε)(-log p_target) + ε · mean over symbols of -log p.
    """
    logits = logits.astype(accumulation_dtype(logits.dtype))
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets.astype(jnp.int32))
    if smoothing == 0.0:
        return losses
    # -log p_v = logsumexp - logit_v, so the mean over v is logsumexp - mean(logits)
    spread = jax.nn.logsumexp(logits, axis=-1) - jnp.mean(logits, axis=-1)
    return (1.0 - smoothing) * losses + smoothing * spread


def masked_sums(losses: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(losses [T, B] summed over the real targets, how many there are), `mask` [T, B] marking the real ones."""
    mask = mask.astype(losses.dtype)
    return jnp.sum(losses * mask), jnp.sum(mask)


def mixture(log_probs: jax.Array) -> jax.Array:
    """The log of the mean of several models' probabilities, from their log-probabilities stacked on axis 0."""
    if log_probs.shape[0] == 1:  # one model's own: no reduction in every generated symbol's step
        return log_probs[0]
    return jax.nn.logsumexp(log_probs, axis=0) - jnp.log(log_probs.shape[0])


def log_mean_softmax(logits: Sequence[jax.Array]) -> jax.Array:
    """log(mean(softmax(logits))) over several models' logits, each [..., V]: their `mixture`'s log-probabilities."""
    return mixture(jnp.stack([jax.nn.log_softmax(one.astype(jnp.float32)) for one in logits]))


def loss(params: dict, config: ModelConfig, carry: tuple, inputs, targets, dropout_key=None, smoothing: float = 0.0):
    """Mean cross-entropy (nats/char) of a chunk and the carry after it (see `token_losses` for `smoothing`)."""
    carry, logits = forward(params, config, carry, inputs, dropout_key)
    return jnp.mean(token_losses(logits, targets, smoothing)), carry


def recurrent_step_macs(config: ModelConfig, batch_size: int) -> int:
    """Multiply-adds of one layer's recurrent matmul [B, H] x [H, G*H] for one time step."""
    return batch_size * config.hidden_size * recurrent_cell(config).num_gates * config.hidden_size


def generation_matmul_flops_per_char(config: ModelConfig, vocab_size: int) -> int:
    """Floating-point operations of the matmuls that one character of one stream costs going forward.

    The first layer's input is a row of the projection table, no matmul; each
    layer above it multiplies its input and its state by [H, G*H] weights, every
    layer multiplies its state, and the output layer is [H, V].
    """
    width = recurrent_cell(config).num_gates * config.hidden_size
    multiply_adds = ((2 * config.num_layers - 1) * config.hidden_size * width
                     + config.hidden_size * vocab_size)
    return 2 * multiply_adds


def training_matmul_flops(config: ModelConfig, vocab_size: int, batch_size: int, seq_len: int) -> int:
    """Floating-point operations of the matmuls of one training step, forward and backward.

    Each forward product x W is matched by two in the backward pass, dy Wᵀ for
    the input's gradient and xᵀ dy for the weights', so a step costs three times
    its forward matmuls: those of batch_size × seq_len characters, plus the
    projection table [V, E] × [E, G*H] that `prepare` builds once per step.
    """
    width = recurrent_cell(config).num_gates * config.hidden_size
    table_flops = 2 * vocab_size * config.embedding_size * width
    return 3 * (batch_size * seq_len * generation_matmul_flops_per_char(config, vocab_size) + table_flops)


def parameter_count(params: dict) -> int:
    return sum(int(leaf.size) for leaf in jax.tree.leaves(params))
