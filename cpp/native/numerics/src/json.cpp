#include "ldm_rt/native/json.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cctype>
#include <cerrno>
#include <cstdio>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>

#include "utf8.hpp"

namespace ldm_rt::native {

// ---- values -------------------------------------------------------------------------------------------

Json Json::boolean(bool b) {
  Json j;
  j.type_ = Type::Bool;
  j.bool_ = b;
  return j;
}

Json Json::number(std::string text) {
  Json j;
  j.type_ = Type::Number;
  j.text_ = std::move(text);
  return j;
}

Json Json::string(std::string s) {
  Json j;
  j.type_ = Type::String;
  j.text_ = std::move(s);
  return j;
}

Json Json::array(Array items) {
  Json j;
  j.type_ = Type::Array;
  j.array_ = std::make_shared<const Array>(std::move(items));
  return j;
}

Json Json::object(Object members) {
  Json j;
  j.type_ = Type::Object;
  j.object_ = std::make_shared<const Object>(std::move(members));
  return j;
}

const char* Json::type_name(Type t) {
  switch (t) {
    case Type::Null: return "null";
    case Type::Bool: return "a boolean";
    case Type::Number: return "a number";
    case Type::String: return "a string";
    case Type::Array: return "an array";
    case Type::Object: return "an object";
  }
  return "a value";
}

static JsonError wrong_type(const char* expected, Json::Type got) {
  return JsonError(std::string("expected ") + expected + ", got " + Json::type_name(got));
}

bool Json::is_integer() const {
  return type_ == Type::Number && text_.find_first_of(".eE") == std::string::npos;
}

bool Json::as_bool() const {
  if (type_ != Type::Bool) throw wrong_type("a boolean", type_);
  return bool_;
}

double Json::as_double() const {
  if (type_ != Type::Number) throw wrong_type("a number", type_);
  // strtod is locale-dependent only for the decimal point; JSON numbers use '.', as the "C" locale does.
  return std::strtod(text_.c_str(), nullptr);
}

float Json::as_float() const {
  if (type_ != Type::Number) throw wrong_type("a number", type_);
  return std::strtof(text_.c_str(), nullptr);
}

int64_t Json::as_int() const {
  if (!is_integer()) throw wrong_type("an integer", type_);
  errno = 0;
  char* end = nullptr;
  long long v = std::strtoll(text_.c_str(), &end, 10);
  if (errno == ERANGE) throw JsonError("integer " + text_ + " is out of range");
  return static_cast<int64_t>(v);
}

const std::string& Json::number_text() const {
  if (type_ != Type::Number) throw wrong_type("a number", type_);
  return text_;
}

const std::string& Json::as_string() const {
  if (type_ != Type::String) throw wrong_type("a string", type_);
  return text_;
}

const Json::Array& Json::as_array() const {
  if (type_ != Type::Array) throw wrong_type("an array", type_);
  return *array_;
}

const Json::Object& Json::as_object() const {
  if (type_ != Type::Object) throw wrong_type("an object", type_);
  return *object_;
}

std::size_t Json::size() const {
  if (type_ == Type::Array) return array_->size();
  if (type_ == Type::Object) return object_->size();
  throw wrong_type("an array or an object", type_);
}

const Json& Json::operator[](std::size_t i) const {
  const Array& a = as_array();
  if (i >= a.size()) throw JsonError("index " + std::to_string(i) + " is out of range for an array of " + std::to_string(a.size()));
  return a[i];
}

const Json* Json::find(std::string_view key) const {
  if (type_ != Type::Object) return nullptr;
  // The last of repeated keys wins, as Python's json module.
  for (auto it = object_->rbegin(); it != object_->rend(); ++it)
    if (it->first == key) return &it->second;
  return nullptr;
}

const Json& Json::at(std::string_view key) const {
  if (type_ != Type::Object) throw wrong_type("an object", type_);
  const Json* v = find(key);
  if (!v) throw JsonError("missing key \"" + std::string(key) + "\"");
  return *v;
}

std::string json_quote(std::string_view s, bool ensure_ascii) {
  std::string out = "\"";
  out.reserve(s.size() + 2);
  char buf[16];  // a backslash, u, 4 hex digits (callers pass cp <= 0xFFFF); room for 8 digits keeps -Wformat-truncation quiet
  auto u = [&](unsigned cp) {
    std::snprintf(buf, sizeof buf, "\\u%04x", cp);
    out += buf;
  };
  for (std::size_t i = 0; i < s.size();) {
    auto c = static_cast<unsigned char>(s[i]);
    unsigned cp = c;
    std::size_t n = 1;
    if (ensure_ascii) {  // escaped per code point, so decode it (surrogate pairs past the BMP, as Python)
      if (c >= 0xF0 && i + 3 < s.size()) {
        cp = ((c & 0x07u) << 18) | ((s[i + 1] & 0x3Fu) << 12) | ((s[i + 2] & 0x3Fu) << 6) | (s[i + 3] & 0x3Fu), n = 4;
      } else if (c >= 0xE0 && i + 2 < s.size()) {
        cp = ((c & 0x0Fu) << 12) | ((s[i + 1] & 0x3Fu) << 6) | (s[i + 2] & 0x3Fu), n = 3;
      } else if (c >= 0xC0 && i + 1 < s.size()) {
        cp = ((c & 0x1Fu) << 6) | (s[i + 1] & 0x3Fu), n = 2;
      }
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
        if (cp < 0x20 || (ensure_ascii && cp > 0x7F)) {
          if (cp >= 0x10000) {
            unsigned v = cp - 0x10000;
            u(0xD800 + (v >> 10));
            u(0xDC00 + (v & 0x3FF));
          } else {
            u(cp);
          }
        } else {
          out += static_cast<char>(cp);  // without ensure_ascii, a byte of the UTF-8 text as it is
        }
    }
  }
  out += '"';
  return out;
}

std::string Json::dump() const {
  switch (type_) {
    case Type::Null: return "null";
    case Type::Bool: return bool_ ? "true" : "false";
    case Type::Number: return text_;
    case Type::String: return json_quote(text_);
    case Type::Array: {
      std::string s = "[";
      for (std::size_t i = 0; i < array_->size(); ++i) {
        if (i) s += ",";
        s += (*array_)[i].dump();
      }
      return s + "]";
    }
    case Type::Object: {
      std::string s = "{";
      bool first = true;
      for (const auto& [k, v] : *object_) {
        if (!first) s += ",";
        first = false;
        s += json_quote(k) + ":" + v.dump();
      }
      return s + "}";
    }
  }
  return "null";
}

// ---- parser -------------------------------------------------------------------------------------------

namespace {

struct TooDeep {};

class Parser {
 public:
  Parser(std::string_view text, int max_depth) : s_(text), max_depth_(max_depth) {}

