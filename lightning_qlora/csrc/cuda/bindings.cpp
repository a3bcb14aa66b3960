// Python bindings of the CUDA kernels and managed memory: the only CUDA-side file that sees torch. It checks what
// would corrupt memory, takes raw pointers, and calls the launchers of csrc/cuda/*.cu on the
// stream Python passes in (torch.cuda.current_stream().cuda_stream; Python also selects the
// device). Only torch's device-independent headers are used, so this file compiles against
// any torch build -- CI compile-checks it with nvcc against the CPU wheel's headers. Typed
// validation happens in Python first (ops/_extension.py), as for the CPU kernels. Never run on
// a GPU here (the build machines have none).
#include <torch/extension.h>

#include <numeric>

#include "launchers.h"
#include "lightning_qlora/torch_args.h"

namespace lq = lightning_qlora;
namespace lqc = lightning_qlora::cuda;

namespace {

cudaStream_t as_stream(int64_t handle) { return reinterpret_cast<cudaStream_t>(static_cast<intptr_t>(handle)); }

void check_launch(cudaError_t status, const char* op) {
  TORCH_CHECK(status == cudaSuccess, "lightning_qlora CUDA ", op, " failed: ", cudaGetErrorString(status));
}

std::tuple<at::Tensor, at::Tensor> quantize_4bit(const at::Tensor& input, const at::Tensor& code, int64_t blocksize,
                                                 c10::optional<int64_t> seed, int64_t stream) {
  TORCH_CHECK(input.is_cuda() && blocksize > 0 && blocksize % 2 == 0, "bad quantize_4bit call");
  auto source = input.contiguous();
  const int64_t n = source.numel();
  auto packed = at::empty({(n + 1) / 2}, source.options().dtype(at::kByte));
  auto absmax = at::empty({(n + blocksize - 1) / blocksize}, source.options().dtype(at::kFloat));
  const auto type = lq::float_type_of(source.scalar_type(), "CUDA");
  check_launch(lqc::launch_quantize_4bit(source.data_ptr(), type, n, lq::codebook_of(code), blocksize,
                                         seed.has_value(), static_cast<uint64_t>(seed.value_or(0)),
                                         packed.data_ptr<uint8_t>(), absmax.data_ptr<float>(),
                                         as_stream(stream)),
               "quantize_4bit");
  return {packed, absmax};
}

at::Tensor dequantize_4bit(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code, int64_t blocksize,
                           std::vector<int64_t> shape, at::ScalarType dtype, int64_t stream) {
  const int64_t n = std::accumulate(shape.begin(), shape.end(), int64_t{1}, std::multiplies<int64_t>());
  TORCH_CHECK(packed.is_cuda() && packed.scalar_type() == at::kByte && packed.numel() == (n + 1) / 2,
              "packed size does not match shape");
  TORCH_CHECK(absmax.scalar_type() == at::kFloat && absmax.numel() == (n + blocksize - 1) / blocksize, "absmax size");
  auto out = at::empty(shape, packed.options().dtype(dtype));
  auto codes = packed.contiguous();
  auto scales = absmax.contiguous();
  const auto book = lq::codebook_of(code);
  check_launch(lqc::launch_dequantize_4bit(codes.data_ptr<uint8_t>(), scales.data_ptr<float>(), book, n, blocksize,
                                           lq::float_type_of(dtype, "CUDA"), out.data_ptr(),
                                           as_stream(stream)),
               "dequantize_4bit");
  return out;
}

void check_weight(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code, int64_t blocksize,
                  const std::vector<int64_t>& shape) {
  TORCH_CHECK(packed.is_cuda(), "4-bit codes must be on the CUDA device");
  lq::check_4bit_weight(packed, absmax, code, blocksize, shape);
}

// x (..., in) @ W^T: fused GEMV for up to kMaxFusedRows rows, else dequantize + cuBLAS.
at::Tensor linear_4bit(const at::Tensor& x, const at::Tensor& packed_in, const at::Tensor& absmax_in,
                       const at::Tensor& code_in, int64_t blocksize, std::vector<int64_t> shape, int64_t stream) {
  check_weight(packed_in, absmax_in, code_in, blocksize, shape);
  const int64_t out_features = shape[0], in_features = shape[1];
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == in_features, "input has ", x.size(-1), " features, weight expects ",
              in_features);
  auto packed = packed_in.contiguous();
  auto absmax = absmax_in.contiguous();
  auto code = code_in.to(x.device()).contiguous();
  auto rows = x.reshape({-1, in_features}).to(at::kFloat).contiguous();
  const int64_t batch = rows.size(0);
  at::Tensor y;
  if (batch <= lqc::kMaxFusedRows && batch > 0) {
    y = at::empty({batch, out_features}, rows.options());
    check_launch(lqc::launch_gemv_4bit(rows.data_ptr<float>(), batch, packed.data_ptr<uint8_t>(),
                                       absmax.data_ptr<float>(), code.data_ptr<float>(), out_features, in_features,
                                       blocksize, y.data_ptr<float>(), as_stream(stream)),
                 "linear_4bit");
  } else {
    y = at::mm(rows, dequantize_4bit(packed, absmax, code, blocksize, shape, at::kFloat, stream).t());
  }
  auto out_shape = x.sizes().vec();
  out_shape.back() = out_features;
  return y.view(out_shape).to(x.scalar_type());
}

