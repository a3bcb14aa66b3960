// Python bindings of the CPU kernels. Validation happens in Python (typed errors) before
// these are called; here we only check what would otherwise corrupt memory.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <numeric>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include "bgmv.h"
#include "kernels.h"
#include "lightning_qlora/torch_args.h"
#include "matmul.h"
#include "parallel.h"

namespace lq = lightning_qlora;

namespace {

// Our loops use as many threads as torch.set_num_threads allows (their own pool, see parallel.h),
// unless set_kernel_threads gave them their own count.
std::atomic<int64_t> g_kernel_threads{0};
void follow_torch_threads() {
  const int64_t own = g_kernel_threads.load(std::memory_order_relaxed);
  lq::cpu::set_max_threads(own > 0 ? static_cast<int>(own) : at::get_num_threads());
}

// 0: follow torch's thread count (the default); n > 0: our kernels may use n threads whatever torch
// uses -- the serving engine keeps torch's small ops on one thread and lets the big products (the
// lm_head) take a second core when the loop sites measure that it pays.
void set_kernel_threads(int64_t threads) {
  TORCH_CHECK(threads >= 0, "set_kernel_threads: threads must be >= 0 (0 follows torch.get_num_threads())");
  g_kernel_threads.store(threads, std::memory_order_relaxed);
}

// A fresh large output is backed by untouched pages; writing it costs one page fault per 4 KiB
// (16k faults for a 64 MB fp32 weight, ~2/3 of the dequantize time measured here). Asking for
// transparent huge pages before the first write makes that one fault per 2 MiB. Only the
// 2 MiB-aligned interior is advised; where THP is off ("never") this is a harmless no-op.
void advise_huge_pages(void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{1} << 21;
  if (bytes < 2 * kHuge) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)data;
  (void)bytes;
#endif
}

std::tuple<at::Tensor, at::Tensor> quantize_4bit(const at::Tensor& input, const at::Tensor& code, int64_t blocksize,
                                                 c10::optional<int64_t> seed) {
  TORCH_CHECK(input.device().is_cpu() && blocksize > 0 && blocksize % 2 == 0, "bad quantize_4bit call");
  follow_torch_threads();
  auto source = input.contiguous();
  const int64_t n = source.numel();
  auto packed = at::empty({(n + 1) / 2}, source.options().dtype(at::kByte));
  auto absmax = at::empty({(n + blocksize - 1) / blocksize}, source.options().dtype(at::kFloat));
  const auto book = lq::codebook_of(code);
  const auto type = lq::float_type_of(source.scalar_type(), "CPU");
  lq::cpu::quantize_4bit(source.data_ptr(), type, n, book, blocksize, seed.has_value(),
                         static_cast<uint64_t>(seed.value_or(0)), packed.data_ptr<uint8_t>(), absmax.data_ptr<float>());
  return {packed, absmax};
}

at::Tensor dequantize_4bit(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code, int64_t blocksize,
                           std::vector<int64_t> shape, at::ScalarType dtype) {
  const int64_t n = std::accumulate(shape.begin(), shape.end(), int64_t{1}, std::multiplies<int64_t>());
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.numel() == (n + 1) / 2, "packed size does not match shape");
  TORCH_CHECK(absmax.scalar_type() == at::kFloat && absmax.numel() == (n + blocksize - 1) / blocksize, "absmax size");
  TORCH_CHECK(code.scalar_type() == at::kFloat && code.numel() == 16, "codebook must be 16 float32 values");
  follow_torch_threads();
  auto out = at::empty(shape, packed.options().dtype(dtype));
  advise_huge_pages(out.data_ptr(), static_cast<size_t>(out.nbytes()));
  auto codes = packed.contiguous();
  auto scales = absmax.contiguous();
  auto table = code.contiguous();
  lq::cpu::dequantize_4bit(codes.data_ptr<uint8_t>(), scales.data_ptr<float>(), table.data_ptr<float>(), n, blocksize,
                           lq::float_type_of(dtype, "CPU"), out.data_ptr());
  return out;
}

std::tuple<at::Tensor, at::Tensor> quantize_blockwise_8bit(const at::Tensor& input, const at::Tensor& table,
                                                           int64_t blocksize) {
  TORCH_CHECK(input.device().is_cpu() && blocksize > 0, "bad quantize_blockwise_8bit call");
  TORCH_CHECK(table.scalar_type() == at::kLong && table.numel() == 65536, "encoding table must be 65536 int64 values");
  follow_torch_threads();
  auto source = input.reshape({-1}).to(at::kFloat).contiguous();
  auto lookup = table.contiguous();
  const int64_t n = source.numel();
  auto codes = at::empty(input.sizes(), source.options().dtype(at::kByte));
  auto absmax = at::empty({(n + blocksize - 1) / blocksize}, source.options());
  lq::cpu::quantize_blockwise_8bit(source.data_ptr<float>(), n, blocksize, lookup.data_ptr<int64_t>(),
                                   codes.data_ptr<uint8_t>(), absmax.data_ptr<float>());
  return {codes, absmax};
}

