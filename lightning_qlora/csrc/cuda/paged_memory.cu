// CUDA unified (managed) memory for paged optimizer state, on raw pointers (no torch headers).
//
// The Python side (lightning_qlora/optim/stores/cuda_managed.py) builds this file into a shared
// library with nvcc and calls it through ctypes: every function is extern "C", returns the
// cudaError_t as an int (0 = success) and takes streams as opaque pointers (torch's
// Stream.cuda_stream). Pages live in managed memory preferring the host; an update prefetches
// the next page to the GPU on a side stream while the current one is updated, and evicted
// pages are prefetched back to the host, as bitsandbytes' paged optimizers do.
//
// Compile-checked with nvcc for sm_80 and sm_90; it has not run on a GPU here (the build
// machines have none).
#include <cuda_runtime.h>
#include <stddef.h>
#include <stdint.h>

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

int prefetch(void* ptr, size_t nbytes, int device, cudaStream_t stream) {
#if CUDART_VERSION >= 13000
  return static_cast<int>(cudaMemPrefetchAsync(ptr, nbytes, location_of(device), 0, stream));
#else
  return static_cast<int>(cudaMemPrefetchAsync(ptr, nbytes, device < 0 ? cudaCpuDeviceId : device, stream));
#endif
}

int advise(void* ptr, size_t nbytes, cudaMemoryAdvise advice, int device) {
#if CUDART_VERSION >= 13000
  return static_cast<int>(cudaMemAdvise(ptr, nbytes, advice, location_of(device)));
#else
  return static_cast<int>(cudaMemAdvise(ptr, nbytes, advice, device < 0 ? cudaCpuDeviceId : device));
#endif
}

}  // namespace

extern "C" {

// Allocates `nbytes` of zero-filled managed memory whose preferred home is the host, so pages
// the GPU stops using migrate back instead of occupying device memory.
int lq_managed_alloc(void** out, size_t nbytes, int device) {
  *out = nullptr;
  void* ptr = nullptr;
  int status = static_cast<int>(cudaMallocManaged(&ptr, nbytes, cudaMemAttachGlobal));
  if (status != 0) return status;
  status = static_cast<int>(cudaMemset(ptr, 0, nbytes));
  if (status == 0) status = advise(ptr, nbytes, cudaMemAdviseSetPreferredLocation, -1);
  if (status == 0) status = advise(ptr, nbytes, cudaMemAdviseSetAccessedBy, device);
  if (status == 0) status = static_cast<int>(cudaDeviceSynchronize());
  if (status != 0) {
    cudaFree(ptr);
    return status;
  }
  *out = ptr;
  return 0;
}

int lq_managed_free(void* ptr) { return static_cast<int>(cudaFree(ptr)); }

// Migrates [ptr, ptr + nbytes) to `device` (a GPU ordinal, or -1 for the host), ordered on `stream`.
int lq_prefetch(void* ptr, size_t nbytes, int device, void* stream) {
  return prefetch(ptr, nbytes, device, static_cast<cudaStream_t>(stream));
}

// Free / total memory of the current device, for budget defaults and error messages.
int lq_mem_info(size_t* free_bytes, size_t* total_bytes) {
  return static_cast<int>(cudaMemGetInfo(free_bytes, total_bytes));
}

const char* lq_error_string(int status) { return cudaGetErrorString(static_cast<cudaError_t>(status)); }

}  // extern "C"
