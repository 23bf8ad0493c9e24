// 8 fp32 lanes, the vector type of the CPU kernels: one AVX2 register (two SSE ones in the default clone), through
// the GCC / Clang vector extension. Loads and stores go through memcpy (any alignment); functions are always
// inlined so that each CPU clone of a kernel (FASTPEFT_CPU_CLONES) compiles them for its own vector width.
#pragma once

#include <cstdint>
#include <cstring>

#define FASTPEFT_INLINE inline __attribute__((always_inline))

namespace fastpeft {

typedef float Vec __attribute__((vector_size(32)));
constexpr int64_t kLanes = 8;

FASTPEFT_INLINE Vec load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

FASTPEFT_INLINE void store(float* p, const Vec& v) { std::memcpy(p, &v, sizeof v); }

// The lanes' sum in a fixed order, so results do not depend on the compiler's choices.
FASTPEFT_INLINE float lane_sum(const Vec& v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

}  // namespace fastpeft
