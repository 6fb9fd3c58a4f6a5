"""``einsum-to-matmul``: a two-operand Einsum that is a batched matmul becomes one.

Labels are sorted by where they occur: exactly one *contracted* label ``k`` is in both operands
but not in the output; the last output label of the left operand alone is the row ``i``, the
last of the right operand alone the column ``j``; every other output label is *outer* (batch
labels of both operands, and more labels of one operand, which MatMul's broadcasting
multiplies out against a unit axis of the other). Then::

    Einsum(a, b, "<a>,<b>-><out>") -> T_out(MatMul(U_a(T_a(a)), U_b(T_b(b))))

    T_a   = Transpose of a to [outer labels of a..., i, k]
    T_b   = Transpose of b to [outer labels of b..., k, j]
    U_a   = Unsqueeze of a unit axis where each outer label of b alone goes (U_b likewise);
            leading unit axes are left to MatMul's broadcasting
    T_out = Transpose from [outer..., i, j] to <out>

Each Transpose or Unsqueeze that would be the identity is left out. The outer labels are tried
in the output's order and with either operand's own labels first, with the operands on either
side; the form with the fewest nodes wins (the first of them on ties: deterministic). The
attention spellings need one Transpose or none::

    'b i d, b j d -> b i j'     MatMul(a, T_{0,2,1}(b))          Q.K^T (LDM, lucidrains)
    'bhid,bhjd->bhij'           MatMul(a, T_{0,1,3,2}(b))        Q.K^T on [B, H, S, D]
    'b i j, b j d -> b i d'     MatMul(a, b)                     P.V
    'bhqk,bkhd->bqhd'           T(MatMul(a, T(b)))               P.V straight into the head merge
    'bsd,de->bse'               MatMul(a, b)                     a projection
    'bsd,ed->bse'               MatMul(a, T_{1,0}(b))            a projection by a [out, in] weight
    '...id,...jd->...ij'        MatMul(a, T(b))                  leading ellipsis: batch dims
    'bhid,bjd->bhij'            MatMul(a, U(T(b)))               K shared by the heads (MQA)
    'bhsd,hde->bhse'            MatMul(a, b)                     per-head weights
    'bnd,dhk->bhnk'             T(MatMul(a, U(T(b))))            a projection into heads

Several contracted labels ``k1..kn`` (a head merge into the output projection) are laid out
last on both sides and merged into one dim by a Reshape (``0`` keeps the leading dims, ``-1``
takes the product); a Reshape keeps dims by position only, so the right side is laid out
``[outer..., j, k1..kn]``, merged, and its last two dims swapped::

    'bhnd,hde->bne'             MatMul(R(T(a)), T(R(T(b))))      the head merge into W_o

For a constant operand (a weight) the nodes on it are folded later, so they count nothing
when the cheapest plan is chosen; on a tie the plan with fewer nodes on the activation wins
(a node there would hide ``MatMul(x, W)``, the projection, from the matcher).

A one-operand Einsum that only reorders its labels (``'bhnd->bnhd'``, a head split or merge
written as an Einsum) is one Transpose (an Identity when the order is kept).

A leading ``...`` in the operands and the output is more batch dims (MatMul broadcasts them
the way Einsum does); it needs the operands' ranks from shape inference. The output keeps its
name and its producer now is the last new node. A Transpose of a constant operand (a weight)
is folded by ``cancel-transposes`` (in ``remove-layout-clutter``), not here.

Left alone, each counted in ``einsums_skipped`` with its reason in the details: more than two
operands; one operand summed over (a reduction); a label repeated in one operand (a diagonal)
or in the output; a label summed out of one operand alone; no contracted label (an outer
product), or several under an ellipsis; no row or no column label (a matrix-vector product);
an ellipsis not leading every term, or over an operand of unknown rank; an element type MatMul
does not take.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from xattn_compiler.rewrite import is_identity_perm

from ._normalize import DEFAULT_DOMAINS, ModelEdit, NormalizingPass, Scope, elem_type, rank, readers

#: Stands for ``...`` in a parsed term (not a label: labels are letters).
_ELLIPSIS = "*"
_MATMUL_TYPES = frozenset({
    onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
    onnx.TensorProto.BFLOAT16, onnx.TensorProto.INT32, onnx.TensorProto.INT64,
    onnx.TensorProto.UINT32, onnx.TensorProto.UINT64,
})


class Refused(Exception):
    """An equation that is no batched matmul; the message says why."""


@dataclass(frozen=True)
class Operand:
    """How one operand becomes a MatMul input: a perm (None: as it is), its last ``flatten``
    dims merged into one (several contracted labels; 0: none), the last two swapped
    (``swap_last``: the right operand laid out ``[.., j, k]``), then new unit axes (negative
    positions, None: none)."""

    perm: tuple[int, ...] | None
    unsqueeze: tuple[int, ...] | None
    flatten: int = 0
    swap_last: bool = False

    @property
    def nodes(self) -> int:
        return ((self.perm is not None) + (self.unsqueeze is not None) + (self.flatten > 1)
                + self.swap_last)


@dataclass(frozen=True)
class Plan:
    """``T_out(MatMul(left, right))``; ``swap`` when the second Einsum operand goes left."""

    swap: bool
    left: Operand
    right: Operand
    out_perm: tuple[int, ...] | None

    @property
    def nodes(self) -> int:
        return self.left.nodes + self.right.nodes + (self.out_perm is not None)


# --- the equation ------------------------------------------------------------------------------

def parse_equation(equation: str) -> tuple[list[str], str]:
    """The operand terms and the output term, spaces dropped, ``...`` as ``*``; the implicit
    output (no ``->``) is the labels used once, in alphabetical order, after any ellipsis."""
    text = "".join(equation.split()).replace("...", _ELLIPSIS)
    lhs, arrow, out = text.partition("->")
    terms = lhs.split(",")
    for term in [*terms, out]:
        if term.count(_ELLIPSIS) > 1 or any(
                not (c.isascii() and c.isalpha()) and c != _ELLIPSIS for c in term):
            raise Refused(f"cannot read the equation {equation!r}")
    if not arrow:
        labels = "".join(terms).replace(_ELLIPSIS, "")
        once = sorted(c for c in set(labels) if labels.count(c) == 1)
        out = (_ELLIPSIS if any(_ELLIPSIS in t for t in terms) else "") + "".join(once)
    return terms, out


def plan_einsum(equation: str, ranks: tuple[int | None, int | None],
                constant: tuple[bool, bool] = (False, False)) -> Plan:
    """The cheapest MatMul form of a two-operand ``equation`` on operands of ``ranks``;
    raises :class:`Refused` when it has none. An operand marked ``constant`` (a weight) has
    its Transpose/Unsqueeze folded later, so they cost nothing (:func:`_cost`)."""
    terms, out = parse_equation(equation)
    if len(terms) != 2:
        raise Refused(f"{len(terms)} operands, not 2")
    ellipsis = _check_ellipsis(terms, out, ranks)
    a, b, out = (t.replace(_ELLIPSIS, "") for t in (*terms, out))
    _check_labels(a, b, out, ranks if ellipsis == (0, 0) else (None, None),
                  ellipsis != (0, 0))
    plans = [*_plans(a, b, out, ellipsis, swap=False), *_plans(b, a, out, ellipsis[::-1], swap=True)]
    # the first of the cheapest: deterministic
    return min(plans, key=lambda plan: _cost(plan, constant))


def _cost(plan: Plan, constant: tuple[bool, bool]) -> tuple[int, int]:
    """Nodes left after folding those on constant operands; for a projection (one operand
    constant), on a tie, fewer nodes between the activation and the MatMul. A node there hides
    ``MatMul(x, W)`` (a projection, as the matcher reads it) behind a copy of ``x`` per Einsum,
    and Q and K then look like two sources; a Transpose after the MatMul is head layout the
    matcher walks through. Between two activations (Q.K^T, P.V) ties keep the first plan,
    which keeps the operands' order."""
    left_const, right_const = constant[::-1] if plan.swap else constant
    on_computed = (0 if left_const else plan.left.nodes) + (0 if right_const else plan.right.nodes)
    total = on_computed + (plan.out_perm is not None)
    return total, on_computed if left_const or right_const else 0


