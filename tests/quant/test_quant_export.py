"""Bit packing and the packed model: exact round trips and clear errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import repvgg_jax as rv
from repvgg_jax.models.repvgg import RepVGG
from repvgg_jax.quant import make_quantizer, pack, pack_bits, read_packed, unpack_bits
from _util import raises_naming, random_variables, tiny_variant

TINY = tiny_variant((1, 2, 2, 1))


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 8), n=st.integers(0, 300), seed=st.integers(0, 2 ** 31))
def test_pack_bits_round_trips_every_width_and_size(bits, n, seed):
  idx = np.random.default_rng(seed).integers(0, 2 ** bits, n)
  packed = pack_bits(idx, bits)
  assert packed.nbytes == -(-n * bits // 8)
  np.testing.assert_array_equal(unpack_bits(packed, bits, n), idx)


def test_pack_bits_rejects_index_too_wide():
  with raises_naming(ValueError, "index 4", "bits=2"):
    pack_bits(np.array([4]), 2)


@pytest.mark.parametrize("method, granularity", [
    ("cluster", "channel"), ("uniform", "tensor"), ("lsq", "channel")])
def test_qat_forward_equals_packed_forward_bit_for_bit(tmp_path, method, granularity):
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 32, 32, 3)), jnp.float32)
  params = rv.merge(random_variables(RepVGG(TINY, num_classes=5), x))["params"]
  model = RepVGG(TINY, num_classes=5, deploy=True)
  q = make_quantizer(method, bits=3, granularity=granularity, first_last_bits=8)
  state = q.init(params)
  apply = jax.jit(model.apply)
  y_qat = apply({"params": jax.jit(q.apply)(params, state)}, x)
  packed = pack(params, q, state)
  packed.save(tmp_path / "m.npz")
  y_packed = apply(read_packed(tmp_path / "m.npz").to_variables(), x)
  np.testing.assert_array_equal(np.asarray(y_packed), np.asarray(y_qat))
  np.testing.assert_array_equal(np.asarray(apply(packed.to_variables(), x)), np.asarray(y_qat))


def test_read_packed_names_corrupt_file(tmp_path):
  path = tmp_path / "bad.npz"
  path.write_bytes(b"not a zip")
  with raises_naming(ValueError, str(path)) as e:
    read_packed(path)
  # numpy's message for a non-.npz file advises loading pickled data unsafely: not ours.
  assert "pickle" not in str(e.value)
  with pytest.raises(FileNotFoundError):
    read_packed(tmp_path / "missing.packed")
