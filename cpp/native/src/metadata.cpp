#include "ldm_rt/native/metadata.hpp"

#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstdlib>

#include "ldm_rt/native/json.hpp"

namespace ldm_rt::native {

std::string python_float(double v) {
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  if (v == 0.0) return std::signbit(v) ? "-0.0" : "0.0";
  char buf[64];
  // Shortest round-trip digits in scientific form, then laid out as Python's repr (float_repr_style 'short'):
  // fixed notation for decimal exponents -4 <= e < 16, else d.ddde+XX.
  auto res = std::to_chars(buf, buf + sizeof buf, v, std::chars_format::scientific);
  std::string s(buf, res.ptr);
  bool negative = s[0] == '-';
  if (negative) s = s.substr(1);
  auto e = s.find('e');
  int exp10 = std::atoi(s.c_str() + e + 1);
  std::string digits;
  for (char c : s.substr(0, e)) {
    if (c != '.') digits.push_back(c);
  }
  std::string out;
  if (exp10 >= -4 && exp10 < 16) {
    if (exp10 < 0) {
      out = "0." + std::string(size_t(-exp10 - 1), '0') + digits;
    } else if (size_t(exp10) + 1 >= digits.size()) {
      out = digits + std::string(size_t(exp10) + 1 - digits.size(), '0') + ".0";
    } else {
      out = digits.substr(0, size_t(exp10) + 1) + "." + digits.substr(size_t(exp10) + 1);
    }
  } else {
    out = digits.substr(0, 1);
    if (digits.size() > 1) out += "." + digits.substr(1);
    char ebuf[16];
    std::snprintf(ebuf, sizeof ebuf, "e%c%02d", exp10 < 0 ? '-' : '+', std::abs(exp10));
    out += ebuf;
  }
  return negative ? "-" + out : out;
}

namespace {

std::string list(const std::vector<std::string>& items) {
  std::string out = "[";
  for (size_t k = 0; k < items.size(); ++k) out += (k ? ", " : "") + json_quote(items[k], true);
  return out + "]";
}

}  // namespace

std::string GenerationParams::to_json() const {
  // Keys in sorted order, as sort_keys=True.
  std::string s = "{";
  s += "\"backend\": " + json_quote(backend, true);
  s += ", \"batch\": " + std::to_string(batch);
  s += ", \"guidance\": " + python_float(guidance);
  s += ", \"guidance_rescale\": " + python_float(guidance_rescale);
  s += ", \"height\": " + std::to_string(height);
  s += ", \"mask_blur\": " + (mask_blur ? python_float(*mask_blur) : std::string("null"));
  s += ", \"mode\": " + json_quote(mode, true);
  s += ", \"model_hash\": " + json_quote(model_hash, true);
  s += ", \"negative_prompts\": " + list(negative_prompts);
  s += ", \"precision\": " + json_quote(precision, true);
  s += ", \"prompts\": " + list(prompts);
  s += ", \"reduced_precision\": " + std::string(reduced_precision ? "true" : "false");
  s += ", \"scheduler\": " + json_quote(scheduler, true);
  s += ", \"seed\": " + std::to_string(seed);
  s += ", \"steps\": " + std::to_string(steps);
  s += ", \"strength\": " + python_float(strength);
  s += ", \"width\": " + std::to_string(width);
  return s + "}";
}

TextChunks GenerationParams::text(std::size_t index, std::size_t count) const {
  size_t prompt = index / size_t(batch);
  TextChunks t = {
      {"prompt", prompts.at(prompt)},
      {"negative_prompt", negative_prompts.at(prompt)},
      {"seed", std::to_string(seed)},
      {"steps", std::to_string(steps)},
      {"scheduler", scheduler},
      {"guidance", python_float(guidance)},
      {"guidance_rescale", python_float(guidance_rescale)},
      {"model_hash", model_hash},
  };
  if (count > 1) t.emplace_back("batch_index", std::to_string(index));
  t.emplace_back("parameters", to_json());
  t.emplace_back("Software", "ldm-rt-native");
  return t;
}

}  // namespace ldm_rt::native
