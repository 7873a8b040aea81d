#include "ldm_rt/native/rng.hpp"

#include <cmath>

namespace ldm_rt::native {

namespace {

#include "ziggurat_tables.inc"

// numpy's constants (random/src/distributions/ziggurat_constants.h).
constexpr float kZigR = 3.6541528853610088f;
constexpr float kZigInvR = 0.27366123732975828f;

using u128 = unsigned __int128;

// PCG64's 128-bit LCG multiplier (O'Neill 2014, PCG_DEFAULT_MULTIPLIER_128).
constexpr u128 kPcgMult = (static_cast<u128>(2549297995355413924ULL) << 64) | 4865540595714422341ULL;

// SeedSequence's hash constants (numpy/random/bit_generator.pyx, after Melissa O'Neill's seed_seq_fe).
constexpr uint32_t kInitA = 0x43b0d7e5, kMultA = 0x931e8875, kInitB = 0x8b51f9dd, kMultB = 0x58f38ded;
constexpr uint32_t kMixMultL = 0xca01f9dd, kMixMultR = 0x4973f715;
constexpr int kXShift = 16;  // 4 * 8 / 2
constexpr std::size_t kPoolSize = 4;

uint32_t hashmix(uint32_t value, uint32_t& hash_const) {
  value ^= hash_const;
  hash_const *= kMultA;
  value *= hash_const;
  value ^= value >> kXShift;
  return value;
}

uint32_t mix(uint32_t x, uint32_t y) {
  uint32_t result = kMixMultL * x - kMixMultR * y;
  result ^= result >> kXShift;
  return result;
}

}  // namespace

std::vector<uint32_t> seed_sequence_state(const std::vector<uint32_t>& entropy, std::size_t n_words) {
  // SeedSequence.mix_entropy
  uint32_t pool[kPoolSize];
  uint32_t hash_const = kInitA;
  for (std::size_t i = 0; i < kPoolSize; ++i) pool[i] = hashmix(i < entropy.size() ? entropy[i] : 0u, hash_const);
  for (std::size_t src = 0; src < kPoolSize; ++src)
    for (std::size_t dst = 0; dst < kPoolSize; ++dst)
      if (src != dst) pool[dst] = mix(pool[dst], hashmix(pool[src], hash_const));
  for (std::size_t src = kPoolSize; src < entropy.size(); ++src)
    for (std::size_t dst = 0; dst < kPoolSize; ++dst) pool[dst] = mix(pool[dst], hashmix(entropy[src], hash_const));
  // SeedSequence.generate_state(n_words, uint32)
  std::vector<uint32_t> state(n_words);
  uint32_t hc = kInitB;
  for (std::size_t i = 0; i < n_words; ++i) {
    uint32_t v = pool[i % kPoolSize];
    v ^= hc;
    hc *= kMultB;
    v *= hc;
    v ^= v >> kXShift;
    state[i] = v;
  }
  return state;
}

Generator::Generator(uint64_t seed) {
  // numpy splits a Python int into little-endian 32-bit words; 0 is one word.
  std::vector<uint32_t> entropy{static_cast<uint32_t>(seed)};
  if (seed >> 32) entropy.push_back(static_cast<uint32_t>(seed >> 32));
  // PCG64(SeedSequence): generate_state(4, uint64) = 8 uint32 words read as 4 little-endian uint64.
  std::vector<uint32_t> w = seed_sequence_state(entropy, 8);
  uint64_t v[4];
  for (int k = 0; k < 4; ++k) v[k] = static_cast<uint64_t>(w[2 * k]) | (static_cast<uint64_t>(w[2 * k + 1]) << 32);
  u128 initstate = (static_cast<u128>(v[0]) << 64) | v[1];
  u128 initseq = (static_cast<u128>(v[2]) << 64) | v[3];
  // pcg_setseq_128_srandom_r
  u128 inc = (initseq << 1) | 1u;
  u128 state = 0;
  state = state * kPcgMult + inc;
  state += initstate;
  state = state * kPcgMult + inc;
  state_hi_ = static_cast<uint64_t>(state >> 64);
  state_lo_ = static_cast<uint64_t>(state);
  inc_hi_ = static_cast<uint64_t>(inc >> 64);
  inc_lo_ = static_cast<uint64_t>(inc);
}

uint64_t Generator::next_uint64() {
  u128 state = (static_cast<u128>(state_hi_) << 64) | state_lo_;
  u128 inc = (static_cast<u128>(inc_hi_) << 64) | inc_lo_;
  state = state * kPcgMult + inc;
  state_hi_ = static_cast<uint64_t>(state >> 64);
  state_lo_ = static_cast<uint64_t>(state);
  // XSL-RR output: xor the halves, rotate right by the top 6 bits.
  uint64_t x = state_hi_ ^ state_lo_;
  unsigned rot = static_cast<unsigned>(state_hi_ >> 58);
  return (x >> rot) | (x << ((64u - rot) & 63u));
}

uint32_t Generator::next_uint32() {
  if (has_uint32_) {
    has_uint32_ = false;
    return uinteger_;
  }
  uint64_t next = next_uint64();
  has_uint32_ = true;
  uinteger_ = static_cast<uint32_t>(next >> 32);
  return static_cast<uint32_t>(next & 0xffffffffu);
}

double Generator::next_double() { return static_cast<double>(next_uint64() >> 11) * (1.0 / 9007199254740992.0); }

float Generator::next_float() { return static_cast<float>(next_uint32() >> 8) * (1.0f / 16777216.0f); }

float Generator::standard_normal_f() {
  // random_standard_normal_f: 23-bit magnitude, 1 sign bit, 8-bit layer index from one 32-bit draw.
  for (;;) {
    uint32_t r = next_uint32();
    int idx = static_cast<int>(r & 0xff);
    int sign = static_cast<int>((r >> 8) & 0x1);
    uint32_t rabs = (r >> 9) & 0x0007fffff;
    float x = static_cast<float>(rabs) * kZigWi[idx];
    if (sign & 0x1) x = -x;
    if (rabs < kZigKi[idx]) return x;  // inside the layer's rectangle (99.3% of draws)
    if (idx == 0) {
      for (;;) {  // the tail beyond r (Marsaglia 1964), with 1 - U to avoid log(0)
        float xx = -kZigInvR * std::log1p(-next_float());
        float yy = -std::log1p(-next_float());
        if (yy + yy > xx * xx) return ((rabs >> 8) & 0x1) ? -(kZigR + xx) : kZigR + xx;
      }
    } else {
      // The wedge: compared in double, as numpy's exp(-0.5 * x * x) promotes.
      if (((kZigFi[idx - 1] - kZigFi[idx]) * next_float() + kZigFi[idx]) < std::exp(-0.5 * x * x)) return x;
    }
  }
}

void Generator::fill_standard_normal(float* out, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) out[i] = standard_normal_f();
}

Tensor Generator::standard_normal(const std::vector<int64_t>& shape) {
  Tensor t(shape);
  fill_standard_normal(t.data.data(), t.data.size());
  return t;
}

}  // namespace ldm_rt::native
