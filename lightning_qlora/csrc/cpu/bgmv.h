// Batched heterogeneous LoRA on raw pointers (no torch headers); layout and formula in
// lightning_qlora/bgmv.h. Returns kBgmvOk or the status of the first bad index/table.
#pragma once

#include <stdint.h>

namespace lightning_qlora {
namespace cpu {

int64_t bgmv(const float* x, int64_t rows, int64_t in_features, int64_t out_features, const float* pool,
             int64_t pool_numel, const int64_t* a_rows, const int64_t* b_rows, const int64_t* ranks,
             const float* scales, int64_t slots, int64_t max_rank, const int64_t* indices, float* y);

}  // namespace cpu
}  // namespace lightning_qlora
