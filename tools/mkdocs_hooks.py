"""mkdocs hook: the site's guide is the README, its benchmarks page the benchmark reports.

Pages listed in ``INCLUDES`` take their text from files outside ``docs/`` (one source, no copies).
Links in every page are made to work on the site: a link to a file that is a page of the site
(``docs/ACCURACY.md`` from the README) points at that page; a link to any other file of the
repository (``examples/train_digits.py``) points at it on GitHub.
"""

from __future__ import annotations

import pathlib
import posixpath
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
REPOSITORY = "https://github.com/bnjax/bnjax/blob/main/"
# site page -> the repository files it shows, in order
INCLUDES = {
  "index.md": ["README.md"],
  "benchmarks.md": [
    "benchmarks/RESULTS.md",
    "benchmarks/MODELS.md",
    "benchmarks/FOLD.md",
    "benchmarks/SYNC.md",
    "benchmarks/TRACED_FLAG.md",
    "benchmarks/NOTES.md",
  ],
}
_LINK = re.compile(r"(!?\[[^\]]*\]\()([^)\s]+)(\))")


def _site_page(repo_path: str) -> str | None:
  """The site page (relative to docs/) that shows ``repo_path``, if any."""
  if repo_path.startswith("docs/"):
    return repo_path[len("docs/") :]
  return next((page for page, sources in INCLUDES.items() if repo_path in sources), None)


def rewrite_links(text: str, *, source: str, page: str) -> str:
  """``text`` of repository file ``source`` shown as site page ``page``, its links fixed."""

  def fix(match: re.Match) -> str:
    before, target, after = match.groups()
    if re.match(r"[a-z]+:", target) or target.startswith("#"):
      return match.group(0)
    path, _, anchor = target.partition("#")
    repo_path = posixpath.normpath(posixpath.join(posixpath.dirname(source), path))
    shown = _site_page(repo_path)
    if shown is None:
      new = REPOSITORY + repo_path
    else:
      new = posixpath.relpath(shown, posixpath.dirname(page) or ".")
    return f"{before}{new}{'#' + anchor if anchor else ''}{after}"

  return _LINK.sub(fix, text)


def on_page_markdown(markdown, page, config, files):
  uri = page.file.src_uri
  sources = INCLUDES.get(uri)
  if sources is None:
    return rewrite_links(markdown, source=f"docs/{uri}", page=uri)
  parts = [markdown.strip()] if markdown.strip() else []
  for source in sources:
    path = ROOT / source
    if path.exists():
      parts.append(rewrite_links(path.read_text(), source=source, page=uri))
  return "\n\n".join(parts)
