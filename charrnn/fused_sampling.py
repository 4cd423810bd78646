"""Generation's loop over a block of characters in one Pallas launch: every layer, the output layer, the choice.

XLA runs each generated character as a chain of small launches (per layer a
matmul and the gates, then the output layer and the choice), each waiting on the
one before; at batch 1 the launches, not the arithmetic, take the time. Here one
launch writes the whole block. Its programs split the work as
charrnn/fused_layer.py splits a layer: program (b, j) owns block b of the
streams and block j of every layer's units. For each character it computes its
units of the first layer, waits for the other programs of its streams
(`fused_layer.wait_for_all`), then does the same for the layer above, and so on.
After the top layer every program computes the whole output layer and the same
choice, so the next character's id needs no further wait. The first layer's input
projection, a row of the projection table, is taken as a product with the one-hot
row of the id.

It takes what generation's fast path takes: rnn or lstm cells without residual
connections, the choice by temperature alone (no top-k, no nucleus), and a
vocabulary of at most MAX_VOCAB. The block's Gumbel noise is made before the
launch, as charrnn/sample.py makes it. On a CPU it runs in Pallas's interpreter,
one program per block of streams, for the tests.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from charrnn import fused_layer, model, runtime
from charrnn.cells import Cell
from charrnn.config import PALLAS_UNIT, ModelConfig
from charrnn.fused_layer import Blocks, add_products, gate_columns, units_of, wait_for_all

MAX_VOCAB = 512  # every program holds the logits of its streams, [rows, vocabulary], in registers


def padded_vocab(vocab_size: int) -> int:
    """The vocabulary as the kernel holds it: a power of two (Triton's blocks), at least one unit."""
    return max(PALLAS_UNIT, pl.next_power_of_2(vocab_size))


def choose_blocks(config: ModelConfig, batch: int, vocab_size: int, filtered: bool) -> Blocks | None:
    """The kernel's blocks for generating `batch` streams of a model that `model.fuses_layers`, or None where
    XLA's loop runs instead: residual connections, top-k or a nucleus (`filtered`), a vocabulary over
    MAX_VOCAB, or more programs than the device holds at once."""
    if config.residual or filtered or padded_vocab(vocab_size) > MAX_VOCAB:
        return None
    return fused_layer.choose_blocks(batch, config.hidden_size, runtime.resident_programs())


def generate_block(prepared: dict, config: ModelConfig, carry: tuple, last_ids: jax.Array, scaled_noise: jax.Array,
                   pick, blocks: Blocks):
    """(carry, ids [length, B]) of generating from `carry` after `last_ids` [B], with `model.prepare`d params.

    `scaled_noise` [length, B, V]: each character's Gumbel noise times the temperature;
    `pick(logits [rows, V'], scaled_noise [rows, V'])` -> ids [rows] makes the choice
    (V' ≥ V: the padded columns hold -inf logits and zero noise).
    """
    cell = model.recurrent_cell(config)
    length, batch, vocab_size = scaled_noise.shape
    extra = padded_vocab(vocab_size) - vocab_size
    output = prepared["output"]
    weights = {
        "table": jnp.pad(prepared["projection_table"], ((0, extra), (0, 0))),  # [V', G*H]
        "layers": [{"w_h": layer["w_h"]} if index == 0 else {"w_x": layer["w_x"], "w_h": layer["w_h"], "b": layer["b"]}
                   for index, layer in enumerate(prepared["layers"])],
        "output": {"w": jnp.pad(output["w"], ((0, 0), (0, extra))),
                   "b": jnp.pad(output["b"].astype(jnp.float32), (0, extra), constant_values=-jnp.inf)},
    }
    noise = jnp.pad(scaled_noise.astype(jnp.float32), ((0, 0), (0, 0), (0, extra)))
    carry_leaves = jax.tree.leaves(carry)
    padded = fused_layer.pad_rows((last_ids, noise, *carry_leaves), batch, blocks.rows,
                                  axis=(0, 1) + (0,) * len(carry_leaves))
    last_ids, noise, carry_padded = padded[0], padded[1], jax.tree.unflatten(jax.tree.structure(carry), padded[2:])
    rows = last_ids.shape[0]
    inputs, in_tree = jax.tree.flatten((last_ids, noise, weights, carry_padded))
    states_shape = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct((length + 1,) + leaf.shape, leaf.dtype), carry_padded)
    out_shape, out_tree = jax.tree.flatten((states_shape, jax.ShapeDtypeStruct((length, rows), jnp.int32)))
    outputs = fused_layer.launch(
        functools.partial(_kernel, cell, blocks, config.hidden_size, length, pick, in_tree, out_tree),
        blocks, config.hidden_size, rows, inputs=tuple(inputs), out_shape=tuple(out_shape))
    states, ids = jax.tree.unflatten(out_tree, outputs)
    final = jax.tree.map(lambda history: history[-1, :batch], states)
    return final, ids[:, :batch]


