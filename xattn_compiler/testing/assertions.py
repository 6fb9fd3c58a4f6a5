"""Assertions for pass and matcher tests, with failure messages that say what went wrong.

- :func:`assert_valid`: ``onnx.checker`` (full check) and strict shape inference.
- :func:`assert_equivalent`: both models in ONNX Runtime (optimizations off) on the same
  inputs, compared with dtype-aware tolerances; the failure message is the verification table.
- :func:`assert_idempotent`: a second run changes nothing, byte for byte.
- :func:`assert_deterministic`: two runs on the same input give the same bytes, and the input
  is left untouched.
- :func:`assert_pass_properties`: all of the above for one pass on one model.
- :func:`assert_attention_found`: the matcher finds exactly an example's planted blocks.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from xattn_compiler.errors import XattnError
from xattn_compiler.ir import infer_shapes
from xattn_compiler.passmanager import Pass, PassResult
from xattn_compiler.verification import verify

if TYPE_CHECKING:
    from .strategies import Example

__all__ = [
    "assert_attention_found", "assert_deterministic", "assert_equivalent", "assert_idempotent",
    "assert_pass_properties", "assert_valid", "model_bytes",
]

Inputs = Mapping[str, np.ndarray]


def model_bytes(model: onnx.ModelProto) -> bytes:
    """The model serialized deterministically: what "byte for byte" compares."""
    return model.SerializeToString(deterministic=True)


def assert_valid(model: onnx.ModelProto) -> None:
    """``model`` passes ``onnx.checker`` (full check) and strict shape inference."""
    try:
        onnx.checker.check_model(model, full_check=True)
        infer_shapes(model, strict=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        lines = str(exc).strip().splitlines()
        raise AssertionError(f"invalid model: {lines[0] if lines else type(exc).__name__}"
                             ) from exc


def assert_equivalent(reference: onnx.ModelProto, candidate: onnx.ModelProto,
                      inputs: Inputs | Sequence[Inputs] | None = None, **options: Any) -> None:
    """Both models compute the same outputs in ONNX Runtime on ``inputs``.

    ``inputs`` is one dict of arrays, a sequence of them (each is checked, e.g. several sizes
    of the dynamic dims) or None for :func:`~xattn_compiler.verification.verify`'s own input
    sets (several bindings of the dims, spread values; ``profile="quick"`` for one).
    ``rtol``/``atol`` override the dtype-aware defaults of
    :func:`xattn_compiler.verification.default_tolerances`; NaN, infinite or negative ones
    raise :class:`~xattn_compiler.errors.InputError`, as in ``verify``. The failure message is
    :meth:`~xattn_compiler.verification.VerifyResult.summary`, which names the input set.
    """
    sets: list[Inputs | None] = [inputs] if inputs is None or isinstance(inputs, Mapping) \
        else list(inputs)
    for feed in sets:
        result = verify(reference, candidate, inputs=feed, **options)
        if not result.ok:
            raise AssertionError("the models are not equivalent\n" + result.summary())


def _run(pass_: Pass, model: onnx.ModelProto) -> PassResult:
    # A fresh copy, so that a pass editing its input in place is caught by comparing bytes.
    return pass_.run(onnx.ModelProto.FromString(model_bytes(model)))


def assert_idempotent(pass_: Pass, model: onnx.ModelProto,
                      first: PassResult | None = None) -> PassResult:
    """Running ``pass_`` on its own output reports no change and returns the same bytes.

    ``first`` is the pass's result on ``model`` if the caller has it already. Returns it.
    """
    first = first or _run(pass_, model)
    second = _run(pass_, first.model)
    if second.changed:
        raise AssertionError(f"pass '{pass_.name}' is not idempotent: a second run reports a "
                             f"change (counts {second.counts})")
    if model_bytes(second.model) != model_bytes(first.model):
        raise AssertionError(f"pass '{pass_.name}' is not idempotent: a second run reports no "
                             "change but returns different bytes" + _diff(first.model, second.model))
    return first


def assert_deterministic(pass_: Pass, model: onnx.ModelProto) -> PassResult:
    """Two runs of ``pass_`` on copies of ``model`` agree byte for byte (and on ``changed``
    and counts), and ``model`` itself is not modified. Returns the first result."""
    before = model_bytes(model)
    first = pass_.run(model)
    if model_bytes(model) != before:
        raise AssertionError(f"pass '{pass_.name}' modified the model it was given")
    second = _run(pass_, model)
    if (first.changed, first.counts) != (second.changed, second.counts):
        raise AssertionError(f"pass '{pass_.name}' is not deterministic: changed/counts "
                             f"{first.changed}/{first.counts} then {second.changed}/{second.counts}")
    if model_bytes(first.model) != model_bytes(second.model):
        raise AssertionError(f"pass '{pass_.name}' is not deterministic: two runs on the same "
                             "model return different bytes" + _diff(first.model, second.model))
    return first


def _diff(a: onnx.ModelProto, b: onnx.ModelProto) -> str:
    """Where two models first differ, in words (nodes, then initializers, then the rest)."""
    for what, xs, ys in (("node", a.graph.node, b.graph.node),
                         ("initializer", a.graph.initializer, b.graph.initializer),
                         ("value_info", a.graph.value_info, b.graph.value_info)):
        if len(xs) != len(ys):
            return f": {len(xs)} then {len(ys)} {what}s"
        for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
            if x != y:
                return f": {what} {i} differs ('{getattr(x, 'name', '')}' vs '{getattr(y, 'name', '')}')"
    return ": the graphs agree, other model fields differ"


def assert_pass_properties(pass_: Pass, model: onnx.ModelProto,
                           inputs: Inputs | Sequence[Inputs] | None = None, *,
                           allow_refusal: bool = True) -> PassResult | XattnError:
    """Every property a pass must have, on one model: it is deterministic and leaves its
    input alone, its output is valid and equivalent (on each input set) and it is idempotent.

    A pass may refuse a model by raising an :class:`~xattn_compiler.errors.XattnError` (say,
    a split that cannot cut a Loop body): that preserves semantics, so with
    ``allow_refusal`` it passes if the pass refuses again, with the same message, on a copy;
    the error is returned. Otherwise returns the pass's result. This is what
    ``tests/properties`` runs for every registered pass; call it from your own ``@given``
    test for a pass that is not registered.
    """
    try:
        result = assert_deterministic(pass_, model)
    except XattnError as refusal:
        if not allow_refusal:
            raise
        return _assert_refuses_again(pass_, model, refusal)
    assert_valid(result.model)
    _assert_pass_equivalent(pass_, model, result.model, inputs)
    assert_idempotent(pass_, model, first=result)
    return result


def _assert_pass_equivalent(pass_: Pass, model: onnx.ModelProto, candidate: onnx.ModelProto,
                            inputs: Inputs | Sequence[Inputs] | None) -> None:
    """Equivalence as the pass defines it: a pass that changes values on purpose (a precision
    conversion) declares ``check_equivalent(reference, candidate, inputs) -> VerifyResult``
    with its own stated tolerances; every other pass is checked by :func:`assert_equivalent`."""
    check = getattr(pass_, "check_equivalent", None)
    if check is None:
        assert_equivalent(model, candidate, inputs)
        return
    sets = [inputs] if inputs is None or isinstance(inputs, Mapping) else list(inputs)
    for feed in sets:
        result = check(model, candidate, feed)
        if not result.ok:
            raise AssertionError(f"pass '{pass_.name}' changed the outputs beyond its stated "
                                 "tolerance\n" + result.summary())


def _assert_refuses_again(pass_: Pass, model: onnx.ModelProto,
                          refusal: XattnError) -> XattnError:
    try:
        _run(pass_, model)
    except XattnError as again:
        if str(again) != str(refusal):
            raise AssertionError(f"pass '{pass_.name}' refuses the same model with different "
                                 f"messages: {refusal} / {again}") from again
        return refusal
    raise AssertionError(f"pass '{pass_.name}' refused a model ({refusal}) and then accepted "
                         "a copy of it") from refusal


# --- the matcher ---------------------------------------------------------------------------------

def _graph_label(subgraph: str) -> str:
    """``""`` for the top level, else the attribute holding the body (``then_branch``...)."""
    return subgraph.rsplit("/", 1)[-1] if subgraph else ""


def assert_attention_found(example: Example, found: Iterable[Any] | None = None,
                           scale_rtol: float = 2e-3) -> None:
    """The matcher reports exactly ``example``'s planted blocks, each with the right facts.

    Blocks pair up by graph and output tensor (clutter-equal names count as the same tensor:
    :meth:`Example.root`). Compared: kind, heads, head dim, scale (to ``scale_rtol``, the
    stored constants are rounded to the model's dtype), Q/K/V sources, static inputs,
    ``kv_source_kind``, and that no intermediate escapes the block. ``found`` defaults to
    ``find_attention(example.model)``.
    """
    from xattn_compiler.attention import find_attention

    found = list(find_attention(example.model) if found is None else found)
    expected = {(label, example.root(t.output)): t
                for t, label in zip(example.blocks, example.block_graphs, strict=True)}
    got = {(_graph_label(b.subgraph), example.root(b.output.name)): b for b in found}
    problems = [f"planted block {t.name!r} (graph {key[0]!r}, output {key[1]!r}) not found"
                for key, t in expected.items() if key not in got]
    problems += [f"found block {b.id} (graph {key[0]!r}, output {key[1]!r}) that was not planted"
                 for key, b in got.items() if key not in expected]
    if len(got) != len(found):
        problems.append(f"{len(found)} blocks found, {len(got)} distinct outputs")
    for key in expected.keys() & got.keys():
        problems += _fact_problems(example, expected[key], got[key], scale_rtol)
    if problems:
        raise AssertionError("the matcher disagrees with the planted blocks:\n  "
                             + "\n  ".join(problems) + f"\nexample: {example.description}")


def _fact_problems(example: Example, truth, block, scale_rtol: float) -> list[str]:
    root = example.root
    facts = {
        "kind": (truth.kind, block.kind),
        "heads/head_dim": ((truth.num_heads, truth.head_dim), (block.num_heads, block.head_dim)),
        "sources q/k/v": ((root(truth.q_source), root(truth.k_source), root(truth.v_source)),
                          (root(block.q.source.name), root(block.k.source.name),
                           root(block.v.source.name))),
        "static_inputs": (sorted(truth.static_inputs), sorted(block.static_inputs)),
        "kv_source_kind": (truth.kv_source_kind, block.kv_source_kind),
        "escapes": ([], list(block.escapes)),
    }
    problems = [f"{truth.name}: {name} planted {want!r}, found {have!r}"
                for name, (want, have) in facts.items() if want != have]
    if block.scale is None or abs(block.scale - truth.scale) > scale_rtol * abs(truth.scale):
        problems.append(f"{truth.name}: scale planted {truth.scale!r}, found {block.scale!r}")
    return problems
