// Sparse weight delta on CPU (fastpeft/ops/sparse_delta.py), the ops of diff pruning's fixed-mask training:
//
//   sddmm(a, b, indices) -> fp32 [nnz]      out[j] = sum_m a[m, r_j] * b[m, c_j],  (r_j, c_j) = divmod(indices[j], C)
//   scatter_delta_(weight, base_values, values, indices)      weight[r_j, c_j] = round(base_values[j] + values[j])
//
// a [M, R] and b [M, C] are dy and x of a linear layer, with any strides; indices are strictly increasing flat
// positions in the row-major [R, C] weight (int32 or int64). Sums are fp32 whatever the input dtype.
//
// SDDMM: a nonzero needs a column of a and a column of b, which row-major storage spreads over M rows. So rows are
// taken in blocks of kBlock: the columns that the mask uses are gathered from the block (as fp32) into two small
// transposed buffers, one kBlock-vector per used column, that stay in L2; each nonzero's share of its dot product
// is then a contiguous vector loop over two buffer rows, added into the nonzero's 8-lane accumulator (lanes are
// summed once, at the end). The nonzeros of one mask row come one after another (sorted indices), so that row's
// vector of a stays in registers while they pass. Only used columns are gathered, so a very sparse mask reads
// little more than it needs; a and b are read in place, whatever their strides (nothing is made contiguous),
// eight rows at a time with the next eight prefetched, and bf16 / fp16 are widened eight lanes at a time.
// Each thread owns a range of blocks and its accumulators; their sums are added in thread order at the end, so
// results are deterministic for a given thread count. Accumulators take 32 bytes per nonzero and thread, so masks
// beyond kMaxPass nonzeros go in several passes. Where the mask is dense enough that BLAS's full a^T b costs less
// (kDenseFraction), the op computes that and gathers.
//
// Measured alternatives (4096 x 768 x 768, density 0.005, fp32, 2 cores): register 8 x 8 transposes of whole
// column groups instead of the gather (no faster, measured again with the caches cold; slower for sparse column
// use); all 32 rows of a block per column group, so that each column's slot is written whole (1.5-2x slower); the
// next block prefetched during the multiply-adds (1.15x slower); a scalar accumulator per nonzero
// (lane sums every block: 1.1x slower at density 0.005, 1.6x at 0.05); no prefetch (1.2x slower); prefetching the
// buffer rows of upcoming nonzeros (no gain); fp16 through c10's scalar conversion (1.6x slower); chunks handed
// out dynamically to the threads (no gain when the machine is busy, where one thread beats two anyway).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "dropout_hash.h"  // FASTPEFT_CPU_CLONES
#include "vec8.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace fastpeft {
namespace {

#define FASTPEFT_DISPATCH_FLOAT_TYPES(TYPE, NAME, ...)                    \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

// Eight 32-bit integers and eight 16-bit floats (their bits), beside vec8.h's fp32 Vec.
typedef uint32_t Bits8 __attribute__((vector_size(32)));
typedef int32_t Int8 __attribute__((vector_size(32)));
typedef uint16_t Half8 __attribute__((vector_size(16)));
constexpr int64_t kBlock = 32;  // rows per block: four vectors per buffered column (16 and 64 measured slower)
constexpr int64_t kVecs = kBlock / kLanes;
// nnz / (R C) from which the dense product and a gather cost less (measured at 4096 x 768 x 768 fp32, 1 and 2
// threads: the two meet between 0.2 and 0.3)
constexpr double kDenseFraction = 0.25;
constexpr int64_t kMaxPass = 1 << 18;  // nonzeros per pass: 8 MiB of accumulators per thread
constexpr int64_t kWorkPerThread = 1 << 16;  // gathered elements + multiply-adds below which a thread does not pay

// Eight 16-bit floats (their bits) as fp32, vectorized: c10's scalar conversions are not.
FASTPEFT_INLINE Vec widen(Half8 h, c10::BFloat16) { return (Vec)(__builtin_convertvector(h, Bits8) << 16); }

FASTPEFT_INLINE Vec widen(Half8 h, c10::Half) {
  const Bits8 w = __builtin_convertvector(h, Bits8), magnitude = w & 0x7FFFu, shifted = magnitude << 13;
  const Bits8 finite = (Bits8)((Vec)shifted * 0x1p112f);  // rebias the exponent; exact for subnormals too
  const Bits8 special = (Bits8)((Int8)magnitude >= 0x7C00);  // inf / NaN: all-ones exponent
  return (Vec)((finite & ~special) | ((shifted | 0x7F800000u) & special) | ((w & 0x8000u) << 16));
}

// p[i][o] for the eight rows p[0..8) as fp32.
FASTPEFT_INLINE Vec gather8(const float* const* p, int64_t o) {
  return Vec{p[0][o], p[1][o], p[2][o], p[3][o], p[4][o], p[5][o], p[6][o], p[7][o]};
}

template <typename T>
FASTPEFT_INLINE Vec gather8(const T* const* p, int64_t o) {
  return widen(Half8{p[0][o].x, p[1][o].x, p[2][o].x, p[3][o].x, p[4][o].x, p[5][o].x, p[6][o].x, p[7][o].x}, T());
}

// Where the nonzeros sit: the columns of a (mask rows) and of b (mask columns) that the mask uses, as element
// offsets in an operand row, ascending; per nonzero the buffer slot of its column of b. The nonzeros of the k-th
// used mask row are [row_start[k], row_start[k + 1]).
struct MaskLayout {
  std::vector<int64_t> a_offsets, b_offsets, row_start;
  std::vector<int32_t> b_slot;
};

// The indices are strictly increasing positions in [0, numel): the kernels read and write where they say.
template <typename I>
void check_positions(const I* indices, int64_t nnz, int64_t numel, const char* op) {
  int64_t previous = -1;
  for (int64_t j = 0; j < nnz; ++j) {
    const int64_t position = static_cast<int64_t>(indices[j]);
    TORCH_CHECK(position > previous && position < numel, op, ": indices must be strictly increasing flat positions ",
                "in [0, ", numel, "), got ", position, " at ", j, " after ", previous);
    previous = position;
  }
}

template <typename I>
MaskLayout decode(const I* indices, int64_t nnz, int64_t C, int64_t a_step, int64_t b_step) {
  MaskLayout layout;
  layout.b_slot.resize(nnz);
  std::vector<int32_t> col_slot(C, -1);
  for (int64_t j = 0; j < nnz; ++j) {
    const int64_t position = static_cast<int64_t>(indices[j]), row = position / C, col = position - row * C;
    if (j == 0 || row != static_cast<int64_t>(indices[j - 1]) / C) {
      layout.a_offsets.push_back(row * a_step);
      layout.row_start.push_back(j);
    }
    col_slot[col] = 0;
    layout.b_slot[j] = static_cast<int32_t>(col);
  }
  layout.row_start.push_back(nnz);
  for (int64_t col = 0; col < C; ++col) {  // slots in column order, so that gathers walk each row forwards
    if (col_slot[col] < 0) continue;
    col_slot[col] = static_cast<int32_t>(layout.b_offsets.size());
    layout.b_offsets.push_back(col * b_step);
  }
  for (auto& slot : layout.b_slot) slot = col_slot[slot];
  return layout;
}

// A 2-D operand read through its strides.
template <typename T>
struct Strided {
  const T* data;
  int64_t row_step;

