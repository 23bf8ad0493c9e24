// The thin low-rank products of LoRA on CPU, fused so that each pass reads its large operand once:
//
//   lora_lowrank_out(x, a, b, bias, scaling, seed, p)
//                                       s  = dropout_p(x) @ a^T, out = bias + scaling * s @ b^T    x  [M, K]
//   lora_dy_pass(dy, b, s, scaling)     g  = scaling * dy @ b,  db = scaling * dy^T @ s           dy [M, N]
//   lora_dx_pass_(x, g, a, dx, seed, p) da = g^T @ dropout_p(x), and dx += mask/(1-p) * (g @ a)   x  [M, K]
//   lora_da_pass(x, g, a, seed, p)      da alone                                                  x  [M, K]
//   lora_grad_pass(x, dy, a, b, scaling)  da and db without dropout, s and g recomputed per panel  x, dy
//
// with a [r, K], b [N, r] and the mask of csrc/dropout_hash.h (p == 0: no mask). BLAS runs these shapes (one
// dimension of a few dozen) well below the machine's speed, and the dropout costs [M, K] temporaries besides.
//
// Every kernel walks blocks of rows of the large operand: the rows are converted to fp32 (and masked, each mask
// bit hashed once) into a panel, then register-blocked multiply-add kernels run GEMM's outer-product scheme on it,
// the accumulators in registers and every load feeding several multiply-adds:
//   reduce_block  out[i, j] = sum_c panel[i, c] * small[c, j]     6 rows x 16 ranks or 12 x 8      (s, g)
//   rank_block    out[c, j] += sum_i panel[i, c] * small[i, j]    6 columns x 16 ranks or 12 x 8   (db, da^T)
//   expand_add_block  out[i, c] (+)= f[i, c] sum_j g[i, j] a[j, c]  kXR rows x kXV vectors (out, dx)
// Ranks are padded to a multiple of 8 and taken 16 (or a last 8) at a time. Sums run in fp32 in a fixed order
// whatever the input dtype. Rows are split into at most one chunk per thread; each chunk owns its da / db
// accumulator and the chunks are summed in order at the end, so results are deterministic for a given thread
// count (and a given CPU: the AVX2 + FMA build rounds each multiply-add once). The next panel's rows are
// prefetched while one computes.
//
// Measured (4096 x 768 x 768, r = 16, fp32, one thread of the 2-core AMD EPYC): lora_grad_pass runs at ~80% of
// the rate of MKL's large square GEMMs; against MKL's thin GEMMs s = x a^T 1.4x, g + db 1.6x, da 1.2x faster. The
// former 4-row kernels without FMA or prefetch were 1.2x (s) to 2.7x (dx with dropout) slower than these. The
// forward writes bias + low-rank term and the backward the masked G A before the base GEMM accumulates into
// them (1-4 ms less per step than adding them to its output, which reads that [M, N] tensor back). Those writes
// stay in the cache for the GEMM: streaming them past it (non-temporal stores) made pass + GEMM 0-9% slower at
// every shape measured, 2048-8192 rows of 384-3072 columns (the dx pass of 2048 x 1536 alone 1.5x slower).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "dropout_hash.h"
#include "seed.h"
#include "vec8.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

namespace fastpeft {
namespace {

// fp32 and bf16 have native kernels; fp16 goes through fp32 (c10::Half's conversions do not vectorize).
#define FASTPEFT_DISPATCH_FLOAT_TYPES(TYPE, NAME, ...)                    \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

// Register blocks (AVX2 has 16 vector registers): 6 x 2 or 12 x 1 accumulators + their operands + 1 broadcast
// for reduce / rank blocks, 4 x 3 + 3 + 1 for expand blocks.
constexpr int64_t kXR = 4, kXV = 3;
// Rows (reduce) or columns (rank) of a register block of NV vectors of ranks: 12 for a group of 8 ranks, where 6
// accumulators alone could not cover the FMA's latency (4-5 cycles at two FMAs a cycle) and left it waiting.
template <int64_t NV>
constexpr int64_t kLines = NV == 1 ? 12 : 6;
constexpr int64_t kMaxLines = 12;                 // rows of a panel are padded to a multiple of it
constexpr int64_t kRankGroup = 16;                // ranks per reduce / rank block
constexpr int64_t kXCols = kXV * kLanes;          // columns per expand block
constexpr int64_t kBlockRows = 24;                // rows per panel: a multiple of kMaxLines and kXR
constexpr int64_t kWorkPerChunk = 1 << 18;        // multiply-adds below which a chunk is not worth a thread

// Zeroed fp32 scratch on a 32-byte boundary (small operands, accumulators): with rows of a multiple of 8 floats,
// no vector load splits a cache line.
struct Scratch {
  std::vector<Vec> storage;