def plan_permutation(equation: str, rank: int | None) -> tuple[int, ...]:
    """The Transpose perm of a one-operand ``equation`` that only reorders its labels (a head
    split or merge written as ``'bhnd->bnhd'``); raises :class:`Refused` otherwise."""
    terms, out = parse_equation(equation)
    if len(terms) != 1:
        raise Refused(f"{len(terms)} operands, not 1")
    (dots,) = _check_ellipsis(terms, out, (rank,))
    term, out = terms[0].replace(_ELLIPSIS, ""), out.replace(_ELLIPSIS, "")
    if dots == 0 and rank is not None and rank != len(term):
        raise Refused(f"'{term}' labels {len(term)} dims of a rank-{rank} operand")
    if len(set(term)) != len(term):
        raise Refused("a label repeated in the operand (a diagonal)")
    if sorted(term) != sorted(out):
        raise Refused("labels summed out of the operand (a reduction)")
    return tuple(_perm(term, list(out), dots) or range(dots + len(term)))


def _check_ellipsis(terms: list[str], out: str, ranks) -> tuple[int, ...]:
    """The number of dims each operand's ``...`` stands for (0s without one)."""
    used = [_ELLIPSIS in term for term in (*terms, out)]
    if not any(used):
        return tuple(0 for _ in terms)
    if not all(term.startswith(_ELLIPSIS) for term in (*terms, out)):
        raise Refused("an ellipsis not leading every term")
    if any(r is None for r in ranks):
        raise Refused("an ellipsis over an operand of unknown rank")
    counts = tuple(r - (len(t) - 1) for r, t in zip(ranks, terms, strict=True))
    if min(counts) < 0:
        raise Refused("an operand has fewer dims than its labels")
    return counts


