// float16 and bfloat16 as numpy converts them: one owner for the .npy reader, the safetensors reader and the weight
// patches (LoRA, embeddings) of fp16 builds.
#pragma once

#include <cstdint>

namespace ldm_rt::native {

// float16 bits -> float32, exact (every float16 is a float32); NaN payloads kept (npy_halfbits_to_floatbits).
float half_to_float(uint16_t h);
// float32 -> float16 bits: round to nearest even, overflow to inf, NaN kept (npy_floatbits_to_halfbits, astype).
uint16_t float_to_half(float value);
// bfloat16 bits -> float32, exact.
float bf16_to_float(uint16_t bits);

}  // namespace ldm_rt::native
