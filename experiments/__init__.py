"""The studies behind experiments/results/ (results*.md, mixed_precision.md, ...): rows of
pipeline runs, a committed ledger of finished rows, and the Markdown written from it. Run from the
repository root:

  python -m experiments.study --workdir runs/study     # FP regimes x quantization rows
  python -m experiments.sweep ...                       # one setting over several values
  python -m experiments.deploy_rows ...                 # deployment rows on the demo model
  python -m experiments.bits --workdir runs/bits_study  # mixed, grouped, vector codebooks

* ``rows``: the row table (``QUANT_ROWS``, regimes, recipes) and each row's config;
* ``ledger``: the committed ``<out>_rows.json`` of finished rows (flock-guarded updates);
* ``report``: the study's Markdown and figures from a ledger alone.

benchmarks/ holds the benchmarks (speed, memory, sizes); experiments/tests/test_study.py tests this
package without training.
"""
