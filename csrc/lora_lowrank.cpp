// The thin low-rank products of LoRA on CPU, fused so that each pass reads its large operand once:
//
//   lora_shrink(x, a, seed, p)          s  = dropout_p(x) @ a^T                                  x  [M, K]
//   lora_dy_pass(dy, b, s, scaling)     g  = scaling * dy @ b,  db = scaling * dy^T @ s           dy [M, N]
//   lora_dx_pass_(x, g, a, dx, seed, p) da = g^T @ dropout_p(x), and dx += mask/(1-p) * (g @ a)   x  [M, K]
//
// with a [r, K], b [N, r] and the mask of csrc/dropout_hash.h (p == 0: no mask). BLAS runs these shapes (one
// dimension of a few dozen) far below the machine's speed and the dropout costs [M, K] temporaries besides.
//
// Every kernel walks row blocks of the large operand: kRows rows are converted to fp32 (and masked) into a
// small buffer, then a register-blocked loop over 8-lane vectors multiplies them with the small operand.
// Sums run in fp32 per lane in a fixed order (no reassociation), whatever the input dtype. The small operand
// and the per-thread accumulator are cut into column tiles that stay in L2 while all rows of a thread pass.
// Rows are split into at most one chunk per thread; each chunk owns its da / db accumulator and the chunks are
// summed in order at the end, so results are deterministic for a given thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "dropout_hash.h"
#include "vec8.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

namespace fastpeft {
namespace {

// fp32 and bf16 have native kernels; fp16 goes through fp32 (c10::Half's conversions do not vectorize).
#define FASTPEFT_DISPATCH_FLOAT_TYPES(TYPE, NAME, ...)                    \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

constexpr int64_t kRows = 4;            // rows per register block: 4 accumulators + 4 inputs + 3 fit 16 registers
constexpr int64_t kTileFloats = 16384;  // 64 KiB: a tile of the small operand (and of the accumulator) in L2
constexpr int64_t kMaxTile = 1024;      // columns per tile, so that kRows buffered rows stay in L1
constexpr int64_t kWorkPerChunk = 1 << 18;  // multiply-adds below which a chunk is not worth a thread

// fp32 scratch on a 32-byte boundary: with rows of a multiple of 8 floats, no vector load splits a cache line.
struct Scratch {
  std::vector<Vec> storage;

  explicit Scratch(int64_t floats) : storage((floats + kLanes - 1) / kLanes) {}
  float* data() { return reinterpret_cast<float*>(storage.data()); }
};

int64_t round_up(int64_t n, int64_t multiple) { return (n + multiple - 1) / multiple * multiple; }

// Row stride of fp32 scratch and padded operands with n columns: a multiple of 8 floats plus one cache line, so
// that rows of a power-of-two length do not all fall into the same L1 sets (4 KiB aliasing).
int64_t row_stride(int64_t n) { return round_up(n, kLanes) + 2 * kLanes; }

// Columns per tile: as many as keep `per_column` floats per column within kTileFloats, a multiple of 8.
int64_t tile_width(int64_t columns, int64_t per_column) {
  const int64_t fit = std::max<int64_t>(kLanes, kTileFloats / std::max<int64_t>(per_column, 1) / kLanes * kLanes);
  return std::min({fit, kMaxTile, round_up(columns, kLanes)});
}

// A 2-D tensor read through its strides (rows of a view, transposed or not, without a copy).
template <typename T>
struct Strided {
  const T* data;
  int64_t row_step, col_step;

