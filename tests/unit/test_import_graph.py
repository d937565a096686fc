"""The package's import graph (read with ast, nothing imported): no cycle, counting imports inside
functions; only the adapter imports diffusers on the training path; nothing the trainer builds on
imports it back; the math core imports nothing but itself."""

from __future__ import annotations

from pathlib import Path

from dpok.utils.import_graph import find_cycles, import_graph, imported_modules, imports_of, reachable, read_tree

ROOT = Path(__file__).resolve().parents[2]
# the entry points above the trainer: the only modules that may import it
ABOVE_TRAINER = {"dpok", "dpok.api", "dpok.cli", "dpok.experiment", "dpok.tuning"}


def package() -> tuple[dict[str, str], dict[str, dict[str, int]]]:
    sources = read_tree(ROOT)
    return sources, import_graph(sources)


def test_no_import_cycle_in_the_package():
    _, graph = package()
    assert find_cycles(graph) == []


def test_only_the_adapter_imports_diffusers_on_the_training_path():
    sources, graph = package()
    on_path = reachable(graph, "dpok.trainer")
    assert "dpok.adapter" in on_path and "dpok.sampling" in on_path
    importing = sorted(m for m in on_path if imports_of(sources[m], "diffusers"))
    assert importing == ["dpok.adapter"]


def test_nothing_below_the_trainer_imports_it():
    _, graph = package()
    below = reachable(graph, "dpok.trainer") - {"dpok.trainer"}
    assert sorted(m for m in below if "dpok.trainer" in graph[m]) == []
    assert {m for m, deps in graph.items() if "dpok.trainer" in deps} <= ABOVE_TRAINER


def test_the_core_imports_only_itself():
    sources, graph = package()
    core = {m for m in graph if m == "dpok.core" or m.startswith("dpok.core.")}
    assert {d for m in core for d in graph[m]} <= core
    assert not any(imports_of(sources[m], "diffusers") for m in core)


# ------------------------------------------------------------------------- the checker itself
def test_a_cycle_through_a_function_local_import_is_found():
    sources = {
        "pkg": "",
        "pkg.a": "from .b import f\n",
        "pkg.b": "def f():\n    from .c import g\n    return g()\n",
        "pkg.c": "def g():\n    from pkg import a\n    return a\n",
        "pkg.d": "from .a import f\n",
    }
    graph = import_graph(sources)
    assert graph["pkg.c"] == {"pkg.a": 2}
    assert find_cycles(graph) == [["pkg.a", "pkg.b", "pkg.c"]]
    assert reachable(graph, "pkg.d") == {"pkg.a", "pkg.b", "pkg.c", "pkg.d"}


def test_type_checking_imports_and_other_packages_are_not_edges():
    source = ("from typing import TYPE_CHECKING\nimport torch\nif TYPE_CHECKING:\n    from .b import B\n"
              "    from diffusers import UNet2DConditionModel\n")
    assert imported_modules("pkg.a", source, False, {"pkg.a", "pkg.b"}) == {}
    assert imports_of(source, "diffusers") == []
    assert imports_of("def f():\n    import diffusers.models\n", "diffusers") == [2]


def test_relative_imports_resolve_from_packages_and_modules():
    known = {"pkg", "pkg.sub", "pkg.sub.x", "pkg.y"}
    # in a package's __init__, "." is the package itself
    assert imported_modules("pkg.sub", "from . import x\nfrom .. import y\n", True, known) == {"pkg.sub.x": 1,
                                                                                             "pkg.y": 2}
    # "from pkg import name" of a name that is not a module: the package's __init__
    assert imported_modules("pkg.sub.x", "from .. import VERSION\n", False, known) == {"pkg": 1}
    assert find_cycles({"a": ["a"]}) == [["a"]]


def test_importing_a_submodule_from_outside_runs_its_package_first():
    # pkg.sub/__init__ imports pkg.a, and pkg.a imports pkg.sub.x: a cycle through the package's __init__
    sources = {"pkg": "", "pkg.sub": "from ..a import f\n", "pkg.sub.x": "X = 1\n",
               "pkg.a": "def f():\n    from .sub.x import X\n    return X\n"}
    graph = import_graph(sources)
    assert graph["pkg.a"] == {"pkg.sub.x": 2, "pkg.sub": 2}
    assert graph["pkg.sub.x"] == {}  # from inside the package: no edge back to its __init__
    assert find_cycles(graph) == [["pkg.a", "pkg.sub"]]
