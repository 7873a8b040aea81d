// numpy.random.default_rng(seed), bit for bit, for the draws the sampler makes (docs/sampler_spec.md,
// Randomness): PCG64 (XSL-RR 128/64) seeded through SeedSequence(seed), and Generator.standard_normal(shape,
// dtype=float32), numpy's float32 ziggurat (random/src/distributions/distributions.c,
// random_standard_normal_f), filled in C order. One Generator per request; not thread safe, no globals.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "ldm_rt/native/tensor.hpp"

namespace ldm_rt::native {

// numpy's SeedSequence(entropy).generate_state(n_words, uint32) for a non-negative integer entropy of up to
// 128 bits, given as its little-endian 32-bit words as numpy splits it (0 -> {0}; 2^32 -> {0, 1}).
std::vector<uint32_t> seed_sequence_state(const std::vector<uint32_t>& entropy_words, std::size_t n_words);

class Generator {
 public:
  // default_rng(seed) for 0 <= seed < 2^64 (the CLI's --seed range).
  explicit Generator(uint64_t seed);

  uint64_t next_uint64();  // PCG64.random_raw()
  uint32_t next_uint32();  // numpy's buffered 32-bit draw (half of a 64-bit draw, low half first)
  double next_double();    // Generator.random(): (next_uint64() >> 11) * 2^-53
  float next_float();      // Generator.random(dtype=float32): (next_uint32() >> 8) * 2^-24

  float standard_normal_f();                      // one standard_normal(dtype=float32) value
  void fill_standard_normal(float* out, std::size_t n);
  Tensor standard_normal(const std::vector<int64_t>& shape);  // standard_normal(shape, dtype=float32)

 private:
  // PCG64 128-bit state and increment as (high, low) 64-bit halves.
  uint64_t state_hi_ = 0, state_lo_ = 0, inc_hi_ = 0, inc_lo_ = 0;
  bool has_uint32_ = false;
  uint32_t uinteger_ = 0;
};

}  // namespace ldm_rt::native
