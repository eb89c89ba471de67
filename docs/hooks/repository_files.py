"""MkDocs hook: the repository's own reports and notes join the site where they lie, not as copies.

`benchmarks/results/**` (every report, figure and JSON a benchmark wrote), CONTRIBUTING.md and CHANGELOG.md are
added to the site under their repository paths (`benchmarks/results/cpu.md` is the page `benchmarks/results/cpu/`).
Pages link to them as the repository does (`../../benchmarks/results/cpu.md` from `docs/guides/x.md` works on
GitHub), and the build rewrites each such link to the file's place in the site; a link to a repository file the
site does not carry (a source file) becomes its path in code. A link to a file that does not exist is left alone,
so `mkdocs build --strict` fails on it.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
CARRIED = ("benchmarks/results/**/*", "CONTRIBUTING.md", "CHANGELOG.md")
LINK = re.compile(r"(?P<bang>!?)\[(?P<text>[^\]]*)\]\((?P<target>[^)\s#]+)(?P<anchor>#[^)\s]*)?\)")


def site_path(path: Path) -> str | None:
    """Where a repository file lies in the site: docs/ files at the top, carried files under their own path."""
    if path.is_relative_to(DOCS):
        return path.relative_to(DOCS).as_posix()
    if path.is_relative_to(ROOT):
        return path.relative_to(ROOT).as_posix()
    return None


def on_files(files: Files, config) -> Files:
    """MkDocs event: add the carried repository files."""
    for pattern in CARRIED:
        for path in sorted(ROOT.glob(pattern)):
            if path.is_file():
                uri = path.relative_to(ROOT).as_posix()
                files.append(File(uri, str(ROOT), config["site_dir"], config["use_directory_urls"]))
    return files


def on_page_markdown(markdown: str, page, config, files: Files) -> str:
    """MkDocs event: repository-relative links -> site-relative ones (or code, for files the site lacks)."""
    source = Path(page.file.abs_src_path).parent
    here = posixpath.dirname(page.file.src_uri)

    def rewrite(match: re.Match) -> str:
        target = match["target"]
        if "://" in target or target.startswith(("mailto:", "/")):
            return match[0]
        real = (source / target).resolve()
        if not real.exists():
            return match[0]  # broken: mkdocs --strict names it
        uri = site_path(real)
        if uri is not None and files.get_file_from_path(uri) is not None:
            return f"{match['bang']}[{match['text']}]({posixpath.relpath(uri, here or '.')}{match['anchor'] or ''})"
        if uri is not None and real.is_dir() and files.get_file_from_path(f"{uri}/index.md") is not None:
            return f"{match['bang']}[{match['text']}]({posixpath.relpath(uri, here or '.')}/index.md)"
        return match["text"] if match["text"].startswith("`") else f"`{uri or target}`"

    return LINK.sub(rewrite, markdown)
