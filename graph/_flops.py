"""FLOP formulas and the op vocabulary of the cost model (IR-free; rules in ``costs.py``),
and the eager temporaries of the FX decomposed quantization ops (:func:`fx_workspace`).

Op names are those of :func:`graphpress.graph.op_name`: ``aten.linear`` for FX, ``MatMul`` or
``com.microsoft::MatMulNBits`` for ONNX. Each table says where the rule finds its operands.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

__all__ = [
    "numel", "matmul_flops", "conv_flops", "attention_flops",
    "FX_MATMUL", "FX_CONV", "FX_TRANSPOSED_CONV", "FX_ATTENTION", "FX_ZERO", "FX_NORM",
    "FX_REDUCE", "FX_POOL",
    "ONNX_MATMUL", "ONNX_CONV", "ONNX_ZERO", "ONNX_NORM", "ONNX_REDUCE", "ONNX_POOL",
    "ONNX_ATTENTION", "ONNX_ALIAS", "NORM_FLOPS_PER_ELEMENT", "FX_WORKSPACE", "fx_workspace",
]

logger = logging.getLogger(__name__)

#: FLOPs per output element of a normalisation: mean, variance, normalise, scale-shift.
NORM_FLOPS_PER_ELEMENT = 4


def numel(shape: Sequence[int] | None) -> int:
    return math.prod(shape) if shape is not None else 0


def matmul_flops(out_shape: Sequence[int] | None, k: int | None) -> int:
    """``2·numel(out)·K``: every output element is a K-long dot product (2·M·N·K)."""
    return 2 * numel(out_shape) * k if out_shape is not None and k else 0


def conv_flops(out_numel: int, weight_shape: Sequence[int] | None) -> int:
    """``2·out_numel·prod(weight.shape[1:])`` = 2·out·(Cin/groups)·prod(kernel)."""
    return 2 * out_numel * math.prod(weight_shape[1:]) if weight_shape else 0


def attention_flops(
    q_shape: Sequence[int], k_shape: Sequence[int], v_dim: int | None = None
) -> int:
    """``2·B·H·Sq·Sk·(D + Dv) + B·H·Sq·Sk`` for ``q [..., Sq, D]``, ``k [..., Sk, D]``."""
    if len(q_shape) < 2 or len(k_shape) < 2:
        return 0
    scores = numel(q_shape[:-1]) * k_shape[-2]  # B·H·Sq·Sk
    return 2 * scores * (q_shape[-1] + (v_dim if v_dim is not None else q_shape[-1])) + scores


# FX (aten) ------------------------------------------------------------------------------------
#: op -> argument index of the left operand A (K = A.shape[-1])
FX_MATMUL = {
    "aten.linear": 0, "aten.mm": 0, "aten.bmm": 0, "aten.matmul": 0, "aten.mv": 0,
    "aten.addmm": 1, "aten.baddbmm": 1, "aten.addbmm": 1, "aten.addmv": 1,
}
FX_CONV = frozenset({
    "aten.conv1d", "aten.conv2d", "aten.conv3d", "aten.convolution", "aten._convolution",
})
FX_TRANSPOSED_CONV = frozenset({
    "aten.conv_transpose1d", "aten.conv_transpose2d", "aten.conv_transpose3d",
})
FX_ATTENTION = frozenset({
    "aten.scaled_dot_product_attention", "aten._scaled_dot_product_flash_attention",
    "aten._scaled_dot_product_flash_attention_for_cpu", "aten._scaled_dot_product_efficient_attention",
    "aten._scaled_dot_product_cudnn_attention",
})
FX_ZERO = frozenset({f"aten.{name}" for name in (
    "view _unsafe_view reshape transpose permute t unsqueeze squeeze expand expand_as slice "
    "select narrow alias detach clone contiguous copy _to_copy to type_as cat stack split "
    "split_with_sizes chunk unbind flatten unflatten index_select gather index embedding "
    "repeat tile flip roll constant_pad_nd pad arange zeros ones full empty new_ones new_zeros "
    "new_full new_empty zeros_like ones_like full_like empty_like scalar_tensor lift_fresh_copy "
    "_assert_tensor_metadata _assert_scalar sym_size sym_numel sym_stride sym_constrain_range "
    "sym_constrain_range_for_size dropout feature_dropout lift view_as as_strided diagonal "
    "movedim swapaxes item masked_select nonzero"
).split()} | {"getitem", "wrap_with_set_grad_enabled", "wrap_with_autocast"})
FX_NORM = frozenset({f"aten.{name}" for name in (
    "layer_norm native_layer_norm group_norm native_group_norm batch_norm instance_norm "
    "_native_batch_norm_legit_no_training _native_batch_norm_legit native_batch_norm rms_norm "
    "_fused_rms_norm"
).split()})
FX_REDUCE = frozenset({f"aten.{name}" for name in (
    "sum mean amax amin max min var std var_mean prod logsumexp norm linalg_vector_norm argmax "
    "argmin cumsum all any count_nonzero"
).split()})
#: op -> argument index of the kernel size
FX_POOL = {
    "aten.max_pool1d": 1, "aten.max_pool2d": 1, "aten.max_pool3d": 1,
    "aten.avg_pool1d": 1, "aten.avg_pool2d": 1, "aten.avg_pool3d": 1,
    "aten.max_pool2d_with_indices": 1,
}

#: ops whose eager CPU kernels allocate temporaries beyond their output (see fx_workspace)
FX_WORKSPACE = frozenset({
    "quantized_decomposed.quantize_per_tensor", "quantized_decomposed.dequantize_per_tensor",
    "quantized_decomposed.dequantize_per_channel", "aten.fake_quantize_per_tensor_affine",
})


def fx_workspace(
    op: str, n: int, out_bytes: int, q_dtype: str | None, zp_dtype: str | None
) -> int:
    """Bytes an op allocates beyond its output while it runs (torch 2.13 eager, CPU).

    ``n`` elements, output ``out_bytes``, input codes of ``q_dtype`` and zero points of
    ``zp_dtype`` (``None``: none); the peak of the op's own allocations minus its output:

    * ``quantize_per_tensor``: ``clamp(round(x·(1/s)) + z)`` keeps two float32 temporaries of
      ``n`` elements alive at a time (each step frees the one before): peak ``2·4n``;
    * ``dequantize_per_tensor``: ``(q.to(float32) − z)·s``: peak ``2·4n``;
    * ``dequantize_per_channel``: ``q − z`` in ``z``'s dtype (``q`` is first cast to it), then
      ``·s`` casts that difference to float32 next to the output: peak
      ``max(cast + diff, diff + cast + out)``; without zero points ``q·s`` (a float32 copy of
      ``q`` next to the output);
    * ``fake_quantize_per_tensor_affine`` (the cachemask kernel): a bool mask, ``n`` bytes.

    Measured with ``torch.profiler`` (``profile_memory``) on int8/uint8 codes; other ops: 0.
    """
    if op == "aten.fake_quantize_per_tensor_affine":
        return n
    if op in ("quantized_decomposed.quantize_per_tensor",
              "quantized_decomposed.dequantize_per_tensor"):
        return max(0, 2 * 4 * n - out_bytes)
    if op != "quantized_decomposed.dequantize_per_channel":
        return 0
    if zp_dtype is None:
        return 4 * n if q_dtype != "float32" else 0
    size = _ITEMSIZE.get(zp_dtype, 8)
    cast_q = size * n if zp_dtype != q_dtype else 0
    cast_diff = 4 * n if zp_dtype != "float32" else 0
    return max(0, max(cast_q + size * n, size * n + cast_diff + out_bytes) - out_bytes)


_ITEMSIZE = {"int8": 1, "uint8": 1, "int16": 2, "int32": 4, "int64": 8, "float16": 2,
             "bfloat16": 2, "float32": 4, "float64": 8}


# ONNX -----------------------------------------------------------------------------------------
_MS = "com.microsoft::"
#: op -> input index of A
ONNX_MATMUL = {
    "MatMul": 0, "MatMulInteger": 0, "QLinearMatMul": 0, "Gemm": 0,
    f"{_MS}MatMulNBits": 0, f"{_MS}MatMulBnb4": 0, f"{_MS}DynamicQuantizeMatMul": 0,
    f"{_MS}MatMulIntegerToFloat": 0, f"{_MS}FusedMatMul": 0, f"{_MS}QGemm": 0,
}
#: op -> input index of the weight
ONNX_CONV = {
    "Conv": 1, "ConvInteger": 1, "QLinearConv": 3, "ConvTranspose": 1,
    f"{_MS}FusedConv": 1, f"{_MS}NhwcConv": 1, f"{_MS}QLinearConv": 3,
}
ONNX_ATTENTION = frozenset({
    f"{_MS}MultiHeadAttention", f"{_MS}GroupQueryAttention", f"{_MS}Attention", "Attention",
})
ONNX_ZERO = frozenset((
    "Reshape Transpose Squeeze Unsqueeze Flatten Identity Shape Size Gather GatherElements "
    "GatherND Slice Concat Split Expand Tile Cast CastLike ConstantOfShape Range Pad EyeLike "
    "NonZero ScatterND ScatterElements DepthToSpace SpaceToDepth Dropout Constant "
    "SplitToSequence SequenceAt SequenceConstruct SequenceEmpty ConcatFromSequence Optional "
    "OptionalGetElement OptionalHasElement Trilu"
).split()) | {f"{_MS}GatherBlockQuantized"}
ONNX_NORM = frozenset((
    "LayerNormalization BatchNormalization InstanceNormalization GroupNormalization "
    "LpNormalization RMSNormalization SimplifiedLayerNormalization MeanVarianceNormalization"
).split()) | {f"{_MS}{n}" for n in (
    "SkipLayerNormalization SkipSimplifiedLayerNormalization EmbedLayerNormalization "
    "SimplifiedLayerNormalization LayerNormalization SkipGroupNorm GroupNorm"
).split()}
ONNX_REDUCE = frozenset((
    "ReduceMean ReduceSum ReduceMax ReduceMin ReduceProd ReduceL1 ReduceL2 ReduceLogSum "
    "ReduceLogSumExp ReduceSumSquare ArgMax ArgMin CumSum GlobalAveragePool GlobalMaxPool "
    "GlobalLpPool"
).split())
ONNX_POOL = frozenset({"MaxPool", "AveragePool", "LpPool", "QLinearAveragePool"})
#: ops whose output ONNX Runtime places in its input's buffer (input 0)
ONNX_ALIAS = frozenset({"Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity"})
