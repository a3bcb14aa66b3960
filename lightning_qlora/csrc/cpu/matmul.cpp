// Fused dequant-GEMV for a 4-bit weight: each output row decodes its codes in registers and
// multiplies them with up to kMaxFusedRows input rows, so the weight is read once as 4-bit
// codes (8x fewer bytes than fp32) and never materialized.
//
// Rounding: every weight value is code[q] * absmax exactly as dequantize_4bit computes it;
// only the order of the fp32 summation differs from dequantize-then-matmul.
#include "matmul.h"

#include <string.h>

#include <algorithm>

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
//
// Independent accumulators: an FMA waits ~4 cycles for the one before it on the same register,
// so one accumulator per input row capped a batch-1 GEMV at one chunk per ~8 cycles. Even and
// odd elements accumulate apart, and with one or two input rows two chunks run side by side
// (four chains per row); the partial sums are added at the end of the output row.
inline void decode_chunk(const uint8_t* codes, __m512 scaled, __m512i low_mask, __m512& even, __m512& odd) {
  const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes)));
  even = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), scaled);
  odd = _mm512_permutexvar_ps(_mm512_and_si512(bytes, low_mask), scaled);
}

template <int Rows>
void gemv_rows_avx512(const float* xs, const uint8_t* packed, const float* absmax, const float* codebook,
                      int64_t out_begin, int64_t out_end, int64_t out_features, int64_t in_features,
                      int64_t blocksize, float* y) {
  constexpr int kChains = Rows <= 2 ? 4 : 2;  // accumulators per input row
  const __m512 book = _mm512_loadu_ps(codebook);
  const __m512i low_mask = _mm512_set1_epi32(0x0F);
  for (int64_t o = out_begin; o < out_end; ++o) {
    __m512 acc[Rows][kChains];
    for (int r = 0; r < Rows; ++r)
      for (int c = 0; c < kChains; ++c) acc[r][c] = _mm512_setzero_ps();
    const int64_t row_start = o * in_features;
    // Blocks in order along the row: the codebook is scaled once per block (the same products
    // code[q] * absmax as dequantize_4bit), and no division runs in the inner loop. A block may
    // straddle two rows when in_features is not a multiple of blocksize: then `block` starts at
    // the one holding the row's first element and `block_end` is that block's end in this row.
    int64_t block = row_start / blocksize;
    int64_t k = 0;
    while (k < in_features) {
      const int64_t block_end = std::min(in_features, (block + 1) * blocksize - row_start);
      const __m512 scaled = _mm512_mul_ps(book, _mm512_set1_ps(absmax[block]));
      if constexpr (kChains == 4) {
        for (; k + 64 <= block_end; k += 64) {  // two chunks of the block at once
          __m512 even0, odd0, even1, odd1;
          decode_chunk(packed + (row_start + k) / 2, scaled, low_mask, even0, odd0);
          decode_chunk(packed + (row_start + k + 32) / 2, scaled, low_mask, even1, odd1);
          for (int r = 0; r < Rows; ++r) {
            const float* xr = xs + r * in_features + k;
            acc[r][0] = _mm512_fmadd_ps(even0, _mm512_loadu_ps(xr), acc[r][0]);
            acc[r][1] = _mm512_fmadd_ps(odd0, _mm512_loadu_ps(xr + 16), acc[r][1]);
            acc[r][2] = _mm512_fmadd_ps(even1, _mm512_loadu_ps(xr + 32), acc[r][2]);
            acc[r][3] = _mm512_fmadd_ps(odd1, _mm512_loadu_ps(xr + 48), acc[r][3]);
          }
        }
      }
      for (; k < block_end; k += 32) {  // k and block_end are multiples of 32: a chunk lies in one block
        __m512 even, odd;
        decode_chunk(packed + (row_start + k) / 2, scaled, low_mask, even, odd);
        for (int r = 0; r < Rows; ++r) {
          const float* xr = xs + r * in_features + k;
          acc[r][0] = _mm512_fmadd_ps(even, _mm512_loadu_ps(xr), acc[r][0]);
          acc[r][1] = _mm512_fmadd_ps(odd, _mm512_loadu_ps(xr + 16), acc[r][1]);
        }
      }
      ++block;
    }
    for (int r = 0; r < Rows; ++r) {
      __m512 sum = _mm512_add_ps(acc[r][0], acc[r][1]);
      if constexpr (kChains == 4) sum = _mm512_add_ps(sum, _mm512_add_ps(acc[r][2], acc[r][3]));
      y[r * out_features + o] = _mm512_reduce_add_ps(sum);
    }
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
    parallel_for(
        gemv_site, out_features, rows_per_chunk(in_features),
        [&](int64_t begin, int64_t end) {
          kernel(shuffled.data(), packed, absmax, codebook, begin, end, out_features, in_features, blocksize, y);
        },
        rows);
    return;
  }
#endif
  parallel_for(
      gemv_site, out_features, rows_per_chunk(in_features),
      [&](int64_t begin, int64_t end) {
        gemv_rows_scalar(x, rows, packed, absmax, codebook, begin, end, out_features, in_features, blocksize, y);
      },
      rows);
}

