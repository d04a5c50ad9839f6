"""Check the house rules of napari_unetpp's layout; print a table and exit 1 where one is broken.

- no import circle between modules, counting imports inside functions too (a package's ``__init__`` counts as a
  module, and importing ``a.b.c`` depends on the packages ``a.b`` it passes through, since their ``__init__`` runs);
- no private name (``_x``) imported from another module of the package;
- every module at most ``--max-lines`` lines (default 400), except those named with ``--allow NAME=LINES``.

Usage: ``python scripts/check_layout.py [--max-lines 400] [--allow napari_unetpp.x.y=500 ...]``
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "napari_unetpp"


def modules() -> dict[str, Path]:
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        parts = list(p.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def imports(mod: str, path: Path, known: dict[str, Path]) -> tuple[set[str], list[str]]:
    """Modules of the package ``mod`` imports (anywhere in the file), and private names it imports from them."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    deps: set[str] = set()
    private: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "napari_unetpp" and a.name in known:
                    deps.add(a.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                src = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                src = node.module or ""
            if src.split(".")[0] != "napari_unetpp":
                continue
            for a in node.names:
                sub = f"{src}.{a.name}"
                if sub in known:  # from package import module
                    deps.add(sub)
                elif src in known:
                    deps.add(src)
                    if a.name.startswith("_") and not a.name.startswith("__") and src != mod:
                        private.append(f"{mod}:{node.lineno} imports {src}.{a.name}")
    # importing a.b.c runs a/__init__ and a/b/__init__ first: the packages it passes through are dependencies too
    # (their __init__ may import anything), except the importer's own packages, which are loaded already
    for d in list(deps):
        parts = d.split(".")
        for n in range(2, len(parts)):
            parent = ".".join(parts[:n])
            if parent in known and not mod.startswith(parent + ".") and mod != parent:
                deps.add(parent)
    deps.discard(mod)
    return deps, private


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-lines", type=int, default=400)
    ap.add_argument("--allow", action="append", default=[], help="NAME=LINES: a module allowed up to LINES")
    ap.add_argument("--quiet", action="store_true", help="print only what breaks a rule")
    args = ap.parse_args(argv)
    allow = {k: int(v) for k, v in (a.split("=") for a in args.allow)}
    known = modules()
    graph: dict[str, set[str]] = {}
    private: list[str] = []
    for mod, path in known.items():
        graph[mod], priv = imports(mod, path, known)
        private += priv
    # a package's __init__ importing its own submodules is how packages re-export; not a design dependency
    for mod in graph:
        graph[mod] = {d for d in graph[mod] if not d.startswith(mod + ".")}
    circ = cycles(graph)
    sizes = {m: len(p.read_text().splitlines()) for m, p in known.items()}
    big = {m: n for m, n in sizes.items() if n > allow.get(m, args.max_lines)}
    if not args.quiet:
        print(f"{'module':52} {'lines':>6}")
        for m in sorted(sizes, key=lambda m: -sizes[m]):
            mark = " *" if m in big else (" (allowed)" if m in allow and sizes[m] > args.max_lines else "")
            print(f"{m:52} {sizes[m]:6}{mark}")
        print(f"\n{len(known)} modules, {sum(sizes.values())} lines, largest {max(sizes.values())}")
    for c in circ:
        print("circle:", " <-> ".join(c))
    for p in private:
        print("private import:", p)
    for m, n in sorted(big.items(), key=lambda kv: -kv[1]):
        print(f"too long: {m} has {n} lines (limit {allow.get(m, args.max_lines)})")
    bad = bool(circ or private or big)
    print("layout:", "BROKEN" if bad else "ok")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
