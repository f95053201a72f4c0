"""convert: PyTorch RepVGG (official and timm) <-> Flax variables.

Logit checks build timm models with random weights and random BN statistics
(``pretrained=False``: nothing is downloaded) and compare eval outputs on one
32x32 image, NCHW for PyTorch and NHWC for us.
"""

import functools
import re
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import repvgg_jax as rv
from repvgg_jax import convert
from _util import raises_naming, random_variables, rel_err

NUM_CLASSES = 10
SIZE = 32


def _torch():
  torch = pytest.importorskip("torch")
  torch.set_num_threads(1)  # the CPU is shared with other test workers
  return torch


def _timm():
  _torch()
  return pytest.importorskip("timm")


def _image(seed=0):
  """``(1, 3, SIZE, SIZE)`` NCHW float32 numpy image."""
  return np.random.default_rng(seed).standard_normal((1, 3, SIZE, SIZE)).astype(np.float32)


def _nhwc(x):
  return jnp.asarray(x.transpose(0, 2, 3, 1))


@functools.cache
def _forward(name, deploy):
  """Jitted ``apply`` of our model, shared by tests so each compiles once.

  XLA's own conv: it compiles faster on large variants than the matmul convs of
  ``conv_impl="auto"``, which tests/models/test_conv.py checks against it."""
  return jax.jit(rv.create_model(name, num_classes=NUM_CLASSES, deploy=deploy,
                                 conv_impl="xla").apply)


# jit: eager merge of D2se dispatches thousands of small ops.
_merge = jax.jit(rv.merge)


def _randomize_bn(model, seed=0):
  """Random BN weight/bias/running stats and He-scaled conv weights, in place.

  PyTorch's default conv init shrinks the signal block by block until the
  logits no longer depend on the input, and then a wrong kernel layout would
  pass; He-scaled weights keep A0 and B1g4 input-dependent.
  """
  torch = _torch()
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, torch.nn.Conv2d):
        m.weight.normal_(0.0, 1.0, generator=g).mul_((2.0 / m.weight[0].numel()) ** 0.5)
      if isinstance(m, torch.nn.BatchNorm2d):
        m.weight.uniform_(0.2, 1.0, generator=g)
        m.bias.normal_(0.0, 0.1, generator=g)
        m.running_mean.normal_(0.0, 0.1, generator=g)
        m.running_var.uniform_(0.5, 2.0, generator=g)
  return model.eval()


def _assert_logits_depend_on_input(model, x):
  """Guards the logit checks: a net whose output ignores its input proves nothing."""
  assert rel_err(_logits(model, x), _logits(model, _image(99))) > 0.01


def _timm_model(arch, seed=0):
  timm, torch = _timm(), _torch()
  torch.manual_seed(seed)
  return _randomize_bn(timm.create_model(arch, pretrained=False, num_classes=NUM_CLASSES), seed)


def _logits(model, x):
  torch = _torch()
  with torch.no_grad():
    return model(torch.from_numpy(x)).numpy()


def _timm_to_official(state_dict):
  """Renames timm keys to the official repo's (written out here, independently)."""
  out = {}
  for k, v in state_dict.items():
    k = re.sub(r"^stem\.", "stage0.", k)
    k = re.sub(r"^stages\.(\d+)\.", lambda m: f"stage{int(m.group(1)) + 1}.", k)
    for timm_name, official in (("conv_kxk.", "rbr_dense."), ("conv_1x1.", "rbr_1x1."),
                                ("identity.", "rbr_identity."), ("attn.fc1.", "se.down."),
                                ("attn.fc2.", "se.up."), ("reparam_conv.", "rbr_reparam."),
                                ("head.fc.", "linear.")):
      k = k.replace(timm_name, official)
    out[k] = v
  return out