namespace {

// Weight sources for the compact GEMV: element k of output row o as fp32, scalar and 16 at a time.
struct Int8Weight {
  const int8_t* codes;
  const float* scales;
  int64_t blocksize;
  float at(int64_t flat) const { return static_cast<float>(codes[flat]) * scales[flat / blocksize]; }
#ifdef __AVX512F__
  // 16 values from flat (a multiple of 16) on, all in the block whose scale is `scale`.
  __m512 sixteen(int64_t flat, __m512 scale) const {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + flat));
    return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(raw)), scale);
  }
  int64_t block_size() const { return blocksize; }
  __m512 block_scale(int64_t block) const { return _mm512_set1_ps(scales[block]); }
#endif
};

struct Bf16Weight {
  const uint16_t* bits;
  float at(int64_t flat) const {
    const uint32_t wide = static_cast<uint32_t>(bits[flat]) << 16;
    float value;
    memcpy(&value, &wide, sizeof(value));
    return value;
  }
#ifdef __AVX512F__
  __m512 sixteen(int64_t flat, __m512) const {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bits + flat));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
  }
  int64_t block_size() const { return int64_t{1} << 62; }  // no blocks: one "block" per row
  __m512 block_scale(int64_t) const { return _mm512_set1_ps(1.0f); }
#endif
};

template <typename Weight>
void compact_rows_scalar(const Weight& w, const float* x, int64_t rows, int64_t out_begin, int64_t out_end,
                         int64_t out_features, int64_t in_features, float* y) {
  for (int64_t o = out_begin; o < out_end; ++o) {
    float acc[kMaxFusedRows] = {0.0f};
    for (int64_t k = 0; k < in_features; ++k) {
      const float value = w.at(o * in_features + k);
      for (int64_t r = 0; r < rows; ++r) acc[r] += value * x[r * in_features + k];
    }
    for (int64_t r = 0; r < rows; ++r) y[r * out_features + o] = acc[r];
  }
}

