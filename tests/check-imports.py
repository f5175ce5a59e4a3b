#!/usr/bin/env python3
"""The code's layers, checked: every path into another module of src/ (`crate::…`,
`super::…`, in `use` trees however nested, in code and macros, tests included)
points to a lower layer, never sideways or up, and the pure modules of src/model/
import one another without a cycle.
   tests/check-imports.py          (run by tests/run.sh; exits 1 and names each offence)
"""
import pathlib
import re
import sys

# Lowest first. A unit is a file of src/ or a folder of it; model's files are units of
# their own (one layer), so that a cycle among them shows. Items of lib.rs are "lib".
LAYERS = [
    {"model"},
    {"settings"},
    {"shared", "spi"},
    {"log_hook", "wake", "catalog"},
    {"capture", "store", "delivery"},
    {"worker", "status"},
    {"lib", "tests"},
]
layer_of = {unit: n for n, units in enumerate(LAYERS) for unit in units}
src = pathlib.Path(__file__).resolve().parent.parent / "src"
modules = set(re.findall(r"(?m)^\s*(?:pub(?:\([a-z]+\))?\s+)?mod\s+(\w+)\s*;", (src / "lib.rs").read_text()))
model_files = {p.stem for p in (src / "model").glob("*.rs")} - {"mod"}


def file_module(path):
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] in ("mod", "lib"):
        parts.pop()
    return parts


def code_only(text):
    """The text without comments, string and character literals (same line count)."""
    out, i, n = [], 0, len(text)
    while i < n:
        if text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            out.append("\n" * text.count("\n", i, n if j < 0 else j))
            i = n if j < 0 else j + 2
        elif re.match(r'(?:b|c)?r(#*)"', text[i:]) and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")):
            m = re.match(r'(?:b|c)?r(#*)"', text[i:])
            end = text.find('"' + m.group(1), i + m.end())
            end = n if end < 0 else end + 1 + len(m.group(1))
            out.append('""' + "\n" * text.count("\n", i, end))
            i = end
        elif text[i] == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append('""' + "\n" * text.count("\n", i, j))
            i = j + 1
        elif re.match(r"'(\\.|[^\\'])'", text[i:]):
            i += re.match(r"'(\\.|[^\\'])'", text[i:]).end()
            out.append("' '")
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def expand(tree):
    """`a::{b, c::{d, e}}` -> [[a, b], [a, c, d], [a, c, e]]."""
    tree = re.sub(r"\s+", "", tree)
    depth, parts, cur = 0, [], ""
    if "{" not in tree:
        return [[p for p in tree.split("::") if p]]
    head, _, rest = tree.partition("{")
    body = rest[: rest.rfind("}")]
    for ch in body:
        depth += ch == "{"
        depth -= ch == "}"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    prefix = [p for p in head.split("::") if p]
    return [prefix + sub for part in parts if part for sub in expand(part)]


def path_tree(code, start):
    """The path tree that starts at `start` (after `crate::` or `super::`)."""
    j, depth = start, 0
    while j < len(code):
        ch = code[j]
        if ch == "{":
            depth += 1
        elif ch == "}":
            if depth == 0:
                break
            depth -= 1
        elif not (ch.isalnum() or ch in "_:*" or (depth and ch in ", \n\t")):
            break
        j += 1
    return code[start:j]


def unit_of(parts):
    if not parts or parts[0] not in modules:
        return ("lib", None)
    if parts[0] == "model":
        return ("model", parts[1] if len(parts) > 1 and parts[1] in model_files else "mod")
    return (parts[0], None)


problems, edges = [], {}
for path in sorted(src.rglob("*.rs")):
    here_module = file_module(path)
    here = unit_of(here_module) if here_module else ("lib", None)
    if here[0] not in layer_of:
        problems.append(f"{path.relative_to(src.parent)}: not in any layer of tests/check-imports.py")
        continue
    code = code_only(path.read_text())
    # Inline modules (`mod tests { … }`) change what `super` means inside them.
    opened = [(m.start(), m.group(1)) for m in re.finditer(r"\bmod\s+(\w+)\s*\{", code)]
    for m in re.finditer(r"\b(crate|super)((?:\s*::\s*super)*)\s*::\s*", code):
        depth_mods = [name for at, name in opened if at < m.start() and code.count("{", at, m.start()) > code.count("}", at, m.start())]
        base = [] if m.group(1) == "crate" else here_module + depth_mods
        ups = 0 if m.group(1) == "crate" else 1 + m.group(2).count("super")
        if ups > len(base):
            problems.append(f"{path.relative_to(src.parent)}: a path climbs above the crate")
            continue
        base = base[: len(base) - ups]
        for tail in expand(path_tree(code, m.end())):
            there = unit_of(base + [t for t in tail if t not in ("self", "*")] if tail else base)
            if there == here or (here[0] == "tests" and there[0] == "lib" and not tail):
                continue
            target = "::".join(base + tail)
            edges.setdefault(here, set()).add(there)
            if there[0] == here[0]:
                continue
            if layer_of[there[0]] >= layer_of[here[0]]:
                way = "sideways" if layer_of[there[0]] == layer_of[here[0]] else "upwards"
                line = code.count("\n", 0, m.start()) + 1
                problems.append(f"{path.relative_to(src.parent)}:{line}: imports {target} ({way})")

# Cycles among model's files (a depth-first search over their edges).
graph = {u: {v for v in vs if v[0] == "model"} for u, vs in edges.items() if u[0] == "model"}
state = {}


def visit(node, trail):
    state[node] = "open"
    for nxt in sorted(graph.get(node, ()), key=str):
        if state.get(nxt) == "open":
            cycle = trail[trail.index(nxt):] + [nxt]
            problems.append("import cycle in src/model: " + " -> ".join(u[1] for u in cycle))
        elif nxt not in state:
            visit(nxt, trail + [nxt])
    state[node] = "done"


for node in sorted(graph, key=str):
    if node not in state:
        visit(node, [node])

if problems:
    print("imports:\n  " + "\n  ".join(sorted(set(problems))), file=sys.stderr)
    sys.exit(1)
count = sum(len(v) for v in edges.values())
print(f"imports: {count} imports between modules, all downwards, no cycle in src/model")
