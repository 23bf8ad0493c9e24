// The counter-based dropout mask of fastpeft/ops/dropout.py, shared by the CPU kernels of csrc/.
//
// Element (row, col) of the logical [M, K] input is kept iff
//     mix32(mix32(row ^ seed) + col * 0x9E3779B9) >= floor(p * 2**32)        (uint32 arithmetic)
// and kept values are scaled by 1/(1-p). The row hash is computed once per row; `keep` and `factor` are
// branch-free so that column loops over them vectorize.
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>

namespace fastpeft {

// Row kernels are also built for AVX2 (8 lanes, not SSE's 4); the loader picks the clone the CPU runs.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FASTPEFT_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define FASTPEFT_CPU_CLONES
#endif

constexpr uint32_t kGolden = 0x9E3779B9u;

// The hash keys a row by its uint32 value, and the row kernels count columns in 32 bits.
inline void check_mask_extent(int64_t rows, int64_t cols, const char* op) {
  TORCH_CHECK(rows <= int64_t{0xFFFFFFFF}, op, ": M must be below 2**32, got ", rows);
  TORCH_CHECK(cols <= int64_t{0xFFFFFFFF}, op, ": K must be below 2**32, got ", cols);
}

// MurmurHash3's 32-bit finalizer: a bijection of uint32 with full avalanche.
inline uint32_t mix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  return h ^ (h >> 16);
}

// The mask of one (seed, p): which elements survive and the factor they are multiplied by.
struct HashMask {
  uint32_t seed;
  uint32_t threshold;  // keep_threshold(p) of dropout.py: floor(p * 2**32), clamped to uint32
  float scale;         // 1/(1-p), rounded to float as torch rounds a Python scalar for a float tensor

  HashMask(int64_t seed_, double p)
      : seed(static_cast<uint32_t>(seed_)),  // low 32 bits, as `seed & 0xFFFFFFFF`
        threshold(p * 4294967296.0 >= 4294967295.0 ? 0xFFFFFFFFu
                                                   : static_cast<uint32_t>(p * 4294967296.0)),
        scale(static_cast<float>(1.0 / (1.0 - p))) {}

  uint32_t row_key(int64_t row) const { return mix32(static_cast<uint32_t>(row) ^ seed); }

  bool keep(uint32_t row_key, uint32_t col) const { return mix32(row_key + col * kGolden) >= threshold; }

  // Multiplier of element (row, col): 1/(1-p) if kept, else 0 (x * 0 keeps torch's -0 / NaN bits).
  float factor(uint32_t row_key, uint32_t col) const { return keep(row_key, col) ? scale : 0.0f; }
};

}  // namespace fastpeft
