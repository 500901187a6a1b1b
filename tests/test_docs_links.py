"""The README and the docs site hold together: every relative link resolves (file and heading),
every docs page is in the site's nav, and the API reference documents every public name."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pytest

import ewc_jax

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(`{3,}|~{3,})")


def prose(text: str) -> str:
  """The text without fenced blocks and code spans (links there are not links)."""
  out, fence = [], None
  for line in text.splitlines():
    m = FENCE.match(line)
    if fence is None and m:
      fence = m.group(1)
      continue
    if fence is not None:
      if line.startswith(fence):
        fence = None
      continue
    out.append(re.sub(r"`[^`]*`", "", line))
  return "\n".join(out)


def slug_mkdocs(title: str) -> str:
  """Python-Markdown's toc slugify (what mkdocs makes of a heading)."""
  value = unicodedata.normalize("NFKD", title).encode("ascii", "ignore").decode("ascii")
  value = re.sub(r"[^\w\s-]", "", value).strip().lower()
  return re.sub(r"[-\s]+", "-", value)


def slug_github(title: str) -> str:
  """GitHub's heading anchors: lower case, punctuation dropped, each space a hyphen."""
  return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
  """The anchors a link may use: those mkdocs and GitHub both give a heading."""
  found = set()
  for line in prose(path.read_text()).splitlines():
    m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
    if m:
      title = re.sub(r"[`*_]", "", re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", m.group(1)))
      if slug_mkdocs(title) == slug_github(title):
        found.add(slug_mkdocs(title))
  return found


def links(path: Path) -> list[str]:
  return [t for t in LINK.findall(prose(path.read_text()))
          if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]      # http:, https:, mailto: ...


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_every_relative_link_resolves_to_a_file_and_heading(page):
  broken = []
  for target in links(page):
    file, _, anchor = target.partition("#")
    dest = (page.parent / file).resolve() if file else page
    if not dest.exists():
      broken.append(f"{target}: no file {dest}")
    elif dest.is_dir() and page.parent == ROOT / "docs":
      broken.append(f"{target}: a folder (the site links files only; mkdocs --strict fails)")
    elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
      broken.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    if file and page.parent == ROOT / "docs" and not dest.is_relative_to(ROOT / "docs"):
      broken.append(f"{target}: outside docs/ (the site cannot serve it)")
  assert not broken, "\n".join(broken)


def test_the_link_checker_sees_a_broken_file_and_a_broken_heading(tmp_path):
  (tmp_path / "a.md").write_text("# A page\n\n## Some part\n\n```sh\n[x](nowhere.md)\n```\n"
                                 "[ok](b.md#the-b) [gone](c.md) [bad](b.md#nope) `[no](x.md)`\n")
  (tmp_path / "b.md").write_text("# The B\n")
  assert links(tmp_path / "a.md") == ["b.md#the-b", "c.md", "b.md#nope"]
  assert anchors(tmp_path / "b.md") == {"the-b"} and "some-part" in anchors(tmp_path / "a.md")


def test_every_docs_page_is_in_the_nav_and_the_readme_links_every_page():
  nav = set(re.findall(r":\s*([\w-]+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), re.M))
  pages = {p.name for p in (ROOT / "docs").glob("*.md")}
  assert nav == pages, (sorted(pages - nav), sorted(nav - pages))
  readme = {Path(t.partition("#")[0]).name for t in links(ROOT / "README.md")}
  assert pages - {"index.md"} <= readme, sorted(pages - {"index.md"} - readme)


def test_the_api_reference_documents_every_public_name():
  text = (ROOT / "docs" / "api.md").read_text()
  documented = re.findall(r"^::: ewc_jax\.(\w+)\s*$", text, re.M)
  assert len(documented) == len(set(documented))
  assert set(documented) == set(ewc_jax.__all__), (
      sorted(set(ewc_jax.__all__) - set(documented)), sorted(set(documented) - set(ewc_jax.__all__)))


def test_the_package_is_typed():
  assert (Path(ewc_jax.__file__).parent / "py.typed").is_file()
  assert 'ewc_jax = ["py.typed"]' in (ROOT / "pyproject.toml").read_text()


def test_the_readme_leads():
  """The README stays short: what it is and the two commands first, details in docs/."""
  text = (ROOT / "README.md").read_text()
  assert len(text.splitlines()) <= 250
  assert text.index("make run") < text.index("make test") < text.index("## ")


def test_the_docs_site_rewrites_the_docstrings_rst_forms_as_markdown():
  """tools/griffe_rst.py (the docs build's griffe extension; griffe comes with the docs extra)."""
  pytest.importorskip("griffe")
  import doctest  # pylint: disable=import-outside-toplevel
  from tools import griffe_rst  # pylint: disable=import-outside-toplevel
  result = doctest.testmod(griffe_rst)
  assert result.attempted > 0 and result.failed == 0, result
  text = griffe_rst.to_markdown("Loads :class:`~ewc_jax.Anchor`.\n\n  .. math::  x\n\n  Example::")
  assert text == "Loads `ewc_jax.Anchor`.\n\n  ```text\n  x\n  ```\n\n  Example:"
