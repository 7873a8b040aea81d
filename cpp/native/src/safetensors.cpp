#include "ldm_rt/native/safetensors.hpp"

#include <cstring>
#include <map>

#include "ldm_rt/native/half.hpp"
#include "ldm_rt/native/json.hpp"
#include "ldm_rt/native/pyrepr.hpp"
#include "ldm_rt/native/sha256.hpp"

namespace ldm_rt::native {
namespace {

constexpr const char* kFix = "download the file again or convert it to .safetensors";

}  // namespace

// runtime/lora.py read_safetensors: every offset and size checked against the file before anything is read.
SafetensorsFile read_safetensors(const std::string& path, uint64_t limit, const std::string& kind) {
  const std::string article = std::string("aeiou").find(kind.empty() ? 'x' : kind[0]) != std::string::npos ? "an " : "a ";
  std::string data;
  try {
    data = read_bounded(path, std::size_t(limit), kind + " file", "pass " + article + kind + " .safetensors file");
  } catch (const JsonError& e) {
    throw SafetensorsError(e.what());
  }
  const std::string where = kind + " " + path;
  if (data.size() < 8) throw SafetensorsError(where + " is truncated (" + std::to_string(data.size()) + " bytes); " + kFix);
  uint64_t size = data.size(), n = 0;
  for (int k = 7; k >= 0; --k) n = (n << 8) | static_cast<unsigned char>(data[size_t(k)]);
  if (n > kMaxSafetensorsHeaderBytes || 8 + n > size) {
    throw SafetensorsError(where + " is truncated or not a safetensors file (header of " + std::to_string(n) + " bytes in a " +
                           std::to_string(size) + "-byte file); " + kFix);
  }
  Json header;
  try {
    std::string_view text(data.data() + 8, size_t(n));
    check_utf8(text, path, kFix);
    JsonLimits limits;
    limits.max_bytes = size_t(kMaxSafetensorsHeaderBytes);
    header = parse_json(text, limits, path);
  } catch (const JsonError&) {
    throw SafetensorsError(where + " has a corrupt safetensors header; " + kFix);
  }
  if (!header.is_object()) throw SafetensorsError(where + " has a corrupt safetensors header; " + kFix);
  SafetensorsFile file;
  std::map<std::string, size_t> index;  // a repeated key keeps its first place and its last value, as a dict
  const Json* meta = header.find("__metadata__");
  if (py_truthy(meta)) {
    bool ok = meta->is_object();
    for (const auto& [k, v] : ok ? meta->as_object() : Json::Object{}) {
      ok = ok && v.is_string();
      if (ok) file.metadata[k] = v.as_string();
    }
    if (!ok) throw SafetensorsError(where + ": __metadata__ must map strings to strings; " + kFix);
  }
  const uint64_t base = 8 + n;
  for (const auto& [key, info] : header.as_object()) {
    if (key == "__metadata__") continue;
    const std::string shown = "tensor " + py_str_repr(key);
    const Json *dtype = info.find("dtype"), *shape_j = info.find("shape"), *offsets = info.find("data_offsets");
    bool ok = dtype && shape_j && shape_j->is_array() && offsets && offsets->is_array() && offsets->size() == 2 &&
              (*offsets)[0].is_integer() && (*offsets)[1].is_integer();
    std::vector<int64_t> shape;
    for (size_t k = 0; ok && k < shape_j->size(); ++k) {
      ok = (*shape_j)[k].is_integer();
      if (ok) shape.push_back((*shape_j)[k].as_int());
    }
    if (!ok) throw SafetensorsError(where + ": " + shown + " has a malformed header entry; " + kFix);
    std::string type = dtype->is_string() ? dtype->as_string() : dtype->dump();
    if (type != "F32" && type != "F16" && type != "BF16" && type != "F64") {
      throw SafetensorsError(where + ": " + shown + " is " + type + "; " + kind + " tensors must be F32, F16, BF16 or F64");
    }
    int64_t itemsize = type == "F64" ? 8 : type == "F32" ? 4 : 2;
    int64_t start = (*offsets)[0].as_int(), end = (*offsets)[1].as_int();
    // count * itemsize, saturated: a product past the file's size cannot match its offsets anyway.
    long double bytes = (long double)itemsize;
    bool negative = false;
    for (int64_t d : shape) negative = negative || d < 0, bytes *= (long double)(d < 0 ? 0 : d);
    if (negative || !(0 <= start && start <= end) || bytes != (long double)(end - start)) {
      throw SafetensorsError(where + ": " + shown + " has inconsistent offsets; " + kFix);
    }
    if (base + uint64_t(end) > size) {
      throw SafetensorsError(where + " is truncated: " + shown + " ends at byte " + std::to_string(base + uint64_t(end)) + " of " +
                             std::to_string(size) + "; " + kFix);
    }
    const char* raw = data.data() + base + uint64_t(start);
    size_t count = size_t(end - start) / size_t(itemsize);
    std::vector<float> values(count);
    for (size_t k = 0; k < count; ++k) {
      if (type == "F32") {
        std::memcpy(&values[k], raw + 4 * k, 4);
      } else if (type == "F64") {
        double d;
        std::memcpy(&d, raw + 8 * k, 8);
        values[k] = float(d);
      } else {
        uint16_t h;
        std::memcpy(&h, raw + 2 * k, 2);
        values[k] = type == "BF16" ? bf16_to_float(h) : half_to_float(h);
      }
    }
    Tensor t(shape, std::move(values));
    if (auto it = index.find(key); it != index.end()) {
      file.tensors[it->second].second = std::move(t);
    } else {
      index[key] = file.tensors.size();
      file.tensors.emplace_back(key, std::move(t));
    }
  }
  file.sha256 = sha256_hex(data);
  return file;
}

}  // namespace ldm_rt::native
