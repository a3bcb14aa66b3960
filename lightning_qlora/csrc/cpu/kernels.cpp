// Blockwise 4-bit quantize/dequantize on the CPU: chunks of blocks spread over threads
// (parallel.h: dynamic assignment, no spinning), an AVX-512 or scalar inner loop the compiler vectorizes (IEEE operations only, no fast-math, so results are bit-identical
// to the PyTorch reference kernels).
#include "kernels.h"

#include <cmath>

#include "parallel.h"

#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace lightning_qlora {
namespace cpu {
namespace {

template <FloatType T>
inline float load(const void* data, int64_t i) {
  if constexpr (T == FloatType::kFloat16) return static_cast<float>(static_cast<const _Float16*>(data)[i]);
  if constexpr (T == FloatType::kBFloat16) return bf16_bits_to_float(static_cast<const uint16_t*>(data)[i]);
  if constexpr (T == FloatType::kFloat32) return static_cast<const float*>(data)[i];
}

template <FloatType T>
inline void store(void* data, int64_t i, float value) {
  if constexpr (T == FloatType::kFloat16) static_cast<_Float16*>(data)[i] = static_cast<_Float16>(value);
  if constexpr (T == FloatType::kBFloat16) static_cast<uint16_t*>(data)[i] = float_to_bf16_bits(value);
  if constexpr (T == FloatType::kFloat32) static_cast<float*>(data)[i] = value;
}

inline uint8_t encode(const Codebook4& book, float scaled, bool stochastic, uint64_t seed, int64_t index) {
  const int sorted_index =
      stochastic ? stochastic_bucket(book, scaled, uniform_at(seed, static_cast<uint64_t>(index))) : bucket_of(book, scaled);
  return book.order[sorted_index];
}

#ifdef __AVX512F__
template <FloatType T>
inline __m512 load16(const void* data, int64_t i) {
  if constexpr (T == FloatType::kFloat32) return _mm512_loadu_ps(static_cast<const float*>(data) + i);
  if constexpr (T == FloatType::kFloat16)  // exact widening
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(data) + i)));
  if constexpr (T == FloatType::kBFloat16) {
    const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(data) + i));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
  }
}

// Nearest-code encoding of a full block, 32 elements per step. The count of midpoints below x
// (bucket_of) is a branch-free binary search over the 15 sorted midpoints padded with +inf:
// 4 permute+compare steps instead of 15 compares. x * (1/absmax) and the clamp are the same
// IEEE operations as the scalar path, so the codes are identical.
template <FloatType T>
void encode_full_block_avx512(const void* input, int64_t start, int64_t count, float scale, const Codebook4& book,
                              uint8_t* packed) {
  alignas(64) float padded_midpoints[16];
  alignas(64) int32_t order[16];
  for (int i = 0; i < 15; ++i) padded_midpoints[i] = book.midpoints[i];
  padded_midpoints[15] = INFINITY;
  for (int i = 0; i < 16; ++i) order[i] = book.order[i];
  const __m512 midpoints = _mm512_load_ps(padded_midpoints);
  const __m512i codes_by_rank = _mm512_load_si512(order);
  const __m512 factor = _mm512_set1_ps(scale), one = _mm512_set1_ps(1.0f), minus_one = _mm512_set1_ps(-1.0f);
  const __m512i evens = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i odds = _mm512_add_epi32(evens, _mm512_set1_epi32(1));
  auto encode16 = [&](__m512 x) {
    const __m512 scaled = _mm512_max_ps(_mm512_min_ps(_mm512_mul_ps(x, factor), one), minus_one);
    __m512i rank = _mm512_setzero_si512();
    for (int step = 8; step >= 1; step >>= 1) {
      const __m512i probe = _mm512_add_epi32(rank, _mm512_set1_epi32(step - 1));
      const __mmask16 below = _mm512_cmp_ps_mask(_mm512_permutexvar_ps(probe, midpoints), scaled, _CMP_LT_OQ);
      rank = _mm512_mask_add_epi32(rank, below, rank, _mm512_set1_epi32(step));
    }
    return _mm512_permutexvar_epi32(rank, codes_by_rank);
  };
  for (int64_t j = 0; j < count; j += 32) {
    const __m512i first = encode16(load16<T>(input, start + j));
    const __m512i second = encode16(load16<T>(input, start + j + 16));
    const __m512i high = _mm512_permutex2var_epi32(first, evens, second);
    const __m512i low = _mm512_permutex2var_epi32(first, odds, second);
    const __m512i bytes = _mm512_or_si512(_mm512_slli_epi32(high, 4), low);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(packed + (start + j) / 2), _mm512_cvtepi32_epi8(bytes));
  }
}
#endif

