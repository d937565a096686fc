"""Architecture numbers of the working tree and of a git revision; writes docs/architecture.md.

For each of the two source trees (the working tree, and ``--rev`` read with ``git show REV:path``,
nothing checked out):

- **import cycles**: the strongly connected components of the ``dpok`` import graph, every
  ``import`` counted, at module level or inside a function (see :mod:`dpok.utils.import_graph`);
- **diffusers on the training path**: the modules reachable from ``dpok.trainer`` that import
  ``diffusers``;
- **trainer lines**: ``wc -l dpok/trainer.py``;
- **ShapeWorld named**: places (file:line) in ``dpok/`` and ``benchmarks/`` outside the domain
  packages (``dpok/shapeworld/``, ``dpok/embedded/``, ``dpok/domains.py``) whose *code* names
  ShapeWorld: an identifier, an imported module path or a string literal containing
  ``shapeworld`` (any case). Comments and docstrings (a string that is a statement of its own)
  are not code and are left out; string literals in code (an option's help, an error message, a
  ``model == "shapeworld"`` test) count, since they are what a second domain would have to edit;
- **reward settings mapped by hand**: places (file:line) outside the reward package
  (``dpok/rewards/``) that read one reward setting off another object (an attribute such as
  ``cfg.reward_model``) or name one as a string (``getattr(cfg, "reward_url")``, a mapping's
  key) to build a reward's options: ``alignment_model``, ``reward_model``, ``reward_head``,
  ``reward_processor``, ``reward_url``, ``reward_token``, ``reward_ca_file``. Declaring such a
  field in a config dataclass is not mapping and is not counted.

This script itself is left out of the last two counts (it names both). The numbers go to
``docs/architecture/data.json``; nothing in the report is typed by hand.
Run: ``python benchmarks/architecture.py [--rev 0bee0bb]`` (a few seconds).
"""

from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dpok.utils.import_graph import find_cycles, import_graph, imports_of, module_name, reachable  # noqa: E402

DOCS = ROOT / "docs"
SELF = "benchmarks/architecture.py"
DOMAIN_PLACES = ("dpok/shapeworld/", "dpok/embedded/", "dpok/domains.py")
REWARD_FIELDS = ("alignment_model", "reward_model", "reward_head", "reward_processor", "reward_url",
                 "reward_token", "reward_ca_file")


