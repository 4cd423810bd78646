"""A recurrent layer's whole time loop in one kernel launch (Pallas), forward and backward.

XLA runs a layer as a loop that launches the recurrent matmul h_{t-1} W_h and
then the gate arithmetic at every step. Here one launch runs all T steps, after
the persistent-RNN idea (Diamos et al. 2016). Program (b, j) owns block b of the
batch rows and block j of the hidden units. At step t it multiplies its rows'
whole h_{t-1} by the columns of W_h that feed its units' G gates. It adds the
input projections, applies the gates (`Cell.activate_blocks`) and writes its
block of the new carry. The programs of one batch block then wait for each other
on an atomic counter before step t+1 reads h_t. Every program must be resident
at once, so the grid never has more programs than the GPU has multiprocessors.

The backward kernel runs the steps in reverse with the same split. Program (b, j)
gets its units' dz_t from the gates' local derivatives; once every program has
written its part of dz_t, it computes dh_{t-1} for its units as dz_t W_h[units]ᵀ.
dW_h needs nothing from other steps: it is one matmul after the loop
(`layer.weight_gradient`), as in charrnn/layer.py.

The kernels take cells whose gates see only z = x_proj + h W_h (rnn, lstm), with
the input projections computed before the loop. On a CPU they run in Pallas's
interpreter: one program per batch block does every unit block in turn, so no
program waits for another. That is how the tests check them against charrnn/layer.py.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from charrnn.cells import Cell, accumulation_dtype
from charrnn.config import PALLAS_UNIT as UNIT  # Triton multiplies blocks of at least 16 × 16: rows, units, depth
from charrnn.layer import weight_gradient

MAX_ROWS = 64  # batch rows per program: more programs of fewer rows spread a step over more multiprocessors


class Blocks(NamedTuple):
    rows: int  # batch rows per program
    units: int  # hidden units per program, each with its G gate columns
    depth: int  # the matmuls' contraction, this many columns at a time
    parallel: bool  # one program per unit block, waiting on each other (GPU); else every unit block in turn (interpreter)


def choose_blocks(batch: int, hidden_size: int, programs: int | None) -> Blocks | None:
    """Block sizes for a [batch, hidden_size] layer, or None where its programs cannot all be resident at once.

    `programs`: how many the device runs at once (None: the interpreter, one program per batch block).
    """
    if programs is None:
        return Blocks(UNIT, UNIT, UNIT, parallel=False)
    depth = next(size for size in (64, 32, UNIT) if hidden_size % size == 0)
    rows = max(UNIT, min(MAX_ROWS, pl.next_power_of_2(batch)))
    units = UNIT
    while _batch_blocks(batch, rows) * (hidden_size // units) > programs:
        if hidden_size % (2 * units) == 0:
            units *= 2
        elif rows < pl.next_power_of_2(batch):
            rows *= 2
        else:
            return None
    return Blocks(rows, units, depth, parallel=True)


def _batch_blocks(batch: int, rows: int) -> int:
    return -(-batch // rows)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 4))
def run_layer(cell: Cell, params: dict, carry, projections: jax.Array, blocks: Blocks):
    """(carry, hidden [T, B, H]) of one layer over input projections [T, B, G*H], as `layer.run_layer` computes it."""
    return _forward(cell, params, carry, projections, blocks)[0]


def _forward(cell: Cell, params: dict, carry, projections: jax.Array, blocks: Blocks):
    w_h = params["w_h"]
    steps, batch, _ = projections.shape
    hidden_size = w_h.shape[0]
    padded = pad_rows((projections, *carry), batch, blocks.rows, axis=(1,) + (0,) * len(carry))
    projections_padded, carry_padded = padded[0], padded[1:]
    rows = projections_padded.shape[1]
    state_shape = jax.ShapeDtypeStruct((steps + 1, rows, hidden_size), carry[0].dtype)
    outputs = launch(
        functools.partial(_forward_kernel, cell, blocks, steps, hidden_size),
        blocks, hidden_size, rows,
        inputs=(projections_padded, w_h, *carry_padded),
        out_shape=(*(state_shape for _ in carry),
                   jax.ShapeDtypeStruct((steps, rows, cell.num_gates * hidden_size), accumulation_dtype(w_h.dtype))),
    )
    states = cell.carry_type(*(state[:, :batch] for state in outputs[:len(carry)]))  # [T+1, B, H] each
    zs = outputs[len(carry)][:, :batch]
    final = cell.carry_type(*(state[-1] for state in states))
    return (final, states.h[1:]), (w_h, states, zs, jnp.zeros((0,), projections.dtype))  # the last: its dtype


def _backward(cell: Cell, blocks: Blocks, saved, cotangents):
    w_h, states, zs, projections_like = saved
    d_final, d_hidden = cotangents
    steps, batch, _ = zs.shape
    hidden_size = w_h.shape[0]
    padded = pad_rows((*states, zs, d_hidden, *d_final), batch, blocks.rows,
                       axis=(1,) * (len(states) + 2) + (0,) * len(d_final))
    rows = padded[0].shape[-2]
    fields = len(states)
    outputs = launch(
        functools.partial(_backward_kernel, cell, blocks, steps, hidden_size),
        blocks, hidden_size, rows,
        inputs=(w_h, *padded),
        out_shape=(jax.ShapeDtypeStruct(zs.shape[:1] + (rows,) + zs.shape[2:], zs.dtype),
                   *(jax.ShapeDtypeStruct((rows, hidden_size), d.dtype) for d in d_final)),
        aliases={1 + fields: 0},  # dz_t overwrites z_t, read for the last time just before
    )
    d_zs = outputs[0][:, :batch]
    d_carry = cell.carry_type(*(d[:batch] for d in outputs[1:]))
    d_w_h = weight_gradient(states.h[:-1], d_zs, w_h)
    return {"w_h": d_w_h}, d_carry, d_zs.astype(projections_like.dtype)


run_layer.defvjp(_forward, _backward)


def pad_rows(arrays: tuple, batch: int, block_rows: int, axis: tuple[int, ...]) -> tuple:
    """The arrays with their batch axis padded with zeros to whole blocks of rows."""
    extra = _batch_blocks(batch, block_rows) * block_rows - batch
    if extra == 0:
        return arrays
    return tuple(jnp.pad(array, [(0, extra if dim == batch_axis else 0) for dim in range(array.ndim)])
                 for array, batch_axis in zip(arrays, axis, strict=True))


def launch(kernel, blocks: Blocks, hidden_size: int, rows: int, inputs: tuple, out_shape: tuple, aliases=None):
    """Launch `kernel` over a grid of (batch blocks, unit blocks), with one wait counter per batch block."""
    row_blocks = rows // blocks.rows
    grid = (row_blocks, hidden_size // blocks.units if blocks.parallel else 1)
    counters = jnp.zeros((row_blocks,), jnp.int32)
    aliases = {**(aliases or {}), len(inputs): len(out_shape)}  # the counters are updated in place
    outputs = pl.pallas_call(
        kernel, grid=grid, input_output_aliases=aliases, interpret=not blocks.parallel,
        out_shape=(*out_shape, jax.ShapeDtypeStruct(counters.shape, counters.dtype)),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1) if blocks.parallel else None,
    )(*inputs, counters)
    return outputs[:-1]


def unit_blocks_of(blocks: Blocks, hidden_size: int) -> list:
    """The unit blocks this program computes: its own (GPU), or all of them in turn (interpreter)."""
    return [pl.program_id(1)] if blocks.parallel else list(range(hidden_size // blocks.units))


def units_of(unit_block, blocks: Blocks):
    """The units of `unit_block`, in an [.., H] row."""
    return pl.ds(unit_block * blocks.units, blocks.units)


def gate_columns(gate: int, unit_block, blocks: Blocks, hidden_size: int):
    """Gate `gate`'s columns of the units in `unit_block`, in a [.., G*H] row of gate blocks side by side."""
    return pl.ds(gate * hidden_size + unit_block * blocks.units, blocks.units)


