"""Family-specific facts of the zoo's UNet, torch.nn, DETR, constant-context and control-flow
models: the builders' truth agrees with the modules they build, and the exports spell what the
truth says (which inputs reach cross-attention K/V, If/Loop bodies that attend). That every
small model exports, is a valid graph and matches torch is tests/zoo/test_zoo.py's job."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import pytest

from xattn_compiler import zoo
from xattn_compiler.zoo.export import requirements_missing, tolerance_for
from xattn_compiler.zoo.families import constant_context, control_flow, detr, torch_nn, unet

FAMILIES = (unet, torch_nn, detr, constant_context, control_flow)
MODELS = [model for family in FAMILIES for model in family.MODELS]
NAMES = [model.name for model in MODELS]
BY_NAME = {model.name: model for model in MODELS}
#: Ops that pass scores from the Q.K^T MatMul to the Softmax (scale, mask, dead zero bias).
SCORE_OPS = {"Mul", "Div", "Add", "Sub", "Where", "Cast"}


def _build(name: str):
    model = BY_NAME[name]
    missing = requirements_missing(model)
    if missing:
        pytest.skip(f"{name} needs {', '.join(missing)}")
    return model.build("small")


def _run(built, *inputs):
    import torch

    with torch.no_grad():
        out = built.module(*(inputs or built.inputs.values()))
    return out if isinstance(out, tuple) else (out,)


# --- eager builders (fast) -------------------------------------------------------------------

def _expected_shapes(name: str, inputs: dict) -> list[tuple]:
    """Output shapes each family promises, from its sample inputs."""
    first = tuple(next(iter(inputs.values())).shape)
    if name.startswith("detr"):
        batch = inputs["features"].shape[0]
        return [(batch, detr.QUERIES, detr.CLASSES + 1), (batch, detr.QUERIES, 4)]
    return [first]      # UNet: the sample's shape; the others: the query stream's


@pytest.mark.parametrize("name", NAMES)
def test_builder_runs_and_declares_consistent_inputs(name):
    built = _build(name)
    outputs = _run(built)
    assert [tuple(o.shape) for o in outputs] == _expected_shapes(name, built.inputs)
    assert all(bool(o.isfinite().all()) for o in outputs)
    assert len(outputs) == len(built.output_names)
    assert set(built.static_inputs) <= set(built.inputs)
    assert set(built.dynamic_dims) <= set(built.inputs)
    assert not built.module.training
    # each named dynamic dim has one sample size, and different names have different sizes,
    # so an export that mixes two dims up fails on the sample
    sizes: dict[str, set] = {}
    for input_name, axes in built.dynamic_dims.items():
        for axis, dim in axes.items():
            sizes.setdefault(dim, set()).add(built.inputs[input_name].shape[axis])
    assert all(len(v) == 1 for v in sizes.values()), sizes
    assert len({v.pop() for v in sizes.values()}) == len(sizes), sizes
    if built.kv_source_kind == "constant":
        assert built.static_inputs == []


def test_unet_truth_matches_the_diffusers_modules():
    pytest.importorskip("diffusers")
    from diffusers.models.attention_processor import Attention

    built = _build("unet2d-tiny")
    found = {name: (m.is_cross_attention, m.heads, m.inner_dim // m.heads)
             for name, m in built.module.unet.named_modules() if isinstance(m, Attention)}
    truth = {b["name"]: (b["cross"], b["num_heads"], b["head_dim"])
             for b in built.attention.blocks}
    assert found == truth
    assert built.attention.cross == sum(c for c, _, _ in found.values()) == 4
    assert built.attention.self == 4
    assert {b["head_dim"] for b in built.attention.blocks} == {8, 16}


def test_sdxl_unet_truth_matches_the_diffusers_modules():
    """Per level heads and transformer layers, linear projections, text_time conditioning:
    the truth read off SDXL_SMALL names every diffusers Attention module, no more."""
    pytest.importorskip("diffusers")
    from diffusers.models.attention_processor import Attention

    built = zoo.get_model("unet2d-sdxl-tiny").build("small")
    found = {name: (m.is_cross_attention, m.heads, m.inner_dim // m.heads)
             for name, m in built.module.unet.named_modules() if isinstance(m, Attention)}
    truth = {b["name"]: (b["cross"], b["num_heads"], b["head_dim"])
             for b in built.attention.blocks}
    assert found == truth
    assert (built.attention.self, built.attention.cross) == (11, 11)
    assert any(".transformer_blocks.1." in name for name in truth)  # 2 layers at the deepest level
    assert built.module.unet.config.addition_embed_type == "text_time"
    assert list(built.inputs)[-2:] == ["text_embeds", "time_ids"]


def test_unet_eager_variant_uses_the_eager_processor():
    pytest.importorskip("diffusers")
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    processors = {type(p) for p in _build("unet2d-tiny-eager").module.unet
                  .attn_processors.values()}
    assert processors == {AttnProcessor}
    processors = {type(p) for p in _build("unet2d-tiny").module.unet.attn_processors.values()}
    assert processors == {AttnProcessor2_0}


def _attention_modules(module) -> dict[str, object]:
    """Attention submodules by name: nn.MultiheadAttention and the zoo's hand-written one."""
    from torch import nn

    hand_written = torch_nn.plain_blocks().MultiHeadAttention
    return {name: m for name, m in module.named_modules()
            if isinstance(m, (nn.MultiheadAttention, hand_written))}