def _check_labels(a: str, b: str, out: str, ranks, ellipsis: bool = False) -> None:
    for term, known in ((a, ranks[0]), (b, ranks[1])):
        if known is not None and known != len(term):
            raise Refused(f"'{term}' labels {len(term)} dims of a rank-{known} operand")
        repeated = sorted(c for c in set(term) if term.count(c) > 1)
        if repeated:
            raise Refused(f"label '{repeated[0]}' repeated in one operand (a diagonal)")
    if len(set(out)) != len(out):
        raise Refused("a label repeated in the output")
    if set(out) - set(a) - set(b):
        raise Refused(f"output label '{sorted(set(out) - set(a) - set(b))[0]}' in no operand")
    alone = sorted((set(a) ^ set(b)) - set(out))
    if alone:
        raise Refused(f"label '{alone[0]}' summed out of one operand alone")
    contracted = (set(a) & set(b)) - set(out)
    if not contracted:
        raise Refused("0 contracted labels (an outer product)")
    if len(contracted) > 1 and ellipsis:
        raise Refused(f"{len(contracted)} contracted labels under an ellipsis")
    if not set(a) - set(b) or not set(b) - set(a):
        raise Refused("no free label on one side (a matrix-vector product)")


def _plans(a: str, b: str, out: str, ellipsis: tuple[int, int], swap: bool) -> list[Plan]:
    """``a`` on the left of the MatMul, ``b`` on the right, for a few orders of the outer
    labels: the output's, and each side's own labels first (what spares an Unsqueeze)."""
    ks = [c for c in a if c in b and c not in out]   # in the left operand's order
    i = [c for c in out if c in a and c not in b][-1]
    j = [c for c in out if c in b and c not in a][-1]
    outer = [c for c in out if c not in (i, j)]
    orders = [outer, sorted(outer, key=lambda c: c in b), sorted(outer, key=lambda c: c in a)]
    if len(ks) > 1:
        return [_merged_plan(a, b, out, order, (i, j, ks), swap) for order in orders]
    return [_plan(a, b, out, order, (i, j, ks[0]), ellipsis, swap) for order in orders]