  const T* row(int64_t i) const { return data + i * row_step; }
};

// out[k * kBlock + i] = src[m + i, column k] as fp32 for the used columns (`offsets`), zero for i >= rows: the
// block's used columns, transposed.
template <typename T>
FASTPEFT_INLINE void gather_columns(const Strided<T>& src, int64_t m, int64_t rows, const std::vector<int64_t>& offsets,
                                    float* out) {
  const int64_t n = static_cast<int64_t>(offsets.size());
  const int64_t* off = offsets.data();
  for (int64_t i0 = 0; i0 < kBlock; i0 += kLanes) {
    if (i0 + kLanes <= rows) {
      const T* p[kLanes];
      for (int64_t i = 0; i < kLanes; ++i) p[i] = src.row(m + i0 + i);
      for (int64_t k = 0; k < n; ++k) {
        if (k % 16 == 0)  // the same columns of the next eight rows: 1.2x faster, 8 rows ahead better than 16 or 32
          for (int64_t i = 0; i < kLanes; ++i) __builtin_prefetch(p[i] + kLanes * src.row_step + off[k], 0, 3);
        store(out + k * kBlock + i0, gather8(p, off[k]));
      }
    } else {  // the last block's partial (or empty) group of rows
      for (int64_t k = 0; k < n; ++k) {
        for (int64_t i = 0; i < kLanes; ++i)
          out[k * kBlock + i0 + i] = i0 + i < rows ? static_cast<float>(src.row(m + i0 + i)[off[k]]) : 0.0f;
      }
    }
  }
}

// out[j] = sum over rows [m0, m1) of a[m, r_j] b[m, c_j], for every nonzero j. at / bt: scratch of [used
// columns, kBlock] floats each; lanes: [nnz, 8] scratch.
template <typename T>
FASTPEFT_CPU_CLONES void sddmm_rows(const Strided<T> a, const Strided<T> b, const MaskLayout& layout, int64_t m0,
                                    int64_t m1, float* at, float* bt, float* lanes, float* out) {
  const int64_t used_rows = static_cast<int64_t>(layout.a_offsets.size()), nnz = layout.row_start.back();
  const int64_t* row_start = layout.row_start.data();
  const int32_t* b_slot = layout.b_slot.data();
  std::fill(lanes, lanes + nnz * kLanes, 0.0f);
  for (int64_t m = m0; m < m1; m += kBlock) {
    const int64_t rows = std::min(kBlock, m1 - m);
    gather_columns(a, m, rows, layout.a_offsets, at);
    gather_columns(b, m, rows, layout.b_offsets, bt);
    for (int64_t k = 0; k < used_rows; ++k) {
      Vec av[kVecs];
      for (int64_t v = 0; v < kVecs; ++v) av[v] = load(at + k * kBlock + v * kLanes);
      for (int64_t j = row_start[k]; j < row_start[k + 1]; ++j) {
        const float* bp = bt + static_cast<int64_t>(b_slot[j]) * kBlock;
        Vec sum = load(lanes + j * kLanes);
        for (int64_t v = 0; v < kVecs; ++v) sum += av[v] * load(bp + v * kLanes);
        store(lanes + j * kLanes, sum);
      }
    }
  }
  for (int64_t j = 0; j < nnz; ++j) out[j] = lane_sum(load(lanes + j * kLanes));
}

// One pass of the SDDMM over the nonzeros that `layout` describes: fp32 [nnz].
at::Tensor sddmm_pass(const at::Tensor& a, const at::Tensor& b, const MaskLayout& layout) {
  const int64_t M = a.size(0), nnz = layout.row_start.back();
  const int64_t used = static_cast<int64_t>(layout.a_offsets.size() + layout.b_offsets.size());
  const int64_t blocks = (M + kBlock - 1) / kBlock, work = (used + nnz) * kBlock;  // per block
  const int64_t chunks = std::max<int64_t>(
      1, std::min<int64_t>({at::get_num_threads(), blocks, blocks * work / kWorkPerThread}));
  const int64_t rows_per = (blocks + chunks - 1) / chunks * kBlock;
  auto partial = at::empty({chunks, nnz}, a.options().dtype(at::kFloat));
  FASTPEFT_DISPATCH_FLOAT_TYPES(a.scalar_type(), "sddmm", [&] {
    const Strided<scalar_t> as{a.const_data_ptr<scalar_t>(), a.stride(0)};
    const Strided<scalar_t> bs{b.const_data_ptr<scalar_t>(), b.stride(0)};
    at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      std::vector<Vec> scratch(used * kVecs + nnz);
      float* at_ = reinterpret_cast<float*>(scratch.data());
      float* bt_ = at_ + layout.a_offsets.size() * kBlock;
      float* lanes = bt_ + layout.b_offsets.size() * kBlock;
      for (int64_t chunk = begin; chunk < end; ++chunk) {
        sddmm_rows(as, bs, layout, chunk * rows_per, std::min(M, (chunk + 1) * rows_per), at_, bt_, lanes,
                   partial.mutable_data_ptr<float>() + chunk * nnz);
      }
    });
  });
  return chunks == 1 ? partial.view({nnz}) : partial.sum(0);
}