  const T* row(int64_t i) const { return data + i * row_step; }
};

template <typename T>
Strided<T> strided(const at::Tensor& t) {
  return {t.const_data_ptr<T>(), t.stride(0), t.stride(1)};
}

// out[0, n) = src[col0 + k] (times the mask factor of (row, col0 + k) when `masked`), zeros up to `padded`.
// Always inlined into the kernels, so each CPU clone converts with its own vector width.
template <typename T>
FASTPEFT_INLINE void load_row(const Strided<T>& src, int64_t row, int64_t col0, int64_t n, int64_t padded,
                              const HashMask& mask, bool masked, float* out) {
  const T* in = src.row(row) + col0 * src.col_step;
  const int64_t step = src.col_step;
  if (masked) {
    const uint32_t key = mask.row_key(row);
    if (step == 1) {
      for (int64_t k = 0; k < n; ++k) out[k] = static_cast<float>(in[k]) * mask.factor(key, col0 + k);
    } else {
      for (int64_t k = 0; k < n; ++k) out[k] = static_cast<float>(in[k * step]) * mask.factor(key, col0 + k);
    }
  } else if (step == 1) {
    for (int64_t k = 0; k < n; ++k) out[k] = static_cast<float>(in[k]);
  } else {
    for (int64_t k = 0; k < n; ++k) out[k] = static_cast<float>(in[k * step]);
  }
  std::fill(out + n, out + padded, 0.0f);
}

// Asks the cache for part `part` of `parts` of rows [row, row + rows) x columns [col0, col0 + n), so that the
// next row block streams in from memory while this one computes. Rows with a unit column stride only.
template <typename T>
FASTPEFT_INLINE void prefetch_part(const T* data, int64_t row_step, int64_t col_step, int64_t row, int64_t rows,
                                   int64_t col0, int64_t n, int64_t part, int64_t parts, int write = 0) {
  if (col_step != 1 || rows <= 0) return;
  constexpr int64_t kLine = 64 / sizeof(T);
  const int64_t lines = (n + kLine - 1) / kLine, begin = lines * part / parts, end = lines * (part + 1) / parts;
  for (int64_t i = 0; i < rows; ++i) {
    const T* base = data + (row + i) * row_step + col0;
    for (int64_t l = begin; l < end; ++l) __builtin_prefetch(base + l * kLine, write, 3);
  }
}

// The mask factors of (row, col0 + k), k < n.
FASTPEFT_INLINE void load_factors(const HashMask& mask, int64_t row, int64_t col0, int64_t n, float* out) {
  const uint32_t key = mask.row_key(row);
  for (int64_t k = 0; k < n; ++k) out[k] = mask.factor(key, col0 + k);
}

// The small operands as fp32, zero-padded: [rows_padded, cols_padded], row-major.
at::Tensor padded_float(const at::Tensor& t, int64_t rows_padded, int64_t cols_padded, double scale = 1.0) {
  auto out = at::zeros({rows_padded, cols_padded}, t.options().dtype(at::kFloat));
  auto body = out.narrow(0, 0, t.size(0)).narrow(1, 0, t.size(1));
  body.copy_(t);
  if (scale != 1.0) body.mul_(scale);
  return out;
}

// ---- the row-range kernels: rows [m0, m1) of the large operand --------------------------------------------

// s[m, j] = sum_k dropout(x)[m, k] * a[j, k]. a: [r_pad, K_pad] fp32 (r_pad even), s: [M, r].
template <typename T>
FASTPEFT_CPU_CLONES void shrink_rows(const Strided<T> x, int64_t K, const float* a, int64_t K_pad, int64_t r,
                                     int64_t r_pad, const HashMask mask, bool masked, int64_t tile, int64_t m0,
                                     int64_t m1, float* s, float* xb /* [kRows, tile] */) {
  const int64_t ld = row_stride(tile);  // of the scratch rows
  for (int64_t k0 = 0; k0 < K; k0 += tile) {
    const int64_t width = std::min(tile, K - k0), padded = round_up(width, kLanes);
    for (int64_t m = m0; m < m1; m += kRows) {
      const int64_t rows = std::min(kRows, m1 - m);
      for (int64_t i = 0; i < kRows; ++i) {
        if (i < rows) load_row(x, m + i, k0, width, padded, mask, masked, xb + i * ld);
        else std::fill(xb + i * ld, xb + i * ld + padded, 0.0f);
      }
      const int64_t next_rows = std::min(kRows, m1 - m - kRows);
      for (int64_t j = 0; j < r_pad; j += 2) {  // two ranks against kRows rows: 8 accumulators
        prefetch_part(x.data, x.row_step, x.col_step, m + kRows, next_rows, k0, width, j / 2, r_pad / 2);
        const float* a0 = a + j * K_pad + k0;
        const float* a1 = a0 + K_pad;
        Vec acc[kRows][2] = {};
        for (int64_t c = 0; c < padded; c += kLanes) {
          const Vec va0 = load(a0 + c), va1 = load(a1 + c);
          for (int64_t i = 0; i < kRows; ++i) {
            const Vec xv = load(xb + i * ld + c);
            acc[i][0] += xv * va0;
            acc[i][1] += xv * va1;
          }
        }
        for (int64_t i = 0; i < rows; ++i) {
          for (int64_t jj = 0; jj < 2 && j + jj < r; ++jj) {
            float& out = s[(m + i) * r + j + jj];
            out = k0 == 0 ? lane_sum(acc[i][jj]) : out + lane_sum(acc[i][jj]);
          }
        }
      }
    }
  }
}

// g[m, :] = dy[m, :] @ b_scaled and db_acc += dy[m, :]^T s_scaled[m, :]. b: [N, r_pad] fp32 (times scaling),
// s_scaled: [M, r_pad] fp32 (times scaling), g: [M, r], db_acc: [N, r_pad] (this chunk's), r_pad % 8 == 0.
template <typename T>
FASTPEFT_CPU_CLONES void dy_rows(const Strided<T> dy, int64_t N, const float* b, const float* s, int64_t r,
                                 int64_t r_pad, int64_t tile, int64_t m0, int64_t m1, float* g, float* db,
                                 float* dyb /* [kRows, tile] */, const float* zeros /* [r_pad] */) {
  const HashMask no_mask(0, 0.0);
  const int64_t ld = row_stride(tile);  // of the scratch rows
  for (int64_t n0 = 0; n0 < N; n0 += tile) {
    const int64_t width = std::min(tile, N - n0);
    for (int64_t m = m0; m < m1; m += kRows) {
      const int64_t rows = std::min(kRows, m1 - m);
      for (int64_t i = 0; i < kRows; ++i) {
        if (i < rows) load_row(dy, m + i, n0, width, width, no_mask, false, dyb + i * ld);
        else std::fill(dyb + i * ld, dyb + i * ld + width, 0.0f);
      }
      const int64_t next_rows = std::min(kRows, m1 - m - kRows);
      for (int64_t c = 0; c < r_pad; c += kLanes) {  // 8 ranks at a time: kRows g accumulators, one db row
        prefetch_part(dy.data, dy.row_step, dy.col_step, m + kRows, next_rows, n0, width, c / kLanes, r_pad / kLanes);
        Vec s_lanes[kRows], g_acc[kRows] = {};
        for (int64_t i = 0; i < kRows; ++i) s_lanes[i] = load((i < rows ? s + (m + i) * r_pad : zeros) + c);
        for (int64_t n = 0; n < width; ++n) {
          const Vec bv = load(b + (n0 + n) * r_pad + c);
          float* db_n = db + (n0 + n) * r_pad + c;
          Vec dbv = load(db_n);
          for (int64_t i = 0; i < kRows; ++i) {
            const float d = dyb[i * ld + n];
            g_acc[i] += d * bv;
            dbv += d * s_lanes[i];
          }
          store(db_n, dbv);
        }
        for (int64_t i = 0; i < rows; ++i) {
          float* out = g + (m + i) * r + c;
          for (int64_t l = 0; l < std::min(kLanes, r - c); ++l) out[l] = n0 == 0 ? g_acc[i][l] : out[l] + g_acc[i][l];
        }
      }
    }
  }
}

// da_acc += g[m, :]^T dropout(x)[m, :] and, when dx, dx[m, :] += factor * (g[m, :] @ a). a: [r, K_pad] fp32,
// g: [M, r] fp32, da_acc: [r, K_pad] (this chunk's), dx: [M, K] contiguous or null.
template <typename T>
FASTPEFT_CPU_CLONES void dx_rows(const Strided<T> x, int64_t K, const float* g, int64_t r, const float* a,
                                 int64_t K_pad, T* dx, const HashMask mask, bool masked, int64_t tile, int64_t m0,
                                 int64_t m1, float* da, float* xb, float* fb, float* tb /* each [kRows, tile] */,
                                 const float* zeros /* [r] */) {
  const int64_t ld = row_stride(tile);  // of the scratch rows
  for (int64_t k0 = 0; k0 < K; k0 += tile) {
    const int64_t width = std::min(tile, K - k0), padded = round_up(width, kLanes);
    for (int64_t m = m0; m < m1; m += kRows) {
      const int64_t rows = std::min(kRows, m1 - m);
      const float* g_rows[kRows];
      for (int64_t i = 0; i < kRows; ++i) {
        g_rows[i] = i < rows ? g + (m + i) * r : zeros;
        if (i < rows) load_row(x, m + i, k0, width, padded, mask, masked, xb + i * ld);
        else std::fill(xb + i * ld, xb + i * ld + padded, 0.0f);
        if (dx != nullptr && masked && i < rows) load_factors(mask, m + i, k0, width, fb + i * ld);
      }
      const int64_t next_rows = std::min(kRows, m1 - m - kRows);
      for (int64_t c = 0; c < padded; c += kLanes) {  // 8 columns: kRows inputs and dx terms, one da row
        if (c % 64 == 0) {  // one cache line of each next row (and of dx's next rows) per 64 columns
          prefetch_part(x.data, x.row_step, x.col_step, m + kRows, next_rows, k0 + c, std::min<int64_t>(64, width - c), 0, 1);
          if (dx != nullptr) prefetch_part(dx, K, 1, m + kRows, next_rows, k0 + c, std::min<int64_t>(64, width - c), 0, 1, 1);
        }
        Vec x_lanes[kRows], t_acc[kRows] = {};
        for (int64_t i = 0; i < kRows; ++i) x_lanes[i] = load(xb + i * ld + c);
        for (int64_t j = 0; j < r; ++j) {
          float* da_j = da + j * K_pad + k0 + c;
          Vec dav = load(da_j);
          if (dx != nullptr) {
            const Vec av = load(a + j * K_pad + k0 + c);
            for (int64_t i = 0; i < kRows; ++i) {
              const float gij = g_rows[i][j];
              dav += gij * x_lanes[i];
              t_acc[i] += gij * av;
            }
          } else {
            for (int64_t i = 0; i < kRows; ++i) dav += g_rows[i][j] * x_lanes[i];
          }
          store(da_j, dav);
        }
        if (dx != nullptr)
          for (int64_t i = 0; i < kRows; ++i) store(tb + i * ld + c, t_acc[i]);
      }
      if (dx == nullptr) continue;
      for (int64_t i = 0; i < rows; ++i) {  // fp32 sum, rounded once to T; the product rounded before the add
        T* out = dx + (m + i) * K + k0;
        const float* t = tb + i * ld;
        if (masked) {
          const float* f = fb + i * ld;
          for (int64_t k = 0; k < width; ++k) out[k] = static_cast<T>(static_cast<float>(out[k]) + t[k] * f[k]);
        } else {
          for (int64_t k = 0; k < width; ++k) out[k] = static_cast<T>(static_cast<float>(out[k]) + t[k]);
        }
      }
    }
  }
}

// ---- chunking, checks, ops ------------------------------------------------------------------------------

// Rows [0, M) in chunks of whole row blocks, at most one per thread and each worth a thread.
struct Chunks {
  int64_t count, rows_per;

