"""k-means codebooks vs scikit-learn on the largest merged RepVGG-A0 kernel.

The kernel is ``stages_3_0`` (3x3x192x1280, 2,211,840 weights) merged from
random train-form weights with random BN statistics (kernels ~ N(0, 1/fan_in),
BN scale ~ U(0.2, 1), bias and mean ~ N(0, 0.1), var ~ U(0.5, 2); this block
has no identity branch). Per tensor at 2, 3, 4 and 8 bits: time and MSE of
``fit_codebook`` (Lloyd), ``optimal_codebook`` (DP) and
``sklearn.cluster.KMeans(n_clusters=2^b, n_init=10)``. scikit-learn fits all
weights up to ``--sk-max-points`` (default: all at 2-4 bits, 100,000 sampled
at 8 bits) and its MSE is always measured on all weights. Then per channel
(the Quantizer's default) at 2, 3, 4 bits: ``optimal_codebook(per_channel=True)``
on all 1280 channels, compared with KMeans and with the exact optimum
(the DP on every value of a channel) on the first ``--channels``.

Everything runs on one thread (XLA and scikit-learn's OpenMP) so the times
compare single-core work. JAX times are warm (compilation excluded, reported
separately) in the per-tensor table; the per-channel table times one call
including compilation, as at the start of QAT.

  python benchmarks/kmeans_vs_sklearn.py
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

import argparse  # noqa: E402
import datetime  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import sklearn  # noqa: E402
from sklearn.cluster import KMeans  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

import repvgg_jax as rv  # noqa: E402
from repvgg_jax.quant.kmeans import codebook_mse, fit_codebook  # noqa: E402
from repvgg_jax.quant.optimal import optimal_codebook  # noqa: E402

from bench_common import cpu_model  # run as a script: benchmarks/ is on sys.path

LAYER = "stages_3_0"


def merged_kernel(seed: int = 0) -> np.ndarray:
  """The merged ``stages_3_0`` kernel of RepVGG-A0 with random weights and BN stats."""
  model = rv.create_model("RepVGG-A0")
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)),
                                             train=False))
  rng = np.random.default_rng(seed)

  def fill(path, s):
    leaf = getattr(path[-1], "key", str(path[-1]))
    if leaf == "kernel":
      return (rng.standard_normal(s.shape) / np.sqrt(np.prod(s.shape[:-1]))).astype(np.float32)
    if leaf == "scale":
      return rng.uniform(0.2, 1.0, s.shape).astype(np.float32)
    if leaf in ("bias", "mean"):
      return (0.1 * rng.standard_normal(s.shape)).astype(np.float32)
    if leaf == "var":
      return rng.uniform(0.5, 2.0, s.shape).astype(np.float32)
    raise ValueError(f"no rule for {jax.tree_util.keystr(path)}")

  block = {c: jax.tree_util.tree_map_with_path(fill, shapes[c][LAYER])
           for c in ("params", "batch_stats")}
  kernel, _ = rv.merge_block(block["params"], block["batch_stats"], ("params", LAYER))
  return np.asarray(kernel, np.float32)


def timed(fn):
  t = time.perf_counter()
  out = jax.block_until_ready(fn())
  return np.asarray(out), time.perf_counter() - t


def sklearn_codebook(x: np.ndarray, bits: int, max_points: int, seed: int = 0):
  """Sorted KMeans(n_init=10) centres fitted on at most ``max_points`` values."""
  x = x.reshape(-1)
  if x.size > max_points:
    x = np.random.default_rng(seed).choice(x, max_points, replace=False)
  km = KMeans(2 ** bits, n_init=10, random_state=seed).fit(x.astype(np.float64).reshape(-1, 1))
  return np.sort(km.cluster_centers_.ravel())


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 8])
  ap.add_argument("--channel-bits", type=int, nargs="+", default=[2, 3, 4])
  ap.add_argument("--sk-max-points", type=int, default=None,
                  help="scikit-learn fit size (default: all at <= 4 bits, 100000 above)")
  ap.add_argument("--channels", type=int, default=32,
                  help="channels compared with scikit-learn in the per-channel table")
  args = ap.parse_args()

  start = time.time()
  print(f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; "
        f"nproc: {os.cpu_count()}; CPU: {cpu_model()}; load average at start: "
        f"{os.getloadavg()[0]:.1f}")
  print(f"jax {jax.__version__}, scikit-learn {sklearn.__version__}, numpy {np.__version__}, "
        f"python {platform.python_version()}; one thread (XLA and OpenMP)")
  w = merged_kernel()
  print(f"\nRepVGG-A0 {LAYER} merged kernel {w.shape} ({w.size:,} weights), random weights "
        f"and random BN stats\n")

  print("Per tensor:\n")
  print("| bits | method | fit points | time (s) | compile (s) | MSE | MSE / best |")
  print("|---|---|---|---|---|---|---|")
  with threadpool_limits(1):
    for bits in args.bits:
      rows = []
      for name, fn in (("Lloyd `fit_codebook`", lambda: fit_codebook(w, bits)),
                       ("DP `optimal_codebook`", lambda: optimal_codebook(w, bits))):
        _, first = timed(fn)
        c, t = timed(fn)
        rows.append((name, f"{w.size:,}", t, max(first - t, 0.0), codebook_mse(w, c)))
      limit = args.sk_max_points or (w.size if bits <= 4 else 100_000)
      c, t = timed(lambda: sklearn_codebook(w, bits, limit))
      rows.append(("scikit-learn KMeans(n_init=10)", f"{min(limit, w.size):,}", t, None,
                   codebook_mse(w, c)))
      best = min(r[-1] for r in rows)
      for name, pts, t, comp, mse in rows:
        comp = "-" if comp is None else f"{comp:.2f}"
        print(f"| {bits} | {name} | {pts} | {t:.2f} | {comp} | {mse:.4e} | {mse / best:.6f} |")

    cols = w.reshape(-1, w.shape[-1])
    n = min(args.channels, cols.shape[1])
    print(f"\nPer channel ({cols.shape[1]} channels of {cols.shape[0]} weights; times for all "
          f"channels, MSE ratios over the first {n}; KMeans fits each channel's weights):\n")
    print("| bits | method | time incl. compile (s) | mean MSE / sklearn | max MSE / sklearn | "
          "worse than sklearn | max MSE / exact | worse than exact |")
    print("|---|---|---|---|---|---|---|---|")
    for bits in args.channel_bits:
      sk = np.array([codebook_mse(cols[:, o], sklearn_codebook(cols[:, o], bits, cols.shape[0]))
                     for o in range(n)])
      # The exact optimum: every channel's values fit the exact DP.
      exact = optimal_codebook(cols[:, :n], bits, per_channel=True, max_points=cols.shape[0])
      ex = np.array([codebook_mse(cols[:, o], exact[o]) for o in range(n)])
      for name, fn in (("Lloyd `fit_codebook`", lambda: fit_codebook(w, bits, per_channel=True)),
                       ("DP `optimal_codebook` (Quantizer.init)",
                        lambda: optimal_codebook(w, bits, per_channel=True))):
        c, t = timed(fn)
        mse = np.array([codebook_mse(cols[:, o], c[o]) for o in range(n)])
        r, e = mse / sk, mse / ex
        worse = lambda v: f"{int(np.sum(v > 1 + 1e-6))} / {n}"
        print(f"| {bits} | {name} | {t:.2f} | {r.mean():.6f} | {r.max():.6f} | {worse(r)} | "
              f"{e.max():.6f} | {worse(e)} |")
  print(f"\ntotal {time.time() - start:.0f} s; load average at end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
  main()
