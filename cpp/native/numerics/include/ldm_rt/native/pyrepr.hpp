// Python's repr() of the values the runtime's messages print ({value!r}), so native messages read the same.
#pragma once

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>

#include <unicode/uchar.h>

#include "ldm_rt/native/json.hpp"

namespace ldm_rt::native {

// repr(str): single quotes unless the text has ' and no ", escapes as Python prints them (non-printable
// characters -- categories Cc Cf Cs Co Cn Zl Zp Zs but the space -- as \xhh, \uhhhh or \Uhhhhhhhh).
inline std::string py_str_repr(std::string_view s) {
  bool has_single = s.find('\'') != std::string_view::npos, has_double = s.find('"') != std::string_view::npos;
  char q = has_single && !has_double ? '"' : '\'';
  std::string out(1, q);
  std::size_t i = 0;
  while (i < s.size()) {
    unsigned char c = static_cast<unsigned char>(s[i]);
    int len = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 1;
    if (i + len > s.size()) len = 1;
    UChar32 cp = c;
    if (len > 1) {
      cp = c & (0xFF >> (len + 1));
      for (int k = 1; k < len; ++k) cp = (cp << 6) | (static_cast<unsigned char>(s[i + k]) & 0x3F);
    }
    char buf[16];
    if (cp == static_cast<unsigned char>(q) || cp == '\\') {
      out += '\\';
      out += static_cast<char>(cp);
    } else if (cp == '\n') {
      out += "\\n";
    } else if (cp == '\r') {
      out += "\\r";
    } else if (cp == '\t') {
      out += "\\t";
    } else if (cp < 0x20 || cp == 0x7f) {
      std::snprintf(buf, sizeof buf, "\\x%02x", static_cast<unsigned>(cp));
      out += buf;
    } else if (cp >= 0x80) {
      int8_t t = u_charType(cp);
      bool printable = !(t == U_CONTROL_CHAR || t == U_FORMAT_CHAR || t == U_SURROGATE || t == U_PRIVATE_USE_CHAR ||
                         t == U_UNASSIGNED || t == U_LINE_SEPARATOR || t == U_PARAGRAPH_SEPARATOR || t == U_SPACE_SEPARATOR);
      if (printable) {
        out.append(s.substr(i, static_cast<std::size_t>(len)));
      } else {
        if (cp < 0x100) std::snprintf(buf, sizeof buf, "\\x%02x", static_cast<unsigned>(cp));
        else if (cp < 0x10000) std::snprintf(buf, sizeof buf, "\\u%04x", static_cast<unsigned>(cp));
        else std::snprintf(buf, sizeof buf, "\\U%08x", static_cast<unsigned>(cp));
        out += buf;
      }
    } else {
      out += static_cast<char>(cp);
    }
    i += static_cast<std::size_t>(len);
  }
  out += q;
  return out;
}

// repr(float): the shortest text that reads back as the same double, in Python's layout.
inline std::string py_float_repr(double v) {
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  char buf[64];
  int prec = 1;
  for (; prec <= 17; ++prec) {
    std::snprintf(buf, sizeof buf, "%.*e", prec - 1, v);
    if (std::strtod(buf, nullptr) == v) break;
  }
  // buf = [-]d.ddde[+-]XX
  std::string s(buf);
  std::size_t epos = s.find('e');
  int exp = std::atoi(s.c_str() + epos + 1);
  std::string mant = s.substr(0, epos);
  bool neg = mant[0] == '-';
  if (neg) mant.erase(0, 1);
  std::string digits;
  for (char c : mant)
    if (c != '.') digits += c;
  while (digits.size() > 1 && digits.back() == '0') digits.pop_back();
  std::string out;
  if (exp >= -5 + 1 && exp < 16) {  // Python: fixed notation for -4 <= exp < 16
    if (exp >= 0) {
      std::string ip = digits.substr(0, std::min<std::size_t>(digits.size(), exp + 1));
      while (static_cast<int>(ip.size()) < exp + 1) ip += '0';
      std::string fp = static_cast<int>(digits.size()) > exp + 1 ? digits.substr(exp + 1) : "0";
      out = ip + "." + fp;
    } else {
      out = "0." + std::string(static_cast<std::size_t>(-exp - 1), '0') + digits;
    }
  } else {
    out = digits.substr(0, 1);
    if (digits.size() > 1) out += "." + digits.substr(1);
    char e[16];
    std::snprintf(e, sizeof e, "e%c%02d", exp < 0 ? '-' : '+', std::abs(exp));
    out += e;
  }
  return (neg ? "-" : "") + out;
}

// repr() of the Python value json.loads gives for `v`.
inline std::string py_json_repr(const Json& v) {
  switch (v.type()) {
    case Json::Type::Null: return "None";
    case Json::Type::Bool: return v.as_bool() ? "True" : "False";
    case Json::Type::Number: {
      if (!v.is_integer()) return py_float_repr(v.as_double());
      std::string t = v.number_text();
      return t == "-0" ? "0" : t;
    }
    case Json::Type::String: return py_str_repr(v.as_string());
    case Json::Type::Array: {
      std::string s = "[";
      for (std::size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + py_json_repr(v[i]);
      return s + "]";
    }
    case Json::Type::Object: {
      std::string s = "{";
      bool first = true;
      for (const auto& [k, x] : v.as_object()) {
        s += (first ? "" : ", ") + py_str_repr(k) + ": " + py_json_repr(x);
        first = false;
      }
      return s + "}";
    }
  }
  return "None";
}

}  // namespace ldm_rt::native