template <FloatType T>
void quantize_block(const void* input, int64_t start, int64_t end, int64_t blocksize, const Codebook4& book,
                    bool stochastic, uint64_t seed, uint8_t* packed, float* absmax_out) {
  float maximum = 0.0f;
  bool has_nan = false;
  int64_t i = start;
#ifdef __AVX512F__
  // 16 at a time (the compiler keeps a float max reduction scalar: its NaN order is not maxps's).
  // The same maximum for finite and infinite values; any NaN marks the block, as below.
  __m512 largest = _mm512_setzero_ps();
  __mmask16 nan_lanes = 0;
  for (; i + 16 <= end; i += 16) {
    const __m512 magnitude = _mm512_abs_ps(load16<T>(input, i));
    nan_lanes |= _mm512_cmp_ps_mask(magnitude, magnitude, _CMP_UNORD_Q);
    largest = _mm512_max_ps(largest, magnitude);
  }
  has_nan = nan_lanes != 0;
  maximum = _mm512_reduce_max_ps(largest);
#endif
  for (; i < end; ++i) {
    const float magnitude = std::fabs(load<T>(input, i));
    has_nan |= magnitude != magnitude;
    maximum = magnitude > maximum ? magnitude : maximum;
  }
  if (has_nan) maximum = NAN;  // torch's amax propagates NaN; keep the block visibly broken
  const bool partial = end - start < blocksize;
  // Full blocks scale by a reciprocal, the partial last block divides (bitsandbytes' exact arithmetic).
  const float floor_max = maximum > kTinyAbsmax ? maximum : kTinyAbsmax;
  const float scale = partial ? floor_max : 1.0f / floor_max;
  *absmax_out = partial ? (has_nan ? maximum : floor_max) : maximum;
#ifdef __AVX512F__
  // Full blocks are multiples of 32 elements (block sizes are powers of two >= 32).
  if (!stochastic && !has_nan && !partial && blocksize % 32 == 0) {
    encode_full_block_avx512<T>(input, start, end - start, scale, book, packed);
    return;
  }
#endif
  if (!stochastic && !has_nan) {
    // Nearest rounding: scale and bucket the block in two vectorizable passes, then pack.
    float scaled[4096 + 1];
    uint8_t buckets[4096 + 1];
    const int64_t count = end - start;
    for (int64_t j = 0; j < count; ++j) {
      const float x = load<T>(input, start + j);
      scaled[j] = clamp_unit(partial ? x / scale : x * scale);
    }
    if (count & 1) scaled[count] = 0.0f;  // odd numel: the pad encodes 0.0
    const int64_t padded = count + (count & 1);
    for (int64_t j = 0; j < padded; ++j) buckets[j] = static_cast<uint8_t>(bucket_of(book, scaled[j]));
    for (int64_t j = 0; j < padded; j += 2)
      packed[(start + j) / 2] = static_cast<uint8_t>((book.order[buckets[j]] << 4) | book.order[buckets[j + 1]]);
    return;
  }
  for (int64_t i = start; i < end; i += 2) {
    const float x0 = load<T>(input, i);
    const float first = has_nan ? NAN : clamp_unit(partial ? x0 / scale : x0 * scale);
    uint8_t low;
    if (i + 1 < end) {
      const float x1 = load<T>(input, i + 1);
      const float second = has_nan ? NAN : clamp_unit(partial ? x1 / scale : x1 * scale);
      low = encode(book, second, stochastic, seed, i + 1);
    } else {
      low = encode(book, 0.0f, stochastic, seed, i + 1);  // odd numel: the pad encodes 0.0
    }
    packed[i / 2] = static_cast<uint8_t>((encode(book, first, stochastic, seed, i) << 4) | low);
  }
}

// 32K elements per chunk: 512 chunks for a 4096x4096 weight, each long enough that claiming
// it costs nothing, short enough that a helper preempted mid-chunk delays the call little.
inline int64_t blocks_per_chunk(int64_t blocksize) { return blocksize >= 32768 ? 1 : 32768 / blocksize; }

LoopSite quantize_site, dequantize_site, quantize_8bit_site, dequantize_8bit_site;

