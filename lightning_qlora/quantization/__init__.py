"""4-bit (NF4/FP4/INT4) and 8-bit blockwise quantization, bit-exact with bitsandbytes.

Example:
    >>> from lightning_qlora.quantization import quantize_4bit
    >>> q = quantize_4bit(torch.randn(4096, 4096), "nf4", blocksize=64, double_quant=True)
    >>> round(q.bits_per_param(), 3)
    4.127
"""

from lightning_qlora.quantization.bnb_format import (
    from_bnb_state_dict,
    from_quant_state,
    to_bnb_state_dict,
    to_quant_state,
)
from lightning_qlora.quantization.codebooks import (
    dynamic_map_8bit,
    fp4_codebook,
    get_codebook,
    nf4_codebook,
    normal_float_codebook,
    symmetric_int_codebook,
)
from lightning_qlora.quantization.functional import (
    NestedAbsmax,
    dequantize_blockwise_8bit,
    double_quantize_absmax,
    quantize_blockwise_8bit,
)
from lightning_qlora.quantization.linear import Linear4bit, linear_4bit, matmul_dtype
from lightning_qlora.quantization.memory import WeightMemory, weight_memory
from lightning_qlora.quantization.tensor import (
    Quantized4bitTensor,
    UnsupportedOperationError,
    dequantize_4bit,
    quantize_4bit,
)

__all__ = [
    "Linear4bit",
    "NestedAbsmax",
    "Quantized4bitTensor",
    "UnsupportedOperationError",
    "WeightMemory",
    "dequantize_4bit",
    "dequantize_blockwise_8bit",
    "double_quantize_absmax",
    "dynamic_map_8bit",
    "fp4_codebook",
    "from_bnb_state_dict",
    "from_quant_state",
    "get_codebook",
    "linear_4bit",
    "matmul_dtype",
    "nf4_codebook",
    "normal_float_codebook",
    "quantize_4bit",
    "quantize_blockwise_8bit",
    "symmetric_int_codebook",
    "to_bnb_state_dict",
    "to_quant_state",
    "weight_memory",
]
