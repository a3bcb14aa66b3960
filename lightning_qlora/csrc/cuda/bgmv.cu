// CUDA BGMV for batched heterogeneous LoRA (layout and formula in lightning_qlora/bgmv.h),
// raw pointers and one launcher, no torch headers. One thread block per batch row: its warps
// split the rank-r shrink (one warp per rank row, lanes stride over `in`, warp reduction into
// shared memory), then all threads stride over `out` for the expand. Bounds checks and the
// strided dot / axpy come from bgmv.h, shared with the tested CPU build.
// Compile-checked with nvcc (sm_80, sm_90); never run on a GPU here.
#include <stdint.h>

#include "launchers.h"
#include "lightning_qlora/bgmv.h"

namespace lightning_qlora {
namespace cuda {

constexpr int kBgmvWarp = 32;
constexpr int kBgmvThreads = 256;

__global__ void bgmv_kernel(const float* __restrict__ x, int64_t in_features, int64_t out_features,
                            const float* __restrict__ pool, const int64_t* __restrict__ a_rows,
                            const int64_t* __restrict__ b_rows, const int64_t* __restrict__ ranks,
                            const float* __restrict__ scales, int64_t max_rank, const int64_t* __restrict__ indices,
                            float* __restrict__ y) {
  extern __shared__ float shrunk[];  // max_rank floats: x . A_s[j, :]
  const int64_t b = blockIdx.x;
  const int64_t slot = indices[b];
  float* out = y + b * out_features;
  if (slot < 0) {
    for (int64_t o = threadIdx.x; o < out_features; o += blockDim.x) out[o] = 0.0f;
    return;
  }
  const int64_t rank = ranks[slot];
  const float* xb = x + b * in_features;
  const int warp = threadIdx.x / kBgmvWarp, lane = threadIdx.x % kBgmvWarp;
  const int warps = blockDim.x / kBgmvWarp;
  for (int64_t j = warp; j < rank; j += warps) {
    float sum = strided_dot(xb, pool + a_rows[slot * max_rank + j], lane, in_features, kBgmvWarp);
    for (int offset = kBgmvWarp / 2; offset > 0; offset /= 2) sum += __shfl_down_sync(0xFFFFFFFFu, sum, offset);
    if (lane == 0) shrunk[j] = sum;
  }
  __syncthreads();
  const float scale = scales[slot];
  for (int64_t o = threadIdx.x; o < out_features; o += blockDim.x) out[o] = 0.0f;
  for (int64_t j = 0; j < rank; ++j) {
    strided_axpy(scale * shrunk[j], pool + b_rows[slot * max_rank + j], out, threadIdx.x, out_features, blockDim.x);
  }
}

// Host-side validation of the (host copies of the) tables, as the CPU kernel does: kBgmvOk or a status.
int64_t check_bgmv_tables(const int64_t* indices, int64_t rows, const int64_t* a_rows, const int64_t* b_rows,
                          const int64_t* ranks, int64_t slots, int64_t max_rank, int64_t in_features,
                          int64_t out_features, int64_t pool_numel) {
  for (int64_t b = 0; b < rows; ++b) {
    if (indices[b] < -1 || indices[b] >= slots) return kBgmvBadSlot;
  }
  for (int64_t s = 0; s < slots; ++s) {
    const int64_t status = check_bgmv_slot(a_rows, b_rows, ranks, s, max_rank, in_features, out_features, pool_numel);
    if (status != kBgmvOk) return status;
  }
  return kBgmvOk;
}

// y (rows, out) = per-row LoRA delta; all pointers on the device, tables already validated
// with check_bgmv_tables on their host copies.
cudaError_t launch_bgmv(const float* x, int64_t rows, int64_t in_features, int64_t out_features, const float* pool,
                        const int64_t* a_rows, const int64_t* b_rows, const int64_t* ranks, const float* scales,
                        int64_t max_rank, const int64_t* indices, float* y, cudaStream_t stream) {
  if (rows == 0 || out_features == 0) return cudaSuccess;
  if (rows > 0x7FFFFFFF || max_rank < 0) return cudaErrorInvalidValue;
  const size_t shared = sizeof(float) * static_cast<size_t>(max_rank > 0 ? max_rank : 1);
  bgmv_kernel<<<static_cast<unsigned>(rows), kBgmvThreads, shared, stream>>>(x, in_features, out_features, pool, a_rows,
                                                                            b_rows, ranks, scales, max_rank, indices, y);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace lightning_qlora
