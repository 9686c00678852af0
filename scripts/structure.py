"""Structure figures of src/transferkit, measured from its source.

Import circles (function-level imports included), private names imported across modules, lines per
module, longest functions, widest signatures, lines over 100 characters.

    python scripts/structure.py [--top N] [--json]
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "transferkit"
WIDE = 100


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def scan(modules: dict[str, Path]) -> dict:
    edges: dict[str, set[str]] = {m: set() for m in modules}
    private, functions, wide, lines = [], [], 0, {}
    total = 0
    for mod, path in modules.items():
        text = path.read_text()
        rows = text.splitlines()
        lines[mod] = len(rows)
        total += len(rows)
        wide += sum(len(r) > WIDE for r in rows)
        tree = ast.parse(text)
        is_package = path.name == "__init__.py"
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [(a.name, None) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                src = resolve(mod, is_package, node)
                for a in node.names:
                    sub = f"{src}.{a.name}"
                    targets.append((sub, None) if sub in modules else (src, a.name))
            for target, name in targets:
                if not target.startswith(PACKAGE):
                    continue
                while target not in modules and "." in target:
                    target = target.rsplit(".", 1)[0]
                if target != mod:
                    edges[mod].add(target)
                    if name and name.startswith("_") and not name.startswith("__"):
                        private.append(f"{mod} imports {target}.{name}")
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                a = node.args
                params = len(a.posonlyargs + a.args + a.kwonlyargs) + bool(a.vararg) + bool(a.kwarg)
                params -= bool(a.args) and a.args[0].arg in ("self", "cls")
                functions.append((length, params, f"{mod}.{node.name}"))
    return {"edges": edges, "private": private, "functions": functions, "wide": wide,
            "lines": lines, "total": total}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]
    sys.setrecursionlimit(10000)

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
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

    for v in edges:
        if v not in index:
            visit(v)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--top", type=int, default=10)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    modules = {module_name(p): p for p in sorted((ROOT / PACKAGE).rglob("*.py"))}
    s = scan(modules)
    # A package's __init__ importing its own submodules is its face, not a circle.
    edges = {m: {t for t in ts if not (m.startswith(t + "."))} for m, ts in s["edges"].items()}
    circles = cycles(edges)
    funcs = sorted(s["functions"], reverse=True)
    result = {
        "modules": len(modules), "lines": s["total"], "lines_over_100": s["wide"],
        "share_over_100": round(100 * s["wide"] / s["total"], 1),
        "import_circles": circles, "private_imports": s["private"],
        "longest_functions": [f"{n} lines  {name}" for n, _, name in funcs[: args.top]],
        "functions_over_50": sum(n > 50 for n, _, _ in funcs),
        "widest_signatures": [f"{p} params  {name}" for _, p, name in
                              sorted(funcs, key=lambda f: -f[1])[: args.top]],
        "largest_modules": [f"{n}  {m}" for m, n in
                            sorted(s["lines"].items(), key=lambda x: -x[1])[: args.top]],
    }
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    for key, value in result.items():
        if isinstance(value, list):
            print(f"{key}: {len(value)}")
            for v in value:
                print(f"  {v}")
        else:
            print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
