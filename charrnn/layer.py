"""Recurrent layers over a whole chunk, with backpropagation through time written out.

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

Layers one above the other run as a wavefront (`run_stack`): iteration k takes
layer l through step k - l, whose input, the layer below's output at that step,
came out of iteration k - 1. The layers of one iteration do not wait for each
other, so their products run side by side on the CPU's cores; the backward pass
runs the same iterations in reverse.
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


def scan_stack(cell: Cell, layers: tuple, carries: tuple, inputs: jax.Array, factors: tuple | None = None,
               unroll: int = 1):
    """Reference: (carries, hiddens) of `scan_layer`s one above the other, layer l > 0 reading hidden_{l-1} ⊙ factors[l-1]."""
    finals, hiddens = [], []
    layer_input = inputs
    for index, (params, carry) in enumerate(zip(layers, carries, strict=True)):
        final, hidden = scan_layer(cell, params, carry, layer_input, unroll)
        finals.append(final)
        hiddens.append(hidden)
        if index + 1 < len(layers):
            layer_input = _dropped(hidden, None if factors is None else factors[index])
    return tuple(finals), tuple(hiddens)


def run_layer(cell: Cell, params: dict, carry, inputs: jax.Array, unroll: int = 1):
    """(carry, hidden [T, B, H]) of one layer over ids [T, B], inputs [T, B, I] or projections [T, B, G*H]:
    `run_stack` of one layer, equal to `scan_layer`."""
    (final,), (hidden,) = run_stack(cell, (params,), (carry,), inputs, None, unroll)
    return final, hidden


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 5))
def run_stack(cell: Cell, layers: tuple, carries: tuple, inputs: jax.Array, factors: tuple | None, unroll: int = 1):
    """(carries, hiddens [T, B, H] each) of layers one above the other, as a wavefront.

    The first layer reads `inputs` as `run_layer` does; layer l > 0 reads the
    outputs of layer l - 1 times `factors[l - 1]` ([T, B, H] or [1, B, H]: dropout
    between layers), or as they are where `factors` is None, through its "w_x"
    and "b". Equal to `scan_stack`, with the backward pass below.
    """
    return scan_stack(cell, layers, carries, inputs, factors, unroll)


def _at(array: jax.Array, t) -> jax.Array:
    return jax.lax.dynamic_index_in_dim(array, t, keepdims=False)


def _chosen(runs, new, old):
    """`new` where the layer runs this iteration, else `old` (pytrees); `new` where `runs` is None (it always runs)."""
    return new if runs is None else jax.tree.map(lambda one, other: jnp.where(runs, one, other), new, old)


def _put(array: jax.Array, value: jax.Array, t, runs=None) -> jax.Array:
    """`array` with step t set to `value`, or left as it is where the layer does not run this iteration."""
    value = _chosen(runs, value.astype(array.dtype), _at(array, t))
    return jax.lax.dynamic_update_index_in_dim(array, value, t, 0)


def _dropped(values: jax.Array, factor) -> jax.Array:
    """A layer's outputs as the layer above reads them: times the dropout `factor`, or as they are where it is None."""
    return values if factor is None else values * factor


def _factor(factors: tuple | None, below: int, t):
    """The dropout factor [B, H] of layer `below`'s output at step t (one for all steps where locked)."""
    if factors is None:
        return None
    return _at(factors[below], t if factors[below].shape[0] > 1 else 0)


def _sweep(advance, state, num_layers: int, num_steps: int, unroll: int, reverse: bool = False):
    """Run `advance(state, steps) -> state` for each wavefront iteration k in [0, T + L - 1), in order or reversed.

    Iteration k runs layer l at step k - l where 0 <= k - l < T: `steps[l]` is
    (that step clamped into [0, T), whether it runs), the latter None for a lone
    layer, which runs every iteration. The L - 1 iterations at either end, where
    some layers wait, are the loop's own: one loop body, however deep the stack.
    """
    def body(state, k):
        steps = []
        for index in range(num_layers):
            t = k - index
            steps.append((t, None) if num_layers == 1 else
                         (jnp.clip(t, 0, num_steps - 1), (t >= 0) & (t < num_steps)))
        return advance(state, steps), None

    ks = jnp.arange(num_steps + num_layers - 1)
    return jax.lax.scan(body, state, ks, reverse=reverse, unroll=unroll)[0]