at::Tensor dequantize_blockwise_8bit(const at::Tensor& codes_in, const at::Tensor& absmax_in, const at::Tensor& code_in,
                                     int64_t blocksize, at::ScalarType dtype, const c10::optional<at::Tensor>& offset_in) {
  const int64_t n = codes_in.numel();
  TORCH_CHECK(codes_in.scalar_type() == at::kByte, "codes must be uint8");
  TORCH_CHECK(absmax_in.scalar_type() == at::kFloat && absmax_in.numel() == (n + blocksize - 1) / blocksize, "absmax size");
  TORCH_CHECK(code_in.scalar_type() == at::kFloat && code_in.numel() == 256, "codebook must be 256 float32 values");
  TORCH_CHECK(!offset_in.has_value() || (offset_in->scalar_type() == at::kFloat && offset_in->numel() == 1),
              "offset must be one float32 value");
  follow_torch_threads();
  auto codes = codes_in.contiguous();
  auto absmax = absmax_in.contiguous();
  auto code = code_in.contiguous();
  const float offset = offset_in.has_value() ? offset_in->item<float>() : 0.0f;
  auto out = at::empty(codes.sizes(), codes.options().dtype(at::kFloat));
  lq::cpu::dequantize_blockwise_8bit(codes.data_ptr<uint8_t>(), absmax.data_ptr<float>(), code.data_ptr<float>(), n,
                                     blocksize, offset_in.has_value() ? &offset : nullptr, out.data_ptr<float>());
  return dtype == at::kFloat ? out : out.to(dtype);
}

// Weight rows per GEMM tile: up to 16M fp32 values (64 MB). Measured on the 2-core dev box
// (4096x4096 weight, batch 512): 1M-value tiles made the product 2x slower than one GEMM over
// the whole dequantized weight (many small BLAS calls, thread hand-offs between OpenMP and
// torch's pool), so tiles only bound the peak memory of very large weights.
int64_t tile_rows(int64_t in_features) {
  return std::max<int64_t>(1, (int64_t{1} << 24) / std::max<int64_t>(1, in_features));
}

void check_weight(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code, int64_t blocksize,
                  const std::vector<int64_t>& shape) {
  follow_torch_threads();
  lq::check_4bit_weight(packed, absmax, code, blocksize, shape);
}

// fp32 values of weight rows [row_begin, row_end) as a (rows, in) tensor.
at::Tensor weight_tile(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code, int64_t blocksize,
                       int64_t in_features, int64_t row_begin, int64_t row_end) {
  auto tile = at::empty({row_end - row_begin, in_features}, packed.options().dtype(at::kFloat));
  advise_huge_pages(tile.data_ptr(), static_cast<size_t>(tile.nbytes()));
  lq::cpu::dequantize_range_4bit(packed.data_ptr<uint8_t>(), absmax.data_ptr<float>(), code.data_ptr<float>(),
                                 blocksize, row_begin * in_features, (row_end - row_begin) * in_features,
                                 tile.data_ptr<float>());
  return tile;
}

