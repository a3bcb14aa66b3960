// Host launchers of the CUDA kernels and the managed-memory calls of the paged optimizers: raw
// pointers, no torch headers. The .cu files define them; csrc/cuda/bindings.cpp (the only file
// that sees torch) calls them.
#pragma once

#include <cuda_runtime_api.h>
#include <stddef.h>
#include <stdint.h>

#include "lightning_qlora/element.h"
#include "lightning_qlora/float_type.h"

namespace lightning_qlora {
namespace cuda {

using lightning_qlora::FloatType;

// Largest batch the fused GEMV decodes in registers; bigger batches dequantize + cuBLAS.
constexpr int kMaxFusedRows = 8;

cudaError_t launch_quantize_4bit(const void* input, FloatType type, int64_t n, const Codebook4& book, int64_t blocksize,
                                 bool stochastic, uint64_t seed, uint8_t* packed, float* absmax, cudaStream_t stream);

cudaError_t launch_dequantize_4bit(const uint8_t* packed, const float* absmax, const Codebook4& book, int64_t n,
                                   int64_t blocksize, FloatType type, void* output, cudaStream_t stream);

cudaError_t launch_gemv_4bit(const float* x, int64_t rows, const uint8_t* packed, const float* absmax,
                             const float* codebook, int64_t out_features, int64_t in_features, int64_t blocksize,
                             float* y, cudaStream_t stream);

cudaError_t launch_input_grad_4bit(const float* grad, int64_t rows, const uint8_t* packed, const float* absmax,
                                   const float* codebook, int64_t out_features, int64_t in_features,
                                   int64_t blocksize, float* result, cudaStream_t stream);

cudaError_t launch_bgmv(const float* x, int64_t rows, int64_t in_features, int64_t out_features, const float* pool,
                        const int64_t* a_rows, const int64_t* b_rows, const int64_t* ranks, const float* scales,
                        int64_t max_rank, const int64_t* indices, float* y, cudaStream_t stream);

// Managed (unified) memory for paged optimizer state (paged_memory.cu). Each returns the CUDA
// status; `device` is a GPU ordinal, or kHostDevice for the host.
constexpr int kHostDevice = -1;

// `nbytes` of zero-filled managed memory preferring the host, accessed by `device`.
cudaError_t managed_alloc(void** out, size_t nbytes, int device);
cudaError_t managed_free(void* ptr);
// Migrates [ptr, ptr + nbytes) to `device`, ordered on `stream`.
cudaError_t managed_prefetch(void* ptr, size_t nbytes, int device, cudaStream_t stream);
// Free and total memory of the current device.
cudaError_t device_memory_info(size_t* free_bytes, size_t* total_bytes);

}  // namespace cuda
}  // namespace lightning_qlora
