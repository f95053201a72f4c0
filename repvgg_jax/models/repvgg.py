"""The RepVGG network (Flax Linen), train form and deploy form, built by name from the zoo
(``models/zoo.py``: the variants' depths, widths, groups and SE).

Layout: inputs NHWC, kernels HWIO. Parameter tree (train form)::

  stem/                     one block, 3 -> min(64, 64a), stride 2
  stages_{i}_{j}/           stage i (0..3), block j
    conv_kxk/{conv,bn}      3x3 conv (no bias) + BN      (official: rbr_dense)
    conv_1x1/{conv,bn}      1x1 conv (no bias) + BN      (official: rbr_1x1)
    identity/               BN, when Cin == Cout and stride 1 (rbr_identity)
    se/{down,up}            squeeze-excitation (D2se only)
  head/                     dense classifier            (official: linear)

QARepVGG blocks (``block="qarepvgg"``) hold ``conv_kxk/{conv,bn}``,
``conv_1x1/kernel`` (a bare conv) and ``post_bn`` (the BN after the sum), and
record ``settings/<block>/identity_gain`` where the block has an identity.

Deploy form: each block is ``reparam_conv/{kernel,bias}`` (+ ``se``); see
:func:`repvgg_jax.merge`. Names follow timm's roles (``conv_kxk``,
``conv_1x1``, ``identity``); ``repvgg_jax.convert`` maps both naming schemes.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import flax.linen as nn

from repvgg_jax.models import conv as conv_lib
from repvgg_jax.models.zoo import GROUPED_LAYERS, VARIANTS, Variant, list_models, zoo_name
from repvgg_jax.models.oabn import (BOUNDS, BRANCH_KEYS, FORMS, OABN, SETTINGS, resolve_bound,
                                branch_bound, check_tau)
from repvgg_jax.quant.activation import ActQuant, check_act_bits
from repvgg_jax.reparam import BN_EPSILON, IDENTITY_GAIN

NORMS = ("bn", "oabn")
# Train-form block: RepVGG's (a BN per branch) or QARepVGG's (one BN after the sum).
STYLES = ("repvgg", "qarepvgg")
# "auto": matmuls for convs with tiny output maps on CPU (``models/conv.py``); "xla": lax conv.
CONV_IMPLS = ("auto", "xla")
# PyTorch's default BN momentum 0.1 is Flax's 0.9.
BN_MOMENTUM = 0.9
# The layer whose input (the normalized image) is signed; every other quantized
# layer reads a ReLU output (or its average), unsigned.
SIGNED_INPUT_LAYER = "stem"


def _conv(features: int, kernel: int, strides: int, groups: int, use_bias: bool,
          dtype: Any, name: str, conv_impl: str = "xla") -> nn.Conv:
  # Explicit symmetric padding: 'SAME' pads (0, 1) at stride 2 on even inputs,
  # which misaligns the 3x3 and 1x1 branches and breaks PyTorch weight import.
  # Both impls trim the high padding no window reads (conv_lib.read_padding):
  # the same outputs, and a program IREE compiles.
  pad = kernel // 2
  impl = (conv_lib.ConvGeneralDilated if conv_impl == "auto"
          else conv_lib.LaxConvGeneralDilated)
  return nn.Conv(features, (kernel, kernel), strides=(strides, strides),
                 padding=((pad, pad), (pad, pad)), feature_group_count=groups,
                 use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                 kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
                 conv_general_dilated_cls=impl, name=name)


class ConvBN(nn.Module):
  """Conv (no bias) followed by a BN/OABN: one branch of a train-form block."""
  features: int
  kernel: int
  strides: int
  groups: int
  norm: Callable[..., nn.Module]
  dtype: Any = None
  conv_impl: str = "xla"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, raw: bool = False) -> Any:
    """The branch's output; ``raw=True``: ``(conv(x) - mean, s, beta, kernel)``
    (float32, ``s`` unbounded, see :class:`OABN`) for a block that bounds ``s``."""
    conv = _conv(self.features, self.kernel, self.strides, self.groups, False,
                 self.dtype, "conv", self.conv_impl)
    bn = self.norm(name="bn")
    if not raw:
      return bn(conv(x), use_running_average=not train)
    return (*bn(conv(x), use_running_average=not train, raw=True),
            conv.variables["params"]["kernel"])


class SqueezeExcite(nn.Module):
  """Official RepVGG SEBlock: global pool, C -> C/16 (+ReLU) -> C (+sigmoid)."""
  reduction: int = 16
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    s = jnp.mean(x, axis=(1, 2), keepdims=True)
    s = nn.relu(nn.Dense(c // self.reduction, dtype=self.dtype, name="down")(s))
    s = nn.sigmoid(nn.Dense(c, dtype=self.dtype, name="up")(s))
    return x * s


class RepVGGBlock(nn.Module):
  """Train form: 3x3+BN, 1x1+BN and identity BN summed (``style="repvgg"``), or
  3x3+BN, bare 1x1 conv and bare identity summed, then one BN
  (``style="qarepvgg"``, arXiv 2212.01593); deploy form: one 3x3 conv with bias
  (its input fake-quantized when ``act_bits``). Then optional SE, then ReLU.

  ``branch_bound=(tau, smooth)``: OABN's ``branch`` form, the 1x1 and identity
  scales bounded per channel by :func:`repvgg_jax.models.oabn.branch_bound`.
  """
  features: int
  strides: int
  groups: int
  se: bool
  deploy: bool
  norm: Callable[..., nn.Module]
  dtype: Any = None
  conv_impl: str = "xla"
  act_bits: int = 0
  act_signed: bool = False
  style: str = "repvgg"
  branch_bound: tuple[float, bool] | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    if self.deploy:
      if self.act_bits:
        x = ActQuant(self.act_bits, self.act_signed, name="act")(x)
      y = _conv(self.features, 3, self.strides, self.groups, True, self.dtype,
                "reparam_conv", self.conv_impl)(x)
    else:
      y = self._branches(x, train)
    if self.se:
      y = SqueezeExcite(dtype=self.dtype, name="se")(y)
    return nn.relu(y)

  def _branches(self, x: jax.Array, train: bool) -> jax.Array:
    """The train form's sum of branches (before SE and ReLU)."""
    branch = functools.partial(ConvBN, self.features, strides=self.strides, groups=self.groups,
                               norm=self.norm, dtype=self.dtype, conv_impl=self.conv_impl)
    has_id = x.shape[-1] == self.features and self.strides == 1
    if self.style == "qarepvgg":
      y = branch(3, name="conv_kxk")(x, train) + _conv(
          self.features, 1, self.strides, self.groups, False, self.dtype, "conv_1x1",
          self.conv_impl)(x)
      if has_id:
        # The identity's gain, recorded for merge (which cannot see strides).
        self.variable(SETTINGS, IDENTITY_GAIN, lambda: jnp.float32(1.0))
        y = y + x
      return self.norm(name="post_bn")(y, use_running_average=not train)
    if self.branch_bound is None:
      y = branch(3, name="conv_kxk")(x, train) + branch(1, name="conv_1x1")(x, train)
      if has_id:
        y = y + self.norm(name="identity")(x, use_running_average=not train)
      return y
    tau, smooth = self.branch_bound
    for k, v in zip(BRANCH_KEYS, (jnp.float32(tau), jnp.bool_(smooth))):
      self.variable(SETTINGS, k, lambda v=v: v)
    z3, s3, b3, k3 = branch(3, name="conv_kxk")(x, train, raw=True)
    z1, s1, b1, k1 = branch(1, name="conv_1x1")(x, train, raw=True)
    zi = si = bi = None
    if has_id:
      zi, si, bi = self.norm(name="identity")(x, use_running_average=not train, raw=True)
    s1, si = branch_bound(s3, k3, s1, k1, si, tau, smooth)
    y = z3 * s3 + b3 + (z1 * s1 + b1)
    if has_id:
      y = y + (zi * si + bi)
    return y.astype(self.dtype or x.dtype)


