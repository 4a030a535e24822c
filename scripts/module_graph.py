#!/usr/bin/env python3
"""The crate's module graph from the source: for each top-level module of src/, the
top-level modules its code names (`crate::x`, comments left out), and the pairs that name
each other. The same rule as tests/architecture.rs.

    python3 scripts/module_graph.py [SRC_DIR]
"""
import pathlib
import re
import sys

root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "src")
graph = {}
for path in sorted(root.rglob("*.rs")):
    module = path.relative_to(root).parts[0].removesuffix(".rs")
    if module in ("main", "lib"):
        continue
    edges = graph.setdefault(module, set())
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("//"):
            continue
        for name in re.findall(r"crate::([A-Za-z0-9_]+)", line):
            if name not in (module, "proto"):
                edges.add(name)
for module, edges in graph.items():
    print(f"{module} -> {' '.join(sorted(edges))}")
pairs = sorted({tuple(sorted((a, b))) for a, e in graph.items() for b in e if a in graph.get(b, ())})
print("modules importing each other:", ", ".join(f"{a} <-> {b}" for a, b in pairs) or "none")


def circle(start):
    """A ring of imports from `start` back to it, if any."""
    stack, seen = [(start, [start])], set()
    while stack:
        at, path = stack.pop()
        for nxt in sorted(graph.get(at, ())):
            if nxt == start:
                return path + [start]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, path + [nxt]))
    return None


rings = {tuple(c) for m in graph if (c := circle(m)) and len(c) > 3}
print("longer circles:", "; ".join(" -> ".join(c) for c in sorted(rings)) or "none")
# Those allowed above a door: start-up (serve) and the command line (cli).
top = {"serve", "cli"}
for door in ["grpc", "stream", "cluster", "serve"]:
    below = sorted(m for m, e in graph.items() if door in e and m != door and m not in top)
    print(f"modules below {door}/ that import it:", ", ".join(below) or "none")
