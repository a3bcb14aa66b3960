// CUDA unified (managed) memory for paged optimizer state, on raw pointers (no torch headers).
//
// Part of the lightning_qlora_cuda extension: csrc/cuda/bindings.cpp exposes these functions
// (declared in launchers.h) to lightning_qlora/optim/stores/cuda_managed.py. Pages live in
// managed memory preferring the host; an update prefetches the next page to the GPU on a side
// stream while the current one is updated, and evicted pages are prefetched back to the host,
// as bitsandbytes' paged optimizers do.
//
// Compile-checked with nvcc for sm_80 and sm_90; it has not run on a GPU here (the build
// machines have none).
#include <cuda_runtime.h>
#include <stddef.h>
#include <stdint.h>

#include "launchers.h"

namespace lightning_qlora {
namespace cuda {
namespace {

// CUDA 13 removed the device-ordinal overloads of prefetch/advise in favour of cudaMemLocation.
#if CUDART_VERSION >= 13000
cudaMemLocation location_of(int device) {
  cudaMemLocation location;
  if (device < 0) {
    location.type = cudaMemLocationTypeHost;
    location.id = 0;
  } else {
    location.type = cudaMemLocationTypeDevice;
    location.id = device;
  }
  return location;
}
#endif

cudaError_t advise(void* ptr, size_t nbytes, cudaMemoryAdvise advice, int device) {
#if CUDART_VERSION >= 13000
  return cudaMemAdvise(ptr, nbytes, advice, location_of(device));
#else
  return cudaMemAdvise(ptr, nbytes, advice, device < 0 ? cudaCpuDeviceId : device);
#endif
}

}  // namespace

// The preferred home is the host, so pages the GPU stops using migrate back instead of
// occupying device memory.
cudaError_t managed_alloc(void** out, size_t nbytes, int device) {
  *out = nullptr;
  void* ptr = nullptr;
  cudaError_t status = cudaMallocManaged(&ptr, nbytes, cudaMemAttachGlobal);
  if (status != cudaSuccess) return status;
  status = cudaMemset(ptr, 0, nbytes);
  if (status == cudaSuccess) status = advise(ptr, nbytes, cudaMemAdviseSetPreferredLocation, kHostDevice);
  if (status == cudaSuccess) status = advise(ptr, nbytes, cudaMemAdviseSetAccessedBy, device);
  if (status == cudaSuccess) status = cudaDeviceSynchronize();
  if (status != cudaSuccess) {
    cudaFree(ptr);
    return status;
  }
  *out = ptr;
  return cudaSuccess;
}

cudaError_t managed_free(void* ptr) { return cudaFree(ptr); }

cudaError_t managed_prefetch(void* ptr, size_t nbytes, int device, cudaStream_t stream) {
#if CUDART_VERSION >= 13000
  return cudaMemPrefetchAsync(ptr, nbytes, location_of(device), 0, stream);
#else
  return cudaMemPrefetchAsync(ptr, nbytes, device < 0 ? cudaCpuDeviceId : device, stream);
#endif
}

cudaError_t device_memory_info(size_t* free_bytes, size_t* total_bytes) {
  return cudaMemGetInfo(free_bytes, total_bytes);
}

}  // namespace cuda
}  // namespace lightning_qlora
