// Products with a 4-bit weight on raw pointers (no torch headers): the bindings validate,
// convert inputs to float32 and pick the path.
#pragma once

#include <stdint.h>

namespace lightning_qlora {
namespace cpu {

// Rows the fused GEMV handles in registers per pass over the codes.
constexpr int64_t kMaxFusedRows = 8;

// Largest batch linear_4bit multiplies with the fused kernel (in passes of kMaxFusedRows rows);
// bigger batches use tiled dequantize + GEMM. Measured with python -m lightning_qlora.bench
// kernels (the crossover table): the fused kernel won at every batch up to 100 rows on SmolLM2's
// and 4096x4096 shapes on the busy 2-core dev box; 64 leaves a margin for MKL's GEMM, whose
// advantage grows with the batch on an idle machine. Keep in sync with quantization/linear.py.
constexpr int64_t kFusedBatchLimit = 64;

// y[r, o] = sum_k x[r, k] * W[o, k] for r < rows <= kMaxFusedRows, W of shape (out, in) stored
// as 4-bit codes over the FLAT weight (codebook[q] * absmax[flat / blocksize]); W is decoded in
// registers and never written to memory.
void gemv_4bit(const float* x, int64_t rows, const uint8_t* packed, const float* absmax, const float* codebook,
               int64_t out_features, int64_t in_features, int64_t blocksize, float* y);

// Float32 values of flat weight elements [start, start + count) (any start, even mid-byte):
// the tile that the GEMM path multiplies with a BLAS call.
void dequantize_range_4bit(const uint8_t* packed, const float* absmax, const float* codebook, int64_t blocksize,
                           int64_t start, int64_t count, float* out);

// y[r, o] = sum_k x[r, k] * W[o, k] for r < rows <= kMaxFusedRows, W of shape (out, in) in a
// compact exact form (serving's lm_head): 8-bit integers with one fp32 scale per `blocksize`
// consecutive elements of the flat weight (W = codes * scale, a GGUF Q8_0 tensor as stored), or
// bf16 values widened to fp32. Bandwidth-bound: 4x / 2x fewer bytes than fp32 per decode step.
void gemv_int8(const float* x, int64_t rows, const int8_t* codes, const float* scales, int64_t out_features,
               int64_t in_features, int64_t blocksize, float* y);
void gemv_bf16(const float* x, int64_t rows, const uint16_t* weight, int64_t out_features, int64_t in_features,
               float* y);

}  // namespace cpu
}  // namespace lightning_qlora
