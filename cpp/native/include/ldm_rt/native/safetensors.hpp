// .safetensors files read bounded (runtime/lora.py read_safetensors, which LoRAs and textual-inversion embeddings
// share): the 8-byte header length, the JSON header and every tensor's offsets checked against the file before
// anything is read; F32, F16, BF16 and F64 widened to float32. Messages are Python's, naming the file's kind.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "ldm_rt/native/errors.hpp"
#include "ldm_rt/native/tensor.hpp"

namespace ldm_rt::native {

// runtime/lora.py MAX_HEADER_BYTES.
constexpr uint64_t kMaxSafetensorsHeaderBytes = uint64_t{64} << 20;

// A .safetensors file cannot be read; callers rethrow it as their own kind (read_safetensors_as).
class SafetensorsError : public Error {
 public:
  using Error::Error;
};

struct SafetensorsFile {
  std::vector<std::pair<std::string, Tensor>> tensors;  // float32, in the header's order (a repeated key: its last value)
  std::map<std::string, std::string> metadata;           // the header's __metadata__
  std::string sha256;                                    // of the whole file
};

// The file at `path` (at most `limit` bytes); `kind` names it in messages ("LoRA", "embedding"). Throws SafetensorsError.
SafetensorsFile read_safetensors(const std::string& path, uint64_t limit, const std::string& kind);

// read_safetensors, its errors thrown as `E` (LoraError, EmbeddingError).
template <class E>
SafetensorsFile read_safetensors_as(const std::string& path, uint64_t limit, const std::string& kind) {
  try {
    return read_safetensors(path, limit, kind);
  } catch (const SafetensorsError& e) {
    throw E(e.what());
  }
}

}  // namespace ldm_rt::native
