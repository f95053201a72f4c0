"""Convolution that avoids XLA:CPU's slow path on tiny feature maps.

:func:`conv_general_dilated` has ``lax.conv_general_dilated``'s signature.
For 2-D convs whose output map has at most :data:`MAX_OUT_PIXELS` pixels,
when the computation runs on a CPU, it computes the conv with matmuls instead:

* kernel taps ``(dy, dx)`` whose window reads only padding at every output
  position are dropped (statically, from the shapes);
* if the input map has no more pixels than there are live taps (1x1 maps,
  2x2 at stride 1 or 2) and the batch has at least as many images as the map
  has pixels, the conv is one dense layer: the kernel is unrolled
  into a ``(H*W*Cin, Ho*Wo*Cout)`` matrix (each entry a copy of a kernel
  weight or zero, built by a 0/1 selection matmul), which also skips the
  padding reads of live taps;
* otherwise (e.g. 4x4 -> 2x2 at stride 2) it is a tap-pruned im2col: strided
  slices of the padded input for the live taps, concatenated along channels,
  times the matching kernel rows.

Grouped convs become matmuls batched over groups. Gradients come from
autodiff of these ops (forward and backward are matmuls too). Everything
else (larger outputs, dilations, ``batch_group_count > 1``, other platforms)
calls ``lax.conv_general_dilated``.

Either way the high padding is first trimmed to what the last window reads
(:func:`read_padding`; :func:`lax_conv_general_dilated` is that trim plus
``lax.conv_general_dilated``): the same output, bit for bit, but a program
every compiler takes. RepVGG pads 3x3 convs by (1, 1); at stride 2 on an even
map the high row is never read, and IREE (3.13, llvm-cpu) rejects such a conv
when its output is one pixel wide (``'linalg.generic' op inferred input/output
operand #1 has shape's dimension #0 to be 4, but found 3`` for 2x2 -> 1x1);
``(1, 0)`` compiles.

The platform is the one the computation is lowered for, not
``jax.default_backend()`` at trace time: ``lax.platform_dependent`` keeps both
forms in the traced program and the lowering keeps the one for its device, so a
function jitted onto a CPU device on a GPU machine (or exported for several
platforms) gets the right form.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# Largest output map (Ho * Wo) computed with matmuls. On XLA:CPU these win by
# 2-50x for 2x2 and 1x1 outputs (most in the backward pass), tie at 3x3 and
# lose at 4x4 and above; see ``benchmarks/conv_impl.py --layers``.
MAX_OUT_PIXELS = 4
# Platforms where the matmul forms are used (measured on CPU only).
PLATFORMS = ("cpu",)


def _out_size(size: int, kernel: int, stride: int, pad: tuple[int, int]) -> int:
  return max((size + pad[0] + pad[1] - kernel) // stride + 1, 0)


def read_padding(size: int, kernel: int, stride: int, pad: tuple[int, int]) -> tuple[int, int]:
  """``pad`` (low, high) along one axis with the high padding trimmed to what the
  last window reads: the same output size and values. ``lo`` is kept; ``hi`` only
  shrinks (never below 0, so nothing of the input is cropped). ``size`` and
  ``kernel`` are the (dilated) input and kernel extents."""
  lo, hi = (int(p) for p in pad)
  out = (size + lo + hi - kernel) // stride + 1
  if lo < 0 or hi <= 0 or out <= 0:
    return lo, hi
  # The last window covers padded rows [(out - 1) * stride, (out - 1) * stride + kernel).
  reach = (out - 1) * stride + kernel - lo - size
  return lo, min(hi, max(reach, 0))


def read_paddings(lhs_shape: Sequence[Any], rhs_shape: Sequence[Any],
                  window_strides: Sequence[int], padding: str | Sequence[tuple[int, int]],
                  lhs_dilation: Sequence[int] | None = None,
                  rhs_dilation: Sequence[int] | None = None,
                  dimension_numbers: Any = None) -> str | list[tuple[int, int]]:
  """``lax.conv_general_dilated``'s ``padding`` as explicit (low, high) pairs, each
  trimmed by :func:`read_padding`; unchanged when a spatial size is symbolic."""
  dn = lax.conv_dimension_numbers(lhs_shape, rhs_shape, dimension_numbers)
  sizes = [lhs_shape[i] for i in dn.lhs_spec[2:]]
  kernels = [rhs_shape[i] for i in dn.rhs_spec[2:]]
  if not all(isinstance(d, (int, np.integer)) for d in (*sizes, *kernels)):
    return padding
  ones = (1,) * len(sizes)
  lhs_dilation, rhs_dilation = tuple(lhs_dilation or ones), tuple(rhs_dilation or ones)
  kernels = [(k - 1) * r + 1 if k else 0 for k, r in zip(kernels, rhs_dilation)]
  if isinstance(padding, str):  # as lax resolves it: from the undilated input
    padding = lax.padtype_to_pads(sizes, kernels, window_strides, padding)
  sizes = [(s - 1) * d + 1 if s else 0 for s, d in zip(sizes, lhs_dilation)]
  return [read_padding(s, k, t, p) for s, k, t, p in zip(sizes, kernels, window_strides, padding)]


def lax_conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
                             padding: str | Sequence[tuple[int, int]],
                             lhs_dilation: Sequence[int] | None = None,
                             rhs_dilation: Sequence[int] | None = None,
                             dimension_numbers: Any = None, feature_group_count: int = 1,
                             batch_group_count: int = 1, precision: Any = None,
                             preferred_element_type: Any = None) -> jax.Array:
  """``lax.conv_general_dilated`` with the padding trimmed by :func:`read_paddings`."""
  padding = read_paddings(lhs.shape, rhs.shape, window_strides, padding, lhs_dilation,
                          rhs_dilation, dimension_numbers)
  return lax.conv_general_dilated(
      lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
      feature_group_count, batch_group_count, precision, preferred_element_type)


def live_taps(size: int, kernel: int, stride: int, pad: tuple[int, int]) -> list[int]:
  """Kernel offsets along one axis that read a real (non-padding) input for
  at least one output position."""
  rows = np.arange(_out_size(size, kernel, stride, pad)) * stride - pad[0]
  return [d for d in range(kernel) if np.any((rows + d >= 0) & (rows + d < size))]


def _live_kernel(k: jax.Array, dys: list[int], dxs: list[int]) -> jax.Array:
  """``k[dys][:, dxs]`` as (T, Cin/groups, Cout), slicing when contiguous."""
  if dys == list(range(dys[0], dys[-1] + 1)) and dxs == list(range(dxs[0], dxs[-1] + 1)):
    kk = k[dys[0]:dys[-1] + 1, dxs[0]:dxs[-1] + 1]
  else:
    kk = k[np.array(dys)][:, np.array(dxs)]
  return kk.reshape(len(dys) * len(dxs), *k.shape[2:])


def _selection(h: int, w: int, dys: list[int], dxs: list[int], strides: Sequence[int],
               pads: Sequence[tuple[int, int]], ho: int, wo: int) -> np.ndarray:
  """0/1 array ``S[t, q, o]``: live tap ``t`` maps input pixel ``q`` to output ``o``."""
  s = np.zeros((len(dys), len(dxs), h, w, ho, wo), np.float32)
  for i, dy in enumerate(dys):
    for j, dx in enumerate(dxs):
      for oy in range(ho):
        for ox in range(wo):
          y, x = oy * strides[0] + dy - pads[0][0], ox * strides[1] + dx - pads[1][0]
          if 0 <= y < h and 0 <= x < w:
            s[i, j, y, x, oy, ox] = 1
  return s.reshape(len(dys) * len(dxs), h * w, ho * wo)


def _unrolled_conv(x: jax.Array, k: jax.Array, sel: np.ndarray, groups: int, ho: int,
                   wo: int, precision: Any, preferred_element_type: Any) -> jax.Array:
  """NHWC x (T, Cin_g, Cout) live taps -> NHWC, as ``x @ unrolled kernel``."""
  n, h, w, cin = x.shape
  taps, cin_g, cout = k.shape
  cout_g = cout // groups
  # W[q, o, c, g, co] = sum_t S[t, q, o] k[t, c, g, co]: exact copies or zeros.
  wmat = lax.dot_general(jnp.asarray(sel, k.dtype), k.reshape(taps, cin_g, groups, cout_g),
                         (((0,), (0,)), ((), ())), precision=lax.Precision.HIGHEST)
  xg = x.reshape(n, h * w, groups, cin_g)
  # Contract (q, c), batch over g: (G, N, O, Cout_g).
  y = lax.dot_general(xg, wmat, (((1, 3), (0, 2)), ((2,), (3,))), precision=precision,
                      preferred_element_type=preferred_element_type)
  if groups == 1:
    return y.reshape(n, ho, wo, cout)
  return jnp.moveaxis(y, 0, 2).reshape(n, ho, wo, cout)


def _im2col_conv(x: jax.Array, k: jax.Array, dys: list[int], dxs: list[int],
                 strides: Sequence[int], pads: Sequence[tuple[int, int]], groups: int,
                 ho: int, wo: int, precision: Any, preferred_element_type: Any) -> jax.Array:
  """NHWC x (T, Cin_g, Cout) live taps -> NHWC, as ``patches @ kernel rows``."""
  n, h, w, cin = x.shape
  taps, cin_g, cout = k.shape
  (sh, sw), (ph, pw) = strides, pads
  # Pad only as far as the live taps reach.
  lo_h, lo_w = max(ph[0] - dys[0], 0), max(pw[0] - dxs[0], 0)
  hi_h = max((ho - 1) * sh + dys[-1] - ph[0] - (h - 1), 0)
  hi_w = max((wo - 1) * sw + dxs[-1] - pw[0] - (w - 1), 0)
  xp = jnp.pad(x, ((0, 0), (lo_h, hi_h), (lo_w, hi_w), (0, 0)))
  cols = []
  for dy in dys:
    for dx in dxs:
      y0, x0 = dy - ph[0] + lo_h, dx - pw[0] + lo_w
      cols.append(lax.slice(xp, (0, y0, x0, 0),
                            (n, y0 + (ho - 1) * sh + 1, x0 + (wo - 1) * sw + 1, cin),
                            (1, sh, sw, 1)))
  m = n * ho * wo
  if groups == 1:
    patches = cols[0] if taps == 1 else jnp.concatenate(cols, axis=-1)
    y = lax.dot_general(patches.reshape(m, taps * cin), k.reshape(taps * cin, cout),
                        (((1,), (0,)), ((), ())), precision=precision,
                        preferred_element_type=preferred_element_type)
    return y.reshape(n, ho, wo, cout)
  cout_g = cout // groups
  # (M, T, G, Cin_g) x (T, Cin_g, G, Cout_g), contracted over (T, Cin_g), batched over G.
  patches = jnp.stack(cols, axis=-2).reshape(m, taps, groups, cin_g)
  y = lax.dot_general(patches, k.reshape(taps, cin_g, groups, cout_g),
                      (((1, 3), (0, 1)), ((2,), (2,))), precision=precision,
                      preferred_element_type=preferred_element_type)  # (G, M, Cout_g)
  return jnp.moveaxis(y, 0, 1).reshape(n, ho, wo, cout)


def _tiny_conv(x: jax.Array, k: jax.Array, strides: Sequence[int],
               pads: Sequence[tuple[int, int]], groups: int, precision: Any,
               preferred_element_type: Any) -> jax.Array:
  """NHWC x HWIO conv with matmuls over the live taps only."""
  n, h, w, _ = x.shape
  kh, kw, _, cout = k.shape
  ho, wo = (_out_size(x.shape[i + 1], k.shape[i], strides[i], pads[i]) for i in (0, 1))
  dys, dxs = live_taps(h, kh, strides[0], pads[0]), live_taps(w, kw, strides[1], pads[1])
  if not dys or not dxs:  # every window reads only padding
    dtype = preferred_element_type or jnp.result_type(x, k)
    return jnp.zeros((n, ho, wo, cout), dtype)
  kk = _live_kernel(k, dys, dxs)
  # Unrolled kernel: no more MACs than im2col per image, but building it costs
  # taps * (H*W) * (Ho*Wo) * Cin * Cout/groups multiply-adds whatever the batch,
  # more than the conv itself when the batch is smaller than H*W (batch-1 inference).
  if h * w <= len(dys) * len(dxs) and n >= h * w:
    sel = _selection(h, w, dys, dxs, strides, pads, ho, wo)
    return _unrolled_conv(x, kk, sel, groups, ho, wo, precision, preferred_element_type)
  return _im2col_conv(x, kk, dys, dxs, strides, pads, groups, ho, wo, precision,
                      preferred_element_type)


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
                         padding: str | Sequence[tuple[int, int]],
                         lhs_dilation: Sequence[int] | None = None,
                         rhs_dilation: Sequence[int] | None = None,
                         dimension_numbers: Any = None, feature_group_count: int = 1,
                         batch_group_count: int = 1, precision: Any = None,
                         preferred_element_type: Any = None) -> jax.Array:
  """Drop-in ``lax.conv_general_dilated``; matmuls for tiny 2-D outputs on CPU devices.
  The padding is trimmed by :func:`read_paddings` for both forms."""
  padding = read_paddings(lhs.shape, rhs.shape, window_strides, padding, lhs_dilation,
                          rhs_dilation, dimension_numbers)

  def xla(lhs, rhs):
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
        feature_group_count, batch_group_count, precision, preferred_element_type)

  if (lhs.ndim != 4 or batch_group_count != 1
      or any(d != 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))):
    return xla(lhs, rhs)
  dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  # To NHWC / HWIO: specs list (batch|out, feature|in, *spatial) axes.
  lhs_perm = (dn.lhs_spec[0], *dn.lhs_spec[2:], dn.lhs_spec[1])
  rhs_perm = (*dn.rhs_spec[2:], dn.rhs_spec[1], dn.rhs_spec[0])
  x_shape = tuple(lhs.shape[i] for i in lhs_perm)
  k_shape = tuple(rhs.shape[i] for i in rhs_perm)
  strides = tuple(window_strides)
  if isinstance(padding, str):
    pads = lax.padtype_to_pads(x_shape[1:3], k_shape[:2], strides, padding)
  else:
    pads = [tuple(p) for p in padding]
  if any(p < 0 for pair in pads for p in pair):
    return xla(lhs, rhs)
  ho, wo = (_out_size(x_shape[i + 1], k_shape[i], strides[i], pads[i]) for i in (0, 1))
  if ho * wo > MAX_OUT_PIXELS:
    return xla(lhs, rhs)

  def matmuls(lhs, rhs):
    y = _tiny_conv(lax.transpose(lhs, lhs_perm), lax.transpose(rhs, rhs_perm), strides, pads,
                   feature_group_count, precision, preferred_element_type)
    # NHWC -> the requested output layout.
    perm = [0] * 4
    for src, dst in zip((0, 3, 1, 2), dn.out_spec):
      perm[dst] = src
    return lax.transpose(y, tuple(perm))

  return lax.platform_dependent(lhs, rhs, **{p: matmuls for p in PLATFORMS}, default=xla)


class ConvGeneralDilated:
  """:func:`conv_general_dilated` as ``flax.linen.Conv(conv_general_dilated_cls=...)`` wants it
  (a class whose instances are the conv function)."""

  def __call__(self, *args: Any, **kwargs: Any) -> jax.Array:
    return conv_general_dilated(*args, **kwargs)


class LaxConvGeneralDilated:
  """:func:`lax_conv_general_dilated` for ``flax.linen.Conv(conv_general_dilated_cls=...)``:
  XLA's conv, with the padding every compiler takes."""

  def __call__(self, *args: Any, **kwargs: Any) -> jax.Array:
    return lax_conv_general_dilated(*args, **kwargs)
