// CPU BGMV for batched heterogeneous LoRA (see lightning_qlora/bgmv.h for the layout).
//
// Bound in bindings.cpp like the other kernels; the Python kernel in ops/_extension.py validates
// dtypes and shapes with our typed errors first. Bounds of every pool row the tables name are
// checked here (cheap, and what would otherwise corrupt memory); a bad table returns a status
// code (kBgmv* in lightning_qlora/bgmv.h) instead of reading out of bounds.
//
// Rounding: fp32 throughout; the dot products sum in 16 lanes then lane by lane, so results
// differ from the PyTorch reference only in summation order.
#include <stdint.h>
#include <string.h>

#include "bgmv.h"
#include "parallel.h"
#include "lightning_qlora/bgmv.h"

namespace lightning_qlora {
namespace cpu {
namespace {

constexpr int64_t kLanes = 16;

LoopSite bgmv_site;

// x . row over n elements: 16 independent lanes (the compiler vectorizes them) + a fixed tail order.
inline float dot_lanes(const float* x, const float* row, int64_t n) {
  float acc[kLanes] = {0.0f};
  const int64_t body = n - n % kLanes;
  for (int64_t k = 0; k < body; k += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) acc[l] += x[k + l] * row[k + l];
  }
  float sum = strided_dot(x, row, body, n, 1);
  for (int64_t l = 0; l < kLanes; ++l) sum += acc[l];
  return sum;
}

}  // namespace

int64_t bgmv(const float* x, int64_t rows, int64_t in_features, int64_t out_features, const float* pool,
             int64_t pool_numel, const int64_t* a_rows, const int64_t* b_rows, const int64_t* ranks,
             const float* scales, int64_t slots, int64_t max_rank, const int64_t* indices, float* y) {
  for (int64_t b = 0; b < rows; ++b) {
    if (indices[b] < -1 || indices[b] >= slots) return kBgmvBadSlot;
  }
  for (int64_t s = 0; s < slots; ++s) {
    const int64_t status = check_bgmv_slot(a_rows, b_rows, ranks, s, max_rank, in_features, out_features, pool_numel);
    if (status != kBgmvOk) return status;
  }
  const int64_t work = rows * max_rank * (in_features + out_features);
  // Small batches stay on the caller's thread (one chunk): waking a helper costs more than them.
  const int64_t grain = work > (int64_t{1} << 16) ? 1 : rows;
  parallel_for(bgmv_site, rows, grain, [&](int64_t first, int64_t last) {
    for (int64_t b = first; b < last; ++b) {
      float* out = y + b * out_features;
      memset(out, 0, sizeof(float) * static_cast<size_t>(out_features));
      const int64_t slot = indices[b];
      if (slot < 0) continue;
      const float* xb = x + b * in_features;
      const float scale = scales[slot];
      for (int64_t j = 0; j < ranks[slot]; ++j) {
        const float t = dot_lanes(xb, pool + a_rows[slot * max_rank + j], in_features);
        strided_axpy(scale * t, pool + b_rows[slot * max_rank + j], out, 0, out_features, 1);
      }
    }
  });
  return kBgmvOk;
}

}  // namespace cpu
}  // namespace lightning_qlora
