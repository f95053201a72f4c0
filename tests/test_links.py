"""Every relative link of the README, the guides and the results pages resolves: to an
existing file, and where it has an anchor (`page.md#heading`, `#heading`), to a heading of
that page (GitHub's anchor of it)."""

import collections
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md"),
                *(ROOT / "experiments" / "results").glob("*.md")])

FENCE = re.compile(r"^(```|~~~).*?^\1", flags=re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", flags=re.M)


def prose(text: str) -> str:
  """The text outside code blocks and inline code, where links are links."""
  return INLINE_CODE.sub("", FENCE.sub("", text))


def anchors(page: pathlib.Path) -> set[str]:
  """GitHub's anchors of the page's headings: lower case, punctuation dropped, spaces to
  hyphens, a repeated one numbered -1, -2, ..."""
  seen = collections.Counter()
  out = set()
  for title in HEADING.findall(FENCE.sub("", page.read_text())):
    title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", title)  # a link keeps its text
    slug = re.sub(r"[^\w\- ]", "", title.lower().replace("`", "")).replace(" ", "-")
    out.add(slug if not seen[slug] else f"{slug}-{seen[slug]}")
    seen[slug] += 1
  return out


def links(page: pathlib.Path) -> list[str]:
  return [t for t in LINK.findall(prose(page.read_text()))
          if not re.match(r"[a-z][a-z0-9+.-]*:", t)]  # http:, https:, mailto: are not ours


def test_the_pages_exist():
  names = {p.relative_to(ROOT).as_posix() for p in PAGES}
  assert {"README.md", "docs/architecture.md", "experiments/results/README.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page):
  bad = []
  for target in links(page):
    path, _, anchor = target.partition("#")
    dest = (page.parent / path).resolve() if path else page
    if not dest.exists():
      bad.append(f"{target}: no file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}")
    elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
      bad.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
  assert not bad, f"{page.relative_to(ROOT)}: " + "; ".join(bad)


def test_anchors_follow_github():
  page = ROOT / "docs" / "deploy.md"
  assert "core-ml-ios-18--macos-15" in anchors(page)