def _layer_step(cell: Cell, params: dict, carry, layer_input: jax.Array):
    """(carry, h, products) of one step of one layer; `products` is what the backward pass needs of it."""
    x_t = project_input(params, layer_input)  # [B, G*H]
    recurrent = matmul(carry.h, params["w_h"])  # [B, G*H]
    if cell.activate is not None:  # keep z = x + r alone: the backward pass needs nothing else
        z = x_t + recurrent
        new_carry, h = cell.activate(params, carry, z)
        return new_carry, h, (z,)
    new_carry, h = cell.gates(params, carry, x_t, recurrent)
    return new_carry, h, (recurrent, x_t)


def _forward(cell: Cell, layers: tuple, carries: tuple, inputs: jax.Array, factors: tuple | None, unroll: int):
    num_layers, num_steps = len(layers), inputs.shape[0]

    def layer_input(state_carries, index: int, t):
        if index == 0:
            return _at(inputs, t)
        below = state_carries[index - 1].h  # the layer below's output at step t: it ran that step one iteration ago
        return _dropped(below, _factor(factors, index - 1, t))

    def advance(state, steps):
        state_carries, records = state
        new_carries, new_records = [], []
        for index, (t, runs) in enumerate(steps):
            carry = state_carries[index]
            new_carry, h, products = _layer_step(cell, layers[index], carry, layer_input(state_carries, index, t))
            new_carries.append(_chosen(runs, new_carry, carry))
            new_records.append(jax.tree.map(lambda record, value: _put(record, value, t, runs),
                                            records[index], (h, carry, products)))
        return tuple(new_carries), tuple(new_records)

    def empty_record(index: int):  # [T, ...] for each step's (h, carry in, products)
        one = jax.eval_shape(lambda carry: _layer_step(cell, layers[index], carry,
                                                       layer_input(carries, index, 0)), carries[index])
        return jax.tree.map(lambda leaf: jnp.zeros((num_steps,) + leaf.shape, leaf.dtype), (one[1], carries[index], one[2]))

    records = tuple(empty_record(index) for index in range(num_layers))
    finals, records = _sweep(advance, (tuple(carries), records), num_layers, num_steps, unroll)
    hiddens = tuple(record[0] for record in records)
    saved = (layers, tuple(record[1] for record in records), tuple(record[2] for record in records), hiddens,
             inputs, factors)
    return (finals, hiddens), saved


def _local_gradients(cell: Cell, others: dict, carry_in, products: tuple, d_carry, d_h):
    """(d_others, d_carry_in, d_products) of one step's gate arithmetic, d_products shaped as products."""
    if cell.activate is not None:  # products = (z,): dz is both d_recurrent and d_x
        _, vjp = jax.vjp(lambda o, c, z: cell.activate(o, c, z), others, carry_in, *products)
        d_others, d_carry_in, d_z = vjp((d_carry, d_h))
        return d_others, d_carry_in, (d_z,)
    recurrent, x_t = products
    _, vjp = jax.vjp(lambda o, c, r, x: cell.gates(o, c, x, r), others, carry_in, recurrent, x_t)
    d_others, d_carry_in, d_recurrent, d_x = vjp((d_carry, d_h))
    return d_others, d_carry_in, (d_recurrent, d_x)


