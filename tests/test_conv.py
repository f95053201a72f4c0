"""Matmul conv for tiny maps (``repvgg_jax.nn.conv``) == ``lax.conv_general_dilated``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import repvgg_jax as rv
from repvgg_jax.models.repvgg import RepVGG, Variant
from repvgg_jax.nn import conv as conv_lib
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
  assert rv.create_model("RepVGG-A0").conv_impl == "auto"
  with pytest.raises(ValueError, match="conv_impl='cudnn'"):
    rv.create_model("RepVGG-A0", conv_impl="cudnn")
