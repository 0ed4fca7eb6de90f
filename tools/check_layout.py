#!/usr/bin/env python
"""Mechanical checks of the package's shape (run by tests/test_layout.py in CI):

1. every module's file path spells its import name: sdk/sparsedge/ffn/module.py is `sparsedge.ffn.module`, and
   the installed package resolves each name to that very file (nothing renamed by packaging);
2. no import cycles anywhere in the package (imports inside functions count: a lazy import is a dependency);
3. the runtime imports nothing offline: no module outside OFFLINE reaches a module inside it.

    python tools/check_layout.py            # prints the report, exits 1 on a violation
    python tools/check_layout.py --json     # the graph's numbers (modules, lines, edges, cycles, back-edges)
"""
from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "sdk"
PACKAGE = "sparsedge"
# Offline work: calibration, sweeps, oracles, evaluation, benchmarks, test helpers. Everything else is the
# runtime an on-device app ships (session, model, loading, tokenizer, sampling, caches, ffn, delta, ops, backends).
OFFLINE = ("sparsedge.calibrate", "sparsedge.evaluate", "sparsedge.bench", "sparsedge.testing")


def module_files() -> dict[str, Path]:
    """import name -> file, derived from the path alone."""
    out = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def is_offline(name: str) -> bool:
    return any(name == o or name.startswith(o + ".") for o in OFFLINE)


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Modules of the package that `name` imports (anywhere in the file), resolved to the most specific module."""
    tree = ast.parse(path.read_text(), str(path))
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def add(target: str) -> None:
        while target and target not in modules:
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != PACKAGE:
                continue
            for alias in node.names:  # `from pkg import submodule` depends on the submodule
                sub = f"{mod}.{alias.name}"
                add(sub if sub in modules else mod)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
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
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def check() -> dict:
    modules = module_files()
    graph = {m: imports_of(m, p, modules) for m, p in modules.items()}
    problems = []
    # 1. the installed package resolves every name to the file its path spells
    for name, path in modules.items():
        try:
            spec = importlib.util.find_spec(name)
        except ImportError as exc:
            problems.append(f"{name}: not importable ({exc}); install with pip install --no-build-isolation -e .")
            continue
        origin = Path(spec.origin).resolve() if spec and spec.origin else None
        if origin != path.resolve():
            problems.append(f"{name}: imports from {origin}, its file is {path.relative_to(ROOT)}")
    # 2. cycles
    cyc = cycles(graph)
    problems += [f"import cycle: {' -> '.join(c)}" for c in cyc]
    # 3. runtime -> offline edges
    back = sorted((a, b) for a, deps in graph.items() for b in deps if not is_offline(a) and is_offline(b))
    problems += [f"runtime module {a} imports offline module {b}" for a, b in back]
    lines = {m: sum(1 for _ in p.open()) for m, p in modules.items()}
    return {"modules": len(modules), "runtime_modules": sum(not is_offline(m) for m in modules),
            "edges": sum(len(d) for d in graph.values()), "cycles": cyc,
            "runtime_to_offline_edges": [list(e) for e in back], "lines": lines, "problems": problems}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    report = check()
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(f"{report['modules']} modules ({report['runtime_modules']} runtime), {report['edges']} import edges, "
              f"{len(report['cycles'])} cycles, {len(report['runtime_to_offline_edges'])} runtime->offline edges")
        for line in report["problems"]:
            print(f"  {line}")
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