  explicit Scratch(int64_t floats) : storage((floats + kLanes - 1) / kLanes) {}
  float* data() { return reinterpret_cast<float*>(storage.data()); }
  const float* data() const { return reinterpret_cast<const float*>(storage.data()); }
};

// This thread's panel buffer of at least `floats`, kept from call to call: panels of a few hundred KiB allocated
// per call cost an mmap and its page faults each time (glibc maps blocks over 128 KiB). Every kernel writes the
// panel rows it reads; rows past a block's last, read by a register block and then discarded, hold earlier
// values (zeros at first), never garbage.
float* thread_panels(int64_t floats) {
  thread_local std::unique_ptr<Vec[]> buffer;
  thread_local int64_t capacity = 0;
  const int64_t vectors = (floats + kLanes - 1) / kLanes;
  if (vectors > capacity) {
    buffer.reset(new Vec[vectors]());
    capacity = vectors;
  }
  return reinterpret_cast<float*>(buffer.get());
}

int64_t round_up(int64_t n, int64_t multiple) { return (n + multiple - 1) / multiple * multiple; }

// Columns of a panel with n columns, zero-padded to whole blocks of every kernel (a multiple of 6, 8, 12 and 24).
int64_t panel_columns(int64_t n) { return round_up(n, kXCols); }

// Row stride of a panel: its columns plus two vectors, so that rows of a power-of-two length do not all fall into
// the same L1 sets (4 KiB aliasing).
int64_t panel_stride(int64_t n) { return panel_columns(n) + 2 * kLanes; }

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

// out[0, n) = src[row, k] as fp32, times the mask factor of (row, k) when `masked` (the factors also to
// `factors` when not null); zeros up to `padded`.
template <typename T>
FASTPEFT_INLINE void load_row(const Strided<T>& src, int64_t row, int64_t n, int64_t padded, const HashMask& mask,
                              bool masked, float* out, float* factors = nullptr) {
  const T* in = src.row(row);
  const int64_t step = src.col_step;
  if (masked) {  // 32-bit column counters (check_mask_extent): GCC then vectorizes the hash's k * kGolden, ~1.5x faster
    const uint32_t key = mask.row_key(row), columns = static_cast<uint32_t>(n);
    if (factors != nullptr && step == 1) {
      for (uint32_t k = 0; k < columns; ++k) {
        factors[k] = mask.factor(key, k);
        out[k] = static_cast<float>(in[k]) * factors[k];
      }
    } else if (factors != nullptr) {
      for (uint32_t k = 0; k < columns; ++k) {
        factors[k] = mask.factor(key, k);
        out[k] = static_cast<float>(in[k * step]) * factors[k];
      }
    } else if (step == 1) {
      for (uint32_t k = 0; k < columns; ++k) out[k] = static_cast<float>(in[k]) * mask.factor(key, k);
    } else {
      for (uint32_t k = 0; k < columns; ++k) out[k] = static_cast<float>(in[k * step]) * mask.factor(key, k);
    }
  } else if (step == 1) {
    for (int64_t k = 0; k < n; ++k) out[k] = static_cast<float>(in[k]);
  } else {
    for (int64_t k = 0; k < n; ++k) out[k] = static_cast<float>(in[k * step]);
  }
  std::fill(out + n, out + padded, 0.0f);
}

// Rows [m, m + rows) of src into the panel (row stride ld), zero rows up to `rows_padded`.
template <typename T>
FASTPEFT_INLINE void load_panel(const Strided<T>& src, int64_t m, int64_t rows, int64_t rows_padded, int64_t n,
                                int64_t ld, const HashMask& mask, bool masked, float* panel,
                                float* factors = nullptr) {
  const int64_t padded = panel_columns(n);
  for (int64_t i = 0; i < rows_padded; ++i) {
    if (i < rows) load_row(src, m + i, n, padded, mask, masked, panel + i * ld, factors ? factors + i * ld : nullptr);
    else std::fill(panel + i * ld, panel + i * ld + padded, 0.0f);
  }
}

// Prefetches rows [row, row + rows) of a matrix one cache line per next(), so that the rows of the next panel
// stream in from memory while the register blocks compute on this one (the hardware prefetchers fall behind on
// a few dozen concurrent row streams). Rows with a unit column stride only; otherwise next() does nothing.
struct RowPrefetcher {
  const char* base = nullptr;
  int64_t row_bytes = 0, lines_per_row = 0, rows = 0, row = 0, line = 0;
  int write = 0;

  RowPrefetcher() = default;
  template <typename T>
  RowPrefetcher(const T* data, int64_t row_step, int64_t col_step, int64_t first_row, int64_t row_count,
                int64_t cols, int for_write = 0)
      : base(reinterpret_cast<const char*>(data + first_row * row_step)),
        row_bytes(row_step * static_cast<int64_t>(sizeof(T))),
        lines_per_row((cols * static_cast<int64_t>(sizeof(T)) + 63) / 64),
        rows(col_step == 1 && cols > 0 ? std::max<int64_t>(row_count, 0) : 0),
        write(for_write) {}