  Json parse_document() {
    ws();
    Json v = value(0);
    ws();
    if (p_ != s_.size()) fail("extra data");
    return v;
  }

  std::string error_;

 private:
  std::string_view s_;
  std::size_t p_ = 0;
  int max_depth_;

  [[noreturn]] void fail(const std::string& what) {
    std::size_t line = 1, col = 1;
    for (std::size_t i = 0; i < p_ && i < s_.size(); ++i) {
      if (s_[i] == '\n') {
        ++line;
        col = 1;
      } else if ((static_cast<unsigned char>(s_[i]) & 0xC0) != 0x80) {
        ++col;
      }
    }
    throw JsonError(what + ": line " + std::to_string(line) + " column " + std::to_string(col) + " (char " +
                    std::to_string(p_) + ")");
  }

  void ws() {
    while (p_ < s_.size() && (s_[p_] == ' ' || s_[p_] == '\t' || s_[p_] == '\n' || s_[p_] == '\r')) ++p_;
  }

  bool lit(std::string_view w) {
    if (s_.substr(p_, w.size()) == w) {
      p_ += w.size();
      return true;
    }
    return false;
  }

  Json value(int depth) {
    if (p_ >= s_.size()) fail("Expecting value");
    char c = s_[p_];
    if (c == '{') return object(depth + 1);
    if (c == '[') return array(depth + 1);
    if (c == '"') return Json::string(string());
    if (c == '-' || (c >= '0' && c <= '9')) return number();
    if (lit("true")) return Json::boolean(true);
    if (lit("false")) return Json::boolean(false);
    if (lit("null")) return Json();
    fail("Expecting value");
  }

  Json object(int depth) {
    if (depth > max_depth_) throw TooDeep{};
    ++p_;  // {
    Json::Object members;
    ws();
    if (p_ < s_.size() && s_[p_] == '}') {
      ++p_;
      return Json::object(std::move(members));
    }
    for (;;) {
      ws();
      if (p_ >= s_.size() || s_[p_] != '"') fail("Expecting property name enclosed in double quotes");
      std::string key = string();
      ws();
      if (p_ >= s_.size() || s_[p_] != ':') fail("Expecting ':' delimiter");
      ++p_;
      ws();
      members.emplace_back(std::move(key), value(depth));
      ws();
      if (p_ < s_.size() && s_[p_] == ',') {
        ++p_;
        continue;
      }
      if (p_ < s_.size() && s_[p_] == '}') {
        ++p_;
        return Json::object(std::move(members));
      }
      fail("Expecting ',' delimiter");
    }
  }

