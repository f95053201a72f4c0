"""The settings a train-form RepVGG records in its ``settings`` collection (OABN
bounds, QARepVGG identity gains) and the check that variables agree with a model's.

The forward pass uses the model's attributes (the config); :func:`repvgg_jax.merge`
reads the recorded copy, so the two must agree for a checkpoint to merge into the
network it was trained as.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from repvgg_jax.models.repvgg import RepVGG
from repvgg_jax.models.oabn import BOUND_KEYS, BRANCH_KEYS, SETTINGS
from repvgg_jax.reparam import IDENTITY_GAIN, SETTING_KEYS


def expected_records(model: RepVGG) -> dict[str, Any]:
  """The settings a train-form ``model`` records in its ``settings`` (OABN
  bounds, QARepVGG identity gains), per entry name, as :func:`check_settings` compares them."""
  out = {}
  if model.norm == "oabn" and model.bound_form == "median":
    out.update(zip(BOUND_KEYS, (model.bound_tau, model.oabn_relative, model.oabn_bound == "tanh")))
  if model.branch_bound() is not None:
    out.update(zip(BRANCH_KEYS, model.branch_bound()))
  if model.block == "qarepvgg":
    out[IDENTITY_GAIN] = 1.0
  return out


def check_settings(model: RepVGG, variables: Any) -> None:
  """Raises ValueError when ``variables`` (e.g. a restored checkpoint) were made
  by a model whose norm/bound settings differ from ``model``'s.

  The forward pass uses ``model``'s attributes while :func:`repvgg_jax.merge`
  reads the settings recorded in ``settings``: they must agree. The error
  names each disagreeing entry with the stored and the configured value.
  Deploy-form ``model``s (no ``batch_stats``) pass.
  """
  if model.deploy:
    return
  want = expected_records(model)
  bad: dict[tuple[str, Any], list[str]] = {}  # (entry, stored value) -> paths
  found = set()

  def walk(tree: Any, path: tuple[str, ...]) -> None:
    for k, v in tree.items():
      if isinstance(v, Mapping):
        walk(v, path + (k,))
      elif k in SETTING_KEYS:
        found.add(k)
        stored = np.asarray(v).item()
        if k not in want or not np.isclose(stored, want[k]):
          bad.setdefault((k, stored), []).append("/".join(path + (k,)))

  if isinstance(variables, Mapping):
    walk(variables.get(SETTINGS, {}), (SETTINGS,))
  problems = []
  for (k, stored), paths in bad.items():
    where = f"{paths[0]}={stored!r}" + (f" (and {len(paths) - 1} more)" if len(paths) > 1
                                         else "")
    problems.append(f"{where} but the model config says {want[k]!r}" if k in want
                    else f"{where} but the model ({_describe(model)}) has no such setting")
  missing = sorted(set(want) - found)
  if missing:
    problems.append(f"the model ({_describe(model)}) records {missing} in {SETTINGS} but the "
                    "variables have none")
  if problems:
    raise ValueError("variables made with other norm settings than the model's: "
                     + "; ".join(problems))


def _describe(model: RepVGG) -> str:
  if model.norm == "bn":
    return f"norm='bn', block={model.block!r}"
  return (f"norm='oabn', block={model.block!r}, oabn_form={model.bound_form!r}, "
          f"oabn_tau={model.bound_tau}, oabn_bound={model.oabn_bound!r}, "
          f"oabn_relative={model.oabn_relative}")