  FASTPEFT_INLINE void next() {
    if (row >= rows) return;
    const char* address = base + row * row_bytes + line * 64;
    if (write) __builtin_prefetch(address, 1, 3);
    else __builtin_prefetch(address, 0, 3);
    if (++line == lines_per_row) line = 0, ++row;
  }
};

// ---- register blocks ------------------------------------------------------------------------------------

// out[i, v-th vector] = sum_{c < n} panel[i, c] * small[c, v-th vector], i < kLines<NV>.
template <int64_t NV>
FASTPEFT_INLINE void reduce_block(const float* panel, int64_t ld, const float* small, int64_t small_ld, int64_t n,
                                  float* out, int64_t out_ld, RowPrefetcher& prefetch) {
  constexpr int64_t kMR = kLines<NV>;
  Vec acc[kMR][NV];
  for (int64_t i = 0; i < kMR; ++i)
    for (int64_t v = 0; v < NV; ++v) acc[i][v] = Vec{};  // not `= {}`, which GCC clears with `rep stos` in memory
  for (int64_t c = 0; c < n; ++c) {
    if (c % 2 == 0) prefetch.next();
    Vec sv[NV];
    for (int64_t v = 0; v < NV; ++v) sv[v] = load(small + c * small_ld + v * kLanes);
    for (int64_t i = 0; i < kMR; ++i) {
      const float e = panel[i * ld + c];
      for (int64_t v = 0; v < NV; ++v) acc[i][v] += e * sv[v];
    }
  }
  for (int64_t i = 0; i < kMR; ++i)
    for (int64_t v = 0; v < NV; ++v) store(out + i * out_ld + v * kLanes, acc[i][v]);
}

// out[c, v-th vector] += sum_{i < rows} panel[i, c] * small[i, v-th vector], c < kLines<NV>.
template <int64_t NV>
FASTPEFT_INLINE void rank_block(const float* panel, int64_t ld, int64_t rows, const float* small, int64_t small_ld,
                                float* out, int64_t out_ld, RowPrefetcher& prefetch) {
  constexpr int64_t kMC = kLines<NV>;
  Vec acc[kMC][NV];
  for (int64_t c = 0; c < kMC; ++c)
    for (int64_t v = 0; v < NV; ++v) acc[c][v] = load(out + c * out_ld + v * kLanes);
  for (int64_t i = 0; i < rows; ++i) {
    if (i % 4 == 0) prefetch.next();
    Vec sv[NV];
    for (int64_t v = 0; v < NV; ++v) sv[v] = load(small + i * small_ld + v * kLanes);
    for (int64_t c = 0; c < kMC; ++c) {
      const float e = panel[i * ld + c];
      for (int64_t v = 0; v < NV; ++v) acc[c][v] += e * sv[v];
    }
  }
  for (int64_t c = 0; c < kMC; ++c)
    for (int64_t v = 0; v < NV; ++v) store(out + c * out_ld + v * kLanes, acc[c][v]);
}

// What an expand block adds its product to: the output's own values (`accumulate`), else the row `base` (a bias,
// fp32, or zeros when null), so that the output is written without being read.
struct ExpandInto {
  bool accumulate;
  const float* base;
};

// out[i, c] = into + factors[i, c] * sum_{j < r} g[i, j] * a[j, c] for i < rows (<= kXR), c < width (<= kXCols);
// factors null: 1. The sum is rounded once to T.
template <typename T>
FASTPEFT_INLINE void expand_add_block(const float* g, int64_t g_ld, int64_t r, const float* a, int64_t a_ld, T* out,
                                      int64_t out_ld, const float* factors, int64_t f_ld, ExpandInto into,
                                      int64_t rows, int64_t width, RowPrefetcher& prefetch) {
  Vec acc[kXR][kXV];
  for (int64_t i = 0; i < kXR; ++i)
    for (int64_t v = 0; v < kXV; ++v) acc[i][v] = Vec{};
  for (int64_t j = 0; j < r; ++j) {
    if (j % 4 == 0) prefetch.next();
    Vec av[kXV];
    for (int64_t v = 0; v < kXV; ++v) av[v] = load(a + j * a_ld + v * kLanes);
    for (int64_t i = 0; i < kXR; ++i) {
      const float e = g[i * g_ld + j];
      for (int64_t v = 0; v < kXV; ++v) acc[i][v] += e * av[v];
    }
  }
  if constexpr (std::is_same_v<T, float>) {
    if (width == kXCols) {  // the common case, straight from the registers
      for (int64_t i = 0; i < kXR; ++i) {
        if (i >= rows) break;
        for (int64_t v = 0; v < kXV; ++v) {
          float* o = out + i * out_ld + v * kLanes;
          const Vec term = factors != nullptr ? acc[i][v] * load(factors + i * f_ld + v * kLanes) : acc[i][v];
          if (into.accumulate) {
            store(o, load(o) + term);
            continue;
          }
          store(o, (into.base != nullptr ? load(into.base + v * kLanes) : Vec{}) + term);
        }
      }
      return;
    }
  }
  alignas(32) float t[kXR * kXCols];
  for (int64_t i = 0; i < kXR; ++i)
    for (int64_t v = 0; v < kXV; ++v) store(t + i * kXCols + v * kLanes, acc[i][v]);
  for (int64_t i = 0; i < rows; ++i) {
    T* o = out + i * out_ld;
    for (int64_t c = 0; c < width; ++c) {
      const float term = factors != nullptr ? t[i * kXCols + c] * factors[i * f_ld + c] : t[i * kXCols + c];
      const float start = into.accumulate ? static_cast<float>(o[c]) : into.base != nullptr ? into.base[c] : 0.0f;
      o[c] = static_cast<T>(start + term);
    }
  }
}

// Runs block<NV>(j0) over the rank groups of r_pad (a multiple of 8): 16 ranks at a time, then a last 8.
template <typename Block>
FASTPEFT_INLINE void for_rank_groups(int64_t r_pad, const Block& block) {
  int64_t j0 = 0;
  for (; j0 + kRankGroup <= r_pad; j0 += kRankGroup) block(std::integral_constant<int64_t, 2>(), j0);
  if (j0 < r_pad) block(std::integral_constant<int64_t, 1>(), j0);
}

// ---- the chunk kernels: rows [m0, m1) of the large operand ----------------------------------------------

// out[m, :] = bias + dropout(x)[m, :] @ a^T @ bs (written, not read) and s[m, :] = dropout(x)[m, :] @ a^T, with
// aT: [K, r_pad], bs: b^T times scaling as expand_operand lays it out, bias: fp32 [panel_columns(N)] or null,
// sb: [kBlockRows, r_pad] scratch.
template <typename T>
FASTPEFT_INLINE void lowrank_out_chunk_body(const Strided<T> x, int64_t K, int64_t N, const float* aT, const float* bs,
                                            const float* bias, int64_t r, int64_t r_pad, const HashMask mask,
                                            bool masked, int64_t m0, int64_t m1, T* out, float* s,
                                            float* panel, float* sb) {
  const int64_t ld = panel_stride(K);
  for (int64_t m = m0; m < m1; m += kBlockRows) {
    const int64_t rows = std::min(kBlockRows, m1 - m), rows_padded = round_up(rows, kMaxLines);
    load_panel(x, m, rows, rows_padded, K, ld, mask, masked, panel);
    RowPrefetcher next(x.data, x.row_step, x.col_step, m + kBlockRows, std::min(kBlockRows, m1 - m - kBlockRows), K);
    for_rank_groups(r_pad, [&](auto nv, int64_t j0) __attribute__((always_inline)) {
      constexpr int64_t NV = decltype(nv)::value;
      for (int64_t i0 = 0; i0 < rows_padded; i0 += kLines<NV>)
        reduce_block<NV>(panel + i0 * ld, ld, aT + j0, r_pad, K, sb + i0 * r_pad + j0, r_pad, next);
    });
    for (int64_t i = 0; i < rows; ++i) std::memcpy(s + (m + i) * r, sb + i * r_pad, r * sizeof(float));
    RowPrefetcher none;
    for (int64_t i0 = 0; i0 < rows; i0 += kXR)
      for (int64_t c0 = 0; c0 < N; c0 += kXCols)
        expand_add_block(sb + i0 * r_pad, r_pad, r, bs + c0 * r, kXCols, out + (m + i0) * N + c0, N, nullptr, 0,
                         ExpandInto{false, bias != nullptr ? bias + c0 : nullptr}, std::min(kXR, rows - i0),
                         std::min(kXCols, N - c0), none);
  }
}
FASTPEFT_DISPATCHED(lowrank_out_chunk)

// g[m, :] = dy[m, :] @ b and dbT += dy[m, :]^T s[m, :], with b: [N, r_pad] (already times scaling) and s:
// [M, r_pad] fp32, g: [M, r], dbT: [panel_columns(N), r_pad] (this chunk's).
template <typename T>
FASTPEFT_INLINE void dy_chunk_body(const Strided<T> dy, int64_t N, const float* b, const float* s, int64_t r,
                                   int64_t r_pad, int64_t m0, int64_t m1, float* g, float* db, float* panel) {
  const HashMask no_mask(0, 0.0);
  const int64_t ld = panel_stride(N), cols = panel_columns(N);
  alignas(32) float out[kMaxLines * kRankGroup];
  for (int64_t m = m0; m < m1; m += kBlockRows) {
    const int64_t rows = std::min(kBlockRows, m1 - m), rows_padded = round_up(rows, kMaxLines);
    load_panel(dy, m, rows, rows_padded, N, ld, no_mask, false, panel);
    RowPrefetcher next(dy.data, dy.row_step, dy.col_step, m + kBlockRows, std::min(kBlockRows, m1 - m - kBlockRows), N);
    for_rank_groups(r_pad, [&](auto nv, int64_t j0) __attribute__((always_inline)) {
      constexpr int64_t NV = decltype(nv)::value;
      const int64_t ranks = std::min(kRankGroup, r - j0);
      for (int64_t i0 = 0; i0 < rows; i0 += kLines<NV>) {
        reduce_block<NV>(panel + i0 * ld, ld, b + j0, r_pad, N, out, kRankGroup, next);
        for (int64_t i = 0; i < std::min(kLines<NV>, rows - i0); ++i)
          for (int64_t j = 0; j < ranks; ++j) g[(m + i0 + i) * r + j0 + j] = out[i * kRankGroup + j];
      }
      for (int64_t c0 = 0; c0 < cols; c0 += kLines<NV>)
        rank_block<NV>(panel + c0, ld, rows, s + m * r_pad + j0, r_pad, db + c0 * r_pad + j0, r_pad, next);
    });
  }
}
FASTPEFT_DISPATCHED(dy_chunk)

// Both gradients of the low-rank factors without dropout, from one read of x and dy, for when the forward saved
// no shrink (it ran on the folded weight): per panel s = x a^T and g = dy b (times scaling), then
// dbT += dy^T s and daT += x^T g. aT: [K, r_pad], b: [N, r_pad] (times scaling), daT / dbT: this chunk's
// [panel_columns(K or N), r_pad]; sb, gb: [kBlockRows, r_pad] scratch.
template <typename T>
FASTPEFT_INLINE void grad_chunk_body(const Strided<T> x, const Strided<T> dy, int64_t K, int64_t N, const float* aT,
                                     const float* b, float scaling, int64_t r_pad, int64_t m0, int64_t m1, float* da,
                                     float* db, float* x_panel, float* dy_panel, float* sb, float* gb) {
  const HashMask no_mask(0, 0.0);
  const int64_t x_ld = panel_stride(K), dy_ld = panel_stride(N);
  for (int64_t m = m0; m < m1; m += kBlockRows) {
    const int64_t rows = std::min(kBlockRows, m1 - m), rows_padded = round_up(rows, kMaxLines);
    const int64_t next_rows = std::min(kBlockRows, m1 - m - kBlockRows);
    load_panel(x, m, rows, rows_padded, K, x_ld, no_mask, false, x_panel);
    load_panel(dy, m, rows, rows_padded, N, dy_ld, no_mask, false, dy_panel);
    RowPrefetcher next_x(x.data, x.row_step, x.col_step, m + kBlockRows, next_rows, K);
    RowPrefetcher next_dy(dy.data, dy.row_step, dy.col_step, m + kBlockRows, next_rows, N);
    for_rank_groups(r_pad, [&](auto nv, int64_t j0) __attribute__((always_inline)) {
      constexpr int64_t NV = decltype(nv)::value;
      for (int64_t i0 = 0; i0 < rows_padded; i0 += kLines<NV>) {
        reduce_block<NV>(x_panel + i0 * x_ld, x_ld, aT + j0, r_pad, K, sb + i0 * r_pad + j0, r_pad, next_x);
        reduce_block<NV>(dy_panel + i0 * dy_ld, dy_ld, b + j0, r_pad, N, gb + i0 * r_pad + j0, r_pad, next_dy);
      }
    });
    for (int64_t i = 0; i < rows * r_pad; ++i) sb[i] *= scaling;
    for_rank_groups(r_pad, [&](auto nv, int64_t j0) __attribute__((always_inline)) {
      constexpr int64_t NV = decltype(nv)::value;
      for (int64_t c0 = 0; c0 < panel_columns(N); c0 += kLines<NV>)
        rank_block<NV>(dy_panel + c0, dy_ld, rows, sb + j0, r_pad, db + c0 * r_pad + j0, r_pad, next_dy);
      for (int64_t c0 = 0; c0 < panel_columns(K); c0 += kLines<NV>)
        rank_block<NV>(x_panel + c0, x_ld, rows, gb + j0, r_pad, da + c0 * r_pad + j0, r_pad, next_x);
    });
  }
}
FASTPEFT_DISPATCHED(grad_chunk)

// daT += dropout(x)[m, :]^T g[m, :] and, when dx, dx[m, :] += factor * (g[m, :] @ a). g: [M padded, r_pad] fp32,
// a: fp32 as expand_operand lays it out, daT: [panel_columns(K), r_pad] (this chunk's), dx: [M, K] contiguous or null.
template <typename T>
FASTPEFT_INLINE void dx_chunk_body(const Strided<T> x, int64_t K, const float* g, int64_t r, int64_t r_pad,
                                   const float* a, T* dx, bool accumulate, const HashMask mask, bool masked,
                                   int64_t m0, int64_t m1, float* da, float* panel, float* factors) {
  const int64_t ld = panel_stride(K), cols = panel_columns(K);
  const bool keep_factors = dx != nullptr && masked;
  for (int64_t m = m0; m < m1; m += kBlockRows) {
    const int64_t rows = std::min(kBlockRows, m1 - m);
    load_panel(x, m, rows, rows, K, ld, mask, masked, panel, keep_factors ? factors : nullptr);
    const int64_t next_rows = std::min(kBlockRows, m1 - m - kBlockRows);
    // while da's blocks run: this panel's dx rows (about to be written), or without dx the next panel's x rows;
    // while the dx blocks run: the next x rows
    const RowPrefetcher next_x(x.data, x.row_step, x.col_step, m + kBlockRows, next_rows, K);
    RowPrefetcher first = dx != nullptr ? RowPrefetcher(dx, K, 1, m, rows, K, 1) : next_x;
    for_rank_groups(r_pad, [&](auto nv, int64_t j0) __attribute__((always_inline)) {
      constexpr int64_t NV = decltype(nv)::value;
      for (int64_t c0 = 0; c0 < cols; c0 += kLines<NV>)
        rank_block<NV>(panel + c0, ld, rows, g + m * r_pad + j0, r_pad, da + c0 * r_pad + j0, r_pad,
                                        first);
    });
    if (dx == nullptr) continue;
    RowPrefetcher second = next_x;
    for (int64_t i0 = 0; i0 < rows; i0 += kXR)  // g's rows past M are zero (padded)
      for (int64_t c0 = 0; c0 < K; c0 += kXCols)
        expand_add_block(g + (m + i0) * r_pad, r_pad, r, a + c0 * r, kXCols, dx + (m + i0) * K + c0, K,
                         keep_factors ? factors + i0 * ld + c0 : nullptr, ld, ExpandInto{accumulate, nullptr},
                         std::min(kXR, rows - i0), std::min(kXCols, K - c0), second);
  }
}
FASTPEFT_DISPATCHED(dx_chunk)

// ---- chunking, checks, ops ------------------------------------------------------------------------------

// Rows [0, M) in chunks of whole row blocks, at most one per thread and each worth a thread.
struct Chunks {
  int64_t count, rows_per;