def add_products(sums: tuple, read_x, w, columns: list, depth_size: int) -> tuple:
    """sums[g] + x w[:, columns[g]] for each g, summed in float32: read_x(depth) gives x [rows, I] `depth_size`
    columns at a time, multiplied by the matching rows of w [I, ...]."""
    def accumulate(k, sums):
        depth = pl.ds(k * depth_size, depth_size)
        x = read_x(depth).astype(w.dtype)
        return tuple(total + jnp.dot(x, w[depth, gate], preferred_element_type=accumulation_dtype(w.dtype))
                     for total, gate in zip(sums, columns, strict=True))

    return jax.lax.fori_loop(0, w.shape[0] // depth_size, accumulate, sums)


def wait_for_all(blocks: Blocks, counters, batch_block, programs: int, phase: int):
    """Return once every program of this batch block has finished `phase` (0, 1, ...) and its writes are visible."""
    if not blocks.parallel:  # one program does every unit block: its own writes are in order
        return
    plgpu.debug_barrier()  # every thread of this program has stored its part
    plgpu.atomic_add(counters, batch_block, 1)
    target = (phase + 1) * programs
    jax.lax.while_loop(lambda seen: seen < target, lambda _: plgpu.atomic_add(counters, batch_block, 0),
                       plgpu.atomic_add(counters, batch_block, 0))
    plgpu.debug_barrier()


def _forward_kernel(cell: Cell, blocks: Blocks, steps: int, hidden_size: int, xs, w_h, *refs):
    fields = len(cell.carry_type._fields)
    carry_in, states, zs = refs[:fields], refs[fields + 1:2 * fields + 1], refs[2 * fields + 1]
    counters = refs[-1]  # the output aliased to the counters' input, refs[fields]
    batch_block = pl.program_id(0)
    rows = pl.ds(batch_block * blocks.rows, blocks.rows)
    unit_blocks = unit_blocks_of(blocks, hidden_size)
    programs = hidden_size // blocks.units
    accumulate_as = accumulation_dtype(w_h.dtype)

    for j in unit_blocks:
        for initial, state in zip(carry_in, states, strict=True):
            state[0, rows, units_of(j, blocks)] = initial[rows, units_of(j, blocks)]
    wait_for_all(blocks, counters, batch_block, programs, 0)

    def step(t, _):
        for j in unit_blocks:
            columns = [gate_columns(gate, j, blocks, hidden_size) for gate in range(cell.num_gates)]

            z = add_products(tuple(xs[t, rows, gate].astype(accumulate_as) for gate in columns),
                             lambda depth: states[0][t, rows, depth], w_h, columns, blocks.depth)
            units = units_of(j, blocks)
            carry, _ = cell.activate_blocks(cell.carry_type(*(state[t, rows, units] for state in states)), z)
            for gate, z_gate in zip(columns, z, strict=True):
                zs[t, rows, gate] = z_gate.astype(zs.dtype)
            for state, value in zip(states, carry, strict=True):
                state[t + 1, rows, units] = value.astype(state.dtype)
        wait_for_all(blocks, counters, batch_block, programs, t + 1)

    jax.lax.fori_loop(0, steps, step, None)


def _backward_kernel(cell: Cell, blocks: Blocks, steps: int, hidden_size: int, w_h, *refs):
    fields = len(cell.carry_type._fields)
    states, zs, d_hidden, d_final = refs[:fields], refs[fields], refs[fields + 1], refs[fields + 2:2 * fields + 2]
    d_zs, d_carry_out = refs[2 * fields + 3], refs[2 * fields + 4:3 * fields + 4]
    counters = refs[-1]  # the output aliased to the counters' input, refs[2 * fields + 2]
    batch_block = pl.program_id(0)
    rows = pl.ds(batch_block * blocks.rows, blocks.rows)
    unit_blocks = unit_blocks_of(blocks, hidden_size)
    programs = hidden_size // blocks.units
    accumulate_as = accumulation_dtype(w_h.dtype)

    def step(i, d_carries):  # d_carries: per unit block, the carry's cotangent from step t+1
        t = steps - 1 - i
        d_carries_in = []
        for j, d_carry in zip(unit_blocks, d_carries, strict=True):
            units = units_of(j, blocks)
            columns = [gate_columns(gate, j, blocks, hidden_size) for gate in range(cell.num_gates)]
            carry = cell.carry_type(*(state[t, rows, units] for state in states))
            z = tuple(zs[t, rows, gate] for gate in columns)
            _, local_vjp = jax.vjp(cell.activate_blocks, carry, z)
            d_carry_in, d_z = local_vjp((d_carry, d_hidden[t, rows, units].astype(carry.h.dtype)))
            for gate, d_z_gate in zip(columns, d_z, strict=True):
                d_zs[t, rows, gate] = d_z_gate.astype(d_zs.dtype)
            d_carries_in.append(d_carry_in)
        wait_for_all(blocks, counters, batch_block, programs, i)

        def through_w_h(j):
            def accumulate(k, total):  # total += dz_t[rows, depth k of the gate columns] W_h[units j, depth k]ᵀ
                depth = pl.ds(k * blocks.depth, blocks.depth)
                d_z = d_zs[t, rows, depth].astype(w_h.dtype)
                return total + jnp.dot(d_z, w_h[units_of(j, blocks), depth].T, preferred_element_type=accumulate_as)

            return jax.lax.fori_loop(0, cell.num_gates * hidden_size // blocks.depth, accumulate,
                                     jnp.zeros((blocks.rows, blocks.units), accumulate_as))

        return tuple(d_carry._replace(h=d_carry.h + through_w_h(j).astype(d_carry.h.dtype))
                     for j, d_carry in zip(unit_blocks, d_carries_in, strict=True))

    initial = tuple(cell.carry_type(*(d[rows, units_of(j, blocks)] for d in d_final)) for j in unit_blocks)
    d_carries = jax.lax.fori_loop(0, steps, step, initial)
    for j, d_carry in zip(unit_blocks, d_carries, strict=True):
        for out, value in zip(d_carry_out, d_carry, strict=True):
            out[rows, units_of(j, blocks)] = value.astype(out.dtype)