  Json array(int depth) {
    if (depth > max_depth_) throw TooDeep{};
    ++p_;  // [
    Json::Array items;
    ws();
    if (p_ < s_.size() && s_[p_] == ']') {
      ++p_;
      return Json::array(std::move(items));
    }
    for (;;) {
      ws();
      items.push_back(value(depth));
      ws();
      if (p_ < s_.size() && s_[p_] == ',') {
        ++p_;
        continue;
      }
      if (p_ < s_.size() && s_[p_] == ']') {
        ++p_;
        return Json::array(std::move(items));
      }
      fail("Expecting ',' delimiter");
    }
  }

  Json number() {
    std::size_t start = p_;
    if (s_[p_] == '-') ++p_;
    if (p_ < s_.size() && s_[p_] == '0') {
      ++p_;
    } else if (p_ < s_.size() && s_[p_] >= '1' && s_[p_] <= '9') {
      while (p_ < s_.size() && std::isdigit(static_cast<unsigned char>(s_[p_]))) ++p_;
    } else {
      p_ = start;
      fail("Expecting value");
    }
    if (p_ < s_.size() && s_[p_] == '.') {
      ++p_;
      if (p_ >= s_.size() || !std::isdigit(static_cast<unsigned char>(s_[p_]))) fail("Expecting digits after '.'");
      while (p_ < s_.size() && std::isdigit(static_cast<unsigned char>(s_[p_]))) ++p_;
    }
    if (p_ < s_.size() && (s_[p_] == 'e' || s_[p_] == 'E')) {
      ++p_;
      if (p_ < s_.size() && (s_[p_] == '+' || s_[p_] == '-')) ++p_;
      if (p_ >= s_.size() || !std::isdigit(static_cast<unsigned char>(s_[p_]))) fail("Expecting exponent digits");
      while (p_ < s_.size() && std::isdigit(static_cast<unsigned char>(s_[p_]))) ++p_;
    }
    if (p_ - start > 4300) fail("number too long");  // Python refuses ints of more than 4300 digits
    return Json::number(std::string(s_.substr(start, p_ - start)));
  }

  uint32_t hex4() {
    if (p_ + 4 > s_.size()) fail("Invalid \\uXXXX escape");
    uint32_t v = 0;
    for (int k = 0; k < 4; ++k) {
      char c = s_[p_ + k];
      v <<= 4;
      if (c >= '0' && c <= '9') v |= c - '0';
      else if (c >= 'a' && c <= 'f') v |= c - 'a' + 10;
      else if (c >= 'A' && c <= 'F') v |= c - 'A' + 10;
      else fail("Invalid \\uXXXX escape");
    }
    p_ += 4;
    return v;
  }

  std::string string() {
    ++p_;  // "
    std::string out;
    for (;;) {
      if (p_ >= s_.size()) fail("Unterminated string");
      unsigned char c = static_cast<unsigned char>(s_[p_]);
      if (c == '"') {
        ++p_;
        return out;
      }
      if (c < 0x20) fail("Invalid control character");
      if (c != '\\') {
        out += static_cast<char>(c);
        ++p_;
        continue;
      }
      ++p_;
      if (p_ >= s_.size()) fail("Unterminated string");
      char e = s_[p_++];
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          uint32_t cp = hex4();
          if (cp >= 0xD800 && cp <= 0xDBFF) {
            if (!(p_ + 1 < s_.size() && s_[p_] == '\\' && s_[p_ + 1] == 'u')) fail("Lone surrogate in string");
            p_ += 2;
            uint32_t lo = hex4();
            if (lo < 0xDC00 || lo > 0xDFFF) fail("Lone surrogate in string");
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
          } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
            fail("Lone surrogate in string");
          }
          append_utf8(out, static_cast<char32_t>(cp));
          break;
        }
        default: --p_; fail("Invalid \\escape");
      }
    }
  }
};

}  // namespace

Json parse_json(std::string_view text, const JsonLimits& limits, std::string_view where) {
  if (text.size() > limits.max_bytes)
    throw JsonError(std::string(where) + " is " + std::to_string(text.size()) + " bytes, more than " +
                    std::to_string(limits.max_bytes));
  Parser parser(text, limits.max_depth);
  try {
    return parser.parse_document();
  } catch (const TooDeep&) {
    throw JsonError(std::string(where) + " nests JSON too deeply");
  } catch (const JsonError& e) {
    throw JsonError(std::string(where) + " is not valid JSON (" + e.what() + ")");
  }
}