  Chunks(int64_t M, int64_t work_per_row) {
    const int64_t worth = std::max<int64_t>(1, M * std::max<int64_t>(work_per_row, 1) / kWorkPerChunk);
    count = std::max<int64_t>(1, std::min<int64_t>({at::get_num_threads(), worth, (M + kRows - 1) / kRows}));
    rows_per = round_up((M + count - 1) / count, kRows);
    count = std::max<int64_t>(1, (M + rows_per - 1) / rows_per);
  }

  // body(chunk, m0, m1) for every chunk, over torch's threads.
  template <typename Body>
  void run(int64_t M, const Body& body) const {
    at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
      for (int64_t chunk = begin; chunk < end; ++chunk)
        body(chunk, chunk * rows_per, std::min(M, (chunk + 1) * rows_per));
    });
  }
};

void check_matrix(const at::Tensor& t, const char* name, const char* shape, const char* op) {
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D ", shape, ", got ", t.dim(), "-D of shape ", t.sizes());
  TORCH_CHECK(t.is_cpu() || t.is_meta(), op, ": ", name, " must be on the cpu, got ", t.device());
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, op, ": ", name,
              " dtype must be float32, bfloat16 or float16, got ", dtype);
}

// `t` must have `size` along `dim`, where `what` says which size that is.
void check_size(const at::Tensor& t, const char* name, int64_t dim, int64_t size, const char* what,
                const char* op) {
  TORCH_CHECK(t.size(dim) == size, op, ": ", name, " of shape ", t.sizes(), " must have ", what, " = ", size,
              " in dimension ", dim);
}

