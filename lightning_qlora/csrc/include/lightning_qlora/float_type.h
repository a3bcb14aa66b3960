// The element types the kernels read and write, shared by the CPU and CUDA sides (raw pointers
// carry no dtype; the bindings map torch's ScalarType onto this).
#pragma once

namespace lightning_qlora {

enum class FloatType { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

}  // namespace lightning_qlora
