// 8 fp32 lanes, the vector type of the CPU kernels: one AVX2 register (two SSE ones in the default clone), through
// the GCC / Clang vector extension. Loads and stores go through memcpy (any alignment); functions are always
// inlined so that each CPU clone of a kernel (FASTPEFT_CPU_CLONES) compiles them for its own vector width.
#pragma once

#include <cstdint>
#include <cstring>

#define FASTPEFT_INLINE inline __attribute__((always_inline))

// Kernels whose inner loops are multiply-adds are built twice: for AVX2 + FMA, with a * b + c contracted into one
// fused instruction (the project builds with -ffp-contract=off elsewhere), and for the baseline. GCC's
// target_clones cannot express that pair (its "arch=haswell" clone dispatches on the CPU model, so AMD CPUs
// would get the baseline), hence FASTPEFT_DISPATCHED below and a feature test at run time.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FASTPEFT_FMA_TARGET __attribute__((target("avx2,fma"), optimize("fp-contract=fast")))
inline bool cpu_has_avx2_fma() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
}
#else
#define FASTPEFT_FMA_TARGET
inline bool cpu_has_avx2_fma() { return false; }
#endif

// name<T>(args...) runs the always-inlined name##_body<T>(args...) in its AVX2 + FMA build where the CPU has
// those, else in its baseline build.
#define FASTPEFT_DISPATCHED(name)                                                                     \
  template <typename T, typename... Args>                                                             \
  FASTPEFT_FMA_TARGET void name##_fma(Args... args) {                                                 \
    name##_body<T>(args...);                                                                          \
  }                                                                                                   \
  template <typename T, typename... Args>                                                             \
  void name##_plain(Args... args) {                                                                   \
    name##_body<T>(args...);                                                                          \
  }                                                                                                   \
  template <typename T, typename... Args>                                                             \
  void name(Args... args) {                                                                           \
    if (cpu_has_avx2_fma()) name##_fma<T>(args...);                                                   \
    else name##_plain<T>(args...);                                                                    \
  }

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