@pytest.mark.parametrize("name", [n for n in NAMES if not n.startswith(("unet", "loop"))])
def test_plain_torch_truth_matches_the_modules(name):
    built = _build(name)
    found = _attention_modules(built.module)
    cross = [n for n in found if n.endswith(("multihead_attn", "cross_attn"))]
    assert (len(found) - len(cross), len(cross)) == (built.attention.self,
                                                     built.attention.cross)
    for m in found.values():
        assert m.num_heads == built.attention.num_heads
        assert m.head_dim == built.attention.head_dim


def test_loop_model_is_scripted_with_one_block_in_a_loop():
    import torch

    built = _build("loop-cross-attention")
    assert isinstance(built.module, torch.jit.ScriptModule)
    assert "prim::Loop" in str(built.module.graph)
    x, context = built.inputs.values()
    with torch.no_grad():       # the same block, three times, then the norm
        expected = x
        for _ in range(control_flow.LOOP_STEPS):
            expected = built.module.block(expected, context)
        expected = built.module.norm(expected)
    torch.testing.assert_close(_run(built)[0], expected)
    assert (built.attention.self, built.attention.cross) == (1, 1)


def test_if_model_branches_differ():
    import torch

    built = _build("if-cross-attention")
    x, context, _ = built.inputs.values()
    taken = _run(built, x, context, torch.tensor(True))[0]
    other = _run(built, x, context, torch.tensor(False))[0]
    with torch.no_grad():
        torch.testing.assert_close(taken, built.module.cached(x, context))
        torch.testing.assert_close(other, built.module.uncached(x, context))
    assert not torch.allclose(taken, other)


def _captured_cross_kv(built, inputs) -> list[tuple]:
    """(key, value) tensors each cross-attention module received on ``inputs``."""
    seen = []
    handles = [m.register_forward_hook(lambda _m, args, _out: seen.append(args[1:3]))
               for name, m in _attention_modules(built.module).items()
               if name.endswith("cross_attn")]
    try:
        _run(built, *inputs)
    finally:
        for handle in handles:
            handle.remove()
    return seen


@pytest.mark.parametrize("name", ["detr-decoder", "detr-decoder-mha"])
def test_detr_cross_attention_keys_carry_pos_and_values_do_not(name):
    import torch

    built = _build(name)
    features, pos = built.inputs.values()
    seen = _captured_cross_kv(built, (features, pos))
    assert len(seen) == detr.LAYERS
    for key, value in seen:
        torch.testing.assert_close(key, features + pos)
        torch.testing.assert_close(value, features)


@pytest.mark.parametrize("name", ["constant-context-cross-attention",
                                  "constant-context-prompt-buffer"])
def test_constant_context_does_not_depend_on_the_input(name):
    import torch

    built = _build(name)
    (x,) = built.inputs.values()
    first = _captured_cross_kv(built, (x,))
    second = _captured_cross_kv(built, (torch.randn_like(x),))
    assert len(first) == constant_context.LAYERS
    for (k1, v1), (k2, v2) in zip(first, second, strict=True):
        torch.testing.assert_close(k1, k2)
        torch.testing.assert_close(v1, v2)
        assert k1.shape[-2:] == (constant_context.CONTEXT_LEN, constant_context.D_MODEL)