def _official_repvgg(blocks, widths, groups_map=(), use_se=False, deploy=False):
  """A PyTorch RepVGG in the official repo's module layout (DingXiaoH/RepVGG)."""
  torch = _torch()
  nn, F = torch.nn, torch.nn.functional

  def conv_bn(cin, cout, k, stride, groups):
    seq = nn.Sequential()
    seq.add_module("conv", nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False))
    seq.add_module("bn", nn.BatchNorm2d(cout))
    return seq

  class SEBlock(nn.Module):
    def __init__(self, c):
      super().__init__()
      self.down = nn.Conv2d(c, c // 16, 1, bias=True)
      self.up = nn.Conv2d(c // 16, c, 1, bias=True)

    def forward(self, x):
      s = F.avg_pool2d(x, kernel_size=x.size(3))
      return x * torch.sigmoid(self.up(F.relu(self.down(s))))

  class RepVGGBlock(nn.Module):
    def __init__(self, cin, cout, stride, groups):
      super().__init__()
      self.se = SEBlock(cout) if use_se else nn.Identity()
      if deploy:
        self.rbr_reparam = nn.Conv2d(cin, cout, 3, stride, 1, groups=groups, bias=True)
      else:
        self.rbr_identity = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None
        self.rbr_dense = conv_bn(cin, cout, 3, stride, groups)
        self.rbr_1x1 = conv_bn(cin, cout, 1, stride, groups)

    def forward(self, x):
      if deploy:
        return F.relu(self.se(self.rbr_reparam(x)))
      identity = 0 if self.rbr_identity is None else self.rbr_identity(x)
      return F.relu(self.se(self.rbr_dense(x) + self.rbr_1x1(x) + identity))

  class RepVGG(nn.Module):
    def __init__(self):
      super().__init__()
      planes = min(64, int(64 * widths[0]))
      self.stage0 = RepVGGBlock(3, planes, 2, 1)
      layer = 1
      for i, (depth, width) in enumerate(zip(blocks, widths)):
        stage = []
        for j in range(depth):
          out = int(64 * 2 ** i * width)
          stage.append(RepVGGBlock(planes, out, 2 if j == 0 else 1, dict(groups_map).get(layer, 1)))
          planes, layer = out, layer + 1
        setattr(self, f"stage{i + 1}", nn.ModuleList(stage))
      self.linear = nn.Linear(planes, NUM_CLASSES)

    def forward(self, x):
      x = self.stage0(x)
      for i in range(1, 5):
        for block in getattr(self, f"stage{i}"):
          x = block(x)
      return self.linear(x.mean((2, 3)))

  return RepVGG().eval()


# --- timm: logits, train form and deploy form -------------------------------------------


@pytest.mark.parametrize("arch,name", [("repvgg_a0", "RepVGG-A0"),
                                       ("repvgg_b1g4", "RepVGG-B1g4"),
                                       ("repvgg_d2se", "RepVGG-D2se")])
def test_timm_checkpoint_reproduces_timm_logits_train_and_deploy(arch, name):
  # One test per variant so that each large model is built once: the train-form
  # eval, our merge vs timm's reparameterize, and timm's reparam_conv keys; for
  # D2se also the official SE names (se.down/se.up vs timm's attn.fc1/attn.fc2).
  timm = _timm()
  model = _timm_model(arch)
  x = _image()
  if arch != "repvgg_d2se":
    # 48 random blocks wash the input out of D2se's logits (they vary ~1e-7
    # between images); its check still covers every parameter, the SE ones
    # included, and A0/B1g4 cover the kernel layouts with live inputs.
    _assert_logits_depend_on_input(model, x)
  got_name, variables = convert.from_torch_state_dict(model.state_dict())
  assert got_name == name
  assert set(variables) == {"params", "batch_stats"}
  err_train = rel_err(_logits(model, x), _forward(name, False)(variables, _nhwc(x)))
  assert err_train <= 1e-5, f"train form vs timm eval: {err_train:.2e}"
  if arch == "repvgg_d2se":  # the SE names; other official names are tested below
    official = convert.from_torch_state_dict(_timm_to_official(model.state_dict()))
    assert official[0] == name
    chex.assert_trees_all_equal(official[1], variables)

  deployed = timm.utils.reparameterize_model(model, inplace=True)
  want = _logits(deployed, x)
  err_merge = rel_err(want, _forward(name, True)(_merge(variables), _nhwc(x)))
  assert err_merge <= 1e-5, f"our merge vs timm reparameterize: {err_merge:.2e}"

  deploy_name, deploy_vars = convert.from_torch_state_dict(deployed.state_dict())
  assert deploy_name == name and set(deploy_vars) == {"params"}
  err_keys = rel_err(want, _forward(name, True)(deploy_vars, _nhwc(x)))
  assert err_keys <= 1e-5, f"timm reparam_conv keys vs timm deploy: {err_keys:.2e}"
  print(f"{arch}: relative error train {err_train:.1e}, merge {err_merge:.1e}, "
        f"reparam keys {err_keys:.1e}")


# --- official layout ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["RepVGG-A0", "RepVGG-B1g4"])
def test_official_layout_checkpoint_reproduces_official_logits(name):
  torch = _torch()
  v = rv.VARIANTS[name]
  groups = {layer: v.groups for layer in range(2, 27, 2)} if v.groups > 1 else {}
  torch.manual_seed(1)
  official = _randomize_bn(_official_repvgg(v.blocks, v.widths, groups.items()), seed=1)
  state_dict = official.state_dict()
  assert "stage0.rbr_dense.conv.weight" in state_dict and "linear.weight" in state_dict
  got_name, variables = convert.from_torch_state_dict(state_dict)
  assert got_name == name
  x = _image(1)
  _assert_logits_depend_on_input(official, x)
  assert rel_err(_logits(official, x), _forward(name, False)(variables, _nhwc(x))) <= 1e-5


def test_official_deploy_export_loads_into_official_module():
  x = _image(2)
  model = rv.create_model("RepVGG-A0", num_classes=NUM_CLASSES)
  merged = _merge(random_variables(model, _nhwc(x)))
  torch = _torch()
  v = rv.VARIANTS["RepVGG-A0"]
  official = _official_repvgg(v.blocks, v.widths, deploy=True)
  official.load_state_dict(convert.to_torch_state_dict(merged, "official", as_torch=True),
                           strict=True)
  assert "stage1.0.rbr_reparam.weight" in official.state_dict()
  with torch.no_grad():
    want = official(torch.from_numpy(x)).numpy()
  assert rel_err(want, _forward("RepVGG-A0", True)(merged, _nhwc(x))) <= 1e-5


# --- round trips and export ----------------------------------------------------------------


@pytest.mark.parametrize("style", ["timm", "official"])
@pytest.mark.parametrize("deploy", [False, True])
def test_state_dict_round_trip_is_identity(style, deploy):
  model = _timm_model("repvgg_a0", seed=3)
  if deploy:
    model = _timm().utils.reparameterize_model(model, inplace=True)
  state_dict = {k: v.numpy() for k, v in model.state_dict().items()}
  if style == "official":
    state_dict = _timm_to_official(state_dict)
  _, variables = convert.from_torch_state_dict(state_dict)
  back = convert.to_torch_state_dict(variables, style)
  assert list(back) == sorted(back, key=convert._natural)
  assert set(back) == set(state_dict)
  for k, v in state_dict.items():
    if k.endswith("num_batches_tracked"):  # a counter Flax does not keep: written as 0
      assert back[k] == 0 and back[k].dtype == np.int64
    else:
      np.testing.assert_array_equal(back[k], v, err_msg=k)  # bit for bit


@pytest.mark.parametrize("deploy", [False, True])
def test_variables_round_trip_is_identity(deploy):
  model = rv.create_model("RepVGG-B1g2", num_classes=NUM_CLASSES)
  variables = random_variables(model, jnp.zeros((1, SIZE, SIZE, 3)), seed=4)
  variables = _merge(variables) if deploy else variables
  name, back = convert.from_torch_state_dict(convert.to_torch_state_dict(variables))
  assert name == "RepVGG-B1g2"
  chex.assert_trees_all_equal(back, jax.tree.map(jnp.asarray, variables))


def test_timm_loads_exported_train_weights_strictly_and_agrees():
  x = _image(5)
  model = rv.create_model("RepVGG-A0", num_classes=NUM_CLASSES)
  variables = random_variables(model, _nhwc(x), seed=5)
  timm_model = _timm_model("repvgg_a0")
  timm_model.load_state_dict(convert.to_torch_state_dict(variables, as_torch=True), strict=True)
  assert rel_err(_logits(timm_model, x), _forward("RepVGG-A0", False)(variables, _nhwc(x))) \
      <= 1e-5


@pytest.mark.parametrize("form, record", [("median", "identity/tau"), ("branch", "bound_tau")])
def test_oabn_variables_are_refused_by_export(form, record):
  model = rv.create_model("RepVGG-A0", num_classes=NUM_CLASSES, norm="oabn", oabn_form=form)
  variables = random_variables(model, jnp.zeros((1, SIZE, SIZE, 3)))
  # The bound changes what the BN computes, so it cannot pass for a torch BatchNorm.
  with raises_naming(ValueError, "PyTorch", record):
    convert.to_torch_state_dict(variables)


def test_export_rejects_unknown_style():
  with pytest.raises(ValueError, match="style='onnx'"):
    convert.to_torch_state_dict({"params": {}}, "onnx")


# --- inference of variant and classes ----------------------------------------------------


def _a0_state_dict(num_classes=NUM_CLASSES, deploy=False):
  """A fresh numpy timm-style A0 state dict (tests may edit it); no torch needed."""
  return dict(_cached_a0_state_dict(num_classes, deploy))


@functools.cache
def _cached_a0_state_dict(num_classes, deploy):
  model = rv.create_model("RepVGG-A0", num_classes=num_classes)
  variables = random_variables(model, jnp.zeros((1, SIZE, SIZE, 3)), seed=6)
  return convert.to_torch_state_dict(_merge(variables) if deploy else variables)


def test_num_classes_is_read_from_the_head():
  name, variables = convert.from_torch_state_dict(_a0_state_dict(num_classes=37))
  assert name == "RepVGG-A0"
  chex.assert_shape(variables["params"]["head"]["kernel"], (1280, 37))


def test_module_prefix_is_removed():
  state_dict = _a0_state_dict()
  _, want = convert.from_torch_state_dict(state_dict)
  _, got = convert.from_torch_state_dict({f"module.{k}": v for k, v in state_dict.items()})
  chex.assert_trees_all_equal(got, want)


def test_key_with_and_without_module_prefix_is_an_error():
  state_dict = _a0_state_dict()
  state_dict["module.head.fc.bias"] = state_dict["head.fc.bias"]
  with raises_naming(ValueError, "'module.head.fc.bias'", "'head.fc.bias'"):
    convert.from_torch_state_dict(state_dict)


def test_bfloat16_tensors_are_widened_to_float32():
  torch = _torch()
  state_dict = _a0_state_dict(deploy=True)
  _, want = convert.from_torch_state_dict(state_dict)
  _, got = convert.from_torch_state_dict(
      {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in state_dict.items()})
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(got))
  chex.assert_trees_all_close(got, want, rtol=1e-2, atol=1e-2)


def test_given_name_that_does_not_match_is_an_error():
  with raises_naming(ValueError, "RepVGG-B0", "given"):
    convert.from_torch_state_dict(_a0_state_dict(), "RepVGG-B0")


def test_given_unknown_name_is_an_error():
  with raises_naming(ValueError, "RepVGG-Z9"):
    convert.from_torch_state_dict(_a0_state_dict(), "RepVGG-Z9")


# --- errors: one ValueError listing every problem --------------------------------------------


def test_key_from_another_architecture_is_named():
  state_dict = _a0_state_dict()
  state_dict["layer1.0.conv1.weight"] = np.zeros((64, 64, 3, 3), np.float32)
  with raises_naming(ValueError, "layer1.0.conv1.weight"):
    convert.from_torch_state_dict(state_dict)


def test_another_architecture_state_dict_is_rejected():
  resnet = _timm().create_model("resnet18", pretrained=False)
  with raises_naming(ValueError, "layer1.0.conv1.weight", "fc.weight"):
    convert.from_torch_state_dict(resnet.state_dict())


def test_wrong_shape_names_the_key_and_both_shapes():
  state_dict = _a0_state_dict()
  state_dict["stages.1.0.conv_kxk.conv.weight"] = np.zeros((96, 48, 1, 1), np.float32)
  with raises_naming(ValueError, "stages.1.0.conv_kxk.conv.weight", "(96, 48, 1, 1)",
                     "(96, 48, 3, 3)"):
    convert.from_torch_state_dict(state_dict)


def test_every_problem_is_listed_in_one_error():
  state_dict = _a0_state_dict()
  del state_dict["stages.2.3.identity.running_var"]
  state_dict["stages.2.3.attn.fc1.weight"] = np.zeros((12, 192, 1, 1), np.float32)
  state_dict["head.fc.bias"] = np.zeros((11,), np.float32)
  with raises_naming(ValueError, "stages.2.3.attn.fc1.weight", "stages.2.3.identity.running_var",
                     "(192,)", "head.fc.bias", "(11,)", "(10,)"):
    convert.from_torch_state_dict(state_dict)


def test_half_merged_state_dict_is_an_error():
  train, deploy = _a0_state_dict(), _a0_state_dict(deploy=True)
  mixed = {k: v for k, v in train.items() if not k.startswith("stem.")}
  mixed.update({k: v for k, v in deploy.items() if k.startswith("stem.")})
  with raises_naming(ValueError, "merged"):
    convert.from_torch_state_dict(mixed)


def test_mixed_official_and_timm_names_are_an_error():
  state_dict = _a0_state_dict()
  state_dict["linear.weight"] = state_dict.pop("head.fc.weight").copy()
  with raises_naming(ValueError, "official", "timm"):
    convert.from_torch_state_dict(state_dict)


# --- files ---------------------------------------------------------------------------------


def test_safetensors_file_loads(tmp_path):
  safetensors_numpy = pytest.importorskip("safetensors.numpy")
  state_dict = _a0_state_dict()
  safetensors_numpy.save_file(state_dict, tmp_path / "a0.safetensors")
  name, got = convert.load_torch_checkpoint(tmp_path / "a0.safetensors")
  assert name == "RepVGG-A0"
  chex.assert_trees_all_equal(got, convert.from_torch_state_dict(state_dict)[1])


@pytest.mark.parametrize("wrapper", [None, "state_dict", "model"])
def test_pth_file_loads_with_wrappers_and_module_prefix(tmp_path, wrapper):
  torch = _torch()
  state_dict = _a0_state_dict(deploy=True)
  obj = {f"module.{k}": torch.from_numpy(v) for k, v in state_dict.items()}
  if wrapper:
    obj = {wrapper: obj, "epoch": 120}
  torch.save(obj, tmp_path / "a0.pth")
  name, got = convert.load_torch_checkpoint(tmp_path / "a0.pth")
  assert name == "RepVGG-A0"
  chex.assert_trees_all_equal(got, convert.from_torch_state_dict(state_dict)[1])


def _truncate(path):
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])


def test_truncated_safetensors_file_is_a_clear_error(tmp_path):
  safetensors_numpy = pytest.importorskip("safetensors.numpy")
  path = tmp_path / "a0.safetensors"
  safetensors_numpy.save_file(_a0_state_dict(deploy=True), path)
  _truncate(path)
  with raises_naming(ValueError, str(path), "truncated"):
    convert.load_torch_checkpoint(path)


def test_truncated_pth_file_is_a_clear_error(tmp_path):
  torch = _torch()
  path = tmp_path / "a0.pth"
  torch.save({k: torch.from_numpy(v) for k, v in _a0_state_dict(deploy=True).items()}, path)
  _truncate(path)
  with raises_naming(ValueError, str(path), "truncated"):
    convert.load_torch_checkpoint(path)


def test_missing_file_is_a_clear_error(tmp_path):
  with raises_naming(ValueError, str(tmp_path / "nope.pth"), "exist"):
    convert.load_torch_checkpoint(tmp_path / "nope.pth")


def test_import_does_not_need_torch():
  code = ("import sys, repvgg_jax, repvgg_jax.convert; "
          "assert 'torch' not in sys.modules and 'timm' not in sys.modules")
  subprocess.run([sys.executable, "-c", code], check=True)
