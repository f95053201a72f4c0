"""The settings a train-form RepVGG records in its ``settings`` collection (OABN
bounds, QARepVGG identity gains), the check that variables agree with a model's, and
the reading of variables saved before the settings had a collection of their own.

The forward pass uses the model's attributes (the config); :func:`repvgg_jax.merge`
reads the recorded copy, so the two must agree for a checkpoint to merge into the
network it was trained as.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from repvgg_jax.models.repvgg import RepVGG
from repvgg_jax.layers.oabn import BOUND_KEYS, BRANCH_KEYS, SETTINGS
from repvgg_jax.reparam import IDENTITY_GAIN, SETTING_KEYS, norm_state


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
  reads the settings recorded in ``settings`` (or, in variables saved before that
  collection, in ``batch_stats``): they must agree. The error
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
    for collection in ("batch_stats", SETTINGS):
      walk(variables.get(collection, {}), (collection,))
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


def split_settings(variables: Mapping[str, Any]) -> dict[str, Any]:
  """``variables`` with every setting (:data:`repvgg_jax.reparam.SETTING_KEYS`) found in
  ``batch_stats`` moved to the ``settings`` collection, at the same path: the layout of
  variables saved before the settings had a collection of their own, read as today's.
  Variables in today's layout come back as they are (as plain dicts)."""
  def split(tree: Mapping[str, Any]) -> tuple[dict, dict]:
    stats, found = {}, {}
    for k, v in tree.items():
      if isinstance(v, Mapping):
        sub_stats, sub_found = split(v)
        stats[k] = sub_stats
        if sub_found:
          found[k] = sub_found
      elif k in SETTING_KEYS:
        found[k] = v
      else:
        stats[k] = v
    return stats, found

  out = dict(variables)
  if "batch_stats" in out:
    out["batch_stats"], found = split(out["batch_stats"])
    if found and out.get(SETTINGS):
      raise ValueError(f"variables hold settings both in batch_stats and in {SETTINGS}")
    if found:
      out[SETTINGS] = found
  return out


def join_settings(variables: Mapping[str, Any]) -> dict[str, Any]:
  """The inverse of :func:`split_settings`: ``settings`` laid back into
  ``batch_stats`` (the old layout; how a checkpoint written before the change is
  matched against today's state)."""
  out = {k: v for k, v in variables.items() if k != SETTINGS}
  if variables.get(SETTINGS):
    out["batch_stats"] = norm_state(variables)
  return out


def _describe(model: RepVGG) -> str:
  if model.norm == "bn":
    return f"norm='bn', block={model.block!r}"
  return (f"norm='oabn', block={model.block!r}, oabn_form={model.bound_form!r}, "
          f"oabn_tau={model.bound_tau}, oabn_bound={model.oabn_bound!r}, "
          f"oabn_relative={model.oabn_relative}")
