"""A griffe extension for the docs site: the docstrings' few reStructuredText forms as Markdown.

The docstrings are Google style with three reStructuredText habits that mkdocstrings would show
raw: roles (``:func:`fisher_diagonal` `` and the like), a literal-block colon (``Example::``) and
``.. math::`` blocks. :func:`to_markdown` rewrites them (a role becomes a code span, ``::`` one
colon, a math block a fenced ``text`` block of its LaTeX); the source is left as it is, so
``help()`` and the doctests see the docstrings unchanged. Loaded by ``mkdocs.yml``
(``extensions: [tools/griffe_rst.py]``).
"""

from __future__ import annotations

import re

import griffe

_ROLE = re.compile(r":(?:func|class|data|mod|attr|meth|obj|exc|math):`~?([^`]+)`")
_MATH = re.compile(r"^(?P<indent>[ \t]*)\.\. math::[ \t]*(?P<first>.*)$")


def to_markdown(text: str) -> str:
  """The docstring ``text`` with its roles, ``::`` endings and math blocks in Markdown.

  >>> to_markdown("See :func:`ewc_loss`. Example::")
  'See `ewc_loss`. Example:'
  >>> print(to_markdown(".. math::  a = b\\n           + c\\n\\nAfter."))
  ```text
  a = b
  + c
  ```
  <BLANKLINE>
  After.
  """
  lines, out, i = text.splitlines(), [], 0
  while i < len(lines):
    m = _MATH.match(lines[i])
    if m is None:
      line = _ROLE.sub(r"`\1`", lines[i])
      out.append(line[:-1] if line.endswith("::") else line)
      i += 1
      continue
    indent, body = m.group("indent"), [m.group("first").strip()]
    i += 1
    while i < len(lines) and lines[i].strip() and len(lines[i]) - len(lines[i].lstrip()) > len(indent):
      body.append(lines[i].strip())
      i += 1
    out += [f"{indent}```text", *(f"{indent}{b}" for b in body if b), f"{indent}```"]
  return "\n".join(out)


class RstToMarkdown(griffe.Extension):
  """Rewrites every loaded object's docstring with :func:`to_markdown`."""

  def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
    del kwargs
    if obj.docstring is not None:
      obj.docstring.value = to_markdown(obj.docstring.value)