// ---- files --------------------------------------------------------------------------------------------

std::string read_bounded(const std::string& path, std::size_t limit, std::string_view what, std::string_view fix) {
  const std::string tail = "; " + std::string(fix);
  // O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused below like any non-file.
  int fd = ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
  if (fd < 0) {
    int err = errno;
    if (err == ENOENT) throw JsonError(path + " is missing" + tail);
    throw JsonError("cannot open " + path + " (" + std::strerror(err) + "); check its permissions or " + std::string(fix));
  }
  struct Closer {
    int fd;
    ~Closer() { ::close(fd); }
  } closer{fd};
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) throw JsonError(path + " is not a regular file" + tail);
  if (static_cast<std::size_t>(st.st_size) > limit)
    throw JsonError(path + " is " + std::to_string(st.st_size) + " bytes, more than a " + std::string(what) +
                    " may have (" + std::to_string(limit) + ")" + tail);
  // Sized for the file as stat saw it (not the limit: a LoRA's is 8 GiB, which resize would zero-fill), grown up to
  // limit + 1 when the file has grown since the stat.
  std::string data;
  data.resize(static_cast<std::size_t>(st.st_size) + 1);
  std::size_t got = 0;
  while (got < limit + 1) {
    if (got == data.size()) data.resize(std::min(limit + 1, 2 * data.size()));
    ssize_t n = ::read(fd, &data[got], data.size() - got);
    if (n < 0) {
      if (errno == EINTR) continue;
      throw JsonError("cannot read " + path + " (" + std::strerror(errno) + ")" + tail);
    }
    if (n == 0) break;
    got += static_cast<std::size_t>(n);
  }
  if (got > limit)
    throw JsonError(path + " is more than " + std::to_string(limit) + " bytes, more than a " + std::string(what) +
                    " may have" + tail);
  data.resize(got);
  return data;
}

void check_utf8(std::string_view data, const std::string& path, std::string_view fix) {
  std::size_t i = 0, n = data.size();
  auto bad = [&](const char* reason) {
    throw JsonError(path + " is not UTF-8 text (" + reason + " at byte " + std::to_string(i) + "); " + std::string(fix));
  };
  while (i < n) {
    unsigned char c = static_cast<unsigned char>(data[i]);
    if (c < 0x80) {
      ++i;
      continue;
    }
    int len;
    uint32_t cp;
    if (c >= 0xC2 && c <= 0xDF) len = 2, cp = c & 0x1F;
    else if (c >= 0xE0 && c <= 0xEF) len = 3, cp = c & 0x0F;
    else if (c >= 0xF0 && c <= 0xF4) len = 4, cp = c & 0x07;
    else bad("invalid start byte");
    if (i + len > n) bad("unexpected end of data");
    for (int k = 1; k < len; ++k) {
      unsigned char d = static_cast<unsigned char>(data[i + k]);
      if ((d & 0xC0) != 0x80) bad("invalid continuation byte");
      cp = (cp << 6) | (d & 0x3F);
    }
    if ((len == 3 && cp < 0x800) || (len == 4 && (cp < 0x10000 || cp > 0x10FFFF)) || (cp >= 0xD800 && cp <= 0xDFFF))
      bad("invalid continuation byte");
    i += len;
  }
}

Json json_object(std::string_view data, const std::string& path, std::string_view fix, int max_depth) {
  check_utf8(data, path, fix);
  Parser parser(data, max_depth);
  Json value;
  try {
    value = parser.parse_document();
  } catch (const TooDeep&) {
    throw JsonError(path + " nests JSON too deeply to be ours; " + std::string(fix));
  } catch (const JsonError& e) {
    throw JsonError(path + " is not valid JSON (" + e.what() + "); " + std::string(fix));
  }
  if (!value.is_object())
    throw JsonError(path + " holds " + Json::type_name(value.type()) + " where a JSON object is expected; " + std::string(fix));
  return value;
}

Json read_json_object(const std::string& path, std::string_view fix, std::size_t limit, std::string_view what) {
  return json_object(read_bounded(path, limit, what, fix), path, fix);
}

}  // namespace ldm_rt::native

namespace ldm_rt::native {

bool py_truthy(const Json* v) {
  if (v == nullptr || v->is_null()) return false;
  if (v->is_bool()) return v->as_bool();
  if (v->is_number()) return v->as_double() != 0.0;
  if (v->is_string()) return !v->as_string().empty();
  return v->size() != 0;
}

}  // namespace ldm_rt::native
