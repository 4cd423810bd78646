"""One recurrent layer over a whole chunk, with backpropagation through time written out.

Forward, each step t does  r_t = h_{t-1} W_h  and  (carry_t, h_t) = gates(carry_{t-1}, x_t, r_t).
Backward runs the same steps in reverse: the gates' local derivatives give
dx_t and dr_t, and dr_t W_hᵀ carries the gradient to h_{t-1}. The weight
gradient  dW_h = Σ_t h_{t-1}ᵀ dr_t  needs nothing from later steps, so instead
of accumulating B-row outer products inside the loop (what differentiating the
scan does), it is one [H, T·B] × [T·B, G·H] matmul after the loop: the same
arithmetic at the efficiency of a large matmul.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from charrnn.cells import Cell, accumulation_dtype, recurrent_matmul


def scan_layer(cell: Cell, params: dict, carry, x_proj: jax.Array, unroll: int = 1):
    """Reference: (carry, hidden [T, B, H]) by differentiating `lax.scan` of the cell step."""
    return jax.lax.scan(functools.partial(cell.step, params), carry, x_proj, unroll=unroll)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 4))
def run_layer(cell: Cell, params: dict, carry, x_proj: jax.Array, unroll: int = 1):
    """(carry, hidden [T, B, H]) of one layer over x_proj [T, B, G*H]; equal to `scan_layer`."""
    return scan_layer(cell, params, carry, x_proj, unroll)


def _forward(cell: Cell, params: dict, carry, x_proj: jax.Array, unroll: int):
    additive = cell.activate is not None

    def step(carry, x_t):
        recurrent = recurrent_matmul(carry.h, params["w_h"])  # [B, G*H]
        if additive:  # keep z = x + r alone: the backward pass needs nothing else
            z = x_t + recurrent
            new_carry, h = cell.activate(params, carry, z)
            return new_carry, (h, carry, z)
        new_carry, h = cell.gates(params, carry, x_t, recurrent)
        return new_carry, (h, carry, recurrent)

    final, (hidden, carries_in, saved_products) = jax.lax.scan(step, carry, x_proj, unroll=unroll)
    return (final, hidden), (params, carries_in, saved_products, None if additive else x_proj)


def _backward(cell: Cell, unroll: int, saved, cotangents):
    params, carries_in, saved_products, x_proj = saved
    d_final, d_hidden = cotangents
    w_h = params["w_h"]
    # The transpose made once, as its own array: a dot that reads w_h transposed
    # inside the loop runs at half the speed of one over a row-major [G*H, H].
    w_h_transposed = jax.lax.optimization_barrier(w_h.T)
    others = {name: value for name, value in params.items() if name != "w_h"}  # e.g. the GRU's b_hn

    def local_gradients(carry_in, products, x_t, d_carry, d_h):
        """(d_others, d_carry_in, d_x, d_recurrent) of one step's gate arithmetic."""
        if x_t is None:  # additive: products = z, and dz is both d_x and d_recurrent
            _, vjp = jax.vjp(lambda o, c, z: cell.activate({**o, "w_h": w_h}, c, z), others, carry_in, products)
            d_others, d_carry_in, d_z = vjp((d_carry, d_h))
            return d_others, d_carry_in, d_z, d_z
        _, vjp = jax.vjp(lambda o, c, x, r: cell.gates({**o, "w_h": w_h}, c, x, r), others, carry_in, x_t, products)
        return vjp((d_carry, d_h))

    def step(d_carry, inputs):
        carry_in, products, x_t, d_h = inputs
        d_others, d_carry_in, d_x, d_recurrent = local_gradients(carry_in, products, x_t, d_carry, d_h)
        d_h_prev = recurrent_matmul(d_recurrent, w_h_transposed)  # [B, H]
        d_carry_in = d_carry_in._replace(h=d_carry_in.h + d_h_prev)
        if x_t is None:
            return d_carry_in, (d_recurrent, d_others)
        return d_carry_in, ((d_x, d_recurrent), d_others)

    d_carry, (d_products, d_others) = jax.lax.scan(
        step, d_final, (carries_in, saved_products, x_proj, d_hidden), reverse=True, unroll=unroll
    )
    d_x_proj, d_recurrents = (d_products, d_products) if x_proj is None else d_products
    h_prev = carries_in.h.astype(w_h.dtype).reshape(-1, w_h.shape[0])  # [T*B, H]
    d_recurrents = d_recurrents.astype(w_h.dtype).reshape(-1, w_h.shape[1])  # [T*B, G*H]
    d_w_h = jnp.dot(h_prev.T, d_recurrents, preferred_element_type=accumulation_dtype(w_h.dtype))  # [H, G*H]
    d_params = {name: jnp.sum(value, axis=0) for name, value in d_others.items()}
    d_params["w_h"] = d_w_h.astype(w_h.dtype)
    return d_params, d_carry, d_x_proj.astype(d_hidden.dtype)


run_layer.defvjp(_forward, _backward)
