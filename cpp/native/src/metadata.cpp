#include "ldm_rt/native/metadata.hpp"

#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstdlib>

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

std::string python_json_string(const std::string& utf8) {
  std::string out = "\"";
  char buf[16];
  auto u = [&](unsigned cp) {
    std::snprintf(buf, sizeof buf, "\\u%04x", cp);
    out += buf;
  };
  for (size_t i = 0; i < utf8.size();) {
    auto c = static_cast<unsigned char>(utf8[i]);
    unsigned cp = c;
    size_t n = 1;
    if (c >= 0xF0 && i + 3 < utf8.size() + 0) {
      cp = ((c & 0x07u) << 18) | ((utf8[i + 1] & 0x3Fu) << 12) | ((utf8[i + 2] & 0x3Fu) << 6) | (utf8[i + 3] & 0x3Fu), n = 4;
    } else if (c >= 0xE0 && i + 2 < utf8.size()) {
      cp = ((c & 0x0Fu) << 12) | ((utf8[i + 1] & 0x3Fu) << 6) | (utf8[i + 2] & 0x3Fu), n = 3;
    } else if (c >= 0xC0 && i + 1 < utf8.size()) {
      cp = ((c & 0x1Fu) << 6) | (utf8[i + 1] & 0x3Fu), n = 2;
    }
    i += n;
    switch (cp) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      default:
        if (cp < 0x20 || (cp > 0x7E && cp != 0x7F)) {
          if (cp >= 0x10000) {
            unsigned v = cp - 0x10000;
            u(0xD800 + (v >> 10));
            u(0xDC00 + (v & 0x3FF));
          } else {
            u(cp);
          }
        } else {
          out.push_back(char(cp));
        }
    }
  }
  return out + "\"";
}

namespace {

std::string list(const std::vector<std::string>& items) {
  std::string out = "[";
  for (size_t k = 0; k < items.size(); ++k) out += (k ? ", " : "") + python_json_string(items[k]);
  return out + "]";
}

}  // namespace

std::string GenerationParams::to_json() const {
  // Keys in sorted order, as sort_keys=True.
  std::string s = "{";
  s += "\"backend\": " + python_json_string(backend);
  s += ", \"batch\": " + std::to_string(batch);
  s += ", \"guidance\": " + python_float(guidance);
  s += ", \"guidance_rescale\": " + python_float(guidance_rescale);
  s += ", \"height\": " + std::to_string(height);
  s += ", \"mask_blur\": " + (mask_blur ? python_float(*mask_blur) : std::string("null"));
  s += ", \"mode\": " + python_json_string(mode);
  s += ", \"model_hash\": " + python_json_string(model_hash);
  s += ", \"negative_prompts\": " + list(negative_prompts);
  s += ", \"precision\": " + python_json_string(precision);
  s += ", \"prompts\": " + list(prompts);
  s += ", \"reduced_precision\": " + std::string(reduced_precision ? "true" : "false");
  s += ", \"scheduler\": " + python_json_string(scheduler);
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