#ifdef __AVX512F__
// kChains independent accumulators per input row for few rows (see gemv_rows_avx512): chunks of a
// block go to them in turn, and the partial sums are added at the end of the output row.
template <typename Weight, int Rows>
void compact_rows_avx512(const Weight& w, const float* x, int64_t out_begin, int64_t out_end, int64_t out_features,
                         int64_t in_features, float* y) {
  constexpr int kChains = Rows <= 2 ? 4 : (Rows <= 4 ? 2 : 1);
  for (int64_t o = out_begin; o < out_end; ++o) {
    __m512 acc[Rows][kChains];
    for (int r = 0; r < Rows; ++r)
      for (int c = 0; c < kChains; ++c) acc[r][c] = _mm512_setzero_ps();
    // Blocks in order along the row (one scale load per block, no division in the loop).
    const int64_t row_start = o * in_features, blocksize = w.block_size();
    int64_t block = row_start / blocksize;
    int64_t k = 0;
    while (k < in_features) {
      const int64_t block_end = std::min(in_features, (block + 1) * blocksize - row_start);
      const __m512 scale = w.block_scale(block);
      for (; k + 16 * kChains <= block_end; k += 16 * kChains) {
        for (int c = 0; c < kChains; ++c) {
          const __m512 values = w.sixteen(row_start + k + 16 * c, scale);
          for (int r = 0; r < Rows; ++r)
            acc[r][c] = _mm512_fmadd_ps(values, _mm512_loadu_ps(x + r * in_features + k + 16 * c), acc[r][c]);
        }
      }
      for (; k < block_end; k += 16) {
        const __m512 values = w.sixteen(row_start + k, scale);
        for (int r = 0; r < Rows; ++r)
          acc[r][0] = _mm512_fmadd_ps(values, _mm512_loadu_ps(x + r * in_features + k), acc[r][0]);
      }
      ++block;
    }
    for (int r = 0; r < Rows; ++r) {
      __m512 sum = acc[r][0];
      for (int c = 1; c < kChains; ++c) sum = _mm512_add_ps(sum, acc[r][c]);
      y[r * out_features + o] = _mm512_reduce_add_ps(sum);
    }
  }
}

template <typename Weight>
void compact_rows_avx512_any(const Weight& w, const float* x, int64_t rows, int64_t out_begin, int64_t out_end,
                             int64_t out_features, int64_t in_features, float* y) {
  switch (rows) {
#define LQ_ROWS(n) \
  case n:          \
    return compact_rows_avx512<Weight, n>(w, x, out_begin, out_end, out_features, in_features, y);
    LQ_ROWS(1) LQ_ROWS(2) LQ_ROWS(3) LQ_ROWS(4) LQ_ROWS(5) LQ_ROWS(6) LQ_ROWS(7) LQ_ROWS(8)
#undef LQ_ROWS
    default:
      return compact_rows_scalar(w, x, rows, out_begin, out_end, out_features, in_features, y);
  }
}
#endif

LoopSite int8_gemv_site, bf16_gemv_site;

template <typename Weight>
void compact_gemv(LoopSite& site, const Weight& w, bool vector_shapes, const float* x, int64_t rows,
                  int64_t out_features, int64_t in_features, float* y) {
  if (rows <= 0 || out_features <= 0) return;
  if (in_features == 0) {
    memset(y, 0, sizeof(float) * rows * out_features);
    return;
  }
#ifdef __AVX512F__
  if (vector_shapes && in_features % 16 == 0) {
    parallel_for(
        site, out_features, rows_per_chunk(in_features),
        [&](int64_t begin, int64_t end) { compact_rows_avx512_any(w, x, rows, begin, end, out_features, in_features, y); },
        rows);
    return;
  }
#else
  (void)vector_shapes;
#endif
  parallel_for(
      site, out_features, rows_per_chunk(in_features),
      [&](int64_t begin, int64_t end) { compact_rows_scalar(w, x, rows, begin, end, out_features, in_features, y); },
      rows);
}

}  // namespace

void gemv_int8(const float* x, int64_t rows, const int8_t* codes, const float* scales, int64_t out_features,
               int64_t in_features, int64_t blocksize, float* y) {
  compact_gemv(int8_gemv_site, Int8Weight{codes, scales, blocksize}, blocksize % 16 == 0, x, rows, out_features,
               in_features, y);
}

void gemv_bf16(const float* x, int64_t rows, const uint16_t* weight, int64_t out_features, int64_t in_features,
               float* y) {
  compact_gemv(bf16_gemv_site, Bf16Weight{weight}, true, x, rows, out_features, in_features, y);
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
