"""The docs tell the truth: their commands are the ones CI runs, their code runs."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from xattn_compiler import verify
from xattn_compiler.passmanager import Pipeline

ROOT = Path(__file__).resolve().parents[1]


def code_blocks(path: Path, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", path.read_text(), flags=re.S)


def test_ci_runs_the_readme_test_command():
    readme_commands = [block.strip() for block in code_blocks(ROOT / "README.md", "bash")]
    test_command = next(c for c in readme_commands if "pytest" in c)
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci_lines


def test_getting_started_shows_the_readme_commands():
    readme = {b.strip() for b in code_blocks(ROOT / "README.md", "bash")}
    guide = {b.strip() for b in code_blocks(ROOT / "docs" / "getting-started.md", "bash")}
    assert {c for c in readme if c.startswith("pip install")} <= guide


def test_the_writing_a_pass_example_runs_and_preserves_outputs():
    first = code_blocks(ROOT / "docs" / "writing-a-pass.md", "python")[0]
    namespace: dict = {}
    exec(first, namespace)
    remove_dropout = namespace["RemoveDropout"]
    graph = helper.make_graph(
        [helper.make_node("Dropout", ["x"], ["d"]), helper.make_node("Relu", ["d"], ["y"])], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    result = remove_dropout()(model)
    assert result.counts == {"dropouts_removed": 1}
    assert [n.op_type for n in result.model.graph.node] == ["Relu"]
    assert verify(model, result.model, inputs={"x": np.linspace(-1, 1, 4, dtype=np.float32)}).ok
    assert str(Pipeline([remove_dropout()])) == "remove-dropout"