  Chunks(int64_t M, int64_t work_per_row) {
    const int64_t worth = std::max<int64_t>(1, M * std::max<int64_t>(work_per_row, 1) / kWorkPerChunk);
    count = std::max<int64_t>(1, std::min<int64_t>({at::get_num_threads(), worth, (M + kBlockRows - 1) / kBlockRows}));
    rows_per = round_up((M + count - 1) / count, kBlockRows);
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

void check_dropout(double p, int64_t rows, int64_t cols, const char* op) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, op, ": p must satisfy 0 <= p < 1, got ", p);
  check_mask_extent(rows, cols, op);
}


// A small operand as fp32 (times scale), zero-padded: [rows_padded, cols_padded], row-major. Plain loops, not
// tensor ops: at the e2e step's sizes the few dispatcher calls of zeros + copy_ + mul_ cost more than the copy.
// block_cols > 0: stored block by block instead, the rows_padded x block_cols block of columns [c0, c0 + block_cols)
// at c0 * rows_padded, row-major (see expand_operand).
Scratch padded_float(const at::Tensor& t, int64_t rows_padded, int64_t cols_padded, double scale = 1.0,
                     int64_t block_cols = 0) {
  Scratch out(rows_padded * cols_padded);
  float* o = out.data();
  const float factor = static_cast<float>(scale);
  const int64_t rows = t.size(0), cols = t.size(1);
  const auto position = [&](int64_t i, int64_t j) {
    return block_cols > 0 ? (j - j % block_cols) * rows_padded + i * block_cols + j % block_cols : i * cols_padded + j;
  };
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, t.scalar_type(), "padded_float", [&] {
    const auto src = strided<scalar_t>(t);
    if (src.col_step <= src.row_step) {  // in the source's memory order: a transposed view is read down its columns
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t j = 0; j < cols; ++j) o[position(i, j)] = static_cast<float>(src.row(i)[j * src.col_step]) * factor;
    } else {
      for (int64_t j = 0; j < cols; ++j)
        for (int64_t i = 0; i < rows; ++i) o[position(i, j)] = static_cast<float>(src.row(i)[j * src.col_step]) * factor;
    }
  });
  return out;
}