def _kernel(cell: Cell, blocks: Blocks, hidden_size: int, length: int, pick, in_tree, out_tree, *refs):
    inputs = in_tree.num_leaves
    ids_in, noise, weights, carry_in = jax.tree.unflatten(in_tree, refs[:inputs])
    states, ids_out = jax.tree.unflatten(out_tree, refs[inputs + 1:-1])  # refs[inputs]: the counters' input
    counters = refs[-1]
    batch_block = pl.program_id(0)
    rows = pl.ds(batch_block * blocks.rows, blocks.rows)
    unit_blocks = fused_layer.unit_blocks_of(blocks, hidden_size)
    programs = hidden_size // blocks.units
    layers, output, table = weights["layers"], weights["output"], weights["table"]
    vocab = table.shape[0]

    for layer_states, layer_carry in zip(states, carry_in, strict=True):
        for j in unit_blocks:
            for state, initial in zip(layer_states, layer_carry, strict=True):
                state[0, rows, units_of(j, blocks)] = initial[rows, units_of(j, blocks)]
    wait_for_all(blocks, counters, batch_block, programs, 0)

    def character(t, ids):
        one_hot = (jax.lax.broadcasted_iota(jnp.int32, (blocks.rows, vocab), 1) == ids[:, None]).astype(table.dtype)
        for index, (layer, layer_states) in enumerate(zip(layers, states, strict=True)):
            for j in unit_blocks:
                columns = [gate_columns(gate, j, blocks, hidden_size) for gate in range(cell.num_gates)]
                if index == 0:  # the table's rows of the ids, exactly: a one-hot product in full float32
                    z = tuple(jnp.dot(one_hot, table[:, gate], precision=jax.lax.Precision.HIGHEST,
                                      preferred_element_type=jnp.float32) for gate in columns)
                else:
                    below = states[index - 1][0]
                    z = add_products(tuple(jnp.broadcast_to(layer["b"][gate], (blocks.rows, blocks.units))
                                           for gate in columns),
                                     lambda depth: below[t + 1, rows, depth], layer["w_x"], columns, blocks.depth)
                z = add_products(z, lambda depth: layer_states[0][t, rows, depth], layer["w_h"], columns, blocks.depth)
                units = units_of(j, blocks)
                carry, _ = cell.activate_blocks(cell.carry_type(*(state[t, rows, units] for state in layer_states)), z)
                for state, value in zip(layer_states, carry, strict=True):
                    state[t + 1, rows, units] = value.astype(state.dtype)
            wait_for_all(blocks, counters, batch_block, programs, 1 + t * len(layers) + index)
        top = states[-1][0]
        every_symbol = pl.ds(0, vocab)
        (logits,) = add_products((jnp.broadcast_to(output["b"][every_symbol], (blocks.rows, vocab)),),
                                 lambda depth: top[t + 1, rows, depth], output["w"], [every_symbol], blocks.depth)
        next_ids = pick(logits, noise[t, rows, every_symbol]).astype(jnp.int32)
        ids_out[t, rows] = next_ids
        return next_ids

    jax.lax.fori_loop(0, length, character, ids_in[rows])
