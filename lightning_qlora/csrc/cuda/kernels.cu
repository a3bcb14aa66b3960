// CUDA kernels for blockwise 4-bit quantize/dequantize on raw pointers (no torch headers), one
// launcher per op. The per-element logic is the shared element.h that the tested CPU build
// uses; these kernels are compile-checked with nvcc in CI (sm_80, sm_90) and have not run on a
// GPU here (the build machines have none).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "launchers.h"
#include "lightning_qlora/element.h"

namespace lightning_qlora {
namespace cuda {

template <typename T>
__device__ __forceinline__ float to_float(T value);
template <>
__device__ __forceinline__ float to_float<float>(float value) { return value; }
template <>
__device__ __forceinline__ float to_float<__half>(__half value) { return __half2float(value); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 value) { return __bfloat162float(value); }

template <typename T>
__device__ __forceinline__ T from_float(float value);
template <>
__device__ __forceinline__ float from_float<float>(float value) { return value; }
template <>
__device__ __forceinline__ __half from_float<__half>(float value) { return __float2half_rn(value); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float value) { return __float2bfloat16_rn(value); }

// One thread block per quantization block; threads stride over its elements in pairs.
template <typename T>
__global__ void quantize_4bit_kernel(const T* __restrict__ input, int64_t n, Codebook4 book, int64_t blocksize,
                                     bool stochastic, uint64_t seed, uint8_t* __restrict__ packed,
                                     float* __restrict__ absmax) {
  const int64_t start = static_cast<int64_t>(blockIdx.x) * blocksize;
  const int64_t end = start + blocksize < n ? start + blocksize : n;
  __shared__ float partial_max[256];
  float maximum = 0.0f;
  bool has_nan = false;
  for (int64_t i = start + threadIdx.x; i < end; i += blockDim.x) {
    const float magnitude = fabsf(to_float(input[i]));
    has_nan |= magnitude != magnitude;
    maximum = magnitude > maximum ? magnitude : maximum;
  }
  partial_max[threadIdx.x] = __syncthreads_or(has_nan) ? NAN : maximum;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) {
      const float other = partial_max[threadIdx.x + stride];
      const float mine = partial_max[threadIdx.x];
      partial_max[threadIdx.x] = (other != other || other > mine) ? other : mine;
    }
    __syncthreads();
  }
  const float block_max = partial_max[0];
  const bool nan_block = block_max != block_max;
  const bool partial = end - start < blocksize;
  const float floor_max = block_max > kTinyAbsmax ? block_max : kTinyAbsmax;
  const float scale = partial ? floor_max : 1.0f / floor_max;
  if (threadIdx.x == 0) absmax[blockIdx.x] = partial ? (nan_block ? block_max : floor_max) : block_max;
  for (int64_t i = start + 2 * threadIdx.x; i < end; i += 2 * blockDim.x) {
    const float x0 = to_float(input[i]);
    const float first = nan_block ? NAN : clamp_unit(partial ? x0 / scale : x0 * scale);
    const float second =
        i + 1 < end ? (nan_block ? NAN : clamp_unit(partial ? to_float(input[i + 1]) / scale : to_float(input[i + 1]) * scale))
                    : 0.0f;
    const int high = stochastic ? stochastic_bucket(book, first, uniform_at(seed, i)) : bucket_of(book, first);
    const int low = stochastic ? stochastic_bucket(book, second, uniform_at(seed, i + 1)) : bucket_of(book, second);
    packed[i / 2] = static_cast<uint8_t>((book.order[high] << 4) | book.order[low]);
  }
}

template <typename T>
__global__ void dequantize_4bit_kernel(const uint8_t* __restrict__ packed, const float* __restrict__ absmax,
                                       Codebook4 book, int64_t n, int64_t blocksize, T* __restrict__ output) {
  const int64_t pair = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t i = 2 * pair;
  if (i >= n) return;
  const uint8_t byte = packed[pair];
  const float scale = absmax[i / blocksize];  // blocks are even-sized: a byte never straddles two
  output[i] = from_float<T>(book.values[byte >> 4] * scale);
  if (i + 1 < n) output[i + 1] = from_float<T>(book.values[byte & 0x0F] * scale);
}

// Launchers (host): return cudaError_t so the binding can raise a clear error.
cudaError_t launch_quantize_4bit(const void* input, FloatType type, int64_t n, const Codebook4& book, int64_t blocksize,
                                 bool stochastic, uint64_t seed, uint8_t* packed, float* absmax, cudaStream_t stream) {
  const int64_t blocks = (n + blocksize - 1) / blocksize;
  const int threads = 256;
  switch (type) {
    case FloatType::kFloat16:
      quantize_4bit_kernel<<<blocks, threads, 0, stream>>>(static_cast<const __half*>(input), n, book, blocksize,
                                                            stochastic, seed, packed, absmax);
      break;
    case FloatType::kBFloat16:
      quantize_4bit_kernel<<<blocks, threads, 0, stream>>>(static_cast<const __nv_bfloat16*>(input), n, book,
                                                            blocksize, stochastic, seed, packed, absmax);
      break;
    default:
      quantize_4bit_kernel<<<blocks, threads, 0, stream>>>(static_cast<const float*>(input), n, book, blocksize,
                                                            stochastic, seed, packed, absmax);
  }
  return cudaGetLastError();
}

cudaError_t launch_dequantize_4bit(const uint8_t* packed, const float* absmax, const Codebook4& book, int64_t n,
                                   int64_t blocksize, FloatType type, void* output, cudaStream_t stream) {
  const int threads = 256;
  const int64_t pairs = (n + 1) / 2;
  const int64_t grid = (pairs + threads - 1) / threads;
  switch (type) {
    case FloatType::kFloat16:
      dequantize_4bit_kernel<<<grid, threads, 0, stream>>>(packed, absmax, book, n, blocksize, static_cast<__half*>(output));
      break;
    case FloatType::kBFloat16:
      dequantize_4bit_kernel<<<grid, threads, 0, stream>>>(packed, absmax, book, n, blocksize,
                                                            static_cast<__nv_bfloat16*>(output));
      break;
    default:
      dequantize_4bit_kernel<<<grid, threads, 0, stream>>>(packed, absmax, book, n, blocksize, static_cast<float*>(output));
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace lightning_qlora