@pytest.mark.slow
def test_unet_bench_size_is_stable_diffusion_15_sized():
    pytest.importorskip("diffusers")
    built = BY_NAME["unet2d-tiny"].build("bench")
    params = sum(p.numel() for p in built.module.parameters())
    assert abs(params - 859.5e6) < 0.01 * 859.5e6, params   # SD-1.5's UNet: 859,520,964
    assert (built.attention.self, built.attention.cross) == (16, 16)
    assert {b["head_dim"] for b in built.attention.blocks} == {40, 80, 160}
    assert tuple(built.inputs["encoder_hidden_states"].shape) == (2, 77, 768)


# --- exports (slow: torch exports, cached on disk) ---------------------------------------------

@dataclass
class GraphAttention:
    """One Softmax of an export and the graph inputs whose values reach its K and V."""

    where: str                  # "main" or the subgraph path, e.g. "main/If.then_branch"
    key_sources: frozenset
    value_sources: frozenset


class _Graph:
    """Producers, consumers and direct data ancestry across a model and its subgraphs.

    Ancestry stops at Shape/Size (a tensor's shape is not its values: an ``Expand`` to the
    batch of ``x`` does not make ``x`` a source) and at the output of other attention (the
    P.V MatMul): DETR's second self-attention reads queries that the first cross-attention
    mixed with ``features``, yet its K is not computed from ``features``. A Loop body's
    carried inputs map to the Loop's initial values, so a body's ``x.11`` traces to ``x``.
    """

    def __init__(self, model: onnx.ModelProto):
        self.inputs = {value.name for value in model.graph.input}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        self.alias: dict[str, str] = {}
        self.softmaxes: list[tuple[str, onnx.NodeProto]] = []
        self._index(model.graph, "main")
        probabilities = {softmax.output[0] for _, softmax in self.softmaxes}
        self.attention_outputs = {
            node.output[0] for _, softmax in self.softmaxes
            for node in self.consumers.get(softmax.output[0], [])
            if node.op_type == "MatMul" and node.input[0] in probabilities}

    def _index(self, graph: onnx.GraphProto, where: str) -> None:
        for node in graph.node:
            for name in node.output:
                self.producer[name] = node
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
            if node.op_type == "Softmax":
                self.softmaxes.append((where, node))
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    if node.op_type == "Loop":     # body inputs: iter, cond, carried...
                        for formal, actual in zip(attr.g.input[2:], node.input[2:],
                                                  strict=False):
                            self.alias[formal.name] = actual
                    self._index(attr.g, f"{where}/{node.op_type}.{attr.name}")

    def sources(self, name: str) -> frozenset:
        """The graph inputs whose values flow into tensor ``name``."""
        found, stack, seen = set(), [name], set()
        while stack:
            current = stack.pop()
            current = self.alias.get(current, current)
            if current in seen:
                continue
            seen.add(current)
            if current in self.inputs:
                found.add(current)
            node = self.producer.get(current)
            if (node is not None and node.op_type not in ("Shape", "Size")
                    and current not in self.attention_outputs):
                stack.extend(i for i in node.input if i)
        return frozenset(found)

    def score_matmul(self, softmax: onnx.NodeProto) -> onnx.NodeProto:
        """The Q.K^T MatMul feeding ``softmax`` through scale/mask ops (breadth first)."""
        queue = [softmax.input[0]]
        while queue:
            node = self.producer.get(queue.pop(0))
            if node is None:
                continue
            if node.op_type == "MatMul":
                return node
            if node.op_type in SCORE_OPS:
                queue.extend(node.input)
        raise AssertionError(f"no score MatMul above Softmax {softmax.name}")

    def attention(self) -> list[GraphAttention]:
        """K and V sources of every Softmax; V is the P.V MatMul's second operand."""
        found = []
        for where, softmax in self.softmaxes:
            key = self.score_matmul(softmax).input[1]
            pv = [n for n in self.consumers.get(softmax.output[0], []) if n.op_type == "MatMul"]
            assert len(pv) == 1, f"Softmax {softmax.name} feeds {len(pv)} MatMuls"
            found.append(GraphAttention(where, self.sources(key), self.sources(pv[0].input[1])))
        return found