// x (..., in) @ W^T -> (..., out), accumulated in fp32, returned in x's dtype.
at::Tensor linear_4bit(const at::Tensor& x, const at::Tensor& packed_in, const at::Tensor& absmax_in,
                       const at::Tensor& code_in, int64_t blocksize, std::vector<int64_t> shape) {
  check_weight(packed_in, absmax_in, code_in, blocksize, shape);
  const int64_t out_features = shape[0], in_features = shape[1];
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == in_features, "input has ", x.size(-1), " features, weight expects ",
              in_features);
  auto packed = packed_in.contiguous();
  auto absmax = absmax_in.contiguous();
  auto code = code_in.contiguous();
  auto rows = x.reshape({-1, in_features}).to(at::kFloat).contiguous();
  const int64_t batch = rows.size(0);
  auto y = at::empty({batch, out_features}, rows.options());
  if (batch <= lq::cpu::kFusedBatchLimit) {
    // Decode-size batches: the fused kernel, kMaxFusedRows rows per pass over the 4-bit codes.
    for (int64_t first = 0; first < batch; first += lq::cpu::kMaxFusedRows) {
      const int64_t count = std::min<int64_t>(lq::cpu::kMaxFusedRows, batch - first);
      lq::cpu::gemv_4bit(rows.data_ptr<float>() + first * in_features, count, packed.data_ptr<uint8_t>(),
                         absmax.data_ptr<float>(), code.data_ptr<float>(), out_features, in_features, blocksize,
                         y.data_ptr<float>() + first * out_features);
    }
  } else {
    // Training-size batches: dequantize a tile of weight rows, let BLAS multiply it. Rows of
    // y^T are contiguous per tile, so BLAS writes straight into the result.
    auto y_t = at::empty({out_features, batch}, rows.options());
    const int64_t step = tile_rows(in_features);
    for (int64_t o = 0; o < out_features; o += step) {
      const int64_t end = std::min(o + step, out_features);
      auto tile = weight_tile(packed, absmax, code, blocksize, in_features, o, end);
      auto slice = y_t.narrow(0, o, end - o);
      at::mm_out(slice, tile, rows.t());
    }
    y = y_t.t().contiguous();
  }
  auto out_shape = x.sizes().vec();
  out_shape.back() = out_features;
  return y.view(out_shape).to(x.scalar_type());
}

// x (..., in) @ W^T -> (..., out) for a compact exact weight: int8 codes with per-block fp32
// scales, or bf16 values (scales empty); accumulated in fp32, returned in x's dtype.
at::Tensor linear_compact(const at::Tensor& x, const at::Tensor& weight_in, const at::Tensor& scales_in,
                          int64_t blocksize) {
  TORCH_CHECK(x.device().is_cpu() && weight_in.device().is_cpu() && weight_in.dim() == 2, "bad linear_compact call");
  const int64_t out_features = weight_in.size(0), in_features = weight_in.size(1);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == in_features, "input has ", x.size(-1), " features, weight expects ",
              in_features);
  const bool int8 = weight_in.scalar_type() == at::kChar;
  TORCH_CHECK(int8 || weight_in.scalar_type() == at::kBFloat16, "linear_compact: weight must be int8 or bfloat16");
  TORCH_CHECK(!int8 || (blocksize > 0 && scales_in.scalar_type() == at::kFloat &&
                        scales_in.numel() * blocksize == weight_in.numel()),
              "linear_compact: int8 weights need one float32 scale per block");
  follow_torch_threads();
  auto weight = weight_in.contiguous();
  auto scales = scales_in.contiguous();
  auto rows = x.reshape({-1, in_features}).to(at::kFloat).contiguous();
  const int64_t batch = rows.size(0);
  auto y = at::empty({batch, out_features}, rows.options());
  for (int64_t first = 0; first < batch; first += lq::cpu::kMaxFusedRows) {
    const int64_t count = std::min<int64_t>(lq::cpu::kMaxFusedRows, batch - first);
    const float* xs = rows.data_ptr<float>() + first * in_features;
    float* ys = y.data_ptr<float>() + first * out_features;
    if (int8) {
      lq::cpu::gemv_int8(xs, count, weight.data_ptr<int8_t>(), scales.data_ptr<float>(), out_features, in_features,
                         blocksize, ys);
    } else {
      lq::cpu::gemv_bf16(xs, count, reinterpret_cast<const uint16_t*>(weight.data_ptr<at::BFloat16>()), out_features,
                         in_features, ys);
    }
  }
  auto out_shape = x.sizes().vec();
  out_shape.back() = out_features;
  return y.view(out_shape).to(x.scalar_type());
}

// grad (..., out) @ W -> (..., in): one weight tile at a time, never the whole weight.
at::Tensor linear_4bit_input_grad(const at::Tensor& grad, const at::Tensor& packed_in, const at::Tensor& absmax_in,
                                  const at::Tensor& code_in, int64_t blocksize, std::vector<int64_t> shape) {
  check_weight(packed_in, absmax_in, code_in, blocksize, shape);
  const int64_t out_features = shape[0], in_features = shape[1];
  TORCH_CHECK(grad.dim() >= 1 && grad.size(-1) == out_features, "gradient has ", grad.size(-1),
              " features, weight has ", out_features, " outputs");
  auto packed = packed_in.contiguous();
  auto absmax = absmax_in.contiguous();
  auto code = code_in.contiguous();
  auto rows = grad.reshape({-1, out_features}).to(at::kFloat).contiguous();
  const int64_t step = tile_rows(in_features);
  at::Tensor result;
  if (step >= out_features) {
    // One tile (every weight up to 16M values): a plain fp32 GEMM (row-major NN, MKL's fastest
    // layout and dtype on CPUs without AMX) into a fresh result -- no zero fill, no beta pass.
    result = at::mm(rows, weight_tile(packed, absmax, code, blocksize, in_features, 0, out_features));
  } else {
    result = at::zeros({rows.size(0), in_features}, rows.options());
    for (int64_t o = 0; o < out_features; o += step) {
      const int64_t end = std::min(o + step, out_features);
      auto tile = weight_tile(packed, absmax, code, blocksize, in_features, o, end);
      result.addmm_(rows.narrow(1, o, end - o), tile);
    }
  }
  auto out_shape = grad.sizes().vec();
  out_shape.back() = in_features;
  return result.view(out_shape).to(grad.scalar_type());
}

