// Argument checks and conversions both bindings (cpu/bindings.cpp, cuda/bindings.cpp) share: the
// only header that sees torch, included by those two files alone. Python validated with typed
// errors first; these checks guard memory safety.
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <vector>

#include "lightning_qlora/element.h"
#include "lightning_qlora/float_type.h"

namespace lightning_qlora {

// torch's dtype -> the kernels' element type; `side` ("CPU", "CUDA") names the kernels in the error.
inline FloatType float_type_of(at::ScalarType type, const char* side) {
  switch (type) {
    case at::kFloat:
      return FloatType::kFloat32;
    case at::kHalf:
      return FloatType::kFloat16;
    case at::kBFloat16:
      return FloatType::kBFloat16;
    default:
      TORCH_CHECK(false, "lightning_qlora ", side, " kernels take float32, float16 or bfloat16, got ", type);
  }
}

// The 16-entry codebook, read on the host into the kernels' by-value Codebook4.
inline Codebook4 codebook_of(const at::Tensor& code) {
  TORCH_CHECK(code.scalar_type() == at::kFloat && code.numel() == 16, "codebook must be 16 float32 values");
  auto values = code.to(at::kCPU).contiguous();
  return make_codebook4(values.data_ptr<float>());
}

// A 4-bit weight of `shape` (out, in): codes, absmax and codebook of the matching sizes.
inline void check_4bit_weight(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code,
                              int64_t blocksize, const std::vector<int64_t>& shape) {
  TORCH_CHECK(shape.size() == 2, "4-bit linear needs a 2-D weight shape (out, in), got ", shape.size(), " dims");
  const int64_t n = shape[0] * shape[1];
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.numel() == (n + 1) / 2, "packed size does not match shape");
  TORCH_CHECK(absmax.scalar_type() == at::kFloat && absmax.numel() == (n + blocksize - 1) / blocksize, "absmax size");
  TORCH_CHECK(code.scalar_type() == at::kFloat && code.numel() == 16, "codebook must be 16 float32 values");
}

}  // namespace lightning_qlora