def _merged_plan(a: str, b: str, out: str, outer: list[str],
                 ijks: tuple[str, str, list[str]], swap: bool) -> Plan:
    """Several contracted labels ``ks`` (a head merge into a projection, ``'bhnd,hde->bne'``):
    each side lays them out last and merges them into one dim; the right side is laid out
    ``[.., j, ks]`` (a Reshape keeps leading dims by position only) and then swaps the last
    two. No ellipsis here, so each term names every dim."""
    i, j, ks = ijks
    return Plan(swap, _merged_operand(a, outer, i, ks, right=False),
                _merged_operand(b, outer, j, ks, right=True), _perm([*outer, i, j], list(out), 0))


def _merged_operand(term: str, outer: list[str], free: str, ks: list[str], right: bool
                    ) -> Operand:
    merged = "#"  # the merged contracted dim: no label
    layout = [*outer, merged, free] if right else [*outer, free, merged]
    missing = [p for p, c in enumerate(layout) if c != merged and c not in term]
    implicit = missing == list(range(len(missing)))
    unsqueeze = None if not missing or implicit else tuple(p - len(layout) for p in missing)
    perm = _perm(term, [c for c in [*outer, free, *ks] if c in term], 0)
    return Operand(perm, unsqueeze, flatten=len(ks), swap_last=right)


def _plan(a: str, b: str, out: str, outer: list[str], ijk: tuple[str, str, str],
          ellipsis: tuple[int, int], swap: bool) -> Plan:
    i, j, k = ijk
    left = _operand(a, [*outer, i, k], ellipsis[0])
    right = _operand(b, [*outer, k, j], ellipsis[1])
    return Plan(swap, left, right, _perm([*outer, i, j], list(out), max(ellipsis)))


def _operand(term: str, layout: list[str], dots: int) -> Operand:
    """``term`` laid out as ``layout``, a unit axis where a label of the other operand goes
    (MatMul broadcasts it). Leading unit axes are implicit, unless an ellipsis is before them."""
    missing = [p for p, c in enumerate(layout) if c not in term]
    implicit = not dots and missing == list(range(len(missing)))
    unsqueeze = None if not missing or implicit else tuple(p - len(layout) for p in missing)
    return Operand(_perm(term, [c for c in layout if c in term], dots), unsqueeze)


def _perm(have: str | list[str], want: list[str], leading: int) -> tuple[int, ...] | None:
    """The Transpose perm from labels ``have`` to ``want`` after ``leading`` untouched dims,
    or None for the identity."""
    have = list(have)
    perm = [*range(leading), *(leading + have.index(c) for c in want)]
    return None if is_identity_perm(perm) else tuple(perm)


# --- the pass ----------------------------------------------------------------------------------

