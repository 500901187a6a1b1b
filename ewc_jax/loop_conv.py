"""A 2-D convolution whose gradients stay fast inside ``lax.scan`` / ``lax.cond`` on CPU.

The runner trains inside one compiled ``lax.scan`` of ``lax.cond`` steps. The two convolutions
that autodiff derives from an NHWC/HWIO ``lax.conv_general_dilated`` have other dimension
layouts (the kernel gradient contracts the batch axis as the feature axis; the input gradient
reads the kernel with its in/out axes swapped); at the top level of a program XLA:CPU transposes
their operands for its fast convolution kernels, inside a loop or conditional body it runs them
with its slow generic emitter instead (jax-ml/jax#12868). Measured here: a CNN train step of
batch 128 took 3.5 s in the runner's scan against 0.09 s jitted alone, a ResNet-18 step 3.4x
its time alone. :func:`loop_conv` computes both gradients as plain NHWC/HWIO convolutions of
explicitly transposed arrays (as jax's own transpose rules, physically transposed):

    dW[h, w, i, o] = Σ_{b, y, x} X_pad[b, s·y + h, s·x + w, i] · dY[b, y, x, o]
                   = conv(lhs = Xᵀ [i, H, W, b], rhs = dYᵀ [Y, X, b, o], rhs_dilation = s),
    dX = conv(lhs = dY, rhs = flip(W) with in/out swapped, lhs_dilation = s),

which run at full speed anywhere (the same numbers as autodiff's). With ``kernel_grad="unfold"``
the kernel gradient is instead one matmul of the unfolded (im2col) input with the output gradient,

    dWᵀ [O, kh·kw·I] = dY [B·Y·X, O]ᵀ · U(X) [B·Y·X, kh·kw·I],

U(X) the kh·kw strided windows of the padded input side by side on the channel axis, for a
transient ``[B, Y, X, kh·kw·I]`` array. Measured on this project's 2-core CPU with the runner's
compiler options (:mod:`ewc_jax.compiler_options`), batch 128: the ``cnn`` backbone's second
convolution's kernel gradient took 9.0 ms as a convolution and 32.7 ms unfolded (the first, one
input channel: 2.6 vs 4.2 ms); the built-in backbones use ``"conv"``. The summation order
differs from autodiff's: equal within rounding.

It is a drop-in for
``nn.Conv(conv_general_dilated=...)`` (ungrouped, undilated 2-D NHWC convolutions; anything
else, and every backend but the CPU, gets ``lax.conv_general_dilated`` itself). The built-in
backbones use it in train mode only (their forward pass is the plain convolution's); the
per-example Fisher (:mod:`ewc_jax.per_example`) runs every convolution of a model through it,
so that its backward pass to the layers' inputs is fast inside its loop over batches.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

_NHWC = ("NHWC", "HWIO", "NHWC")


def _input_grad(dy, w, in_hw, strides, pads, precision):
  """``dx [B, H, W, I]`` of ``y = conv(x, W)``: ``dy`` (dilated by the strides) convolved with
  the flipped kernel, its in/out axes swapped into a plain HWIO array."""
  kernel_hw = w.shape[:2]
  before = [k - lo - 1 for k, (lo, _) in zip(kernel_hw, pads)]
  after = [n_in + k - 1 - ((n_out - 1) * s + 1) - b
           for n_in, k, n_out, s, b in zip(in_hw, kernel_hw, dy.shape[1:3], strides, before)]
  flipped = jnp.transpose(w[::-1, ::-1], (0, 1, 3, 2))
  return lax.conv_general_dilated(dy, flipped, (1, 1), list(zip(before, after)),
                                  lhs_dilation=tuple(strides), dimension_numbers=_NHWC,
                                  precision=precision)


def _kernel_grad(x, dy, kernel_hw, strides, pads, precision):
  """``dW [kh, kw, I, O]`` of ``y = conv(x, W)`` from ``x [B, H, W, I]`` and ``dy [B, Y, X, O]``."""
  hi = [(n_out - 1) * s + k - n_in - lo
        for (lo, _), n_in, n_out, s, k in zip(pads, x.shape[1:3], dy.shape[1:3], strides,
                                              kernel_hw)]
  out = lax.conv_general_dilated(
      jnp.transpose(x, (3, 1, 2, 0)), jnp.transpose(dy, (1, 2, 0, 3)), (1, 1),
      [(lo, h) for (lo, _), h in zip(pads, hi)], rhs_dilation=tuple(strides),
      dimension_numbers=_NHWC, precision=precision)
  return jnp.transpose(out, (1, 2, 0, 3))


def _unfold(x, kernel_hw, out_hw, strides, pads):
  """``U(x) [B, Y, X, kh·kw·I]``: the strided window of every filter offset (row-major) of the
  padded ``x [B, H, W, I]``, side by side on the channel axis (HWIO order of the kernel)."""
  xp = lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0)] + [(lo, hi, 0) for lo, hi in pads]
               + [(0, 0, 0)])
  b, c = x.shape[0], x.shape[-1]
  windows = []
  for i in range(kernel_hw[0]):
    for j in range(kernel_hw[1]):
      start = (0, i, j, 0)
      limit = (b, i + (out_hw[0] - 1) * strides[0] + 1, j + (out_hw[1] - 1) * strides[1] + 1, c)
      windows.append(lax.slice(xp, start, limit, (1, *strides, 1)))
  return jnp.concatenate(windows, axis=-1)


def _kernel_grad_unfold(x, dy, kernel_hw, strides, pads, precision):
  """``dW [kh, kw, I, O]`` as one matmul ``dYᵀ U(x)`` (see the module docstring)."""
  u = _unfold(x, kernel_hw, dy.shape[1:3], strides, pads)
  o = dy.shape[-1]
  g = lax.dot_general(dy.reshape(-1, o), u.reshape(-1, u.shape[-1]), (((0,), (0,)), ((), ())),
                      precision=precision)                      # [O, kh·kw·I]
  return jnp.transpose(g.reshape(o, *kernel_hw, x.shape[-1]), (1, 2, 3, 0))


_KERNEL_GRADS = {"conv": _kernel_grad, "unfold": _kernel_grad_unfold}


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _conv(x, w, strides, pads, precision, kernel_grad):
  return lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=_NHWC,
                                  precision=precision)


def _conv_fwd(x, w, strides, pads, precision, kernel_grad):
  return _conv(x, w, strides, pads, precision, kernel_grad), (x, w)


def _conv_bwd(strides, pads, precision, kernel_grad, residuals, dy):
  x, w = residuals
  dw = _KERNEL_GRADS[kernel_grad](x, dy, w.shape[:2], strides, pads, precision)
  return (_input_grad(dy, w, x.shape[1:3], strides, pads, precision).astype(x.dtype),
          dw.astype(w.dtype))


_conv.defvjp(_conv_fwd, _conv_bwd)


def _canonical(lhs, rhs, dimension_numbers) -> bool:
  if lhs.ndim != 4 or rhs.ndim != 4:
    return False
  want = lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
  return dimension_numbers is not None and lax.conv_dimension_numbers(
      lhs.shape, rhs.shape, dimension_numbers) == want


def loop_conv(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int], padding, *,
              lhs_dilation: Sequence[int] | None = None,
              rhs_dilation: Sequence[int] | None = None, dimension_numbers=None,
              feature_group_count: int = 1, batch_group_count: int = 1, precision=None,
              preferred_element_type=None, kernel_grad: str = "conv") -> jax.Array:
  """``lax.conv_general_dilated`` (same arguments, same values) with the gradients of the
  module docstring for ungrouped, undilated NHWC/HWIO 2-D convolutions on the CPU.

  The arguments after ``padding`` are keyword-only (as ``flax.linen.Conv`` passes them).

  ``kernel_grad``: ``"conv"`` (a plain convolution of transposed arrays) or ``"unfold"`` (one
  matmul of the unfolded input; pass ``functools.partial(loop_conv, kernel_grad="unfold")``).

    >>> import jax.numpy as jnp
    >>> x, w = jnp.ones((2, 5, 5, 3)), jnp.ones((3, 3, 3, 4))
    >>> loop_conv(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")).shape
    (2, 5, 5, 4)
  """
  if kernel_grad not in _KERNEL_GRADS:
    raise ValueError(f"`kernel_grad` must be one of {', '.join(map(repr, _KERNEL_GRADS))}, "
                     f"but got kernel_grad={kernel_grad!r}.")
  plain = (jax.default_backend() != "cpu" or not _canonical(lhs, rhs, dimension_numbers)
           or any(d != 1 for d in tuple(lhs_dilation or ()) + tuple(rhs_dilation or ()))
           or feature_group_count != 1 or batch_group_count != 1
           or preferred_element_type is not None)
  if plain:
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
        batch_group_count=batch_group_count, precision=precision,
        preferred_element_type=preferred_element_type)
  strides = tuple(int(s) for s in window_strides)
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
  pads = tuple((int(lo), int(hi)) for lo, hi in padding)
  return _conv(lhs, rhs, strides, pads, precision, kernel_grad)
