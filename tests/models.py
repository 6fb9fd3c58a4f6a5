"""Tiny ONNX models for tests, built in memory with ``onnx.helper``.

Every builder returns a fresh, checker-valid ``onnx.ModelProto`` (default opset 17, IR 8 so
any onnxruntime can run it) with named nodes and deterministic weights, so a test can break
one thing on purpose and expect an error that names it. Import as ``from tests import models``
or ``import models`` (pytest puts ``tests/`` on the path).

- :func:`tiny_mlp` - ``x -> MatMul -> Add -> Relu -> MatMul -> y``.
- :func:`tiny_attention` - a multi-head cross-attention block (queries from ``x``, keys and
  values from ``context``) in the unfused form exporters emit.
- :func:`tiny_if` / :func:`tiny_loop` - control flow whose bodies read an outer-scope tensor.
- :func:`large_weight_model` - one MatMul with a weight of a chosen size.
- :func:`write_unchecked` - serialise a (possibly broken) model to a file, no checks.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8

FLOAT = TensorProto.FLOAT


def make_model(graph: onnx.GraphProto, *, opset: int = OPSET, **kwargs) -> onnx.ModelProto:
    """``graph`` as a model importing the default domain at ``opset`` (extra imports via
    ``opset_imports=[...]`` replace it)."""
    kwargs.setdefault("opset_imports", [helper.make_opsetid("", opset)])
    model = helper.make_model(graph, producer_name="xattn-tests", **kwargs)
    model.ir_version = IR_VERSION
    return model


def weight(name: str, shape: tuple[int, ...], seed: int = 0, scale: float = 0.1) -> TensorProto:
    """A float32 initializer of normal noise, stored as ``raw_data``."""
    values = np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * scale
    return numpy_helper.from_array(values, name)


def ints(name: str, values: list[int]) -> TensorProto:
    """An int64 initializer (Reshape targets and the like)."""
    return numpy_helper.from_array(np.asarray(values, dtype=np.int64), name)


def tiny_mlp(dim: int = 4, hidden: int = 8, *, batch: int | str = "batch") -> onnx.ModelProto:
    """``y = Relu(x @ W1 + b1) @ W2``; nodes ``fc1``, ``bias1``, ``relu``, ``fc2``.

    Inputs ``x[batch, dim]``, output ``y[batch, dim]``; initializers ``W1``, ``b1``, ``W2``.
    """
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h0"], name="fc1"),
        helper.make_node("Add", ["h0", "b1"], ["h1"], name="bias1"),
        helper.make_node("Relu", ["h1"], ["h2"], name="relu"),
        helper.make_node("MatMul", ["h2", "W2"], ["y"], name="fc2"),
    ]
    graph = helper.make_graph(
        nodes, "tiny_mlp",
        [helper.make_tensor_value_info("x", FLOAT, [batch, dim])],
        [helper.make_tensor_value_info("y", FLOAT, [batch, dim])],
        [weight("W1", (dim, hidden), 1), weight("b1", (hidden,), 2),
         weight("W2", (hidden, dim), 3)],
    )
    return make_model(graph)


def tiny_attention(
    dim: int = 8,
    heads: int = 2,
    *,
    q_len: int = 4,
    kv_len: int = 6,
    context_dim: int | None = None,
    batch: int | str = "batch",
) -> onnx.ModelProto:
    """Cross-attention ``softmax(Q K^T / sqrt(d)) V`` with head split/merge, unfused.

    Inputs ``x[batch, q_len, dim]`` and ``context[batch, kv_len, context_dim]``; output
    ``y[batch, q_len, dim]``. Nodes: ``q_proj``/``k_proj``/``v_proj`` (MatMul), ``*_split``
    (Reshape to heads) and ``*_heads`` (Transpose; K is transposed to ``[b, h, d, kv]``),
    ``scores`` (MatMul), ``scale`` (Mul), ``softmax``, ``context_mix`` (MatMul), ``merge_heads``
    (Transpose), ``merge`` (Reshape), ``out_proj`` (MatMul).
    """
    if dim % heads:
        raise ValueError(f"dim {dim} is not divisible by heads {heads}")
    context_dim = context_dim or dim
    head_dim = dim // heads
    node = helper.make_node
    nodes = [
        node("MatMul", ["x", "Wq"], ["q"], name="q_proj"),
        node("MatMul", ["context", "Wk"], ["k"], name="k_proj"),
        node("MatMul", ["context", "Wv"], ["v"], name="v_proj"),
        node("Reshape", ["q", "heads_shape"], ["q4"], name="q_split"),
        node("Reshape", ["k", "heads_shape"], ["k4"], name="k_split"),
        node("Reshape", ["v", "heads_shape"], ["v4"], name="v_split"),
        node("Transpose", ["q4"], ["qh"], name="q_heads", perm=[0, 2, 1, 3]),
        node("Transpose", ["k4"], ["kt"], name="k_heads", perm=[0, 2, 3, 1]),
        node("Transpose", ["v4"], ["vh"], name="v_heads", perm=[0, 2, 1, 3]),
        node("MatMul", ["qh", "kt"], ["s"], name="scores"),
        node("Mul", ["s", "scale_value"], ["s_scaled"], name="scale"),
        node("Softmax", ["s_scaled"], ["p"], name="softmax", axis=-1),
        node("MatMul", ["p", "vh"], ["o4"], name="context_mix"),
        node("Transpose", ["o4"], ["o_t"], name="merge_heads", perm=[0, 2, 1, 3]),
        node("Reshape", ["o_t", "merged_shape"], ["o"], name="merge"),
        node("MatMul", ["o", "Wo"], ["y"], name="out_proj"),
    ]
    inits = [
        weight("Wq", (dim, dim), 11),
        weight("Wk", (context_dim, dim), 12),
        weight("Wv", (context_dim, dim), 13),
        weight("Wo", (dim, dim), 14),
        ints("heads_shape", [0, 0, heads, head_dim]),
        ints("merged_shape", [0, 0, dim]),
        numpy_helper.from_array(np.asarray(head_dim**-0.5, dtype=np.float32), "scale_value"),
    ]
    graph = helper.make_graph(
        nodes, "tiny_attention",
        [
            helper.make_tensor_value_info("x", FLOAT, [batch, q_len, dim]),
            helper.make_tensor_value_info("context", FLOAT, [batch, kv_len, context_dim]),
        ],
        [helper.make_tensor_value_info("y", FLOAT, [batch, q_len, dim])],
        inits,
    )
    return make_model(graph)


def tiny_if() -> onnx.ModelProto:
    """``y = If(cond, then: x + bias, else: x - bias)``; node ``choose``.

    Both branches read the outer initializer ``bias`` (an implicit input). Branch nodes are
    ``then_add`` and ``else_sub``.
    """
    then_branch = helper.make_graph(
        [helper.make_node("Add", ["x", "bias"], ["then_y"], name="then_add")],
        "then_body", [], [helper.make_tensor_value_info("then_y", FLOAT, [2])],
    )
    else_branch = helper.make_graph(
        [helper.make_node("Sub", ["x", "bias"], ["else_y"], name="else_sub")],
        "else_body", [], [helper.make_tensor_value_info("else_y", FLOAT, [2])],
    )
    graph = helper.make_graph(
        [helper.make_node("If", ["cond"], ["y"], name="choose",
                          then_branch=then_branch, else_branch=else_branch)],
        "tiny_if",
        [helper.make_tensor_value_info("x", FLOAT, [2]),
         helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", FLOAT, [2])],
        [numpy_helper.from_array(np.asarray([1.0, 2.0], dtype=np.float32), "bias")],
    )
    return make_model(graph)


def tiny_loop(trips: int = 3) -> onnx.ModelProto:
    """``y = x + trips * step`` computed by a Loop node ``repeat`` (body nodes ``accumulate``
    and ``keep_going``); the body reads the outer initializer ``step`` (an implicit input)."""
    body = helper.make_graph(
        [
            helper.make_node("Add", ["acc_in", "step"], ["acc_out"], name="accumulate"),
            helper.make_node("Identity", ["cond_in"], ["cond_out"], name="keep_going"),
        ],
        "loop_body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_in", FLOAT, [2]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_out", FLOAT, [2]),
        ],
    )
    graph = helper.make_graph(
        [helper.make_node("Loop", ["trips", "keep", "x"], ["y"], name="repeat", body=body)],
        "tiny_loop",
        [helper.make_tensor_value_info("x", FLOAT, [2])],
        [helper.make_tensor_value_info("y", FLOAT, [2])],
        [
            numpy_helper.from_array(np.asarray(trips, dtype=np.int64), "trips"),
            numpy_helper.from_array(np.asarray(True), "keep"),
            numpy_helper.from_array(np.asarray([0.5, -1.0], dtype=np.float32), "step"),
        ],
    )
    return make_model(graph)


def large_weight_model(n_bytes: int = 1 << 17, *, dim: int = 128) -> onnx.ModelProto:
    """``y = Relu(x @ W)`` with ``W[dim, n]`` of about ``n_bytes`` bytes, then ``Reshape`` of
    ``y`` to ``[batch, 2, n/2]`` (so shape inference has a constant shape to propagate).
    Nodes ``big_matmul``, ``relu``, ``split``."""
    cols = max(2, n_bytes // (4 * dim)) // 2 * 2
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["h"], name="big_matmul"),
            helper.make_node("Relu", ["h"], ["r"], name="relu"),
            helper.make_node("Reshape", ["r", "split_shape"], ["y"], name="split"),
        ],
        "large_weight",
        [helper.make_tensor_value_info("x", FLOAT, ["batch", dim])],
        [helper.make_tensor_value_info("y", FLOAT, ["batch", 2, cols // 2])],
        [weight("W", (dim, cols), 21), ints("split_shape", [-1, 2, cols // 2])],
    )
    return make_model(graph)


def write_unchecked(model: onnx.ModelProto, path: str | os.PathLike) -> Path:
    """Serialise ``model`` to ``path`` as is (for models that are broken on purpose)."""
    path = Path(path)
    path.write_bytes(model.SerializeToString())
    return path


# --- the model zoo -------------------------------------------------------------------------------

def small_zoo_names() -> list[str]:
    """Every zoo model with a small size, for ``params=`` of a module-scoped fixture."""
    from xattn_compiler.zoo import all_models

    return [m.name for m in all_models() if "small" in m.sizes]


def small_zoo_export(name: str, cache_dir):
    """The cached small export of zoo model ``name``; the test is skipped, saying what is
    missing, when its exporter's libraries are not installed."""
    import pytest

    from xattn_compiler.zoo import cached_export, get_model
    from xattn_compiler.zoo.export import requirements_missing

    missing = requirements_missing(get_model(name))
    if missing:
        pytest.skip(f"needs {', '.join(missing)}")
    return cached_export(name, cache_dir)