void check_float32(const at::Tensor& t, const char* name, const char* op) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " dtype must be float32, got ", t.scalar_type());
}

void check_device(const at::Tensor& t, const char* name, const at::Tensor& first, const char* first_name,
                  const char* op) {
  TORCH_CHECK(t.device() == first.device(), op, ": ", name, " device ", t.device(), " must match ", first_name,
              " device ", first.device());
}

void check_dropout(double p, int64_t rows, const char* op) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, op, ": p must satisfy 0 <= p < 1, got ", p);
  TORCH_CHECK(rows <= int64_t{0xFFFFFFFF}, op, ": M must be below 2**32, got ", rows);
}

at::Tensor lora_shrink(const at::Tensor& x, const at::Tensor& a, int64_t seed, double p) {
  constexpr const char* op = "lora_shrink";
  check_matrix(x, "x", "[M, K]", op);
  check_matrix(a, "a", "[r, K]", op);
  check_size(a, "a", 1, x.size(1), "K (x.size(1))", op);
  check_device(a, "a", x, "x", op);
  check_dropout(p, x.size(0), op);
  const int64_t M = x.size(0), K = x.size(1), r = a.size(0);
  auto s = at::empty({M, r}, x.options().dtype(at::kFloat));
  if (x.is_meta() || s.numel() == 0) return s;
  if (K == 0) return s.zero_();
  if (x.scalar_type() == at::kHalf) return lora_shrink(x.to(at::kFloat), a, seed, p);

  const int64_t r_pad = round_up(r, 2), K_pad = row_stride(K), tile = tile_width(K, r_pad);
  const auto a32 = padded_float(a, r_pad, K_pad);
  const HashMask mask(seed, p);
  const Chunks chunks(M, K * r);
  FASTPEFT_DISPATCH_FLOAT_TYPES(x.scalar_type(), op, [&] {
    const auto xs = strided<scalar_t>(x);
    chunks.run(M, [&](int64_t, int64_t m0, int64_t m1) {
      Scratch xb(kRows * row_stride(tile));
      shrink_rows(xs, K, a32.const_data_ptr<float>(), K_pad, r, r_pad, mask, p > 0.0, tile, m0, m1,
                  s.mutable_data_ptr<float>(), xb.data());
    });
  });
  return s;
}

