"""Matmul conv for tiny maps (``repvgg_jax.models.conv``) == ``lax.conv_general_dilated``."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import repvgg_jax as rv
from repvgg_jax.models.repvgg import RepVGG, Variant
from repvgg_jax.models import conv as conv_lib
from _util import random_variables, rel_err

NHWC = ("NHWC", "HWIO", "NHWC")
PAD1, PAD0 = ((1, 1), (1, 1)), ((0, 0), (0, 0))
# (size, stride) -> RepVGG's 3x3 pad-1 and 1x1 pad-0 convs; group counts rotate
# over the cases so that each map size and stride meets grouped convs.
CASES = {(size, stride): ((3, PAD1, (1, 2, 4)[i % 3]), (1, PAD0, (1, 4)[i // 2 % 2]))
         for i, (size, stride) in enumerate((s, t) for s in range(1, 6) for t in (1, 2))}


def _conv_ops(fn, *args, platform: str | None = None) -> int:
  """Convolutions in the program lowered for ``platform`` (default: this machine's)."""
  if platform is None:
    text = jax.jit(fn).lower(*args).as_text()
  else:
    text = jax.export.export(jax.jit(fn), platforms=(platform,))(*args).mlir_module()
  return text.count("stablehlo.convolution")


def _dots(jaxpr):
  """Every dot_general equation of ``jaxpr``, inside platform branches too."""
  out = []
  for e in jaxpr.eqns:
    if e.primitive.name == "dot_general":
      out.append(e)
    for branch in e.params.get("branches", ()):
      out += _dots(branch.jaxpr)
  return out


def _values_and_grads(conv, x, ws, stride, configs):
  """Per config: conv output and d/dx, d/dw of sum(sin(output))."""
  out = []
  for w, (_, pad, groups) in zip(ws, configs):
    f = lambda x, w, pad=pad, groups=groups: conv(  # noqa: E731
        x, w, (stride, stride), pad, dimension_numbers=NHWC, feature_group_count=groups)
    out.append((f(x, w), *jax.grad(lambda x, w: jnp.sum(jnp.sin(f(x, w))), (0, 1))(x, w)))
  return out


@pytest.fixture
def any_backend(monkeypatch):
  monkeypatch.setattr(conv_lib, "PLATFORMS", (jax.default_backend(),))


@pytest.fixture
def matmul_everywhere(monkeypatch, any_backend):
  monkeypatch.setattr(conv_lib, "MAX_OUT_PIXELS", 1 << 30)


@pytest.mark.parametrize("size, stride", list(CASES))
def test_matches_lax_values_and_grads(size, stride, matmul_everywhere):
  configs = CASES[size, stride]
  rng = np.random.default_rng(size * 10 + stride)
  x = rng.standard_normal((2, size, size, 8), np.float32)
  ws = [rng.standard_normal((k, k, 8 // g, 12), np.float32) for k, _, g in configs]
  want, got = (jax.jit(lambda x, ws, c=c: _values_and_grads(c, x, ws, stride, configs))
               for c in (lax.conv_general_dilated, conv_lib.conv_general_dilated))
  assert _conv_ops(got, x, ws) == 0  # every conv took a matmul form
  for cfg, a, b in zip(configs, want(x, ws), got(x, ws)):
    for name, u, v in zip(("y", "dx", "dw"), a, b):
      assert u.shape == v.shape
      assert rel_err(u, v) <= 1e-5, (cfg, name)


def test_default_threshold_picks_tiny_outputs_only(any_backend):
  w = jnp.ones((3, 3, 4, 4))
  f = lambda x, s: conv_lib.conv_general_dilated(  # noqa: E731
      x, w, (s, s), ((1, 1), (1, 1)), dimension_numbers=NHWC)
  for size, stride, convs in ((1, 1, 0), (2, 1, 0), (4, 2, 0), (3, 1, 1), (4, 1, 1),
                              (224, 112, 0)):
    assert _conv_ops(lambda x: f(x, stride), jnp.ones((1, size, size, 4))) == convs


def test_form_follows_the_platform_of_the_computation(monkeypatch):
  w = jnp.ones((3, 3, 4, 4))
  f = lambda x: conv_lib.conv_general_dilated(  # noqa: E731
      x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=NHWC)
  x = jnp.ones((4, 2, 2, 4))
  # Chosen when lowering, not from jax.default_backend() while tracing.
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert _conv_ops(f, x, platform="cpu") == 0
  assert _conv_ops(f, x, platform="cuda") == 1
  assert _conv_ops(f, x, platform="tpu") == 1


@pytest.mark.parametrize("batch, hw, stride, form, taps", [
    (4, (1, 1), 1, "unrolled", 1), (4, (1, 1), 2, "unrolled", 1), (4, (2, 2), 2, "unrolled", 4),
    (4, (2, 2), 1, "unrolled", 9), (4, (4, 4), 2, "im2col", 9), (4, (1, 4), 2, "im2col", 3),
    (1, (2, 2), 1, "im2col", 9)])  # batch < H*W: building the unrolled kernel would cost more
def test_padding_only_taps_are_dropped(batch, hw, stride, form, taps, any_backend):
  x, w = jnp.ones((batch, *hw, 8)), jnp.ones((3, 3, 8, 5))
  jaxpr = jax.make_jaxpr(lambda x: conv_lib.conv_general_dilated(
      x, w, (stride, stride), ((1, 1), (1, 1)), dimension_numbers=NHWC))(x)
  dots = _dots(jaxpr.jaxpr)
  if form == "unrolled":  # selection (T, H*W, Ho*Wo), then x @ unrolled kernel
    sel, _ = dots
    assert sel.invars[0].aval.shape[0] == taps
  else:  # patches (M, T*Cin) @ kernel rows (T*Cin, Cout)
    (dot,) = dots
    assert dot.invars[1].aval.shape == (taps * 8, 5)


@pytest.mark.parametrize("kwargs", [
    dict(padding="SAME"), dict(padding="VALID"), dict(padding=((2, 0), (0, 1))),
    dict(padding=((1, 1), (1, 1)), dimension_numbers=("NCHW", "OIHW", "NCHW")),
    dict(padding=((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NCHW")),
    dict(padding=((1, 1), (1, 1)), rhs_dilation=(2, 2)),   # falls back to lax
])
def test_other_paddings_and_layouts(kwargs, matmul_everywhere):
  rng = np.random.default_rng(1)
  x = rng.standard_normal((2, 3, 4, 8), np.float32)
  w = rng.standard_normal((3, 3, 4, 6), np.float32)
  dn = kwargs.pop("dimension_numbers", NHWC)
  if dn[0] == "NCHW":
    x = x.transpose(0, 3, 1, 2)
  if dn[1] == "OIHW":
    w = w.transpose(3, 2, 0, 1)
  args = dict(window_strides=(1, 2), dimension_numbers=dn, feature_group_count=2, **kwargs)
  want = lax.conv_general_dilated(x, w, **args)
  got = conv_lib.conv_general_dilated(x, w, **args)
  assert want.shape == got.shape
  assert rel_err(want, got) <= 1e-5


def test_live_taps():
  assert conv_lib.live_taps(1, 3, 1, (1, 1)) == [1]
  assert conv_lib.live_taps(2, 3, 2, (1, 1)) == [1, 2]
  assert conv_lib.live_taps(2, 3, 1, (1, 1)) == [0, 1, 2]
  assert conv_lib.live_taps(5, 1, 2, (0, 0)) == [0]


TINY = Variant((1, 2, 2, 1), (0.25, 0.25, 0.25, 0.5), groups=2)


@pytest.mark.parametrize("deploy", [False, True])
def test_tiny_repvgg_auto_equals_xla(deploy, any_backend):
  # 16 px: output maps 8, 4, 2, 1, 1; stages 1-3 take the matmul forms (im2col and
  # unrolled, grouped and not).
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 16, 16, 3), np.float32))
  models = {impl: RepVGG(TINY, num_classes=10, conv_impl=impl) for impl in ("xla", "auto")}
  variables = random_variables(models["xla"], x)
  if deploy:
    variables = jax.jit(rv.merge)(variables)
    models = {k: m.clone(deploy=True) for k, m in models.items()}
  shapes = {k: jax.eval_shape(lambda m=m: m.init(jax.random.key(0), x)) for k, m in
            models.items()}
  assert jax.tree.structure(shapes["xla"]) == jax.tree.structure(shapes["auto"])
  assert jax.tree.map(lambda s: s.shape, shapes["xla"]) == jax.tree.map(
      lambda s: s.shape, shapes["auto"])
  apply = {k: jax.jit(lambda v, x, m=m: m.apply(v, x)) for k, m in models.items()}
  assert _conv_ops(apply["auto"], variables, x) < _conv_ops(apply["xla"], variables, x)
  want, got = apply["xla"](variables, x), apply["auto"](variables, x)
  assert rel_err(want, got) <= 1e-5


def test_default_conv_impl_and_bad_value():
  assert rv.create_model("RepVGG-A0").conv_impl == "xla"
  with pytest.raises(ValueError, match="conv_impl='cudnn'"):
    rv.create_model("RepVGG-A0", conv_impl="cudnn")


def test_read_padding_trims_the_high_padding_no_window_reads():
  # (size, kernel, stride, pad) -> trimmed: RepVGG's 3x3 pad-1 and 1x1 pad-0 convs.
  for args, want in (((2, 3, 2, (1, 1)), (1, 0)), ((4, 3, 2, (1, 1)), (1, 0)),
                     ((3, 3, 2, (1, 1)), (1, 1)), ((5, 3, 2, (1, 1)), (1, 1)),
                     ((1, 3, 2, (1, 1)), (1, 1)), ((4, 3, 1, (1, 1)), (1, 1)),
                     ((4, 1, 2, (0, 0)), (0, 0)), ((5, 3, 3, (1, 2)), (1, 0)),
                     ((2, 3, 2, (-1, 1)), (-1, 1)), ((1, 5, 1, (1, 1)), (1, 1))):
    assert conv_lib.read_padding(*args) == want, args
  for size in range(1, 9):
    for kernel in (1, 2, 3, 5):
      for stride in (1, 2, 3):
        for pad in ((0, 0), (1, 1), (2, 2), (1, 0), (0, 3)):
          lo, hi = conv_lib.read_padding(size, kernel, stride, pad)
          assert lo == pad[0] and 0 <= hi <= pad[1]
          assert (conv_lib._out_size(size, kernel, stride, (lo, hi))
                  == conv_lib._out_size(size, kernel, stride, pad))


@pytest.mark.parametrize("size", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("stride", [1, 2])
def test_trimmed_padding_gives_the_same_outputs_bit_for_bit(size, stride, monkeypatch):
  monkeypatch.setattr(conv_lib, "MAX_OUT_PIXELS", 0)  # conv_general_dilated: its lax form
  rng = np.random.default_rng(size * 10 + stride)
  x = rng.standard_normal((2, size, size, 8), np.float32)
  for k, pad, groups in CASES.get((size, stride), ((3, PAD1, 2), (1, PAD0, 1))):
    w = rng.standard_normal((k, k, 8 // groups, 12), np.float32)
    trimmed = [conv_lib.read_padding(size, k, stride, p) for p in pad]
    if stride == 2 and size % 2 == 0 and k == 3:
      assert trimmed == [(1, 0), (1, 0)]
    conv = jax.jit(lambda x, w, pad, fn=lax.conv_general_dilated: fn(  # noqa: E731
        x, w, (stride, stride), pad, dimension_numbers=NHWC, feature_group_count=groups),
        static_argnums=(2, 3))
    want = conv(x, w, pad)
    np.testing.assert_array_equal(conv(x, w, tuple(trimmed)), want)
    np.testing.assert_array_equal(conv(x, w, pad, conv_lib.lax_conv_general_dilated), want)
    np.testing.assert_array_equal(conv(x, w, pad, conv_lib.conv_general_dilated), want)


def test_read_paddings_resolves_strings_and_dilations():
  x, w = (2, 8, 8, 4), (3, 3, 4, 6)
  # SAME at stride 2 on 8 px pads (0, 1) and reads the high row; VALID is (0, 0).
  assert conv_lib.read_paddings(x, w, (2, 2), "SAME", dimension_numbers=NHWC) == [(0, 1)] * 2
  assert conv_lib.read_paddings(x, w, (2, 2), "VALID", dimension_numbers=NHWC) == [(0, 0)] * 2
  # A 2-dilated 3x3 kernel spans 5 rows: 8 px padded by (1, 1) at stride 2 gives 3 rows,
  # whose windows start at 0, 2, 4 and end at padded row 8 (the last input row).
  assert conv_lib.read_paddings(x, w, (2, 2), PAD1, rhs_dilation=(2, 2),
                                dimension_numbers=NHWC) == [(1, 0)] * 2
  assert conv_lib.read_paddings(x, w, (2, 4), ((2, 2), (2, 2)), rhs_dilation=(2, 2),
                                dimension_numbers=NHWC) == [(2, 1), (2, 0)]
  batch, = jax.export.symbolic_shape("batch")  # only the spatial sizes matter
  assert conv_lib.read_paddings((batch, 8, 8, 4), w, (2, 2), PAD1,
                                dimension_numbers=NHWC) == [(1, 0)] * 2


def _conv_windows(text):
  """(input HW, kernel HW, stride, pads, output HW) of each convolution in ``text``."""
  out = []
  for m in re.finditer(r"stablehlo\.convolution.*?window = \{(.*?)\}.*?: \(tensor<(\w+)>, "
                       r"tensor<(\w+)>\) -> tensor<(\w+)>", text):
    window, lhs, rhs, res = m.groups()
    dims = [s.split("x")[:-1] for s in (lhs, rhs, res)]
    stride = re.search(r"stride = \[(\d+), (\d+)\]", window)
    pad = re.search(r"pad = \[\[(\d+), (\d+)\], \[(\d+), (\d+)\]\]", window)
    out.append(([int(d) for d in dims[0][1:3]], [int(d) for d in dims[1][:2]],
                [int(s) for s in stride.groups()] if stride else [1, 1],
                [int(p) for p in pad.groups()] if pad else [0, 0, 0, 0],
                [int(d) for d in dims[2][1:3]]))
  return out


@pytest.mark.parametrize("conv_impl", ["xla", "auto"])
def test_repvgg_convs_pad_only_what_they_read_with_the_same_outputs(conv_impl, monkeypatch):
  # ImageNet stem at 16 px: stride-2 convs on maps 16, 8, 4, 2 (even) and 1.
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 16, 16, 3), np.float32))
  model = RepVGG(TINY, num_classes=10, conv_impl=conv_impl)
  variables = random_variables(model, x)
  merged = jax.jit(rv.merge)(variables)
  deploy = model.clone(deploy=True)
  programs = [(model, variables), (deploy, merged)]
  def run(m, v):  # a new function each time: traced again after the monkeypatch
    return jax.jit(lambda v, x: m.apply(v, x))(v, x)

  def lowered():
    return jax.jit(lambda v, x: deploy.apply(v, x)).lower(merged, x).as_text()
  got = [run(m, v) for m, v in programs]
  text = lowered()
  windows = _conv_windows(text)
  assert len(windows) == text.count("stablehlo.convolution") >= 2
  for (h, w), (kh, kw), (sh, sw), (plh, phh, plw, phw), (ho, wo) in windows:
    # The padded input ends where the last window does.
    assert (h + plh + phh, w + plw + phw) == ((ho - 1) * sh + kh, (wo - 1) * sw + kw)
  assert any(s == [2, 2] and hw[0] % 2 == 0 and p[1] == 0 for hw, _, s, p, _ in windows)
  # The untrimmed padding: same parameters, and the same outputs bit for bit.
  monkeypatch.setattr(conv_lib, "read_paddings", lambda lhs, rhs, strides, padding, *a: padding)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
  assert jax.tree.map(lambda s: s.shape, shapes) == jax.tree.map(jnp.shape, variables)
  text = lowered()
  assert any(p[1] == 1 and s == [2, 2] and hw[0] % 2 == 0
             for hw, _, s, p, _ in _conv_windows(text))
  for (m, v), y in zip(programs, got):
    np.testing.assert_array_equal(run(m, v), y)
