// Blockwise 4-bit quantize/dequantize on the CPU: OpenMP across blocks, a scalar inner loop
// the compiler vectorizes (IEEE operations only, no fast-math, so results are bit-identical
// to the PyTorch reference kernels).
#include "kernels.h"

#include <cmath>

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

template <FloatType T>
void quantize_block(const void* input, int64_t start, int64_t end, int64_t blocksize, const Codebook4& book,
                    bool stochastic, uint64_t seed, uint8_t* packed, float* absmax_out) {
  float maximum = 0.0f;
  bool has_nan = false;
  for (int64_t i = start; i < end; ++i) {
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

template <FloatType T>
void quantize_all(const void* input, int64_t n, const Codebook4& book, int64_t blocksize, bool stochastic,
                  uint64_t seed, uint8_t* packed, float* absmax) {
  const int64_t blocks = (n + blocksize - 1) / blocksize;
#pragma omp parallel for schedule(static)
  for (int64_t block = 0; block < blocks; ++block) {
    const int64_t start = block * blocksize;
    const int64_t end = start + blocksize < n ? start + blocksize : n;
    quantize_block<T>(input, start, end, blocksize, book, stochastic, seed, packed, absmax + block);
  }
}

template <FloatType T>
void dequantize_all(const uint8_t* packed, const float* absmax, const float* codebook, int64_t n, int64_t blocksize,
                    void* output) {
  const int64_t blocks = (n + blocksize - 1) / blocksize;
#pragma omp parallel for schedule(static)
  for (int64_t block = 0; block < blocks; ++block) {
    const int64_t start = block * blocksize;
    const int64_t end = start + blocksize < n ? start + blocksize : n;
    const float scale = absmax[block];
    // Blocks start at even indices (block sizes are even), so bytes never straddle blocks.
    const int64_t pairs_end = start + ((end - start) & ~int64_t{1});
    for (int64_t i = start; i < pairs_end; i += 2) {
      const uint8_t byte = packed[i >> 1];
      store<T>(output, i, codebook[byte >> 4] * scale);
      store<T>(output, i + 1, codebook[byte & 0x0F] * scale);
    }
    if (pairs_end < end) store<T>(output, pairs_end, codebook[packed[pairs_end >> 1] >> 4] * scale);
  }
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

}  // namespace cpu
}  // namespace lightning_qlora
