#include "ldm_rt/native/half.hpp"

#include <cstring>

namespace ldm_rt::native {

float half_to_float(uint16_t h) {
  uint32_t sign = uint32_t(h >> 15) << 31, exp = (h >> 10) & 0x1f, mant = h & 0x3ff, bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      int e = -1;
      do {
        ++e;
        mant <<= 1;
      } while (!(mant & 0x400));
      bits = sign | uint32_t(127 - 15 - e) << 23 | (mant & 0x3ff) << 13;
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | mant << 13;
  } else {
    bits = sign | (exp + 127 - 15) << 23 | mant << 13;
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t float_to_half(float value) {
  uint32_t f;
  std::memcpy(&f, &value, 4);
  uint16_t sign = uint16_t((f & 0x80000000u) >> 16);
  uint32_t exp = f & 0x7f800000u;
  if (exp >= 0x47800000u) {
    uint32_t sig = f & 0x007fffffu;
    if (exp == 0x7f800000u && sig != 0) {
      uint16_t nan = uint16_t(0x7c00u + (sig >> 13));
      return uint16_t(sign + (nan == 0x7c00u ? nan + 1 : nan));
    }
    return uint16_t(sign + 0x7c00u);
  }
  if (exp <= 0x38000000u) {
    if (exp < 0x33000000u) return sign;
    uint32_t sig = 0x00800000u + (f & 0x007fffffu);
    sig >>= (113 - (exp >> 23));
    if ((sig & 0x00003fffu) != 0x00001000u || (f & 0x000007ffu)) sig += 0x00001000u;
    return uint16_t(sign + (sig >> 13));
  }
  uint32_t sig = f & 0x007fffffu;
  if ((sig & 0x00003fffu) != 0x00001000u) sig += 0x00001000u;
  return uint16_t(sign + ((exp - 0x38000000u) >> 13) + (sig >> 13));
}

float bf16_to_float(uint16_t bits) {
  uint32_t f = uint32_t(bits) << 16;
  float v;
  std::memcpy(&v, &f, 4);
  return v;
}

}  // namespace ldm_rt::native
