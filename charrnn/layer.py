"""One recurrent layer over a whole chunk, with backpropagation through time written out.

Forward, step t projects its input inside the loop (where `model.projects_per_step`),
so no [T, B, G*H] array of projections goes through memory: x_t = table[id_t] in
the first layer (embedding and input weights folded into one [V, G*H] table),
in_t W_x + b above. Then r_t = h_{t-1} W_h and
(carry_t, h_t) = gates(carry_{t-1}, x_t, r_t).
Backward runs the steps in reverse: the gates' local derivatives give dx_t and
dr_t; dr_t W_hᵀ flows to h_{t-1}, dx_t W_xᵀ to the layer below. dW_h = Σ_t h_{t-1}ᵀ dr_t
and dW_x = Σ_t in_tᵀ dx_t need nothing from later steps, so each is one
[I, T·B] × [T·B, G·H] matmul after the loop, not B-row outer products inside it
(what differentiating the scan does). The reverse loop writes each step's
gradients over the products it saved for that step, so the backward pass
allocates and zero-fills no [T, B, G·H] arrays of its own.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from charrnn.cells import Cell, TransposedWeight, accumulation_dtype, dense, matmul

INPUT_PARAMS = ("table", "w_x", "b")  # the input projection's params; the rest belong to the cell


def recurrent_params(params: dict) -> dict:
    """A layer's params without its input projection's."""
    return {name: value for name, value in params.items() if name not in INPUT_PARAMS}


def project_input(params: dict, inputs: jax.Array) -> jax.Array:
    """The input projection x [..., G*H] of the layer's inputs, by what the params hold:
    a "table" for character ids (a row each), "w_x" and "b" for the layer below's
    outputs, or neither when the inputs are projections already (computed before the loop).
    """
    if "table" in params:
        return params["table"][inputs]
    if "w_x" not in params:
        return inputs
    return dense(inputs, params["w_x"], params["b"])


def scan_layer(cell: Cell, params: dict, carry, inputs: jax.Array, unroll: int = 1):
    """Reference: (carry, hidden [T, B, H]) by differentiating `lax.scan` of the cell step."""
    def step(carry, input_t):
        return cell.step(params, carry, project_input(params, input_t))

    return jax.lax.scan(step, carry, inputs, unroll=unroll)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 4))
def run_layer(cell: Cell, params: dict, carry, inputs: jax.Array, unroll: int = 1):
    """(carry, hidden [T, B, H]) of one layer over ids [T, B], inputs [T, B, I] or projections [T, B, G*H].

    Equal to `scan_layer`, with the backward pass below.
    """
    return scan_layer(cell, params, carry, inputs, unroll)


def _forward(cell: Cell, params: dict, carry, inputs: jax.Array, unroll: int):
    additive = cell.activate is not None

    def step(carry, input_t):
        x_t = project_input(params, input_t)  # [B, G*H]
        recurrent = matmul(carry.h, params["w_h"])  # [B, G*H]
        if additive:  # keep z = x + r alone: the backward pass needs nothing else
            z = x_t + recurrent
            new_carry, h = cell.activate(params, carry, z)
            return new_carry, (h, carry, (z,))
        new_carry, h = cell.gates(params, carry, x_t, recurrent)
        return new_carry, (h, carry, (recurrent, x_t))

    final, (hidden, carries_in, saved_products) = jax.lax.scan(step, carry, inputs, unroll=unroll)
    return (final, hidden), (params, carries_in, saved_products, inputs)


def _backward(cell: Cell, unroll: int, saved, cotangents):
    params, carries_in, saved_products, inputs = saved
    d_final, d_hidden = cotangents
    w_h, dense_input, table_input = params["w_h"], "w_x" in params, "table" in params
    additive = cell.activate is not None
    # dr_t W_hᵀ contracts each row of W_h as it lies in memory: faster than multiplying by a transposed copy.
    w_h_transposed = TransposedWeight(w_h)
    w_x_transposed = TransposedWeight(params["w_x"]) if dense_input else None
    others = {name: value for name, value in recurrent_params(params).items() if name != "w_h"}  # the GRU's b_hn

    def local_gradients(carry_in, products, d_carry, d_h):
        """(d_others, d_carry_in, d_products) of one step's gate arithmetic, d_products shaped as products."""
        if additive:  # products = (z,): dz is both d_recurrent and d_x
            _, vjp = jax.vjp(lambda o, c, z: cell.activate(o, c, z), others, carry_in, *products)
            d_others, d_carry_in, d_z = vjp((d_carry, d_h))
            return d_others, d_carry_in, (d_z,)
        recurrent, x_t = products
        _, vjp = jax.vjp(lambda o, c, r, x: cell.gates(o, c, x, r), others, carry_in, recurrent, x_t)
        d_others, d_carry_in, d_recurrent, d_x = vjp((d_carry, d_h))
        return d_others, d_carry_in, (d_recurrent, d_x)

    def step(state, step_saved):
        d_carry, products = state  # products [T, ...]: steps after t hold their gradients already
        carry_in, d_h, t = step_saved
        products_t = tuple(jax.lax.dynamic_index_in_dim(product, t, keepdims=False) for product in products)
        d_others, d_carry_in, d_products = local_gradients(carry_in, products_t, d_carry, d_h)
        d_recurrent, d_x = d_products[0], d_products[-1]
        d_carry_in = d_carry_in._replace(h=d_carry_in.h + matmul(d_recurrent, w_h_transposed))
        d_input = matmul(d_x, w_x_transposed).astype(d_h.dtype) if dense_input else None
        products = tuple(jax.lax.dynamic_update_index_in_dim(product, d_product.astype(product.dtype), t, 0)
                         for product, d_product in zip(products, d_products, strict=True))
        return (d_carry_in, products), (d_input, d_others)

    steps = jnp.arange(d_hidden.shape[0])
    (d_carry, d_products), (d_inputs, d_others) = jax.lax.scan(
        step, (d_final, saved_products), (carries_in, d_hidden, steps), reverse=True, unroll=unroll
    )
    d_recurrents, d_xs = d_products[0], d_products[-1]
    d_params = {name: jnp.sum(value, axis=0) for name, value in d_others.items()}
    d_params["w_h"] = weight_gradient(carries_in.h, d_recurrents, w_h)
    if dense_input:
        d_params["w_x"] = weight_gradient(inputs, d_xs, params["w_x"])
        d_params["b"] = jnp.sum(d_xs, axis=(0, 1)).astype(params["b"].dtype)
    elif table_input:  # rows of the table, added up per character
        table = params["table"]
        d_params["table"] = jnp.zeros(table.shape, d_xs.dtype).at[inputs].add(d_xs).astype(table.dtype)
    else:  # the inputs were the projections
        d_inputs = d_xs.astype(inputs.dtype)
    return d_params, d_carry, d_inputs


def weight_gradient(layer_inputs: jax.Array, d_outputs: jax.Array, w: jax.Array) -> jax.Array:
    """Σ_t in_tᵀ d_t over all steps and streams [T, B] as one contraction, an [I, T·B] × [T·B, G·H] matmul.

    Contracting the step and stream axes in place, rather than after merging them
    into one, lets a run whose streams are split across devices sum each device's
    share and add the shares up, instead of first gathering every stream everywhere.
    """
    inputs_first = jnp.transpose(layer_inputs.astype(w.dtype), (2, 0, 1))  # [I, T, B]: the smaller operand moves
    contract = ((1, 2), (0, 1))
    return jax.lax.dot_general(inputs_first, d_outputs.astype(w.dtype), (contract, ((), ())),
                               preferred_element_type=accumulation_dtype(w.dtype)).astype(w.dtype)


run_layer.defvjp(_forward, _backward)