// The [r, n] operand of expand blocks as fp32 (times scale), zero-padded to cols_padded columns and stored block by
// block: the r x kXCols block of columns [c0, c0 + kXCols) at c0 * r, row-major. A block's rows then lie in one
// run of memory that the prefetchers stream; read as rows of the whole [r, n] matrix (8-16 pieces of 96 bytes,
// 6 KiB apart for n = 1536), those loads drew a quarter of the dx pass's samples in perf at 2048 x 1536.
Scratch expand_operand(const at::Tensor& t, int64_t cols_padded, double scale = 1.0) {
  return padded_float(t, t.size(0), cols_padded, scale, kXCols);
}

// A [M, r] fp32 operand as the kernels read it, [rows_padded, r_pad] row-major: `t` itself where it already is
// that (no copy), else a padded copy kept in `copy`.
const float* rank_rows(const at::Tensor& t, int64_t rows_padded, int64_t r_pad, std::optional<Scratch>& copy) {
  if (t.size(0) == rows_padded && t.size(1) == r_pad && t.is_contiguous()) return t.const_data_ptr<float>();
  copy.emplace(padded_float(t, rows_padded, r_pad));
  return copy->data();
}

// The chunks' transposed accumulators acc[chunk][c, j] (c < n of a padded n, j < r of r_pad) summed in chunk
// order, times scale, into a new fp32 [r, n] (`transposed`) or [n, r].
at::Tensor sum_chunks(const Scratch& acc, int64_t chunks, int64_t chunk_floats, int64_t n, int64_t r, int64_t r_pad,
                      bool transposed, double scale, const at::TensorOptions& f32) {
  auto out = transposed ? at::empty({r, n}, f32) : at::empty({n, r}, f32);
  float* o = out.mutable_data_ptr<float>();
  const float* a = acc.data();
  const float factor = static_cast<float>(scale);
  for (int64_t c = 0; c < n; ++c)
    for (int64_t j = 0; j < r; ++j) {
      float total = a[c * r_pad + j];
      for (int64_t chunk = 1; chunk < chunks; ++chunk) total += a[chunk * chunk_floats + c * r_pad + j];
      o[transposed ? j * n + c : c * r + j] = factor == 1.0f ? total : total * factor;
    }
  return out;
}

