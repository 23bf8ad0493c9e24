// The dropout seed that the ops take: a one-element int64 tensor on the CPU. A tensor, not an int, so that
// torch.compile keeps a seed drawn inside the graph (torch.randint) as a value of the graph: an int would be a
// symbol while tracing, got from an `.item()` that splits the graph unless capture_scalar_outputs is set.
#pragma once

#include <ATen/ATen.h>

namespace fastpeft {

// A meta seed passes with meta inputs `x`, for tracing; the value is read only where the mask is computed.
inline void check_seed(const at::Tensor& seed, const at::Tensor& x, const char* op) {
  const bool where = seed.is_cpu() || (seed.is_meta() && x.is_meta());
  TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong && where, op,
              ": seed must be a one-element int64 cpu tensor, got ", seed.scalar_type(), " of shape ", seed.sizes(),
              " on ", seed.device());
}

// The seed's value, once check_seed has passed a cpu seed: a read, not .item(), which goes through the dispatcher.
inline int64_t seed_value(const at::Tensor& seed) { return *seed.const_data_ptr<int64_t>(); }

}  // namespace fastpeft