// Batched heterogeneous LoRA into a preallocated y (rows, out); returns the kernel's status code.
int64_t bgmv(const at::Tensor& x, const at::Tensor& pool, const at::Tensor& a_rows, const at::Tensor& b_rows,
             const at::Tensor& ranks, const at::Tensor& scales, const at::Tensor& indices, at::Tensor& y) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(), "bgmv: x must be contiguous float32 (rows, in)");
  TORCH_CHECK(pool.scalar_type() == at::kFloat && pool.is_contiguous(), "bgmv: pool must be contiguous float32");
  TORCH_CHECK(a_rows.dim() == 2 && b_rows.sizes() == a_rows.sizes() && a_rows.is_contiguous() && b_rows.is_contiguous(),
              "bgmv: row tables must be contiguous (slots, max_rank)");
  TORCH_CHECK(y.scalar_type() == at::kFloat && y.dim() == 2 && y.size(0) == x.size(0) && y.is_contiguous(),
              "bgmv: y must be contiguous float32 (rows, out)");
  follow_torch_threads();
  return lq::cpu::bgmv(x.data_ptr<float>(), x.size(0), x.size(1), y.size(1), pool.data_ptr<float>(), pool.numel(),
                       a_rows.data_ptr<int64_t>(), b_rows.data_ptr<int64_t>(), ranks.data_ptr<int64_t>(),
                       scales.data_ptr<float>(), a_rows.size(0), a_rows.size(1), indices.data_ptr<int64_t>(),
                       y.data_ptr<float>());
}

// Drives one ThreadChoice with given timings (tests): call i runs on a team if the choice picks one,
// costing team_ms[i], else single_ms[i], at load level levels[i]; returns the thread count picked
// for each call. The policy is tested without depending on how busy the test machine is.
std::vector<int64_t> simulate_thread_choice(const std::vector<double>& team_ms, const std::vector<double>& single_ms,
                                            const std::vector<int64_t>& levels) {
  TORCH_CHECK(team_ms.size() == single_ms.size() && levels.size() == team_ms.size(), "one time of each and a level per call");
  lq::cpu::ThreadChoice choice;
  std::vector<int64_t> picked;
  for (size_t i = 0; i < team_ms.size(); ++i) {
    const int threads = choice.pick(2, static_cast<int>(levels[i]));
    choice.record(threads, (threads > 1 ? team_ms[i] : single_ms[i]) / 1000.0, 1);
    picked.push_back(threads);
  }
  return picked;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lightning_qlora CPU kernels";
  m.def("bgmv", &bgmv, "batched heterogeneous LoRA; returns a status code");
  m.def("quantize_4bit", &quantize_4bit, "blockwise 4-bit quantization");
  m.def("dequantize_4bit", &dequantize_4bit, "blockwise 4-bit dequantization");
  m.def("quantize_blockwise_8bit", &quantize_blockwise_8bit, "blockwise 8-bit quantization, nearest rounding");
  m.def("dequantize_blockwise_8bit", &dequantize_blockwise_8bit, "blockwise 8-bit dequantization");
  m.def("linear_4bit", &linear_4bit, "x @ W^T with a 4-bit weight");
  m.def("linear_4bit_input_grad", &linear_4bit_input_grad, "grad @ W with a 4-bit weight");
  m.def("linear_compact", &linear_compact, "x @ W^T with an int8-blockwise or bf16 weight");
  m.def("helper_chunks", &lq::cpu::helper_chunks, "chunks run by the loop pool's helper threads so far");
  m.def("set_kernel_threads", &set_kernel_threads, "threads of our kernels (0: follow torch.get_num_threads())");
  m.def("machine_load_level", &lq::cpu::machine_load_level, "other processes' CPU use, quarters of the cores (0..4)");
  m.def("simulate_thread_choice", &simulate_thread_choice, "a loop site's thread choices for given timings (tests)");
}
