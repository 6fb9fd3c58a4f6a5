"""TensorRT's ONNX operator support, by TensorRT version: the data ``lint-trt`` checks against.

Transcribed from the onnx-tensorrt ``docs/operators.md`` published for TensorRT 10.15 and the
TensorRT changelog (``Attention`` parses from 10.14 GA; ``RotaryEmbedding``,
``RMSNormalization`` and ``TensorScatter`` from 10.15 GA; TensorRT 11 keeps every row). The
opset range is 9..20 in the operators.md of TensorRT 10.0/10.1, 9..24 in that of 10.15, and the
parser of 11.5 reads opsets up to 25 (ONNX 1.22); versions in between are held to the older,
documented range (a conservative reading: a newer one may accept more).
The ONNX Attention node's own restrictions are in :mod:`.trt_attention_rules`.
Facts only; the package ships this table because it cannot read the project's notes at run time.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Type abbreviations of operators.md, as ONNX ``TensorProto`` data type names.
TYPE_CODES = {
    "F": "FLOAT", "H": "FLOAT16", "B": "BFLOAT16", "I32": "INT32", "I64": "INT64",
    "Bo": "BOOL", "INT8": "INT8", "UINT8": "UINT8", "FP8": "FLOAT8E4M3FN", "FP4": "FLOAT4E2M1",
    "INT4": "INT4",
}

# "ops | types": one row of operators.md's support table; a row may list several ops.
_TABLE = """
Abs | F H B I32 I64
Acos Acosh Asin Asinh Atan Atanh | F H B
Add | F H B I32 I64
And | Bo
ArgMax ArgMin | F H B I32 I64
Attention | F H B INT8 FP8
AveragePool | F H B
BatchNormalization | F H B
BlackmanWindow | F H
Cast CastLike | F H B I32 I64 UINT8 Bo
Ceil | F H B
Celu | F H B
Clip | F H B
Concat | F H B I32 I64 Bo
Constant | F H B FP8 FP4 INT4 I32 I64 Bo
ConstantOfShape | F H B FP8 FP4 INT4 I32 I64 Bo
Conv ConvTranspose | F H B
Cos Cosh | F H B
CumSum | F H B
DeformConv | F H
DepthToSpace | F H B I32 I64
DequantizeLinear | INT8 FP8 FP4 INT4
Div | F H B I32 I64
Dropout | F H B
Einsum | F H B
Elu | F H B
Equal | F H B I32 I64
Erf Exp | F H B
Expand | F H B I32 I64 Bo
EyeLike | F H B I32 I64 Bo
Flatten | F H B I32 I64 Bo
Floor | F H B
Gather GatherElements GatherND | F H B I32 I64 Bo
Gelu | F H B INT8 I32 I64
Gemm | F H B
GlobalAveragePool GlobalLpPool GlobalMaxPool | F H B
Greater GreaterOrEqual | F H B I32 I64
GridSample | F H
GroupNormalization | F H B
GRU | F H B
HammingWindow HannWindow | F H
HardSigmoid HardSwish | F H B
Hardmax | F H B
Identity | F H B I32 I64 Bo
If | F H B I32 I64 Bo
ImageScaler | F H B
InstanceNormalization | F H B
IsInf | F H B
IsNaN | F H B I32 I64
LayerNormalization | F H B
LeakyRelu | F H B
Less LessOrEqual | F H B I32 I64
Log LogSoftmax | F H B
Loop | F H B I32 I64 Bo
LRN | F H B
LSTM | F H B
LpNormalization | F H B
LpPool | F H B
MatMul | F H B
Max Min | F H B I32 I64
MaxPool | F H B
Mean | F H B FP8 I32 I64
MeanVarianceNormalization | F H B
Mish | F H
Mod Mul | F H B I32 I64
Neg | F H B I32 I64
NonMaxSuppression | F H
NonZero | F H
Not Or Xor | Bo
OneHot | F H B I32 I64 Bo
Pad | F H B I32 I64
ParametricSoftplus | F H B
Pow | F H B I32 I64
PRelu | F H B
QuantizeLinear | F H B
RandomNormal RandomNormalLike RandomUniform RandomUniformLike | F H B
Range | F H B I32 I64
Reciprocal | F H B
ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare | F H B I32 I64
Relu | F H B I32 I64
Reshape | F H B I32 I64 Bo
Resize | F H B
ReverseSequence | F H B I32 I64 Bo
RMSNormalization | F H B
RNN | F H B
RoiAlign | F H
RotaryEmbedding | F H B
Round | F H B
STFT | F
ScaledTanh | F H B
Scan | F H B
Scatter ScatterElements | F H B I32 I64
ScatterND | F H B I32 I64
Selu | F H B
Shape | F H B I32 I64 Bo
Shrink | F H B I32 I64
Sigmoid | F H B
Sign | F H B I32 I64
Sin Sinh | F H B
Size | F H B I32 I64 Bo
Slice | F H B I32 I64 Bo
Softmax | F H B
Softplus Softsign | F H B
SpaceToDepth | F H B I32 I64
Split | F H B I32 I64 Bo
Sqrt | F H B
Squeeze | F H B I32 I64 Bo
Sub Sum | F H B I32 I64
Tan Tanh | F H B
TensorScatter | F H B I32
ThresholdedRelu | F H B
Tile | F H B I32 I64 Bo
TopK | F H B I32 I64
Transpose Trilu | F H B I32 I64 Bo
Unsqueeze | F H B I32 I64 Bo
Upsample | F H B
Where | F H B I32 I64 Bo
"""

#: Ops operators.md lists as not supported.
UNSUPPORTED = frozenset("""
AffineGrid Bernoulli BitShift BitwiseAnd BitwiseNot BitwiseOr BitwiseXor Col2Im CenterCropPad
Compress ConcatFromSequence ConvInteger DFT Det DynamicQuantizeLinear ImageDecoder
MatMulInteger MaxRoiPool MaxUnpool MelWeightMatrix Multinomial NegativeLogLikelihoodLoss Optional
OptionalGetElement OptionalHasElement QLinearConv QLinearMatMul RegexFullMatch SequenceAt
SequenceConstruct SequenceEmpty SequenceErase SequenceInsert SequenceLength SequenceMap
SoftmaxCrossEntropyLoss SplitToSequence StringConcat StringNormalizer StringSplit
TfIdfVectorizer Unique
""".split())

#: The first TensorRT version whose parser imports the op (absent: every 10.x).
SINCE = {
    "Attention": (10, 14),
    "RotaryEmbedding": (10, 15),
    "RMSNormalization": (10, 15),
    "TensorScatter": (10, 15),
}

#: (first version, highest default-domain opset its operators.md documents).
OPSET_RANGES = (((10, 0), 9, 20), ((10, 14), 9, 24), ((11, 5), 9, 25))

#: Types the parser accepts only on quantize/dequantize paths (Q/DQ), never as plain tensors.
QUANTIZED_TYPES = frozenset({"INT8", "INT4", "FLOAT8E4M3FN", "FLOAT4E2M1"})
#: Types with no support at all ("Data types" in operators.md lists everything else).
UNSUPPORTED_TYPES = frozenset({"STRING", "INT16", "UINT16", "UINT32", "UINT64", "COMPLEX64",
                               "COMPLEX128", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ",
                               "UINT4"})

#: The oldest version the table covers, and the version the TensorRT stage targets by default
#: (`lint-trt`, `build`, `--emit-trtexec`: the current release).
OLDEST = (10, 0)
DEFAULT_VERSION = (11, 5)
#: The newest version whose support the table was transcribed from.
NEWEST = (11, 5)
#: TensorRT 11 builds strongly typed networks only: no precision flags, no per-layer precision.
STRONGLY_TYPED_ONLY = (11, 0)
#: The first version whose trtexec takes --decomposableAttentions (IAttention arrived in 10.14).
DECOMPOSABLE_SINCE = (10, 14)


@dataclass(frozen=True)
class OpSupport:
    op: str
    types: frozenset[str]          # ONNX data type names
    since: tuple[int, int]


def _parse_table(text: str) -> dict[str, OpSupport]:
    table: dict[str, OpSupport] = {}
    for line in text.strip().splitlines():
        ops, types = (part.split() for part in line.split("|"))
        names = frozenset(TYPE_CODES[code] for code in types)
        for op in ops:
            table[op] = OpSupport(op, names, SINCE.get(op, OLDEST))
    return table


SUPPORTED: dict[str, OpSupport] = _parse_table(_TABLE)


def parse_version(text: str) -> tuple[int, int]:
    """``"10.14"`` (or ``"10.14.1"``) as ``(10, 14)``; ValueError on anything else."""
    parts = text.strip().split(".")
    if len(parts) < 2 or not all(p.isdigit() for p in parts[:2]):
        raise ValueError(f"TensorRT version '{text}' is not MAJOR.MINOR (for example 10.14)")
    return int(parts[0]), int(parts[1])


def format_version(version: tuple[int, int]) -> str:
    return f"{version[0]}.{version[1]}"


def strongly_typed_only(version: tuple[int, int]) -> bool:
    """True when TensorRT ``version`` has no precision flags (11.0 and later)."""
    return version >= STRONGLY_TYPED_ONLY


def opset_range(version: tuple[int, int]) -> tuple[int, int]:
    """The default-domain opsets the parser of ``version`` documents, as ``(low, high)``."""
    low, high = OPSET_RANGES[0][1:]
    for since, lo, hi in OPSET_RANGES:
        if version >= since:
            low, high = lo, hi
    return low, high


def support(op: str, version: tuple[int, int]) -> OpSupport | None:
    """The op's support row when the parser of ``version`` imports it, else None."""
    row = SUPPORTED.get(op)
    return row if row is not None and version >= row.since else None