template <typename T, typename I>
void scatter_range(T* weight, int64_t row_step, int64_t col_step, int64_t C, const float* base, const float* values,
                   const I* indices, int64_t begin, int64_t end) {
  for (int64_t j = begin; j < end; ++j) {
    const int64_t position = static_cast<int64_t>(indices[j]), row = position / C;
    weight[row * row_step + (position - row * C) * col_step] = static_cast<T>(base[j] + values[j]);
  }
}

// ---- checks and ops ---------------------------------------------------------------------------------------------

void check_float_matrix(const at::Tensor& t, const char* name, const char* op) {
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D, got ", t.dim(), "-D of shape ", t.sizes());
  TORCH_CHECK(t.is_cpu() || t.is_meta(), op, ": ", name, " must be on the cpu, got ", t.device());
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, op, ": ", name,
              " dtype must be float32, bfloat16 or float16, got ", dtype);
}

void check_vector(const at::Tensor& t, const char* name, int64_t length, const at::Tensor& first, const char* op) {
  TORCH_CHECK(t.dim() == 1 && (length < 0 || t.size(0) == length), op, ": ", name, " must be 1-D",
              length < 0 ? "" : " of the values' length", ", got shape ", t.sizes());
  TORCH_CHECK(t.device() == first.device(), op, ": ", name, " device ", t.device(), " must match ", first.device());
}