// body(block, start, end) for every block of n elements (the last may be partial), `per_chunk` blocks per chunk.
// `variant`: what else sets a chunk's cost at this site (the element type), see parallel_for.
template <typename Body>
void for_each_block(LoopSite& site, int64_t n, int64_t blocksize, int64_t per_chunk, const Body& body,
                    int64_t variant = 0) {
  const int64_t blocks = (n + blocksize - 1) / blocksize;
  parallel_for(
      site, blocks, per_chunk,
      [&](int64_t first, int64_t last) {
        for (int64_t block = first; block < last; ++block) {
          const int64_t start = block * blocksize;
          body(block, start, start + blocksize < n ? start + blocksize : n);
        }
      },
      variant);
}

template <FloatType T>
void quantize_all(const void* input, int64_t n, const Codebook4& book, int64_t blocksize, bool stochastic,
                  uint64_t seed, uint8_t* packed, float* absmax) {
  for_each_block(
      quantize_site, n, blocksize, blocks_per_chunk(blocksize),
      [&](int64_t block, int64_t start, int64_t end) {
        quantize_block<T>(input, start, end, blocksize, book, stochastic, seed, packed, absmax + block);
      },
      2 * static_cast<int64_t>(T) + (stochastic ? 1 : 0));
}

#ifdef __AVX512F__
// 32 elements (16 bytes) per step: the codebook lives in one register and vpermps looks the
// codes up; high nibbles are the even elements, so two permutes re-interleave them.
template <FloatType T>
inline void store16(void* data, int64_t i, __m512 values) {
  if constexpr (T == FloatType::kFloat32) _mm512_storeu_ps(static_cast<float*>(data) + i, values);
  if constexpr (T == FloatType::kFloat16)  // vcvtps2ph rounds to nearest even, as torch's .to(float16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<_Float16*>(data) + i),
                        _mm512_cvtps_ph(values, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  if constexpr (T == FloatType::kBFloat16) {
    // Round to nearest even on the bit pattern (float_to_bf16_bits); NaN payloads may become
    // inf here, which still dequantizes a NaN block to non-finite values.
    const __m512i bits = _mm512_castps_si512(values);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(data) + i),
                        _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16)));
  }
}

template <FloatType T>
inline int64_t dequantize_block_avx512(const uint8_t* packed, const __m512 book, float absmax, int64_t start,
                                       int64_t end, void* output) {
  const __m512 scale = _mm512_set1_ps(absmax);
  const __m512i low_mask = _mm512_set1_epi32(0x0F);
  const __m512i first_half = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i second_half = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
  int64_t i = start;
  for (; i + 32 <= end; i += 32) {
    const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(packed + i / 2)));
    const __m512 even = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), book), scale);
    const __m512 odd = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_and_si512(bytes, low_mask), book), scale);
    store16<T>(output, i, _mm512_permutex2var_ps(even, first_half, odd));
    store16<T>(output, i + 16, _mm512_permutex2var_ps(even, second_half, odd));
  }
  return i;  // the scalar loop finishes a partial last block
}
#endif

template <FloatType T>
void dequantize_all(const uint8_t* packed, const float* absmax, const float* codebook, int64_t n, int64_t blocksize,
                    void* output) {
  for_each_block(
      dequantize_site, n, blocksize, blocks_per_chunk(blocksize),
      [&](int64_t block, int64_t start, int64_t end) {
        const float scale = absmax[block];
        // Blocks start at even indices (block sizes are even), so bytes never straddle blocks.
        const int64_t pairs_end = start + ((end - start) & ~int64_t{1});
        int64_t first = start;
#ifdef __AVX512F__
        first = dequantize_block_avx512<T>(packed, _mm512_loadu_ps(codebook), scale, start, pairs_end, output);
#endif
        for (int64_t i = first; i < pairs_end; i += 2) {
          const uint8_t byte = packed[i >> 1];
          store<T>(output, i, codebook[byte >> 4] * scale);
          store<T>(output, i + 1, codebook[byte & 0x0F] * scale);
        }
        if (pairs_end < end) store<T>(output, pairs_end, codebook[packed[pairs_end >> 1] >> 4] * scale);
      },
      static_cast<int64_t>(T));
}

}  // namespace

void quantize_4bit(const void* input, FloatType type, int64_t n, const Codebook4& book, int64_t blocksize,
                   bool stochastic, uint64_t seed, uint8_t* packed, float* absmax) {
  switch (type) {
    case FloatType::kFloat16:
      return quantize_all<FloatType::kFloat16>(input, n, book, blocksize, stochastic, seed, packed, absmax);
    case FloatType::kBFloat16:
      return quantize_all<FloatType::kBFloat16>(input, n, book, blocksize, stochastic, seed, packed, absmax);
    default:
      return quantize_all<FloatType::kFloat32>(input, n, book, blocksize, stochastic, seed, packed, absmax);
  }
}