def _export(name: str, export_cache):
    if requirements_missing(BY_NAME[name]):
        pytest.skip(f"{name} needs {', '.join(requirements_missing(BY_NAME[name]))}")
    exported = zoo.cached_export(name, export_cache)
    return exported, onnx.load(exported.path)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_export_attention_agrees_with_the_truth(name, export_cache):
    """One Softmax per attention block, and as many whose K/V are computed from the static
    inputs only (from no input at all for a constant context) as the truth has cross."""
    exported, model = _export(name, export_cache)
    manifest = exported.manifest
    truth, static = manifest["attention"], set(manifest["static_inputs"])
    found = _Graph(model).attention()
    assert len(found) == truth["self"] + truth["cross"], found
    if manifest["kv_source_kind"] == "constant":
        cross = [a for a in found if not a.key_sources and not a.value_sources]
    else:
        cross = [a for a in found if a.key_sources and a.key_sources | a.value_sources <= static]
    assert len(cross) == truth["cross"], found


@pytest.mark.slow
@pytest.mark.parametrize("name", ["detr-decoder", "detr-decoder-mha",
                                  "detr-decoder-mha-torchscript"])
def test_detr_export_keys_read_features_and_pos_values_features_only(name, export_cache):
    _, model = _export(name, export_cache)
    cross = [a for a in _Graph(model).attention() if "features" in a.key_sources]
    assert len(cross) == detr.LAYERS
    for attention in cross:
        assert attention.key_sources == {"features", "pos"}
        assert attention.value_sources == {"features"}


@pytest.mark.slow
def test_if_export_attends_in_both_branches(export_cache):
    import torch

    from xattn_compiler.verification import run_model

    exported, model = _export("if-cross-attention", export_cache)
    (node,) = [n for n in model.graph.node if n.op_type == "If"]
    assert list(node.input) == ["use_cache_branch"]          # the condition is the input
    for attr in node.attribute:
        ops = [n.op_type for n in attr.g.node]
        assert ops.count("Softmax") == 2 and "MatMul" in ops, (attr.name, ops)
    # the sample takes the then-branch; check the else-branch against torch as well
    built = _build("if-cross-attention")
    feeds = {**{k: v.numpy() for k, v in built.inputs.items()},
             "use_cache_branch": np.array(False)}
    actual = run_model(exported.path, feeds)["out"]
    expected = _run(built, built.inputs["x"], built.inputs["context"], torch.tensor(False))
    np.testing.assert_allclose(actual, expected[0].numpy(), rtol=1e-3, atol=1e-4)


@pytest.mark.slow
def test_loop_export_attends_in_a_body_with_a_constant_trip_count(export_cache):
    _, model = _export("loop-cross-attention", export_cache)
    (node,) = [n for n in model.graph.node if n.op_type == "Loop"]
    initializers = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    assert node.input[0] in initializers                     # trip count: an initializer...
    assert int(initializers[node.input[0]]) == control_flow.LOOP_STEPS   # ...of 3
    body = [n.op_type for n in node.attribute[0].g.node]
    assert body.count("Softmax") == 2 and "MatMul" in body
    assert "Softmax" not in [n.op_type for n in model.graph.node]    # not unrolled


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_dynamic_dims_accept_other_sizes(name, export_cache):
    """Ones (which torch.export likes to specialise) and larger sizes run and match torch."""
    import torch

    from xattn_compiler.verification import run_model

    exported, _ = _export(name, export_cache)
    model, built = BY_NAME[name], _build(name)
    if model.dtype == "float16":
        built.module = built.module.half()
    rtol, atol_factor = tolerance_for(model)
    generator = torch.Generator().manual_seed(3)
    for size in (1, 3):
        inputs = {}
        for input_name, sample in built.inputs.items():
            shape = list(sample.shape)
            for axis, dim in built.dynamic_dims.get(input_name, {}).items():
                shape[axis] = size if dim == "batch" else size * 5 + 1   # 1|3 and 6|16
            if sample.is_floating_point():
                inputs[input_name] = torch.randn(shape, generator=generator).to(
                    torch.float16 if model.dtype == "float16" else sample.dtype)
            elif sample.dtype == torch.bool:          # the If's flag: as sampled
                inputs[input_name] = sample
            else:                                     # UNet timesteps
                inputs[input_name] = torch.randint(0, 1000, shape, generator=generator)
        expected = _run(built, *inputs.values())
        actual = run_model(exported.path, {k: v.numpy() for k, v in inputs.items()})
        for out_name, reference in zip(built.output_names, expected, strict=True):
            reference = reference.float().numpy()
            atol = atol_factor * max(1.0, float(np.abs(reference).max()))
            np.testing.assert_allclose(actual[out_name].astype(np.float32), reference,
                                       rtol=rtol, atol=atol, err_msg=f"{name} size {size}")
