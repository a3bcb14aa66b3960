// Runs the raw-pointer CPU kernels on odd shapes under AddressSanitizer/UBSan
// (built and run by test_sanitizers.py). Exit code 0 = no finding and sane results.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "../../csrc/cpu/kernels.h"
#include "../../csrc/cpu/matmul.h"

using namespace lightning_qlora;

static const float kNF4[16] = {-1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
                               -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
                               0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f,
                               0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f,
                               0.7229568362236023f, 1.0f};

int main() {
  Codebook4 book{};
  for (int i = 0; i < 16; ++i) {
    book.values[i] = book.sorted[i] = kNF4[i];
    book.order[i] = static_cast<uint8_t>(i);
  }
  for (int i = 0; i < 15; ++i) book.midpoints[i] = (book.sorted[i] + book.sorted[i + 1]) / 2.0f;
  const int64_t sizes[] = {1, 2, 3, 31, 33, 63, 65, 127, 1001, 4097, 8193};
  const int64_t blocks[] = {32, 64, 4096};
  int failures = 0;
  srand(7);
  for (int64_t n : sizes) {
    std::vector<float> input(n);
    for (auto& x : input) x = static_cast<float>(rand()) / RAND_MAX * 2.0f - 1.0f;
    std::vector<_Float16> half(input.begin(), input.end());
    std::vector<uint16_t> bf16(n);
    for (int64_t i = 0; i < n; ++i) bf16[i] = float_to_bf16_bits(input[i]);
    for (int64_t blocksize : blocks) {
      for (int stochastic = 0; stochastic < 2; ++stochastic) {
        for (int type = 0; type < 3; ++type) {
          const void* source = type == 0 ? static_cast<const void*>(input.data())
                               : type == 1 ? static_cast<const void*>(half.data()) : static_cast<const void*>(bf16.data());
          // exact-size buffers so any overrun is an ASan finding
          std::vector<uint8_t> packed((n + 1) / 2);
          std::vector<float> absmax((n + blocksize - 1) / blocksize);
          cpu::quantize_4bit(source, static_cast<cpu::FloatType>(type), n, book, blocksize, stochastic != 0, 11,
                             packed.data(), absmax.data());
          std::vector<float> output(n);
          cpu::dequantize_4bit(packed.data(), absmax.data(), book.values, n, blocksize, cpu::FloatType::kFloat32,
                               output.data());
          for (int64_t i = 0; i < n; ++i) {
            const float bound = absmax[i / blocksize] * (stochastic ? 0.33f : 0.17f) + 1e-2f;
            if (!(std::fabs(output[i] - input[i]) <= bound)) ++failures;
          }
        }
      }
    }
  }
  // Fused GEMV and the GEMM tile decoder on odd shapes (scalar path) and in % 32 == 0 (AVX-512
  // path), exact-size buffers, checked against a plain dequantize-then-dot.
  const int64_t shapes[][2] = {{1, 1}, {3, 7}, {5, 32}, {17, 33}, {9, 64}, {33, 96}, {2, 4096}};
  for (const auto& shape : shapes) {
    const int64_t out = shape[0], in = shape[1], n = out * in;
    for (int64_t blocksize : blocks) {
      std::vector<float> weight(n);
      for (auto& w : weight) w = static_cast<float>(rand()) / RAND_MAX * 2.0f - 1.0f;
      std::vector<uint8_t> packed((n + 1) / 2);
      std::vector<float> absmax((n + blocksize - 1) / blocksize);
      cpu::quantize_4bit(weight.data(), cpu::FloatType::kFloat32, n, book, blocksize, false, 0, packed.data(),
                         absmax.data());
      std::vector<float> dense(n);
      cpu::dequantize_range_4bit(packed.data(), absmax.data(), book.values, blocksize, 0, n, dense.data());
      if (out > 1) {  // a tile starting mid-row (and mid-byte when in is odd)
        std::vector<float> tile(n - in);
        cpu::dequantize_range_4bit(packed.data(), absmax.data(), book.values, blocksize, in, n - in, tile.data());
        for (int64_t i = 0; i < n - in; ++i) failures += tile[i] != dense[in + i];
      }
      for (int64_t rows = 1; rows <= cpu::kMaxFusedRows; rows += 3) {
        std::vector<float> x(rows * in), y(rows * out);
        for (auto& v : x) v = static_cast<float>(rand()) / RAND_MAX - 0.5f;
        cpu::gemv_4bit(x.data(), rows, packed.data(), absmax.data(), book.values, out, in, blocksize, y.data());
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t o = 0; o < out; ++o) {
            double expected = 0.0;
            for (int64_t k = 0; k < in; ++k) expected += static_cast<double>(x[r * in + k]) * dense[o * in + k];
            failures += !(std::fabs(y[r * out + o] - expected) <= 1e-4 * (1.0 + std::fabs(expected)));
          }
      }
    }
  }
  std::printf("checked, failures=%d\n", failures);
  return failures == 0 ? 0 : 1;
}
