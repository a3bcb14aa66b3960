// Fused dequant-GEMV for a 4-bit weight: each output row decodes its codes in registers and
// multiplies them with up to kMaxFusedRows input rows, so the weight is read once as 4-bit
// codes (8x fewer bytes than fp32) and never materialized.
//
// Rounding: every weight value is code[q] * absmax exactly as dequantize_4bit computes it;
// only the order of the fp32 summation differs from dequantize-then-matmul.
#include "matmul.h"

#include <string.h>

#include <vector>

#include "lightning_qlora/element.h"
#include "parallel.h"

#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace lightning_qlora {
namespace cpu {
namespace {

inline float weight_at(const uint8_t* packed, const float* absmax, const float* codebook, int64_t blocksize,
                       int64_t flat) {
  return codebook[code_at(packed, flat)] * absmax[flat / blocksize];
}

// Portable path: any shape, one output row at a time.
void gemv_rows_scalar(const float* x, int64_t rows, const uint8_t* packed, const float* absmax, const float* codebook,
                      int64_t out_begin, int64_t out_end, int64_t out_features, int64_t in_features,
                      int64_t blocksize, float* y) {
  for (int64_t o = out_begin; o < out_end; ++o) {
    float acc[kMaxFusedRows] = {0.0f};
    for (int64_t k = 0; k < in_features; ++k) {
      const float w = weight_at(packed, absmax, codebook, blocksize, o * in_features + k);
      for (int64_t r = 0; r < rows; ++r) acc[r] += w * x[r * in_features + k];
    }
    for (int64_t r = 0; r < rows; ++r) y[r * out_features + o] = acc[r];
  }
}

#ifdef __AVX512F__
// Chunks of 32 elements = 16 bytes. x is pre-shuffled per chunk into (16 even, 16 odd)
// elements so the high nibbles (even elements) and low nibbles (odd elements) each meet
// their inputs with one aligned load -- no in-register interleave.
template <int Rows>
void gemv_rows_avx512(const float* xs, const uint8_t* packed, const float* absmax, const float* codebook,
                      int64_t out_begin, int64_t out_end, int64_t out_features, int64_t in_features,
                      int64_t blocksize, float* y) {
  const __m512 book = _mm512_loadu_ps(codebook);
  const __m512i low_mask = _mm512_set1_epi32(0x0F);
  for (int64_t o = out_begin; o < out_end; ++o) {
    __m512 acc[Rows];
    for (int r = 0; r < Rows; ++r) acc[r] = _mm512_setzero_ps();
    const int64_t row_start = o * in_features;
    for (int64_t k = 0; k < in_features; k += 32) {
      const int64_t flat = row_start + k;  // a multiple of 32, so the chunk lies in one block
      const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(packed + flat / 2)));
      const __m512 scale = _mm512_set1_ps(absmax[flat / blocksize]);
      const __m512 even = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), book), scale);
      const __m512 odd = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_and_si512(bytes, low_mask), book), scale);
      for (int r = 0; r < Rows; ++r) {
        const float* xr = xs + r * in_features + k;
        acc[r] = _mm512_fmadd_ps(even, _mm512_loadu_ps(xr), acc[r]);
        acc[r] = _mm512_fmadd_ps(odd, _mm512_loadu_ps(xr + 16), acc[r]);
      }
    }
    for (int r = 0; r < Rows; ++r) y[r * out_features + o] = _mm512_reduce_add_ps(acc[r]);
  }
}

using Avx512Rows = void (*)(const float*, const uint8_t*, const float*, const float*, int64_t, int64_t, int64_t,
                            int64_t, int64_t, float*);
constexpr Avx512Rows kAvx512ByRows[kMaxFusedRows + 1] = {
    nullptr, gemv_rows_avx512<1>, gemv_rows_avx512<2>, gemv_rows_avx512<3>, gemv_rows_avx512<4>,
    gemv_rows_avx512<5>, gemv_rows_avx512<6>, gemv_rows_avx512<7>, gemv_rows_avx512<8>};
#endif

// Output rows per chunk: ~64K weight elements (32 KB of codes), 256 chunks for 4096x4096.
inline int64_t rows_per_chunk(int64_t in_features) { return in_features >= 65536 ? 1 : 65536 / in_features; }

LoopSite gemv_site, weight_tile_site;

}  // namespace

void gemv_4bit(const float* x, int64_t rows, const uint8_t* packed, const float* absmax, const float* codebook,
               int64_t out_features, int64_t in_features, int64_t blocksize, float* y) {
  if (rows <= 0 || out_features <= 0) return;
  if (in_features == 0) {
    memset(y, 0, sizeof(float) * rows * out_features);
    return;
  }
#ifdef __AVX512F__
  // Block sizes are multiples of 32, so 32-aligned chunks never straddle a block.
  if (in_features % 32 == 0 && blocksize % 32 == 0) {
    std::vector<float> shuffled(rows * in_features);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t k = 0; k < in_features; k += 32)
        for (int j = 0; j < 16; ++j) {
          shuffled[r * in_features + k + j] = x[r * in_features + k + 2 * j];
          shuffled[r * in_features + k + 16 + j] = x[r * in_features + k + 2 * j + 1];
        }
    const Avx512Rows kernel = kAvx512ByRows[rows];
    // Dynamic chunks: if one core is busy with another process, the other takes over its rows.
    parallel_for(gemv_site, out_features, rows_per_chunk(in_features), [&](int64_t begin, int64_t end) {
      kernel(shuffled.data(), packed, absmax, codebook, begin, end, out_features, in_features, blocksize, y);
    });
    return;
  }
#endif
  parallel_for(gemv_site, out_features, rows_per_chunk(in_features), [&](int64_t begin, int64_t end) {
    gemv_rows_scalar(x, rows, packed, absmax, codebook, begin, end, out_features, in_features, blocksize, y);
  });
}

void dequantize_range_4bit(const uint8_t* packed, const float* absmax, const float* codebook, int64_t blocksize,
                           int64_t start, int64_t count, float* out) {
  const int64_t end = start + count;
  const int64_t first_block = start / blocksize;
  const int64_t last_block = (end + blocksize - 1) / blocksize;
  const int64_t grain = blocksize >= 32768 ? 1 : 32768 / blocksize;
  parallel_for(weight_tile_site, last_block - first_block, grain, [&](int64_t chunk_begin, int64_t chunk_end) {
    for (int64_t block = first_block + chunk_begin; block < first_block + chunk_end; ++block) {
      const int64_t begin = block * blocksize > start ? block * blocksize : start;
      const int64_t stop = (block + 1) * blocksize < end ? (block + 1) * blocksize : end;
      const float scale = absmax[block];
      for (int64_t i = begin; i < stop; ++i) {
        const int shift = (i & 1) ? 0 : 4;  // the even element sits in the high nibble
        out[i - start] = codebook[(packed[i >> 1] >> shift) & 0x0F] * scale;
      }
    }
  });
}

}  // namespace cpu
}  // namespace lightning_qlora
