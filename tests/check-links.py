#!/usr/bin/env python3
"""Every relative link in the project's Markdown resolves: the file exists and, for a
link with #anchor, the target has a heading with that anchor (GitHub's rule: lower
case, punctuation dropped, spaces to hyphens). Links in code blocks are not links.
   tests/check-links.py            (run by tests/run.sh; exits 1 on a broken link)
"""
import pathlib
import re
import sys

repo = pathlib.Path(__file__).resolve().parent.parent
pages = [repo / "README.md", repo / "CHANGELOG.md", *sorted((repo / "docs").glob("*.md")),
         *sorted(p for p in (repo / "examples").glob("*/README.md"))]
link = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def prose(path):
    """The lines of a page outside fenced code blocks, with their numbers."""
    fenced = False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            yield number, line


def anchors(path):
    found = set()
    for _, line in prose(path):
        heading = re.match(r"#+\s+(.*)", line)
        if heading:
            text = heading.group(1).strip().lower()
            slug = re.sub(r"[^\w\- ]", "", text).replace(" ", "-")
            found.add(slug)
    return found


broken = []
for page in pages:
    if not page.exists():
        continue
    for number, line in prose(page):
        for target in link.findall(re.sub(r"`[^`]*`", "", line)):
            if re.match(r"[a-z]+:", target):
                continue  # http:, https:, mailto:
            file, _, anchor = target.partition("#")
            resolved = (page.parent / file).resolve() if file else page
            where = f"{page.relative_to(repo)}:{number}: {target}"
            if not resolved.exists():
                broken.append(f"{where}: no such file")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                broken.append(f"{where}: no heading #{anchor} in {resolved.relative_to(repo)}")

if broken:
    print("links: broken relative links:\n  " + "\n  ".join(broken), file=sys.stderr)
    sys.exit(1)
print(f"links: every relative link resolves ({len(pages)} pages)")
