// CPU kernels on raw pointers (no torch headers): the bindings validate and dispatch.
#pragma once

#include <stdint.h>

#include "lightning_qlora/element.h"
#include "lightning_qlora/float_type.h"

namespace lightning_qlora {
namespace cpu {

using lightning_qlora::FloatType;  // shared with the CUDA side (lightning_qlora/float_type.h)

// Blockwise 4-bit quantization of n elements; packed holds ceil(n/2) bytes, absmax ceil(n/blocksize).
void quantize_4bit(const void* input, FloatType type, int64_t n, const Codebook4& book, int64_t blocksize,
                   bool stochastic, uint64_t seed, uint8_t* packed, float* absmax);

// codebook[q] * absmax[block] for n elements, written as `type`.
void dequantize_4bit(const uint8_t* packed, const float* absmax, const float* codebook, int64_t n,
                     int64_t blocksize, FloatType type, void* output);

// bitsandbytes' blockwise 8-bit encoding, nearest rounding (double quantization of absmax):
// per block absmax (NaN propagates), scaled = clamp(x / absmax, -1, 1), grid point
// trunc(fma(65535, (scaled + 1) / 2, 0.5)) & 0xFFFF looked up in `table` (65536 code indices,
// lightning_qlora.ops.reference.encode_lookup_table_8bit); an all-zero block encodes 0.
void quantize_blockwise_8bit(const float* input, int64_t n, int64_t blocksize, const int64_t* table, uint8_t* codes,
                             float* absmax);

// code[codes[i]] * absmax[i / blocksize] in float32.
// output[i] = code[codes[i]] * absmax[i / blocksize] (+ *offset, added after the product is rounded;
// offset may be null): the double-quantized absmax of a 4-bit weight decodes in this one pass.
void dequantize_blockwise_8bit(const uint8_t* codes, const float* absmax, const float* code, int64_t n,
                               int64_t blocksize, const float* offset, float* output);

}  // namespace cpu
}  // namespace lightning_qlora
