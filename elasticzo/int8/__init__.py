"""ElasticZO-INT8's integer engine, built in layers (each file one concept):

rounding (shifts that round, saturation) -> format (QTensor: int8 * 2**exponent) -> ops
(int8 x int8 -> int32 products, one fast path behind ``int8_matmul``) -> layers (explicit
forward/backward) and loss (integer cross-entropy value and gradient) -> update (NITI and ZO
integer updates) -> convert (float model -> IntSequential, or int8 init from scratch).

After ``quantize`` of the input batch, nothing in forward, loss, backward or update uses a
floating dtype.
"""
from elasticzo.int8.convert import convert, int8_lenet5, int8_mlp, int8_pointnet
from elasticzo.int8.format import QTensor, dequantize, quantize, requantize_int32
from elasticzo.int8.layers import (
    IntConv2d,
    IntFlatten,
    IntGlobalMaxPool,
    IntLinear,
    IntMaxPool2d,
    IntReLU,
    IntSequential,
)
from elasticzo.int8.loss import LOSS_FRAC_BITS, cross_entropy, cross_entropy_grad, cross_entropy_loss
from elasticzo.int8.ops import int8_conv2d, int8_linear, int8_matmul, set_matmul_impl
from elasticzo.int8.rounding import (
    bitlength,
    saturate_int8,
    shift_round_nearest,
    shift_round_pseudo_stochastic,
    shift_round_stochastic,
)
from elasticzo.int8.update import apply_niti_update, int8_noise, niti_update, perturb, zo_update

__all__ = [
    "QTensor", "quantize", "dequantize", "requantize_int32",
    "shift_round_nearest", "shift_round_stochastic", "shift_round_pseudo_stochastic", "saturate_int8", "bitlength",
    "int8_matmul", "int8_linear", "int8_conv2d", "set_matmul_impl",
    "IntLinear", "IntConv2d", "IntReLU", "IntMaxPool2d", "IntGlobalMaxPool", "IntFlatten", "IntSequential",
    "cross_entropy", "cross_entropy_loss", "cross_entropy_grad", "LOSS_FRAC_BITS",
    "niti_update", "apply_niti_update", "int8_noise", "perturb", "zo_update",
    "convert", "int8_lenet5", "int8_mlp", "int8_pointnet",
]