class EinsumToMatMul(NormalizingPass):
    """Einsum(a, b) -> [Transpose] MatMul [Transpose] where it is a batched matmul;
    Einsum(a) -> Transpose(a) where it only reorders the labels."""

    name = "einsum-to-matmul"
    description = ("an Einsum that is a batched matmul as (Transpose) MatMul (Transpose), "
                   "one that only permutes as Transpose")
    candidate_ops = frozenset({"Einsum"})
    rewritten_key = "einsums_rewritten"
    skipped_key = "einsums_skipped"

    def __init__(self, **values):
        super().__init__(**values)
        self._laid_out: dict[tuple[str, Operand], str] = {}

    def apply(self, edit: ModelEdit) -> int:
        self._laid_out = {}
        return super().apply(edit)

    def finish(self, edit: ModelEdit) -> None:
        """Drop the weights only the rewritten Einsums read (their laid-out copies replace
        them), so the model does not carry both."""
        read = readers(edit.model)
        unread = {name for name, _ in self._laid_out if not read.get(name)}
        if not unread:
            return
        for _, graph, _ in edit.graphs():
            kept = [t for t in graph.initializer if t.name not in unread]
            if len(kept) != len(graph.initializer):
                del graph.initializer[:]
                graph.initializer.extend(kept)
            nodes = [n for n in graph.node
                     if not (n.op_type == "Constant" and n.output and n.output[0] in unread)]
            if len(nodes) != len(graph.node):
                del graph.node[:]
                graph.node.extend(nodes)

    def rewrite(self, graph: onnx.GraphProto, scope: Scope, edit: ModelEdit, path: str) -> int:
        nodes: list[onnx.NodeProto] = []
        done = 0
        for node in graph.node:
            if node.op_type != "Einsum" or node.domain not in DEFAULT_DOMAINS:
                nodes.append(node)
                continue
            try:
                plan = _plan_node(node, scope, edit)
            except Refused as reason:
                self.skip(node, path, str(reason))
                nodes.append(node)
                continue
            if isinstance(plan, Plan):
                # Only the main graph gets laid-out weights: a body reads outer weights, and
                # an initializer of its own there is not what the checker takes.
                nodes.extend(_matmul_nodes(node, plan, edit, graph, scope if not path else None,
                                           self._laid_out))
            else:
                nodes.append(_transpose_node(node, plan, edit))
            done += 1
        if done:  # the new nodes stand where the Einsum stood: the order stays topological
            del graph.node[:]
            graph.node.extend(nodes)
        return done


def _plan_node(node: onnx.NodeProto, scope: Scope, edit: ModelEdit) -> Plan | tuple[int, ...]:
    """The MatMul plan of a two-operand Einsum, the perm of a one-operand permutation."""
    if len(node.input) not in (1, 2) or len(node.output) != 1:
        raise Refused(f"{len(node.input)} operands, not 2")
    equation = next((a.s for a in node.attribute if a.name == "equation"), None)
    if equation is None:
        raise Refused("no equation")
    equation = equation.decode()
    names = [node.output[0], *node.input]
    dtype = next((t for t in (elem_type(scope.types.get(n)) for n in names) if t), None) or \
        next((t for t in (elem_type(edit.value_type(n, scope)) for n in names) if t), None)
    if len(node.input) == 2 and dtype not in _MATMUL_TYPES:
        name = onnx.TensorProto.DataType.Name(dtype) if dtype else "unknown"
        raise Refused(f"element type {name} (MatMul does not take it)")
    ranks = tuple(rank(scope.types.get(n)) for n in node.input)
    if "..." in equation and None in ranks:  # only an ellipsis needs the ranks
        ranks = tuple(rank(edit.value_type(n, scope)) for n in node.input)
    if len(node.input) == 1:
        return plan_permutation(equation, ranks[0])
    constant = tuple(scope.constants.get(n) is not None for n in node.input)
    return plan_einsum(equation, ranks, constant)


def _transpose_node(node: onnx.NodeProto, perm: tuple[int, ...], edit: ModelEdit
                    ) -> onnx.NodeProto:
    base = node.name or node.output[0]
    if list(perm) == list(range(len(perm))):
        return onnx.helper.make_node("Identity", [node.input[0]], [node.output[0]],
                                     edit.fresh(f"{base}/identity"))
    return onnx.helper.make_node("Transpose", [node.input[0]], [node.output[0]],
                                 edit.fresh(f"{base}/transpose"), perm=list(perm))