def read_sources(rev: str | None) -> dict[str, str]:
    """``{path: text}`` of every ``.py`` file under ``dpok/`` and ``benchmarks/``, from the working
    tree (``rev`` None) or from the git revision ``rev``."""
    if rev is None:
        return {str(p.relative_to(ROOT)): p.read_text() for folder in ("dpok", "benchmarks")
                for p in sorted((ROOT / folder).rglob("*.py"))}
    names = subprocess.run(["git", "ls-tree", "-r", "--name-only", rev, "dpok", "benchmarks"], cwd=ROOT,
                           check=True, capture_output=True, text=True).stdout.split()
    return {n: subprocess.run(["git", "show", f"{rev}:{n}"], cwd=ROOT, check=True, capture_output=True,
                              text=True).stdout for n in names if n.endswith(".py")}


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the string constants that are statements of their own (docstrings, bare strings)."""
    return {id(node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)}


def _code_texts(tree: ast.AST) -> list[tuple[int, str, str]]:
    """(line, kind, text) of every identifier, imported module path and non-docstring string
    literal; comments are not in the tree at all."""
    skipped = _docstrings(tree)
    out: list[tuple[int, str, str]] = []
    for node in ast.walk(tree):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Name):
            out.append((line, "name", node.id))
        elif isinstance(node, ast.Attribute):
            out.append((line, "attribute", node.attr))
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.append((line, "name", node.name))
        elif isinstance(node, ast.arg):
            out.append((line, "name", node.arg))
        elif isinstance(node, ast.keyword) and node.arg:
            out.append((line, "name", node.arg))
        elif isinstance(node, ast.ImportFrom):
            out.append((line, "module", node.module or ""))
            out.extend((line, "name", a.name) for a in node.names)
        elif isinstance(node, ast.Import):
            out.extend((line, "module", a.name) for a in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skipped:
            out.append((line, "string", node.value))
    return out


def shapeworld_places(sources: dict[str, str]) -> list[str]:
    """file:line of the code outside the domain packages that names ShapeWorld (see the module docstring)."""
    places = set()
    for path, text in sources.items():
        if path == SELF or path.startswith(DOMAIN_PLACES):
            continue
        for line, _, value in _code_texts(ast.parse(text)):
            if "shapeworld" in value.lower():
                places.add((path, line))
    return [f"{p}:{n}" for p, n in sorted(places)]


def reward_mapping_places(sources: dict[str, str]) -> list[str]:
    """file:line outside ``dpok/rewards/`` that reads or names a reward setting (see the module docstring)."""
    places = set()
    for path, text in sources.items():
        if path == SELF or path.startswith("dpok/rewards/"):
            continue
        for line, kind, value in _code_texts(ast.parse(text)):
            if kind in ("attribute", "string") and value in REWARD_FIELDS:
                places.add((path, line))
    return [f"{p}:{n}" for p, n in sorted(places)]


def measure(sources: dict[str, str]) -> dict[str, Any]:
    """The architecture numbers of one source tree ``{path: text}``."""
    package = {module_name(p): t for p, t in sources.items() if p.startswith("dpok/")}
    graph = import_graph(package)
    on_path = reachable(graph, "dpok.trainer")
    shapeworld = shapeworld_places(sources)
    mapping = reward_mapping_places(sources)
    return {
        "import_cycles": find_cycles(graph),
        "diffusers_on_training_path": sorted(m for m in on_path if imports_of(package[m], "diffusers")),
        "trainer_lines": sources["dpok/trainer.py"].count("\n"),
        "shapeworld_places": len(shapeworld), "shapeworld_sites": shapeworld,
        "reward_mapping_places": len(mapping), "reward_mapping_sites": mapping,
        "modules": len(package),
    }


def describe(name: str, m: dict[str, Any]) -> str:
    cycles = "; ".join(" <-> ".join(c) for c in m["import_cycles"]) or "none"
    return "\n".join([
        f"== {name}",
        f"import cycles ({len(m['import_cycles'])}): {cycles}",
        f"diffusers on the training path: {', '.join(m['diffusers_on_training_path']) or 'none'}",
        f"dpok/trainer.py lines: {m['trainer_lines']}",
        f"places naming ShapeWorld outside the domain packages: {m['shapeworld_places']}",
        f"places mapping reward settings by hand: {m['reward_mapping_places']}",
    ])


def report(rev: str, before: dict[str, Any], after: dict[str, Any]) -> str:
    def cycles(m: dict[str, Any]) -> str:
        return "<br>".join("`" + " ↔ ".join(c) + "`" for c in m["import_cycles"]) or "none"

    def sites(m: dict[str, Any], key: str) -> str:
        return "\n".join(f"- `{s}`" for s in m[key]) or "- none"

    rows = [("import cycles (function-local imports counted)", cycles(before), cycles(after)),
            ("modules importing diffusers on the training path",
             ", ".join(f"`{x}`" for x in before["diffusers_on_training_path"]),
             ", ".join(f"`{x}`" for x in after["diffusers_on_training_path"])),
            ("`wc -l dpok/trainer.py`", str(before["trainer_lines"]), str(after["trainer_lines"])),
            ("places naming ShapeWorld outside the domain packages", str(before["shapeworld_places"]),
             str(after["shapeworld_places"])),
            ("places mapping reward settings by hand", str(before["reward_mapping_places"]),
             str(after["reward_mapping_places"]))]
    table = "\n".join(f"| {a} | {b} | {c} |" for a, b, c in rows)
    return f"""# Architecture numbers

Written by `python benchmarks/architecture.py --rev {rev}`; the raw numbers are in
`docs/architecture/data.json`. What each number counts is defined in the script's docstring:
imports inside functions count; ShapeWorld is counted in code (identifiers, module paths, string
literals), not in comments or docstrings, outside `dpok/shapeworld/`, `dpok/embedded/` and
`dpok/domains.py`; reward settings are counted where code outside `dpok/rewards/` reads or names
one (`cfg.reward_model`, `"reward_url"`).

| | `{rev}` | working tree |
| --- | --- | --- |
{table}

## Places naming ShapeWorld, working tree

{sites(after, "shapeworld_sites")}

## Places mapping reward settings by hand, working tree

{sites(after, "reward_mapping_sites")}
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", default="0bee0bb", help="the git revision to compare with (default 0bee0bb)")
    parser.add_argument("--no-write", action="store_true", help="print only; write no report")
    args = parser.parse_args(argv)
    before, after = measure(read_sources(args.rev)), measure(read_sources(None))
    print(describe(args.rev, before))
    print(describe("working tree", after))
    if not args.no_write:
        (DOCS / "architecture").mkdir(parents=True, exist_ok=True)
        data = {"rev": args.rev, "before": before, "after": after}
        (DOCS / "architecture" / "data.json").write_text(json.dumps(data, indent=2) + "\n")
        (DOCS / "architecture.md").write_text(report(args.rev, before, after))
        print("wrote docs/architecture.md and docs/architecture/data.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
