"""notebooks/quickstart.ipynb executes top to bottom (nbclient, tiny settings: EDLM_NOTEBOOK_TINY=1)."""
from __future__ import annotations

import json
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    """On a tiny random teacher (EDLM_DEMO_TEACHER); the shipped one is checked in test_demo_teacher.py."""
    from tests.demo_teacher_factory import make_tiny_teacher

    import nbformat
    import nbclient
    monkeypatch.setenv("EDLM_DEMO_TEACHER", make_tiny_teacher(str(tmp_path / "teacher")))
    monkeypatch.setenv("EDLM_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("EDLM_NOTEBOOK_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    nb = nbformat.read(os.path.join(REPO, "notebooks", "quickstart.ipynb"), as_version=4)
    nbclient.NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "".join(
        out.get("text", "") for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])
    )
    assert "dLM tokens per forward:" in text and "AR tokens per forward: 1.0" in text
    assert json.load(open(tmp_path / "run" / "hf" / "config.json"))["model_type"].startswith("edlm_")


def test_tpu_notebook_is_valid_and_names_only_real_api():
    """The TPU notebook needs a TPU runtime; CI checks its code compiles and every efficient_dlm name it
    uses (`from efficient_dlm... import X`, `edlm.X`) exists."""
    import ast
    import importlib
    import importlib.util

    import nbformat
    nb = nbformat.read(os.path.join(REPO, "notebooks", "tpu_colab.ipynb"), as_version=4)
    nbformat.validate(nb)
    used = 0
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        source = "\n".join(line for line in cell.source.splitlines() if not line.lstrip().startswith(("!", "%")))
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ImportFrom) and node.module.startswith("efficient_dlm"):
                module = importlib.import_module(node.module)
                for alias in node.names:
                    # a name of the module, or one of its submodules (not yet imported in a fresh process)
                    qualified = f"{node.module}.{alias.name}"
                    is_submodule = hasattr(module, "__path__") and importlib.util.find_spec(qualified) is not None
                    assert hasattr(module, alias.name) or is_submodule, qualified
                    used += 1
            if isinstance(node, ast.Attribute) and getattr(node.value, "id", None) == "edlm":
                assert hasattr(importlib.import_module("efficient_dlm"), node.attr), f"edlm.{node.attr}"
                used += 1
    assert used >= 8
