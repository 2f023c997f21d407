"""efficient_dlm's modules import one another without cycles (read with ast: tests/import_graph.py)."""
import ast
import os

from tests.import_graph import cycles, graph, modules

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_no_import_cycles():
    edges, _ = graph(ROOT)
    assert "efficient_dlm.models.kernel_dispatch" in edges["efficient_dlm.models.decoder"]  # the graph is read
    assert cycles(edges) == []


def test_cycle_detection_finds_a_planted_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_parallel_is_the_low_level_layer():
    """parallel/ (rules, mesh, sharding, distributed, topology, its config section) imports nothing above it:
    the AOT tool that compiles train and sample programs lives at the CLI level (efficient_dlm/aot/)."""
    edges, _ = graph(ROOT)
    below = ("efficient_dlm.parallel.", "efficient_dlm.errors", "efficient_dlm.section")
    parallel = {m: targets for m, targets in edges.items() if m.startswith("efficient_dlm.parallel.")}
    assert "efficient_dlm.parallel.mesh" in parallel
    assert {m: sorted(t for t in targets if not t.startswith(below)) for m, targets in parallel.items()} == {
        m: [] for m in parallel
    }


def test_ml_collections_stays_at_the_cli_edge():
    """Only the CLI and config.py (which types the ConfigDict once) import ml_collections: the library below
    takes the typed Config and its sections (issue 16)."""
    importers = set()
    for module, path in modules(ROOT).items():
        for node in ast.walk(ast.parse(open(path).read(), path)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            if any(name.split(".")[0] == "ml_collections" for name in names):
                importers.add(module)
    assert importers == {"efficient_dlm.cli", "efficient_dlm.config"}
