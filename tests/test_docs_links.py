"""Every relative link in README.md, docs/*.md and bench/README.md points at a file of the repository,
and every `#anchor` at a heading of the page it names (GitHub's heading ids). No network: links with
a scheme (https:, mailto:) are not followed."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "bench" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^\s*(```|~~~)")
CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.S)


def _prose_lines(text: str, blank_code: bool = False):
    """(line number, line) outside fenced and indented code blocks; with blank_code, inline code spans
    (which may run over a line break) are blanked out."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            lines.append("")
        else:
            lines.append("" if fenced or line.startswith("    ") else line)
    if blank_code:
        joined = CODE_SPAN.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), "\n".join(lines))
        lines = joined.split("\n")
    for n, line in enumerate(lines, 1):
        if line:
            yield n, line


def slug(heading: str) -> str:
    """GitHub's id for a heading: rendered text, lower case, without punctuation, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link shows its text
    text = CODE_SPAN.sub(lambda m: m.group(2), text).replace("*", "")
    keep = (
        c
        for c in text.strip().lower()
        if c in " -" or unicodedata.category(c)[0] in "LMN" or unicodedata.category(c) == "Pc"
    )
    return "".join(keep).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, line in _prose_lines(page.read_text(encoding="utf-8")):
        m = re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        s = slug(m.group(2))
        k = seen.get(s, 0)
        seen[s] = k + 1
        out.add(s if k == 0 else f"{s}-{k}")
    return out


def links(page: Path):
    for n, line in _prose_lines(page.read_text(encoding="utf-8"), blank_code=True):
        for m in LINK.finditer(line):
            yield n, m.group(1)


def test_slug_follows_github():
    assert slug("## 4. Use what you trained".lstrip("# ")) == "4-use-what-you-trained"
    assert slug("`ff.models.load`") == "ffmodelsload"
    assert slug("Fused AdamW (`bench/bench_adam.py`)") == "fused-adamw-benchbench_adampy"
    assert slug("Interrupts and `--resume`") == "interrupts-and---resume"


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    bad = []
    for n, target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto:, ...
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        where = f"{page.relative_to(root)}:{n}: {target}"
        if root not in dest.parents:
            bad.append(f"{where} (outside the repository)")
        elif not dest.exists():
            bad.append(f"{where} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{where} (no heading with this anchor)")
    return bad


def test_checker_finds_broken_links(tmp_path):
    (tmp_path / "b.md").write_text("# Title\n\n## `ff.x` and more\n")
    page = tmp_path / "a.md"
    page.write_text(
        "[ok](b.md#ffx-and-more) [ok](#top) ![img](b.md) `[code](nowhere.md)`\n"
        "# Top\n[bad](c.md) [bad](b.md#nothing) [bad](../outside.md) [web](https://example.com/x)\n"
        "```\n[in a fence](nowhere.md)\n```\n"
    )
    bad = broken_links(page, tmp_path)
    assert [b.split(": ", 1)[1] for b in bad] == [
        "c.md (no such file)",
        "b.md#nothing (no heading with this anchor)",
        "../outside.md (outside the repository)",
    ]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    assert page.exists(), page
    bad = broken_links(page)
    assert not bad, "broken links:\n" + "\n".join(bad)


def test_readme_links_are_seen():
    targets = [t for _, t in links(ROOT / "README.md")]
    assert "docs/training.md" in targets and len(targets) > 20