void dequantize_4bit(const uint8_t* packed, const float* absmax, const float* codebook, int64_t n,
                     int64_t blocksize, FloatType type, void* output) {
  switch (type) {
    case FloatType::kFloat16:
      return dequantize_all<FloatType::kFloat16>(packed, absmax, codebook, n, blocksize, output);
    case FloatType::kBFloat16:
      return dequantize_all<FloatType::kBFloat16>(packed, absmax, codebook, n, blocksize, output);
    default:
      return dequantize_all<FloatType::kFloat32>(packed, absmax, codebook, n, blocksize, output);
  }
}

// The 8-bit ops code absmax constants (1/64 of a weight: 262K values for 4096x4096, well under
// a millisecond on one core), so chunks are 1M values: one thread unless the input is huge. A
// parallel region for such short work risks waiting a whole timeslice for a descheduled thread.
inline int64_t small_8bit_chunk(int64_t blocksize) { return blocksize >= (1 << 20) ? 1 : (1 << 20) / blocksize; }

void quantize_blockwise_8bit(const float* input, int64_t n, int64_t blocksize, const int64_t* table, uint8_t* codes,
                             float* absmax) {
  for_each_block(quantize_8bit_site, n, blocksize, small_8bit_chunk(blocksize), [&](int64_t block, int64_t start, int64_t end) {
    float maximum = 0.0f;
    bool has_nan = false;
    for (int64_t i = start; i < end; ++i) {
      const float magnitude = std::fabs(input[i]);
      has_nan |= magnitude != magnitude;
      maximum = magnitude > maximum ? magnitude : maximum;
    }
    if (has_nan) maximum = NAN;
    absmax[block] = maximum;
    // The reference's where(absmax > 0, 1 / absmax, 0): a NaN block scales by 0 as well.
    const float inverse = maximum > 0.0f ? 1.0f / maximum : 0.0f;
    for (int64_t i = start; i < end; ++i) {
      if (maximum == 0.0f) {
        codes[i] = 0;
        continue;
      }
      float scaled = input[i] * inverse;
      scaled = scaled < -1.0f ? -1.0f : (scaled > 1.0f ? 1.0f : scaled);  // keeps NaN, as torch.clamp
      const float half = (scaled + 1.0f) * 0.5f;
      // One rounding of the exact product-plus-half, as the reference's float64 detour (an FMA).
      const float fused = static_cast<float>(static_cast<double>(half) * 65535.0 + 0.5);
      // x86 truncation of NaN gives INT64_MIN, whose low 16 bits are 0 (what torch computes).
      const int64_t grid = fused == fused ? static_cast<int64_t>(fused) & 0xFFFF : 0;
      codes[i] = static_cast<uint8_t>(table[grid]);
    }
  });
}

void dequantize_blockwise_8bit(const uint8_t* codes, const float* absmax, const float* code, int64_t n,
                               int64_t blocksize, const float* offset, float* output) {
  // Block by block (no division per element): decoding a 4096x4096 weight's 262k double-quantized
  // absmax took 0.65 ms with a division and a separate torch add for the offset, as long as the
  // batch-1 GEMV it feeds; the add's own thread team also stalled on a busy machine (issue 18).
  // The product is rounded before the offset is added (two roundings, -ffp-contract=off), as
  // bitsandbytes' dequantize-then-add.
  const float shift = offset != nullptr ? *offset : 0.0f;
  for_each_block(dequantize_8bit_site, n, blocksize, small_8bit_chunk(blocksize),
                 [&](int64_t block, int64_t start, int64_t end) {
                   const float scale = absmax[block];
                   int64_t i = start;
#ifdef __AVX512F__
                   // 16 codes per step: widen, look the values up in the 256-entry table (gather), scale.
                   const __m512 scales = _mm512_set1_ps(scale), shifts = _mm512_set1_ps(shift);
                   for (; i + 16 <= end; i += 16) {
                     const __m512i index = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + i)));
                     __m512 value = _mm512_mul_ps(_mm512_i32gather_ps(index, code, 4), scales);
                     if (offset != nullptr) value = _mm512_add_ps(value, shifts);
                     _mm512_storeu_ps(output + i, value);
                   }
                   start = i;
#endif
                   if (offset == nullptr) {
                     for (int64_t i = start; i < end; ++i) output[i] = code[codes[i]] * scale;
                   } else {
                     for (int64_t i = start; i < end; ++i) output[i] = code[codes[i]] * scale + shift;
                   }
                 });
}

}  // namespace cpu
}  // namespace lightning_qlora
