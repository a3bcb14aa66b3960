// Python bindings of the CPU kernels. Validation happens in Python (typed errors) before
// these are called; here we only check what would otherwise corrupt memory.
#include <torch/extension.h>

#include <algorithm>
#include <numeric>

#include "kernels.h"

namespace lq = lightning_qlora;

namespace {

lq::cpu::FloatType float_type(at::ScalarType type) {
  switch (type) {
    case at::kFloat:
      return lq::cpu::FloatType::kFloat32;
    case at::kHalf:
      return lq::cpu::FloatType::kFloat16;
    case at::kBFloat16:
      return lq::cpu::FloatType::kBFloat16;
    default:
      TORCH_CHECK(false, "lightning_qlora CPU kernels take float32, float16 or bfloat16, got ", type);
  }
}

lq::Codebook4 prepare_codebook(const at::Tensor& code) {
  TORCH_CHECK(code.scalar_type() == at::kFloat && code.numel() == 16, "codebook must be 16 float32 values");
  auto values = code.contiguous();
  const float* data = values.data_ptr<float>();
  lq::Codebook4 book{};
  int order[16];
  std::iota(order, order + 16, 0);
  std::stable_sort(order, order + 16, [&](int a, int b) { return data[a] < data[b]; });
  for (int i = 0; i < 16; ++i) {
    book.values[i] = data[i];
    book.order[i] = static_cast<uint8_t>(order[i]);
    book.sorted[i] = data[order[i]];
  }
  for (int i = 0; i < 15; ++i) book.midpoints[i] = (book.sorted[i] + book.sorted[i + 1]) / 2.0f;
  return book;
}

std::tuple<at::Tensor, at::Tensor> quantize_4bit(const at::Tensor& input, const at::Tensor& code, int64_t blocksize,
                                                 c10::optional<int64_t> seed) {
  TORCH_CHECK(input.device().is_cpu() && blocksize > 0 && blocksize % 2 == 0, "bad quantize_4bit call");
  auto source = input.contiguous();
  const int64_t n = source.numel();
  auto packed = at::empty({(n + 1) / 2}, source.options().dtype(at::kByte));
  auto absmax = at::empty({(n + blocksize - 1) / blocksize}, source.options().dtype(at::kFloat));
  const auto book = prepare_codebook(code);
  lq::cpu::quantize_4bit(source.data_ptr(), float_type(source.scalar_type()), n, book, blocksize, seed.has_value(),
                         static_cast<uint64_t>(seed.value_or(0)), packed.data_ptr<uint8_t>(), absmax.data_ptr<float>());
  return {packed, absmax};
}

at::Tensor dequantize_4bit(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code, int64_t blocksize,
                           std::vector<int64_t> shape, at::ScalarType dtype) {
  const int64_t n = std::accumulate(shape.begin(), shape.end(), int64_t{1}, std::multiplies<int64_t>());
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.numel() == (n + 1) / 2, "packed size does not match shape");
  TORCH_CHECK(absmax.scalar_type() == at::kFloat && absmax.numel() == (n + blocksize - 1) / blocksize, "absmax size");
  TORCH_CHECK(code.scalar_type() == at::kFloat && code.numel() == 16, "codebook must be 16 float32 values");
  auto out = at::empty(shape, packed.options().dtype(dtype));
  auto codes = packed.contiguous();
  auto scales = absmax.contiguous();
  auto table = code.contiguous();
  lq::cpu::dequantize_4bit(codes.data_ptr<uint8_t>(), scales.data_ptr<float>(), table.data_ptr<float>(), n, blocksize,
                           float_type(dtype), out.data_ptr());
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lightning_qlora CPU kernels";
  m.def("quantize_4bit", &quantize_4bit, "blockwise 4-bit quantization");
  m.def("dequantize_4bit", &dequantize_4bit, "blockwise 4-bit dequantization");
}
