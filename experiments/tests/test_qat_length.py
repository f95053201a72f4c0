"""experiments/qat_length.py: an FP network that came out different moves its rows aside, and
the page reports each set against its own FP."""

import json

from experiments import qat_length_report


def _row(bits=None, packed=None, seed=0, merged=None):
  machine = {"nproc": 1, "cpu": "test cpu", "jax": "0", "date": "2026-01-01T00:00:00"}
  if bits is None:
    return {"regime": "oabn_median", "seed": seed, "forms": {"fp": merged, "merged": merged},
            "seconds": 1.0, "commit": "aaa", "machine": machine}
  return {"regime": "oabn_median", "seed": seed, "bits": bits, "steps": 200,
          "distill": "off", "forms": {"packed": packed, "ptq": 0.1}, "seconds": 1.0,
          "commit": "aaa", "machine": machine, "curve": [[200, packed]]}


def test_supersede_moves_that_seeds_rows_and_the_page_keeps_each_against_its_fp(tmp_path):
  path = str(tmp_path / "rows.json")
  ledger = {"rows": {"fp_oabn_median_s0": _row(merged=0.9),
                     "w2a8_oabn_median_n200_ce_s0": _row(2, 0.88),
                     "fp_oabn_median_s1": _row(seed=1, merged=0.91),
                     "w2a8_oabn_median_n200_ce_s1": _row(2, 0.905, seed=1)}}
  with open(path, "w") as f:
    json.dump(ledger, f)
  fp_row = {"name": "fp_oabn_median_s0", "regime": "oabn_median", "seed": 0}
  moved = qat_length_report.supersede(path, fp_row, "trained again: FP 0.85")
  assert sorted(moved) == ["fp_oabn_median_s0", "w2a8_oabn_median_n200_ce_s0"]
  after = qat_length_report.load_ledger(path)
  assert sorted(after["rows"]) == ["fp_oabn_median_s1", "w2a8_oabn_median_n200_ce_s1"]
  assert after["earlier"] == [{"why": "trained again: FP 0.85",
                               "rows": {k: ledger["rows"][k] for k in moved}}]
  # The new FP row of seed 0: the moved QAT row is not measured against it.
  after["rows"]["fp_oabn_median_s0"] = _row(merged=0.85)
  page = qat_length_report.markdown(after, None)
  current, earlier = page.split("## Earlier FP network 1")
  assert "| oabn_median | 1 | W2A8 | 200 | off | 90.50 | 0.50 | met |" in current
  assert "| oabn_median | 0 | W2A8 |" not in current and "| 85.00 |" in current
  assert "trained again: FP 0.85" in earlier
  assert "| oabn_median | 0 | W2A8 | 200 | off | 88.00 | 2.00 | not met |" in earlier
