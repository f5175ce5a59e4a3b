#!/usr/bin/env python3
"""The code's layers, checked: every `crate::` path in src/ (tests included) points to
a lower layer, never sideways or up, and the pure modules of src/model/ import one
another without a cycle.
   tests/check-imports.py          (run by tests/run.sh; exits 1 and names each offence)
"""
import pathlib
import re
import sys

# Lowest first. A unit is a file of src/ or a folder of it; model's files are units of
# their own (one layer), so that a cycle among them shows.
LAYERS = [
    {"model"},
    {"settings"},
    {"shared", "spi"},
    {"log_hook", "wake", "catalog"},
    {"capture", "store", "delivery"},
    {"worker"},
    {"status"},
    {"lib", "tests"},
]
layer_of = {unit: n for n, units in enumerate(LAYERS) for unit in units}

src = pathlib.Path(__file__).resolve().parent.parent / "src"
edges = {}  # (unit, model file or None) -> set of (unit, model file or None)


def unit_of(path):
    parts = path.relative_to(src).with_suffix("").parts
    if parts[0] == "model":
        return ("model", parts[1] if len(parts) > 1 else "mod")
    return (parts[0], None)


problems = []
for path in sorted(src.rglob("*.rs")):
    here = unit_of(path)
    if here[0] not in layer_of:
        problems.append(f"{path.relative_to(src.parent)}: not in any layer of tests/check-imports.py")
        continue
    text = re.sub(r"//[^\n]*", "", path.read_text())
    targets = set()
    for group in re.findall(r"crate::\{([^}]*)\}", text):
        targets.update(m.group(1) for m in re.finditer(r"\b([a-z_]+)(?:::([a-z_]+))?", group))
    for m in re.finditer(r"crate::([a-z_]+)(?:::([a-z_]+))?", text):
        targets.add(m.group(1) if m.group(1) != "model" else f"model::{m.group(2)}")
    for target in targets:
        name, _, sub = target.partition("::")
        there = ("model", sub or "mod") if name == "model" else (name, None)
        if there[0] not in layer_of or there == here:
            continue
        edges.setdefault(here, set()).add(there)
        if there[0] == here[0]:
            continue
        if layer_of[there[0]] >= layer_of[here[0]]:
            way = "sideways" if layer_of[there[0]] == layer_of[here[0]] else "upwards"
            problems.append(f"{path.relative_to(src.parent)}: imports {target} ({way})")

# Cycles among model's files (a depth-first search over their edges).
model = {u: {v for v in vs if v[0] == "model"} for u, vs in edges.items() if u[0] == "model"}
state = {}


def visit(node, trail):
    state[node] = "open"
    for nxt in sorted(model.get(node, ())):
        if state.get(nxt) == "open":
            cycle = trail[trail.index(nxt):] + [nxt]
            problems.append("import cycle in src/model: " + " -> ".join(u[1] for u in cycle))
        elif nxt not in state:
            visit(nxt, trail + [nxt])
    state[node] = "done"


for node in sorted(model):
    if node not in state:
        visit(node, [node])

if problems:
    print("imports:\n  " + "\n  ".join(sorted(set(problems))), file=sys.stderr)
    sys.exit(1)
count = sum(len(v) for v in edges.values())
print(f"imports: {count} imports between modules, all downwards, no cycle in src/model")
