"""Every ``repvgg_jax.X`` / ``repvgg_jax.a.b.X`` name that README.md and docs/*.md write, and
every name they import ``from repvgg_jax...``, exists: a reader who types it gets the
object, not an AttributeError."""

import importlib
import pathlib
import re
import warnings

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def documented_names(text):
  """The dotted ``repvgg_jax...`` names of ``text``, and ``module.name`` for each name of
  a ``from repvgg_jax... import a, b`` line."""
  names = set(re.findall(r"\brepvgg_jax(?:\.[A-Za-z_]\w*)+", text))
  for module, imported in re.findall(
      r"^\s*from (repvgg_jax(?:\.\w+)*) import \(?([\w, ]+(?:\n[\w, ]+)*)\)?", text, re.M):
    names |= {f"{module}.{n.split(' as ')[0].strip()}" for n in imported.split(",")
              if n.strip()}
  return names


def resolve(name):
  """The object ``name`` names: its longest importable module prefix, then attributes
  (a renamed name still resolves, with its DeprecationWarning)."""
  parts = name.split(".")
  for i in range(len(parts), 0, -1):
    module = ".".join(parts[:i])
    try:
      obj = importlib.import_module(module)
      break
    except ModuleNotFoundError as e:
      if not module.startswith(e.name or "\0"):  # a dependency of the module is missing
        raise
  for attr in parts[i:]:
    obj = getattr(obj, attr)
  return obj


def test_documented_names_finds_dotted_and_imported_names():
  text = ("`repvgg_jax.load_packed(path)` and repvgg_jax.quant.read_packed.\n"
          "from repvgg_jax.analysis import outlier_stats, channel_outliers as co\n")
  assert documented_names(text) == {
      "repvgg_jax.load_packed", "repvgg_jax.quant.read_packed", "repvgg_jax.analysis",
      "repvgg_jax.analysis.outlier_stats", "repvgg_jax.analysis.channel_outliers"}
  with pytest.raises(AttributeError):
    resolve("repvgg_jax.read_packed")  # what docs/deploy.md once named


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_repvgg_jax_name_in_the_docs_exists(doc):
  missing = []
  for name in sorted(documented_names(doc.read_text())):
    try:
      with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        resolve(name)
    except (AttributeError, ImportError) as e:
      missing.append(f"{name}: {type(e).__name__}: {e}")
  assert not missing, f"{doc.name} names what does not exist:\n" + "\n".join(missing)
