"""ElasticZO-INT8's integer engine, built in layers (each file one concept):

rounding (shifts that round, saturation) -> format (QTensor: int8 * 2**exponent) -> ops
(int8 x int8 -> int32 products, one fast path behind ``int8_matmul``), conv, pool -> layers (explicit
forward/backward) and loss (integer cross-entropy value and gradient) -> update (NITI and ZO
integer updates) -> convert (float model -> IntSequential, an nn.Module; or a fresh int8 init)
-> elastic (IntElasticZO, the optimiser, shaped like the float ElasticZO). Ordinary models add
bias (integer biases), blocks (residual add, average pool), fold (BatchNorm, at conversion) and
graph (IntGraph: a torch.fx-traced model that is not a chain).

After ``quantize`` of the input batch, nothing in forward, loss, backward or update uses a
floating dtype.
"""
from elasticzo.int8.blocks import IntAdd, IntGlobalAvgPool2d
from elasticzo.int8.convert import convert
from elasticzo.int8.graph import IntGraph
from elasticzo.int8.elastic import IntElasticZO
from elasticzo.int8.format import QTensor, dequantize, quantize, requantize_int32
from elasticzo.int8.inputs import quantize_input, quantize_once, quantize_pixels, quantize_points
from elasticzo.int8.layers import (
    IntConv2d,
    IntFlatten,
    IntGlobalMaxPool,
    IntLinear,
    IntMaxPool2d,
    IntReLU,
)
from elasticzo.int8.sequential import IntSequential
from elasticzo.int8.loss import LOSS_FRAC_BITS, cross_entropy, cross_entropy_grad, cross_entropy_loss, loss_closure
from elasticzo.int8.conv import int8_conv2d
from elasticzo.int8.ops import int8_linear, int8_matmul, set_matmul_impl
from elasticzo.int8.rounding import (
    bitlength,
    saturate_int8,
    shift_round_nearest,
    shift_round_pseudo_stochastic,
    shift_round_stochastic,
)
from elasticzo.int8.update import int8_noise, niti_update, perturb_weight, zo_update

__all__ = [
    "IntElasticZO", "QTensor", "quantize", "dequantize", "requantize_int32",
    "quantize_input", "quantize_once", "quantize_pixels", "quantize_points",
    "shift_round_nearest", "shift_round_stochastic", "shift_round_pseudo_stochastic", "saturate_int8", "bitlength",
    "int8_matmul", "int8_linear", "int8_conv2d", "set_matmul_impl",
    "IntLinear", "IntConv2d", "IntReLU", "IntMaxPool2d", "IntGlobalMaxPool", "IntFlatten", "IntSequential",
    "IntAdd", "IntGlobalAvgPool2d", "IntGraph",
    "cross_entropy", "cross_entropy_loss", "cross_entropy_grad", "LOSS_FRAC_BITS", "loss_closure",
    "niti_update", "int8_noise", "perturb_weight", "zo_update",
    "convert",
]
