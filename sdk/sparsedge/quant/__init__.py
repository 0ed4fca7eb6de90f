"""Quantized weights in GGUF's own block formats (q8_0, q4_0, q4_1, q4_k, q6_k, tq2_0, and f32/f16/bf16 rows),
executed in place by the `sparsedge::qlinear` op (sdk/sparsedge/ops/quant.py). See formats.py for the layouts."""
from sparsedge.quant.formats import (FORMATS, QK, QK_K, QUANTIZABLE, SUPPORTED, QFormat, UnsupportedQuantError,
                                     check_k, dequantize, get_format, int8_reference, qtype_from_ggml, quantize,
                                     quantize_activations, row_bytes)

__all__ = ["FORMATS", "QK", "QK_K", "QUANTIZABLE", "SUPPORTED", "QFormat", "UnsupportedQuantError", "check_k",
           "dequantize", "get_format", "int8_reference", "qtype_from_ggml", "quantize", "quantize_activations",
           "row_bytes"]
