"""efficient_dlm's modules import one another without cycles (read with ast: tests/import_graph.py)."""
import os

from tests.import_graph import cycles, graph

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_no_import_cycles():
    edges, _ = graph(ROOT)
    assert "efficient_dlm.models.kernel_dispatch" in edges["efficient_dlm.models.decoder"]  # the graph is read
    assert cycles(edges) == []


def test_cycle_detection_finds_a_planted_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