def _laid_out(value: np.ndarray, how: Operand) -> np.ndarray:
    """A constant operand laid out as ``how`` says, in numpy (the nodes it spares)."""
    if how.perm is not None:
        value = np.transpose(value, how.perm)
    if how.flatten > 1:
        value = value.reshape(*value.shape[:value.ndim - how.flatten], -1)
    if how.swap_last:
        value = np.swapaxes(value, -1, -2)
    if how.unsqueeze is not None:
        value = np.expand_dims(value, how.unsqueeze)
    return np.ascontiguousarray(value)


def _matmul_nodes(node: onnx.NodeProto, plan: Plan, edit: ModelEdit,
                  graph: onnx.GraphProto, scope: Scope | None = None,
                  laid_out: dict[tuple[str, Operand], str] | None = None
                  ) -> list[onnx.NodeProto]:
    """The nodes that compute ``node``'s output as ``plan`` says, in order (Unsqueeze axes
    become initializers of ``graph``). A weight whose value is in the model is laid out once,
    as a new initializer, instead of through nodes."""
    made: list[onnx.NodeProto] = []
    base = node.name or node.output[0]

    def add(op: str, suffix: str, inputs: list[str], output: str | None = None, **attrs):
        output = output or edit.fresh(f"{base}/{suffix}")
        made.append(onnx.helper.make_node(op, inputs, [output], edit.fresh(f"{base}/{suffix}"),
                                          **attrs))
        return output

    a, b = node.input[::-1] if plan.swap else node.input
    # Only a plan that merges dims needs ranks, and it has no ellipsis: a term names each dim.
    equation = next(x.s for x in node.attribute if x.name == "equation").decode()
    ranks = [len(term) for term in parse_equation(equation)[0]]
    ranks = ranks[::-1] if plan.swap else ranks
    operands = []
    for x, how, side, term_rank in ((a, plan.left, "left", ranks[0]),
                                    (b, plan.right, "right", ranks[1])):
        key = (x, how)
        if laid_out is not None and key in laid_out:  # the same weight, laid out the same way
            operands.append(laid_out[key])
            continue
        own = scope is not None and any(t.name == x for t in graph.initializer)
        value = scope.constant(x) if own and how.nodes else None
        if value is not None:
            name = edit.fresh(f"{x}/{side}_laid_out")
            graph.initializer.append(numpy_helper.from_array(_laid_out(value, how), name))
            operands.append(name)
            if laid_out is not None:
                laid_out[key] = name
            continue
        if how.perm is not None:
            x = add("Transpose", f"{side}_transpose", [x], perm=list(how.perm))
        if how.flatten > 1:  # [.., k1, ..., kn] -> [.., k1*...*kn]; 0 keeps a dim
            shape = edit.fresh(f"{base}/{side}_shape")
            graph.initializer.append(numpy_helper.from_array(
                np.array([0] * (term_rank - how.flatten) + [-1], np.int64), shape))
            x = add("Reshape", f"{side}_flatten", [x, shape])
        if how.swap_last:
            kept = term_rank - how.flatten + 1
            x = add("Transpose", f"{side}_swap", [x],
                    perm=[*range(kept - 2), kept - 1, kept - 2])
        if how.unsqueeze is not None and edit.opset >= 13:
            axes = edit.fresh(f"{base}/{side}_axes")
            graph.initializer.append(numpy_helper.from_array(np.array(how.unsqueeze, np.int64),
                                                             axes))
            x = add("Unsqueeze", f"{side}_unsqueeze", [x, axes])
        elif how.unsqueeze is not None:
            x = add("Unsqueeze", f"{side}_unsqueeze", [x], axes=list(how.unsqueeze))
        operands.append(x)
    if plan.out_perm is None:
        add("MatMul", "matmul", operands, node.output[0])
    else:
        product = add("MatMul", "matmul", operands)
        add("Transpose", "transpose_out", [product], node.output[0], perm=list(plan.out_perm))
    return made


__all__ = ["EinsumToMatMul", "Plan", "Refused", "parse_equation", "plan_einsum",
           "plan_permutation"]
