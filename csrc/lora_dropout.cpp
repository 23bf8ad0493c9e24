// LoRA input dropout on CPU with the counter-based mask of fastpeft/ops/dropout.py, bit for bit.
//
// The mask (csrc/dropout_hash.h) keeps element (row, col) with probability 1-p and scales it by 1/(1-p);
// arithmetic is fp32 whatever the dtype. The column loops are branch-free, so the compiler vectorizes them.
// Rows are split over torch's thread pool with at::parallel_for, so torch.set_num_threads governs them.
//
// The ops are registered in the `fastpeft` torch.library namespace (callable as torch.ops.fastpeft.*,
// visible to torch.compile). One CompositeExplicitAutograd kernel serves CPU tensors and meta tensors (shapes
// only); any other device fails the device check with a message. Dropout seeds are tensors (csrc/seed.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "dropout_hash.h"
#include "seed.h"

#include <algorithm>
#include <cstdint>
#include <optional>

namespace fastpeft {
namespace {

// The dtypes with native kernels: float32 and bfloat16 (scalar_t inside). float16 goes through float32
// because c10::Half's scalar conversions do not vectorize (10x slower) while torch's .to() does.
#define FASTPEFT_DISPATCH_FLOAT_TYPES(TYPE, NAME, ...)                    \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

constexpr int64_t kElementsPerTask = 16384;  // smallest piece of work handed to one thread

// The row kernels take the mask by value so that its fields live in registers (a store through `xd` could
// otherwise alias `mask.scale`), and the column loops are branch-free: the compiler vectorizes them.
// A unit column stride gets its own loop; any other stride is served by the general one.

// xd[col] = x[col * x_step] * factor, for one row.
template <typename T>
FASTPEFT_CPU_CLONES void forward_row(const HashMask mask, int64_t row, const T* x, int64_t x_step, T* xd,
                                     int64_t K) {
  const uint32_t key = mask.row_key(row), columns = static_cast<uint32_t>(K);  // 32-bit counters: see load_row
  if (x_step == 1) {
    for (uint32_t col = 0; col < columns; ++col)
      xd[col] = static_cast<T>(static_cast<float>(x[col]) * mask.factor(key, col));
  } else {
    for (uint32_t col = 0; col < columns; ++col)
      xd[col] = static_cast<T>(static_cast<float>(x[col * x_step]) * mask.factor(key, col));
  }
}

FASTPEFT_CPU_CLONES void mask_row(const HashMask mask, int64_t row, bool* keep, int64_t K) {
  const uint32_t key = mask.row_key(row), columns = static_cast<uint32_t>(K);
  for (uint32_t col = 0; col < columns; ++col) keep[col] = mask.keep(key, col);
}

// Runs body(row) for every row in [0, rows), split over torch's threads in pieces of >= kElementsPerTask.
template <typename Body>
void for_each_row(int64_t rows, int64_t cols, const Body& body) {
  const int64_t grain = std::max<int64_t>(1, kElementsPerTask / std::max<int64_t>(cols, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) body(row);
  });
}

void check_2d(const at::Tensor& t, const char* name, const char* op) {
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D [M, K], got ", t.dim(), "-D of shape ", t.sizes());
  TORCH_CHECK(t.is_cpu() || t.is_meta(), op, ": ", name, " must be on the cpu, got ", t.device());
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, op, ": ", name,
              " dtype must be float32, bfloat16 or float16, got ", dtype);
}

void check_p(double p, const char* op) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, op, ": p must satisfy 0 <= p < 1, got ", p);
}

// xd = x * keep / (1-p), contiguous, in x's dtype (the fp32 product rounded once to it).
at::Tensor dropout_forward(const at::Tensor& x, const at::Tensor& seed, double p) {
  constexpr const char* op = "dropout_forward";
  check_2d(x, "x", op);
  check_p(p, op);
  check_seed(seed, x, op);
  check_mask_extent(x.size(0), x.size(1), op);
  auto xd = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (x.is_meta() || x.numel() == 0) return xd;
  if (x.scalar_type() == at::kHalf) {  // the same numbers: fp32 products, each rounded once to half
    return dropout_forward(x.to(at::kFloat), seed, p).to(at::kHalf);
  }

  const HashMask mask(seed_value(seed), p);
  const int64_t K = x.size(1);
  FASTPEFT_DISPATCH_FLOAT_TYPES(x.scalar_type(), op, [&] {
    const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
    scalar_t* xd_ptr = xd.mutable_data_ptr<scalar_t>();
    for_each_row(x.size(0), K, [&](int64_t row) {
      forward_row(mask, row, x_ptr + row * x.stride(0), x.stride(1), xd_ptr + row * K, K);
    });
  });
  return xd;
}

// The boolean [M, K] keep-mask itself, for tests (`device` is for tracing: cpu or meta).
at::Tensor dropout_mask(int64_t seed, int64_t M, int64_t K, double p, std::optional<at::Device> device) {
  constexpr const char* op = "dropout_mask";
  TORCH_CHECK(M >= 0 && K >= 0, op, ": M and K must be >= 0, got M=", M, ", K=", K);
  check_p(p, op);
  check_mask_extent(M, K, op);
  const at::Device where = device.value_or(at::kCPU);
  TORCH_CHECK(where.is_cpu() || where.is_meta(), op, ": device must be cpu, got ", where);
  auto keep = at::empty({M, K}, at::TensorOptions().dtype(at::kBool).device(where));
  if (where.is_meta()) return keep;
  const HashMask mask(seed, p);
  bool* keep_ptr = keep.mutable_data_ptr<bool>();
  for_each_row(M, K, [&](int64_t row) { mask_row(mask, row, keep_ptr + row * K, K); });
  return keep;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastpeft, m) {
  m.def("dropout_forward(Tensor x, Tensor seed, float p) -> Tensor");
  m.def("dropout_mask(int seed, int M, int K, float p, *, Device? device=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastpeft, CompositeExplicitAutograd, m) {
  m.impl("dropout_forward", &dropout_forward);
  m.impl("dropout_mask", &dropout_mask);
}

}  // namespace fastpeft