// (out, s): out = bias + scaling * dropout_p(x) @ a^T @ b^T in x's dtype, the starting value of the forward's
// output (the base GEMM then accumulates into it), and the fp32 shrink s = dropout_p(x) @ a^T, in one read of x.
std::tuple<at::Tensor, at::Tensor> lora_lowrank_out(const at::Tensor& x, const at::Tensor& a, const at::Tensor& b,
                                                    const std::optional<at::Tensor>& bias, double scaling,
                                                    const at::Tensor& seed, double p) {
  constexpr const char* op = "lora_lowrank_out";
  check_matrix(x, "x", "[M, K]", op);
  check_matrix(a, "a", "[r, K]", op);
  check_matrix(b, "b", "[N, r]", op);
  check_size(a, "a", 1, x.size(1), "K (x.size(1))", op);
  check_size(b, "b", 1, a.size(0), "r (a.size(0))", op);
  check_device(a, "a", x, "x", op);
  check_device(b, "b", x, "x", op);
  const int64_t M = x.size(0), K = x.size(1), N = b.size(0), r = a.size(0);
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, op, ": bias must have shape [N] = [", N, "], got ",
                bias->sizes());
    check_device(*bias, "bias", x, "x", op);
  }
  check_dropout(p, M, K, op);
  check_seed(seed, x, op);
  auto out = at::empty({M, N}, x.options().memory_format(at::MemoryFormat::Contiguous));
  auto s = at::empty({M, r}, x.options().dtype(at::kFloat));
  if (x.is_meta() || (out.numel() == 0 && s.numel() == 0)) return {out, s};
  if (x.scalar_type() == at::kHalf) {  // fp32 arithmetic, out rounded once to half
    auto [out32, s32] = lora_lowrank_out(x.to(at::kFloat), a, b, bias, scaling, seed, p);
    return {out32.to(at::kHalf), s32};
  }
  const int64_t r_pad = round_up(r, kLanes);
  const auto aT = padded_float(a.t(), K, r_pad);
  const auto bs = expand_operand(b.t(), panel_columns(N), scaling);
  const auto bias32 = bias.has_value() ? std::optional<Scratch>(padded_float(bias->view({1, N}), 1, panel_columns(N)))
                                       : std::nullopt;
  const HashMask mask(seed_value(seed), p);
  const Chunks chunks(M, (K + N) * r);
  FASTPEFT_DISPATCH_FLOAT_TYPES(x.scalar_type(), op, [&] {
    const auto xs = strided<scalar_t>(x);
    chunks.run(M, [&](int64_t, int64_t m0, int64_t m1) {
      float* panel = thread_panels(kBlockRows * panel_stride(K) + kBlockRows * r_pad);
      lowrank_out_chunk<scalar_t>(xs, K, N, aT.data(), bs.data(), bias32 ? bias32->data() : nullptr, r, r_pad, mask,
                                  p > 0.0, m0, m1, out.mutable_data_ptr<scalar_t>(),
                                  s.mutable_data_ptr<float>(), panel, panel + kBlockRows * panel_stride(K));
    });
  });
  return {out, s};
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

  const int64_t r_pad = round_up(r, kLanes);
  const auto b32 = padded_float(b, N, r_pad, scaling);
  std::optional<Scratch> s_copy;  // db = scaling * dy^T s: s as it is, the scaling applied to the sum
  const float* s32 = rank_rows(s, M, r_pad, s_copy);
  const Chunks chunks(M, N * r);
  const int64_t acc_floats = panel_columns(N) * r_pad;
  Scratch db_acc(chunks.count * acc_floats);
  FASTPEFT_DISPATCH_FLOAT_TYPES(dy.scalar_type(), op, [&] {
    const auto dys = strided<scalar_t>(dy);
    chunks.run(M, [&](int64_t chunk, int64_t m0, int64_t m1) {
      dy_chunk<scalar_t>(dys, N, b32.data(), s32, r, r_pad, m0, m1, g.mutable_data_ptr<float>(),
                         db_acc.data() + chunk * acc_floats, thread_panels(kBlockRows * panel_stride(N)));
    });
  });
  return {g, sum_chunks(db_acc, chunks.count, acc_floats, N, r, r_pad, false, scaling, f32)};
}