std::tuple<at::Tensor, at::Tensor> lora_dy_pass(const at::Tensor& dy, const at::Tensor& b, const at::Tensor& s,
                                                double scaling) {
  constexpr const char* op = "lora_dy_pass";
  check_matrix(dy, "dy", "[M, N]", op);
  check_matrix(b, "b", "[N, r]", op);
  check_matrix(s, "s", "[M, r]", op);
  check_float32(s, "s", op);
  check_size(b, "b", 0, dy.size(1), "N (dy.size(1))", op);
  check_size(s, "s", 0, dy.size(0), "M (dy.size(0))", op);
  check_size(s, "s", 1, b.size(1), "r (b.size(1))", op);
  check_device(b, "b", dy, "dy", op);
  check_device(s, "s", dy, "dy", op);
  const int64_t M = dy.size(0), N = dy.size(1), r = b.size(1);
  const auto f32 = dy.options().dtype(at::kFloat);
  auto g = at::empty({M, r}, f32);
  if (dy.is_meta()) return {g, at::empty({N, r}, f32)};
  if (M == 0 || N == 0 || r == 0) return {g.zero_(), at::zeros({N, r}, f32)};
  if (dy.scalar_type() == at::kHalf) return lora_dy_pass(dy.to(at::kFloat), b, s, scaling);

  const int64_t r_pad = round_up(r, kLanes), tile = tile_width(N, 2 * r_pad);
  const auto b32 = padded_float(b, N, r_pad, scaling);
  const auto s32 = padded_float(s, M, r_pad, scaling);
  const Chunks chunks(M, N * r);
  auto db_acc = at::zeros({chunks.count, N, r_pad}, f32);
  FASTPEFT_DISPATCH_FLOAT_TYPES(dy.scalar_type(), op, [&] {
    const auto dys = strided<scalar_t>(dy);
    chunks.run(M, [&](int64_t chunk, int64_t m0, int64_t m1) {
      Scratch dyb(kRows * row_stride(tile)), zeros(r_pad);
      dy_rows(dys, N, b32.const_data_ptr<float>(), s32.const_data_ptr<float>(), r, r_pad, tile, m0, m1,
              g.mutable_data_ptr<float>(), db_acc.mutable_data_ptr<float>() + chunk * N * r_pad, dyb.data(),
              zeros.data());
    });
  });
  return {g, db_acc.sum(0).narrow(1, 0, r).contiguous()};
}