void check_index_dtype(const at::Tensor& indices, const char* op) {
  TORCH_CHECK(indices.scalar_type() == at::kInt || indices.scalar_type() == at::kLong, op,
              ": indices dtype must be int32 or int64, got ", indices.scalar_type());
}

at::Tensor sddmm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& indices) {
  constexpr const char* op = "sddmm";
  check_float_matrix(a, "a", op);
  check_float_matrix(b, "b", op);
  TORCH_CHECK(b.scalar_type() == a.scalar_type(), op, ": b dtype ", b.scalar_type(), " must match a dtype ",
              a.scalar_type());
  TORCH_CHECK(b.size(0) == a.size(0), op, ": a ", a.sizes(), " and b ", b.sizes(), " must have the same rows M");
  check_vector(indices, "indices", -1, a, op);
  check_index_dtype(indices, op);
  const int64_t M = a.size(0), R = a.size(1), C = b.size(1), nnz = indices.size(0);
  const auto f32 = a.options().dtype(at::kFloat);
  if (a.is_meta()) return at::empty({nnz}, f32);
  if (nnz == 0) return at::zeros({0}, f32);
  const auto idx = indices.contiguous();
  AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), op, [&] {
    check_positions(idx.const_data_ptr<index_t>(), nnz, R * C, op);
  });
  if (M == 0) return at::zeros({nnz}, f32);
  if (nnz >= kDenseFraction * static_cast<double>(R * C)) {  // dense enough for BLAS to win
    return at::mm(a.t().to(at::kFloat), b.to(at::kFloat)).view({-1}).index_select(0, idx);
  }
  auto out = at::empty({nnz}, f32);
  AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), op, [&] {
    for (int64_t j0 = 0; j0 < nnz; j0 += kMaxPass) {
      const int64_t count = std::min(kMaxPass, nnz - j0);
      const auto layout = decode(idx.const_data_ptr<index_t>() + j0, count, C, a.stride(1), b.stride(1));
      out.narrow(0, j0, count).copy_(sddmm_pass(a, b, layout));
    }
  });
  return out;
}

at::Tensor& scatter_delta_(at::Tensor& weight, const at::Tensor& base_values, const at::Tensor& values,
                           const at::Tensor& indices) {
  constexpr const char* op = "scatter_delta_";
  check_float_matrix(weight, "weight", op);
  check_vector(values, "values", -1, weight, op);
  check_vector(base_values, "base_values", values.size(0), weight, op);
  check_vector(indices, "indices", values.size(0), weight, op);
  TORCH_CHECK(base_values.scalar_type() == weight.scalar_type(), op, ": base_values dtype ",
              base_values.scalar_type(), " must match weight dtype ", weight.scalar_type());
  check_index_dtype(indices, op);
  const int64_t nnz = values.size(0), R = weight.size(0), C = weight.size(1);
  if (weight.is_meta() || nnz == 0) return weight;
  const auto idx = indices.contiguous();
  const auto base32 = base_values.to(at::kFloat).contiguous(), values32 = values.to(at::kFloat).contiguous();
  AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), op, [&] {
    const index_t* ix = idx.const_data_ptr<index_t>();
    check_positions(ix, nnz, R * C, op);  // O(nnz), as the writes
    FASTPEFT_DISPATCH_FLOAT_TYPES(weight.scalar_type(), op, [&] {
      scalar_t* w = weight.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, nnz, 1 << 15, [&](int64_t begin, int64_t end) {
        scatter_range(w, weight.stride(0), weight.stride(1), C, base32.const_data_ptr<float>(),
                      values32.const_data_ptr<float>(), ix, begin, end);
      });
    });
  });
  return weight;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastpeft, m) {
  m.def("sddmm(Tensor a, Tensor b, Tensor indices) -> Tensor");
  m.def("scatter_delta_(Tensor(a!) weight, Tensor base_values, Tensor values, Tensor indices) -> Tensor(a!)");
}

TORCH_LIBRARY_IMPL(fastpeft, CompositeExplicitAutograd, m) {
  m.impl("sddmm", &sddmm);
  m.impl("scatter_delta_", &scatter_delta_);
}

}  // namespace fastpeft