std::tuple<at::Tensor, at::Tensor> lora_grad_pass(const at::Tensor& x, const at::Tensor& dy, const at::Tensor& a,
                                                  const at::Tensor& b, double scaling) {
  constexpr const char* op = "lora_grad_pass";
  check_matrix(x, "x", "[M, K]", op);
  check_matrix(dy, "dy", "[M, N]", op);
  check_matrix(a, "a", "[r, K]", op);
  check_matrix(b, "b", "[N, r]", op);
  check_size(dy, "dy", 0, x.size(0), "M (x.size(0))", op);
  check_size(a, "a", 1, x.size(1), "K (x.size(1))", op);
  check_size(b, "b", 0, dy.size(1), "N (dy.size(1))", op);
  check_size(b, "b", 1, a.size(0), "r (a.size(0))", op);
  TORCH_CHECK(dy.scalar_type() == x.scalar_type(), op, ": dy dtype ", dy.scalar_type(), " must match x dtype ",
              x.scalar_type());
  check_device(dy, "dy", x, "x", op);
  check_device(a, "a", x, "x", op);
  check_device(b, "b", x, "x", op);
  const int64_t M = x.size(0), K = x.size(1), N = dy.size(1), r = a.size(0);
  const auto f32 = x.options().dtype(at::kFloat);
  if (x.is_meta()) return {at::empty({r, K}, f32), at::empty({N, r}, f32)};
  if (M == 0 || K == 0 || N == 0 || r == 0) return {at::zeros({r, K}, f32), at::zeros({N, r}, f32)};
  if (x.scalar_type() == at::kHalf) return lora_grad_pass(x.to(at::kFloat), dy.to(at::kFloat), a, b, scaling);

  const int64_t r_pad = round_up(r, kLanes);
  const auto aT = padded_float(a.t(), K, r_pad);
  const auto b32 = padded_float(b, N, r_pad, scaling);
  const Chunks chunks(M, 4 * (K + N) * r);
  const int64_t da_floats = panel_columns(K) * r_pad, db_floats = panel_columns(N) * r_pad;
  Scratch da_acc(chunks.count * da_floats), db_acc(chunks.count * db_floats);  // transposed: [K, r], [N, r]
  FASTPEFT_DISPATCH_FLOAT_TYPES(x.scalar_type(), op, [&] {
    const auto xs = strided<scalar_t>(x), dys = strided<scalar_t>(dy);
    chunks.run(M, [&](int64_t chunk, int64_t m0, int64_t m1) {
      const int64_t x_floats = kBlockRows * panel_stride(K), dy_floats = kBlockRows * panel_stride(N);
      float* x_panel = thread_panels(x_floats + dy_floats + 2 * kBlockRows * r_pad);
      grad_chunk<scalar_t>(xs, dys, K, N, aT.data(), b32.data(), static_cast<float>(scaling), r_pad, m0, m1,
                           da_acc.data() + chunk * da_floats, db_acc.data() + chunk * db_floats, x_panel,
                           x_panel + x_floats, x_panel + x_floats + dy_floats,
                           x_panel + x_floats + dy_floats + kBlockRows * r_pad);
    });
  });
  return {sum_chunks(da_acc, chunks.count, da_floats, K, r, r_pad, true, 1.0, f32),
          sum_chunks(db_acc, chunks.count, db_floats, N, r, r_pad, false, 1.0, f32)};
}