at::Tensor lora_dx_pass_(const at::Tensor& x, const at::Tensor& g, const at::Tensor& a,
                         const std::optional<at::Tensor>& dx, int64_t seed, double p) {
  constexpr const char* op = "lora_dx_pass_";
  check_matrix(x, "x", "[M, K]", op);
  check_matrix(g, "g", "[M, r]", op);
  check_float32(g, "g", op);
  check_matrix(a, "a", "[r, K]", op);
  check_size(g, "g", 0, x.size(0), "M (x.size(0))", op);
  check_size(a, "a", 1, x.size(1), "K (x.size(1))", op);
  check_size(a, "a", 0, g.size(1), "r (g.size(1))", op);
  check_device(g, "g", x, "x", op);
  check_device(a, "a", x, "x", op);
  if (dx.has_value()) {
    check_matrix(*dx, "dx", "[M, K]", op);
    TORCH_CHECK(dx->sizes() == x.sizes(), op, ": dx shape ", dx->sizes(), " must match x shape ", x.sizes());
    TORCH_CHECK(dx->scalar_type() == x.scalar_type(), op, ": dx dtype ", dx->scalar_type(), " must match x dtype ",
                x.scalar_type());
    check_device(*dx, "dx", x, "x", op);
    TORCH_CHECK(dx->is_contiguous(), op, ": dx must be contiguous, got strides ", dx->strides());
  }
  check_dropout(p, x.size(0), op);
  const int64_t M = x.size(0), K = x.size(1), r = a.size(0);
  const auto f32 = x.options().dtype(at::kFloat);
  if (x.is_meta()) return at::empty({r, K}, f32);
  if (M == 0 || K == 0 || r == 0) return at::zeros({r, K}, f32);
  if (x.scalar_type() == at::kHalf) {  // fp32 arithmetic, dx rounded once to half
    if (!dx.has_value()) return lora_dx_pass_(x.to(at::kFloat), g, a, std::nullopt, seed, p);
    auto dx_float = dx->to(at::kFloat);
    auto da = lora_dx_pass_(x.to(at::kFloat), g, a, dx_float, seed, p);
    dx->copy_(dx_float);
    return da;
  }

  const bool with_dx = dx.has_value();
  const int64_t K_pad = row_stride(K), tile = tile_width(K, (with_dx ? 2 : 1) * r);
  const auto a32 = padded_float(a, r, K_pad);
  const auto g32 = g.contiguous();
  const HashMask mask(seed, p);
  const Chunks chunks(M, (with_dx ? 2 : 1) * K * r);
  auto da_acc = at::zeros({chunks.count, r, K_pad}, f32);
  FASTPEFT_DISPATCH_FLOAT_TYPES(x.scalar_type(), op, [&] {
    const auto xs = strided<scalar_t>(x);
    scalar_t* dx_ptr = with_dx ? dx->mutable_data_ptr<scalar_t>() : nullptr;
    chunks.run(M, [&](int64_t chunk, int64_t m0, int64_t m1) {
      Scratch buffers(3 * kRows * row_stride(tile)), zeros(r);
      float* xb = buffers.data();
      dx_rows(xs, K, g32.const_data_ptr<float>(), r, a32.const_data_ptr<float>(), K_pad, dx_ptr, mask, p > 0.0,
              tile, m0, m1, da_acc.mutable_data_ptr<float>() + chunk * r * K_pad, xb, xb + kRows * row_stride(tile),
              xb + 2 * kRows * row_stride(tile), zeros.data());
    });
  });
  return da_acc.sum(0).narrow(1, 0, K).contiguous();
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastpeft, m) {
  m.def("lora_shrink(Tensor x, Tensor a, int seed, float p) -> Tensor");
  m.def("lora_dy_pass(Tensor dy, Tensor b, Tensor s, float scaling) -> (Tensor, Tensor)");
  m.def("lora_dx_pass_(Tensor x, Tensor g, Tensor a, Tensor(a!)? dx, int seed, float p) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastpeft, CompositeExplicitAutograd, m) {
  m.impl("lora_shrink", &lora_shrink);
  m.impl("lora_dy_pass", &lora_dy_pass);
  m.impl("lora_dx_pass_", &lora_dx_pass_);
}

}  // namespace fastpeft