def _backward(cell: Cell, unroll: int, saved, cotangents):
    layers, carries_in, saved_products, hiddens, inputs, factors = saved
    d_finals, d_hiddens = cotangents
    num_layers, num_steps = len(layers), inputs.shape[0]
    first = layers[0]
    first_dense, first_table = "w_x" in first, "table" in first
    # dr_t W_hᵀ contracts each row of W_h as it lies in memory: faster than multiplying by a transposed copy.
    w_h_transposed = tuple(TransposedWeight(params["w_h"]) for params in layers)
    w_x_transposed = tuple(TransposedWeight(params["w_x"]) if "w_x" in params else None for params in layers)
    others = tuple({name: value for name, value in recurrent_params(params).items() if name != "w_h"}
                   for params in layers)  # gains and shifts, the GRU's b_hn

    def advance(state, steps):
        d_carries, from_above, products, d_others, d_inputs = state
        new_d_carries, new_from_above, new_products, new_d_others = (list(part) for part in state[:4])
        for index, (t, runs) in enumerate(steps):
            d_h = _at(d_hiddens[index], t)
            if index + 1 < num_layers:  # what the layer above sent down for this step, one iteration ago
                d_h = d_h + from_above[index]
            products_t = tuple(_at(product, t) for product in products[index])
            carry_in = jax.tree.map(lambda record: _at(record, t), carries_in[index])
            d_other, d_carry_in, d_products = _local_gradients(cell, others[index], carry_in, products_t,
                                                               d_carries[index], d_h)
            d_recurrent, d_x = d_products[0], d_products[-1]
            d_carry_in = d_carry_in._replace(h=d_carry_in.h + matmul(d_recurrent, w_h_transposed[index]))
            new_d_carries[index] = _chosen(runs, d_carry_in, d_carries[index])
            if index > 0:
                d_below = matmul(d_x, w_x_transposed[index]).astype(d_h.dtype)
                # read one iteration later by the layer below, at this step: only where this layer runs it
                new_from_above[index - 1] = _dropped(d_below, _factor(factors, index - 1, t))
            elif first_dense:
                d_inputs = _put(d_inputs, matmul(d_x, w_x_transposed[0]), t, runs)
            new_products[index] = tuple(_put(product, d_product, t, runs)
                                        for product, d_product in zip(products[index], d_products, strict=True))
            new_d_others[index] = _chosen(runs, jax.tree.map(jnp.add, d_others[index], d_other), d_others[index])
        return tuple(new_d_carries), tuple(new_from_above), tuple(new_products), tuple(new_d_others), d_inputs

    from_above = tuple(jnp.zeros_like(hidden[0]) for hidden in hiddens[:-1])
    d_others = jax.tree.map(jnp.zeros_like, others)
    d_inputs = jnp.zeros(inputs.shape, d_hiddens[0].dtype) if first_dense else None
    state = (tuple(d_finals), from_above, saved_products, d_others, d_inputs)
    d_carries, _, d_products, d_others, d_inputs = _sweep(advance, state, num_layers, num_steps, unroll, reverse=True)

    d_layers = []
    for index, params in enumerate(layers):
        d_recurrents, d_xs = d_products[index][0], d_products[index][-1]
        d_params = dict(d_others[index])
        d_params["w_h"] = weight_gradient(carries_in[index].h, d_recurrents, params["w_h"])
        if index > 0 or first_dense:
            below = inputs if index == 0 else hiddens[index - 1]
            factor = None if index == 0 or factors is None else factors[index - 1]
            d_params["w_x"] = weight_gradient(_dropped(below, factor), d_xs, params["w_x"])
            d_params["b"] = jnp.sum(d_xs, axis=(0, 1)).astype(params["b"].dtype)
        elif first_table:  # rows of the table, added up per character
            table = params["table"]
            d_params["table"] = jnp.zeros(table.shape, d_xs.dtype).at[inputs].add(d_xs).astype(table.dtype)
        else:  # the inputs were the projections
            d_inputs = d_xs.astype(inputs.dtype)
        d_layers.append(d_params)
    d_factors = None if factors is None else tuple(jnp.zeros_like(factor) for factor in factors)
    return tuple(d_layers), d_carries, d_inputs, d_factors


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


run_stack.defvjp(_forward, _backward)