// grad (..., out) @ W -> (..., in) without materializing W.
at::Tensor linear_4bit_input_grad(const at::Tensor& grad, const at::Tensor& packed_in, const at::Tensor& absmax_in,
                                  const at::Tensor& code_in, int64_t blocksize, std::vector<int64_t> shape,
                                  int64_t stream) {
  check_weight(packed_in, absmax_in, code_in, blocksize, shape);
  const int64_t out_features = shape[0], in_features = shape[1];
  TORCH_CHECK(grad.dim() >= 1 && grad.size(-1) == out_features, "gradient has ", grad.size(-1),
              " features, weight has ", out_features, " outputs");
  auto packed = packed_in.contiguous();
  auto absmax = absmax_in.contiguous();
  auto code = code_in.to(grad.device()).contiguous();
  auto rows = grad.reshape({-1, out_features}).to(at::kFloat).contiguous();
  auto result = at::empty({rows.size(0), in_features}, rows.options());
  check_launch(lqc::launch_input_grad_4bit(rows.data_ptr<float>(), rows.size(0), packed.data_ptr<uint8_t>(),
                                           absmax.data_ptr<float>(), code.data_ptr<float>(), out_features,
                                           in_features, blocksize, result.data_ptr<float>(),
                                           as_stream(stream)),
               "linear_4bit_input_grad");
  auto out_shape = grad.sizes().vec();
  out_shape.back() = in_features;
  return result.view(out_shape).to(grad.scalar_type());
}

// Batched heterogeneous LoRA (lightning_qlora/bgmv.h): y[b] = scale_s * B_s (A_s x[b]), s = indices[b].
// The caller allocates y (rows, out_features), as for the CPU binding; Python validated the tables.
void bgmv(const at::Tensor& x, const at::Tensor& pool, const at::Tensor& a_rows, const at::Tensor& b_rows,
          const at::Tensor& ranks, const at::Tensor& scales, const at::Tensor& indices, at::Tensor& y, int64_t stream) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "bgmv: x must be contiguous float32 (rows, in) on CUDA");
  TORCH_CHECK(pool.is_cuda() && pool.scalar_type() == at::kFloat && pool.is_contiguous(),
              "bgmv: pool must be contiguous float32 on CUDA");
  TORCH_CHECK(a_rows.dim() == 2 && b_rows.sizes() == a_rows.sizes() && a_rows.is_contiguous() && b_rows.is_contiguous(),
              "bgmv: row tables must be contiguous (slots, max_rank)");
  TORCH_CHECK(y.is_cuda() && y.scalar_type() == at::kFloat && y.dim() == 2 && y.size(0) == x.size(0) && y.is_contiguous(),
              "bgmv: y must be contiguous float32 (rows, out) on CUDA");
  check_launch(lqc::launch_bgmv(x.data_ptr<float>(), x.size(0), x.size(1), y.size(1), pool.data_ptr<float>(),
                                a_rows.data_ptr<int64_t>(), b_rows.data_ptr<int64_t>(), ranks.data_ptr<int64_t>(),
                                scales.data_ptr<float>(), a_rows.size(1), indices.data_ptr<int64_t>(),
                                y.data_ptr<float>(), as_stream(stream)),
               "bgmv");
}

// Managed memory for the paged optimizers (paged_memory.cu). Pointers cross to Python as
// integers; a CUDA failure raises RuntimeError with CUDA's message, which
// optim/stores/cuda_managed.py turns into a typed PageStoreSetupError.
int64_t managed_alloc(int64_t nbytes, int64_t device) {
  TORCH_CHECK(nbytes > 0, "managed_alloc: nbytes must be positive, got ", nbytes);
  void* ptr = nullptr;
  check_launch(lqc::managed_alloc(&ptr, static_cast<size_t>(nbytes), static_cast<int>(device)), "cudaMallocManaged");
  return static_cast<int64_t>(reinterpret_cast<intptr_t>(ptr));
}

void managed_free(int64_t ptr) {
  check_launch(lqc::managed_free(reinterpret_cast<void*>(static_cast<intptr_t>(ptr))), "cudaFree of managed memory");
}

void managed_prefetch(int64_t ptr, int64_t nbytes, int64_t device, int64_t stream) {
  check_launch(lqc::managed_prefetch(reinterpret_cast<void*>(static_cast<intptr_t>(ptr)), static_cast<size_t>(nbytes),
                                     static_cast<int>(device), as_stream(stream)),
               device < 0 ? "cudaMemPrefetchAsync to the host" : "cudaMemPrefetchAsync to the GPU");
}

std::tuple<int64_t, int64_t> device_memory_info() {
  size_t free_bytes = 0, total_bytes = 0;
  check_launch(lqc::device_memory_info(&free_bytes, &total_bytes), "cudaMemGetInfo");
  return {static_cast<int64_t>(free_bytes), static_cast<int64_t>(total_bytes)};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lightning_qlora CUDA kernels";
  m.def("quantize_4bit", &quantize_4bit, "blockwise 4-bit quantization");
  m.def("dequantize_4bit", &dequantize_4bit, "blockwise 4-bit dequantization");
  m.def("linear_4bit", &linear_4bit, "x @ W^T with a 4-bit weight");
  m.def("linear_4bit_input_grad", &linear_4bit_input_grad, "grad @ W with a 4-bit weight");
  m.def("bgmv", &bgmv, "batched heterogeneous LoRA into a caller-allocated y");
  m.def("managed_alloc", &managed_alloc, "zero-filled CUDA managed memory preferring the host; returns its address");
  m.def("managed_free", &managed_free, "free managed memory");
  m.def("managed_prefetch", &managed_prefetch, "migrate a managed range to a GPU (device >= 0) or the host (-1)");
  m.def("device_memory_info", &device_memory_info, "(free, total) bytes of the current device");
  m.attr("HOST_DEVICE") = lqc::kHostDevice;
}
