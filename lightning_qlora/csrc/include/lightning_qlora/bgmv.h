// Batched gather matrix-vector products for heterogeneous LoRA (BGMV, as punica / S-LoRA):
// row b of a batch uses adapter slot s = indices[b] (-1: no adapter), whose rank-r factors
// live as rows of one flat float32 page pool:
//
//   A_s row j (length in)   at pool[a_rows[s * max_rank + j] ...]     (lora_A[j, :])
//   B_s^T row j (length out) at pool[b_rows[s * max_rank + j] ...]    (lora_B[:, j])
//   y[b, :] = scales[s] * sum_{j < ranks[s]} (x[b, :] . A_s[j, :]) * B_s^T[j, :]
//
// Everything here is __host__ __device__ and free of torch headers: the CPU build (tested
// against the PyTorch reference) and the CUDA kernel share the bounds checks and the strided
// dot / axpy that make up the per-element work.
#pragma once

#include <stdint.h>

#include "lightning_qlora/element.h"

namespace lightning_qlora {

// Status codes of a BGMV call (the CPU entry point returns them; the binding raises a typed error).
constexpr int64_t kBgmvOk = 0;
constexpr int64_t kBgmvBadSlot = 1;    // indices[b] outside [-1, slots)
constexpr int64_t kBgmvBadRank = 2;    // ranks[s] outside [0, max_rank]
constexpr int64_t kBgmvBadOffset = 3;  // a factor row would read outside the pool

// Whether the `length` floats starting at `offset` lie inside a pool of `pool_numel` floats.
LQ_HD bool pool_row_in_bounds(int64_t offset, int64_t length, int64_t pool_numel) {
  return offset >= 0 && length >= 0 && offset <= pool_numel - length;
}

// Validates one adapter slot's table entries; kBgmvOk when every row it names is readable.
LQ_HD int64_t check_bgmv_slot(const int64_t* a_rows, const int64_t* b_rows, const int64_t* ranks, int64_t slot,
                              int64_t max_rank, int64_t in_features, int64_t out_features, int64_t pool_numel) {
  const int64_t rank = ranks[slot];
  if (rank < 0 || rank > max_rank) return kBgmvBadRank;
  for (int64_t j = 0; j < rank; ++j) {
    if (!pool_row_in_bounds(a_rows[slot * max_rank + j], in_features, pool_numel) ||
        !pool_row_in_bounds(b_rows[slot * max_rank + j], out_features, pool_numel)) {
      return kBgmvBadOffset;
    }
  }
  return kBgmvOk;
}

// sum over k = begin, begin + step, ... < end of a[k] * b[k] (one lane's share of a dot product).
LQ_HD float strided_dot(const float* a, const float* b, int64_t begin, int64_t end, int64_t step) {
  float sum = 0.0f;
  for (int64_t k = begin; k < end; k += step) sum += a[k] * b[k];
  return sum;
}

// y[o] += alpha * row[o] for o = begin, begin + step, ... < end (the expand half of LoRA).
LQ_HD void strided_axpy(float alpha, const float* row, float* y, int64_t begin, int64_t end, int64_t step) {
  for (int64_t o = begin; o < end; o += step) y[o] += alpha * row[o];
}

}  // namespace lightning_qlora
