// CUDA products with a 4-bit weight on raw pointers (no torch headers), one launcher per op:
// the fused dequant-GEMV y = x @ W^T (batch <= kMaxFusedRows) and the input gradient g @ W.
// Decoding is element.h's code_at + codebook[q] * absmax, shared with the tested CPU build.
// Compile-checked with nvcc in CI (sm_80, sm_90); never run on a GPU here.
#include <stdint.h>

#include "launchers.h"
#include "lightning_qlora/element.h"

namespace lightning_qlora {
namespace cuda {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 4;

// One warp per output feature: lanes stride over the row, decode in registers, warp-reduce.
template <int Rows>
__global__ void gemv_4bit_kernel(const float* __restrict__ x, const uint8_t* __restrict__ packed,
                                 const float* __restrict__ absmax, const float* __restrict__ codebook,
                                 int64_t out_features, int64_t in_features, int64_t blocksize, float* __restrict__ y) {
  __shared__ float book[16];
  if (threadIdx.x < 16) book[threadIdx.x] = codebook[threadIdx.x];
  __syncthreads();
  const int64_t o = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (o >= out_features) return;
  const int lane = threadIdx.x % kWarp;
  float acc[Rows];
#pragma unroll
  for (int r = 0; r < Rows; ++r) acc[r] = 0.0f;
  for (int64_t k = lane; k < in_features; k += kWarp) {
    const int64_t flat = o * in_features + k;
    const float w = book[code_at(packed, flat)] * absmax[flat / blocksize];
#pragma unroll
    for (int r = 0; r < Rows; ++r) acc[r] = fmaf(w, x[r * in_features + k], acc[r]);
  }
#pragma unroll
  for (int r = 0; r < Rows; ++r) {
    float sum = acc[r];
    for (int offset = kWarp / 2; offset > 0; offset /= 2) sum += __shfl_down_sync(0xFFFFFFFFu, sum, offset);
    if (lane == 0) y[r * out_features + o] = sum;
  }
}

// One thread per (row, input feature): sum over output features of g[r, o] * W[o, k]; reads of W
// are coalesced across k. Meant for small batches; large ones dequantize tiles and call cuBLAS
// from the binding.
__global__ void input_grad_4bit_kernel(const float* __restrict__ grad, int64_t rows, const uint8_t* __restrict__ packed,
                                       const float* __restrict__ absmax, const float* __restrict__ codebook,
                                       int64_t out_features, int64_t in_features, int64_t blocksize,
                                       float* __restrict__ result) {
  const int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= rows * in_features) return;
  const int64_t r = index / in_features, k = index % in_features;
  float sum = 0.0f;
  for (int64_t o = 0; o < out_features; ++o) {
    const int64_t flat = o * in_features + k;
    sum = fmaf(grad[r * out_features + o], codebook[code_at(packed, flat)] * absmax[flat / blocksize], sum);
  }
  result[index] = sum;
}

template <int Rows>
void launch_rows(const float* x, const uint8_t* packed, const float* absmax, const float* codebook,
                 int64_t out_features, int64_t in_features, int64_t blocksize, float* y, cudaStream_t stream) {
  const unsigned grid = static_cast<unsigned>((out_features + kWarpsPerBlock - 1) / kWarpsPerBlock);
  gemv_4bit_kernel<Rows><<<grid, kWarpsPerBlock * kWarp, 0, stream>>>(x, packed, absmax, codebook, out_features,
                                                                      in_features, blocksize, y);
}

// y (rows, out) = x (rows, in) @ W^T for 1 <= rows <= kMaxFusedRows; all pointers on the device.
cudaError_t launch_gemv_4bit(const float* x, int64_t rows, const uint8_t* packed, const float* absmax,
                             const float* codebook, int64_t out_features, int64_t in_features, int64_t blocksize,
                             float* y, cudaStream_t stream) {
  if (rows < 1 || rows > kMaxFusedRows) return cudaErrorInvalidValue;
  if (out_features == 0) return cudaSuccess;
  switch (rows) {
    case 1: launch_rows<1>(x, packed, absmax, codebook, out_features, in_features, blocksize, y, stream); break;
    case 2: launch_rows<2>(x, packed, absmax, codebook, out_features, in_features, blocksize, y, stream); break;
    case 3: launch_rows<3>(x, packed, absmax, codebook, out_features, in_features, blocksize, y, stream); break;
    case 4: launch_rows<4>(x, packed, absmax, codebook, out_features, in_features, blocksize, y, stream); break;
    case 5: launch_rows<5>(x, packed, absmax, codebook, out_features, in_features, blocksize, y, stream); break;
    case 6: launch_rows<6>(x, packed, absmax, codebook, out_features, in_features, blocksize, y, stream); break;
    case 7: launch_rows<7>(x, packed, absmax, codebook, out_features, in_features, blocksize, y, stream); break;
    default: launch_rows<8>(x, packed, absmax, codebook, out_features, in_features, blocksize, y, stream); break;
  }
  return cudaGetLastError();
}

// result (rows, in) = grad (rows, out) @ W; all pointers on the device.
cudaError_t launch_input_grad_4bit(const float* grad, int64_t rows, const uint8_t* packed, const float* absmax,
                                   const float* codebook, int64_t out_features, int64_t in_features,
                                   int64_t blocksize, float* result, cudaStream_t stream) {
  const int64_t total = rows * in_features;
  if (total == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  const unsigned grid = static_cast<unsigned>((total + kThreads - 1) / kThreads);
  input_grad_4bit_kernel<<<grid, kThreads, 0, stream>>>(grad, rows, packed, absmax, codebook, out_features,
                                                        in_features, blocksize, result);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace lightning_qlora