// da, and the masked G A into dx when given: the body of lora_dx_pass_ and lora_da_pass (`op` names the caller).
at::Tensor dx_pass(const char* op, const at::Tensor& x, const at::Tensor& g, const at::Tensor& a,
                   const std::optional<at::Tensor>& dx, const at::Tensor& seed, double p, bool accumulate) {
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
  check_dropout(p, x.size(0), x.size(1), op);
  check_seed(seed, x, op);
  const int64_t M = x.size(0), K = x.size(1), r = a.size(0);
  const auto f32 = x.options().dtype(at::kFloat);
  if (x.is_meta()) return at::empty({r, K}, f32);
  if (M == 0 || K == 0 || r == 0) return at::zeros({r, K}, f32);
  if (x.scalar_type() == at::kHalf) {  // fp32 arithmetic, dx rounded once to half
    if (!dx.has_value()) return dx_pass(op, x.to(at::kFloat), g, a, std::nullopt, seed, p, accumulate);
    auto dx_float = accumulate ? dx->to(at::kFloat) : at::empty(dx->sizes(), f32);
    auto da = dx_pass(op, x.to(at::kFloat), g, a, dx_float, seed, p, accumulate);
    dx->copy_(dx_float);
    return da;
  }

  const bool with_dx = dx.has_value();
  const int64_t r_pad = round_up(r, kLanes), cols = panel_columns(K);
  const auto a32 = expand_operand(a, cols);
  std::optional<Scratch> g_copy;  // expand blocks read whole blocks of kXR rows of g
  const float* g32 = rank_rows(g, round_up(M, kXR), r_pad, g_copy);
  const HashMask mask(seed_value(seed), p);
  const Chunks chunks(M, (with_dx ? 2 : 1) * K * r);
  const int64_t acc_floats = cols * r_pad;
  Scratch da_acc(chunks.count * acc_floats);  // transposed: [K, r] per chunk
  FASTPEFT_DISPATCH_FLOAT_TYPES(x.scalar_type(), "dx_pass", [&] {
    const auto xs = strided<scalar_t>(x);
    scalar_t* dx_ptr = with_dx ? dx->mutable_data_ptr<scalar_t>() : nullptr;
    chunks.run(M, [&](int64_t chunk, int64_t m0, int64_t m1) {
      float* panel = thread_panels((with_dx && p > 0.0 ? 2 : 1) * kBlockRows * panel_stride(K));
      dx_chunk<scalar_t>(xs, K, g32, r, r_pad, a32.data(), dx_ptr, accumulate, mask, p > 0.0, m0, m1,
                         da_acc.data() + chunk * acc_floats, panel, panel + kBlockRows * panel_stride(K));
    });
  });
  return sum_chunks(da_acc, chunks.count, acc_floats, K, r, r_pad, true, 1.0, f32);
}

at::Tensor lora_dx_pass_(const at::Tensor& x, const at::Tensor& g, const at::Tensor& a, const at::Tensor& dx,
                         const at::Tensor& seed, double p, bool accumulate) {
  return dx_pass("lora_dx_pass_", x, g, a, dx, seed, p, accumulate);
}

// A separate op rather than lora_dx_pass_ with no dx: inductor mishandles a mutable argument that is None.
at::Tensor lora_da_pass(const at::Tensor& x, const at::Tensor& g, const at::Tensor& a, const at::Tensor& seed,
                        double p) {
  return dx_pass("lora_da_pass", x, g, a, std::nullopt, seed, p, false);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastpeft, m) {
  m.def("lora_dy_pass(Tensor dy, Tensor b, Tensor s, float scaling) -> (Tensor, Tensor)");
  m.def("lora_dx_pass_(Tensor x, Tensor g, Tensor a, Tensor(a!) dx, Tensor seed, float p, bool accumulate=True) -> Tensor");
  m.def("lora_da_pass(Tensor x, Tensor g, Tensor a, Tensor seed, float p) -> Tensor");
  m.def("lora_lowrank_out(Tensor x, Tensor a, Tensor b, Tensor? bias, float scaling, Tensor seed, float p) -> (Tensor, Tensor)");
  m.def("lora_grad_pass(Tensor x, Tensor dy, Tensor a, Tensor b, float scaling) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastpeft, CompositeExplicitAutograd, m) {
  m.impl("lora_dy_pass", &lora_dy_pass);
  m.impl("lora_dx_pass_", &lora_dx_pass_);
  m.impl("lora_da_pass", &lora_da_pass);
  m.impl("lora_lowrank_out", &lora_lowrank_out);
  m.impl("lora_grad_pass", &lora_grad_pass);
}

}  // namespace fastpeft