@dataclasses.dataclass(frozen=True)
class BlockSpec:
  name: str
  features: int
  strides: int
  groups: int


class RepVGG(nn.Module):
  """RepVGG network; build it with :func:`create_model`.

  Attributes:
    variant: the zoo row (depths, widths, groups, SE).
    num_classes: size of the dense head.
    norm: ``"bn"`` (flax's BatchNorm) or ``"oabn"`` (:class:`OABN`: the same statistics,
      bounded).
    block: ``"repvgg"`` (a BN per branch) or ``"qarepvgg"`` (QARepVGG, arXiv
      2212.01593: bare 1x1 conv and identity, one BN after the sum).
    oabn_form: ``"branch"`` (each block bounds its 1x1 and identity taps per
      channel, the only form that removes the merged kernels' outliers;
      ``block="repvgg"`` only), ``"median"`` (each BN bounds its scales), or None:
      picked by depth, :func:`repvgg_jax.models.oabn.resolve_bound` (``branch`` where no stage has
      more than 4 blocks, ``median`` deeper: on A0's 14-block stage ``branch``
      caps every skip and costs FP accuracy; docs/oabn.md, "At full depth"). See
      :attr:`bound_form`.
    oabn_bound, oabn_tau, oabn_relative: OABN settings (see ``models/oabn.py``);
      ``oabn_tau`` is the multiple of the channel's 3x3 rms (``branch``) or of
      the layer's median ``|s|`` (``median``); None = the form's
      ``models.oabn.DEFAULT_TAU`` (branch 3, median 4), see :attr:`bound_tau`.
    deploy: single-conv deploy form (the output of :func:`repvgg_jax.merge`).
    cifar_stem: stride 1 in the stem and first stage, for 28-32 px inputs.
    dtype: compute dtype (e.g. ``jnp.bfloat16``); params stay float32 and
      logits are returned in float32.
    act_bits: deploy form only: fake-quantize the input of every conv, the
      map the global pool averages (``pool_act``) and the pooled input of the
      head to this many bits (2..8; per tensor, steps in the ``quant``
      collection, see ``quant/activation.py``); 0 = float activations.
    conv_impl: ``"xla"`` (the default: every conv is ``lax.conv_general_dilated``,
      plain flax/lax on every platform) or ``"auto"`` (on CPU devices, convs whose
      output map has <= 4 pixels run as matmuls: unrolled kernel or tap-pruned
      im2col, see ``models/conv.py``; several times faster for the tiny maps of a
      32 px input on XLA:CPU; XLA's conv elsewhere, chosen per platform at
      lowering by ``lax.platform_dependent``). Same parameters and, up to float
      rounding, the same outputs; at 224 px both compile to the same program.
  """
  variant: Variant
  num_classes: int = 1000
  norm: str = "bn"
  block: str = "repvgg"
  oabn_form: str | None = None
  oabn_bound: str = "tanh"
  oabn_tau: float | None = None
  oabn_relative: bool = True
  deploy: bool = False
  cifar_stem: bool = False
  dtype: Any = None
  conv_impl: str = "xla"
  act_bits: int = 0

  def _norm_factory(self) -> Callable[..., nn.Module]:
    """Every BN of the model: flax's ``BatchNorm`` for ``norm="bn"``, or :class:`OABN`, which
    computes flax's batch statistics op for op and bounds the scale."""
    if self.norm == "bn":
      return functools.partial(nn.BatchNorm, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                               dtype=self.dtype)
    return functools.partial(OABN, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                             form=self.bound_form, bound=self.oabn_bound, tau=self.bound_tau,
                             relative=self.oabn_relative, dtype=self.dtype)

  @property
  def bound_form(self) -> str:
    """The OABN form in use (:func:`repvgg_jax.models.oabn.resolve_bound`)."""
    return resolve_bound(self.oabn_form, self.oabn_tau, self.variant.blocks, self.block)[0]

  @property
  def bound_tau(self) -> float:
    """The OABN tau in use (:func:`repvgg_jax.models.oabn.resolve_bound`)."""
    return resolve_bound(self.oabn_form, self.oabn_tau, self.variant.blocks, self.block)[1]

  def branch_bound(self) -> tuple[float, bool] | None:
    """``(tau, smooth)`` of OABN's ``branch`` form, None for every other model."""
    if self.norm == "oabn" and self.bound_form == "branch":
      return self.bound_tau, self.oabn_bound == "tanh"
    return None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Args: x, images ``(N, H, W, 3)``. Returns logits ``(N, num_classes)``."""
    if x.ndim != 4:
      raise ValueError(f"RepVGG expects NHWC images, got shape {x.shape}")
    v = self.variant
    check_model(None, num_classes=self.num_classes, norm=self.norm, deploy=self.deploy,
                block=self.block, oabn_form=self.bound_form, oabn_bound=self.oabn_bound,
                oabn_tau=self.oabn_tau, conv_impl=self.conv_impl, act_bits=self.act_bits)
    block = functools.partial(RepVGGBlock, se=v.se, deploy=self.deploy,
                              norm=self._norm_factory(), dtype=self.dtype,
                              conv_impl=self.conv_impl, act_bits=self.act_bits,
                              style=self.block, branch_bound=self.branch_bound())
    x = x.astype(self.dtype) if self.dtype is not None else x
    for b in self.layers():
      x = block(b.features, b.strides, b.groups, act_signed=b.name == SIGNED_INPUT_LAYER,
                name=b.name)(x, train)
    if self.act_bits:  # the map the pool averages, on a grid: an integer pool (ONNX Runtime)
      x = ActQuant(self.act_bits, name="pool_act")(x)
    x = jnp.mean(x, axis=(1, 2))
    if self.act_bits:
      x = ActQuant(self.act_bits, name="head_act")(x)
    x = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)
    return x.astype(jnp.float32)

  def layers(self) -> list["BlockSpec"]:
    """The 3x3 conv layers in order, one a block (stem first): name, output channels,
    stride, groups. (``variant.blocks`` are the blocks per stage; ``block`` the style.)"""
    v = self.variant
    first_stride = 1 if self.cifar_stem else 2
    out = [BlockSpec("stem", min(64, int(64 * v.widths[0])), first_stride, 1)]
    layer = 1
    for i, (depth, width) in enumerate(zip(v.blocks, v.widths)):
      for j in range(depth):
        strides = (first_stride if i == 0 else 2) if j == 0 else 1
        groups = v.groups if layer in GROUPED_LAYERS else 1
        out.append(BlockSpec(f"stages_{i}_{j}", int(64 * 2 ** i * width), strides, groups))
        layer += 1
    return out


def check_options(norm: str, block: str, oabn_form: str | None) -> None:
  """ValueError naming the value when the norm, block style or OABN form is unknown,
  or the combination is one the model cannot build."""
  if norm not in NORMS:
    raise ValueError(f"norm={norm!r}: expected one of {NORMS}")
  if block not in STYLES:
    raise ValueError(f"block={block!r}: expected one of {STYLES}")
  if oabn_form is not None and oabn_form not in FORMS:
    raise ValueError(f"oabn_form={oabn_form!r}: expected one of {FORMS}")
  if norm == "oabn" and oabn_form == "branch" and block != "repvgg":
    raise ValueError(f"oabn_form='branch' bounds the 1x1 and identity BNs of a RepVGG block; "
                     f"block={block!r} has none (use oabn_form='median' or block='repvgg')")


def check_model(name: str | None, *, num_classes: int = 1000, norm: str = "bn",
                deploy: bool = False, **kwargs: Any) -> None:
  """ValueError unless :func:`create_model` can build this model. Every message starts
  with the bad argument's name (``norm='x': ...``), so a config can prefix its group.
  ``name`` None: the variant is not checked (a :class:`RepVGG` built from its own)."""
  if name is not None and zoo_name(name) is None:
    raise ValueError(f"name={name!r}: unknown RepVGG variant; valid names: {list_models()}")
  fields = {f.name for f in dataclasses.fields(RepVGG)} - {"variant", "parent", "name"}
  unknown = sorted(set(kwargs) - fields)
  if unknown:
    raise ValueError(f"unknown create_model option(s) {unknown}; valid: {sorted(fields)}")
  check_options(norm, kwargs.get("block", "repvgg"), kwargs.get("oabn_form"))
  if isinstance(num_classes, bool) or not (isinstance(num_classes, int) and num_classes > 0):
    raise ValueError(f"num_classes={num_classes!r}: expected a positive int")
  bound = kwargs.get("oabn_bound", "tanh")
  if bound not in BOUNDS:
    raise ValueError(f"oabn_bound={bound!r}: expected one of {BOUNDS}")
  conv_impl = kwargs.get("conv_impl", "xla")
  if conv_impl not in CONV_IMPLS:
    raise ValueError(f"conv_impl={conv_impl!r}: expected one of {CONV_IMPLS}")
  if check_act_bits(kwargs.get("act_bits", 0)) and not deploy:
    raise ValueError(f"act_bits={kwargs['act_bits']!r}: activation quantization needs "
                     "deploy=True")
  if kwargs.get("oabn_tau") is not None:  # None: the form's default
    check_tau(kwargs["oabn_tau"], "oabn_tau")


def create_model(name: str, *, num_classes: int = 1000, norm: str = "bn",
                 deploy: bool = False, **kwargs: Any) -> RepVGG:
  """Builds a RepVGG variant by name, e.g. ``create_model("RepVGG-A0")``.

  Args:
    name: one of :func:`list_models` (case-insensitive; ``"repvgg_a0"`` and
      ``"A0"`` are accepted).
    num_classes: classifier width.
    norm: ``"bn"`` or ``"oabn"``. With ``"oabn"`` and no ``oabn_form``, the form is
      picked by depth (:func:`repvgg_jax.models.oabn.resolve_bound`): ``"branch"`` when no stage has more
      than 4 blocks, ``"median"`` for the zoo's deeper variants (every one of them).
      At full depth ``branch`` caps every block's skip: it cost FP accuracy on every
      seed of the study and ClusterQAT accuracy on average, where ``median`` was the
      best regime (experiments/results/results_full_a0.md); pass
      ``oabn_form="branch"`` for uniform low-bit grids, whose outliers only it removes.
    deploy: the merged single-conv form.
    **kwargs: other :class:`RepVGG` fields: ``block``, ``oabn_form``, ``oabn_bound``, ``oabn_tau``,
      ``oabn_relative``, ``cifar_stem``, ``dtype``, ``conv_impl``, ``act_bits``.
  """
  check_model(name, num_classes=num_classes, norm=norm, deploy=deploy, **kwargs)
  return RepVGG(VARIANTS[zoo_name(name)], num_classes=num_classes, norm=norm,
                deploy=deploy, **kwargs)
