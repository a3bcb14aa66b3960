// Per-element logic shared by the CPU (C++) and CUDA kernels: codebook encode/decode,
// the stochastic-rounding random stream and float conversions. Everything here is
// __host__ __device__ and free of torch headers, so nvcc compiles it anywhere and the CPU
// build -- which the tests compare bit for bit with the PyTorch reference -- exercises the
// same code the GPU runs.
#pragma once

#include <stdint.h>

#ifdef __CUDACC__
#define LQ_HD __host__ __device__ __forceinline__
#else
#define LQ_HD inline
#endif

namespace lightning_qlora {

// Smallest absmax used for the reciprocal of an all-zero block (bitsandbytes' floor).
constexpr float kTinyAbsmax = 1e-38f;

// A 16-entry codebook prepared for encoding: values sorted ascending, the float32
// midpoints between neighbours, and the map from sorted position back to the code.
struct Codebook4 {
  float sorted[16];
  float midpoints[15];
  uint8_t order[16];
  float values[16];  // index = code (for decoding)
};

// Host: prepare a codebook from its 16 values (index = code). The sort is stable, so equal
// values keep code order; midpoints are the float32 means of sorted neighbours.
inline Codebook4 make_codebook4(const float* values) {
  Codebook4 book{};
  int order[16];
  for (int i = 0; i < 16; ++i) {
    book.values[i] = values[i];
    int j = i;  // insertion sort: stable, 16 entries
    while (j > 0 && values[order[j - 1]] > values[i]) {
      order[j] = order[j - 1];
      --j;
    }
    order[j] = i;
  }
  for (int i = 0; i < 16; ++i) {
    book.order[i] = static_cast<uint8_t>(order[i]);
    book.sorted[i] = values[order[i]];
  }
  for (int i = 0; i < 15; ++i) book.midpoints[i] = (book.sorted[i] + book.sorted[i + 1]) / 2.0f;
  return book;
}

// Number of midpoints strictly below x (torch.bucketize with right=False).
LQ_HD int bucket_of(const Codebook4& book, float x) {
  int index = 0;
#pragma unroll
  for (int i = 0; i < 15; ++i) index += (book.midpoints[i] < x) ? 1 : 0;
  return index;
}

LQ_HD uint32_t mix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x7FEB352Du;
  h ^= h >> 15;
  h *= 0x5BD1E995u;
  return h ^ (h >> 16);
}

// u_i in [0, 1): the counter-based stream of lightning_qlora.ops.reference.uniform_stream.
LQ_HD float uniform_at(uint64_t seed, uint64_t index) {
  const uint32_t key = static_cast<uint32_t>(seed) * 0x61C88647u;
  const uint32_t high = mix32(static_cast<uint32_t>(index >> 32) + key);
  const uint32_t h = mix32(static_cast<uint32_t>(index) ^ high);
  return static_cast<float>(h >> 8) * (1.0f / 16777216.0f);
}

// Stochastic rounding between the sorted neighbours lo <= x <= hi: up with probability (x-lo)/(hi-lo).
LQ_HD int stochastic_bucket(const Codebook4& book, float x, float u) {
  int lo = -1;
#pragma unroll
  for (int i = 0; i < 16; ++i) lo += (book.sorted[i] <= x) ? 1 : 0;
  lo = lo < 0 ? 0 : (lo > 14 ? 14 : lo);
  float p = (x - book.sorted[lo]) / (book.sorted[lo + 1] - book.sorted[lo]);
  p = p < 0.0f ? 0.0f : (p > 1.0f ? 1.0f : p);
  return lo + ((u < p) ? 1 : 0);
}

// The 4-bit code of flat element `index`: two codes per byte, the even element in the high nibble.
LQ_HD int code_at(const uint8_t* packed, int64_t index) {
  const uint8_t byte = packed[index >> 1];
  return (index & 1) ? (byte & 0x0F) : (byte >> 4);
}

LQ_HD float clamp_unit(float x) { return x < -1.0f ? -1.0f : (x > 1.0f ? 1.0f : x); }

// float -> bfloat16 bits with round-to-nearest-even (NaN stays NaN), as torch's .to(bfloat16).
LQ_HD uint16_t float_to_bf16_bits(float value) {
  union {
    float f;
    uint32_t u;
  } bits = {value};
  if ((bits.u & 0x7F800000u) == 0x7F800000u && (bits.u & 0x007FFFFFu) != 0) return static_cast<uint16_t>((bits.u >> 16) | 0x40u);
  const uint32_t rounding = 0x7FFFu + ((bits.u >> 16) & 1u);
  return static_cast<uint16_t>((bits.u + rounding) >> 16);
}

LQ_HD float bf16_bits_to_float(uint16_t value) {
  union {
    uint32_t u;
    float f;
  } bits = {static_cast<uint32_t>(value) << 16};
  return bits.f;
}

}  // namespace lightning_qlora
