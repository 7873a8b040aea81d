// A small strict JSON (RFC 8259) value and parser for the files of an artifacts folder (manifest.json,
// scheduler_config.json, tokenizer.json). No JSON library is available to the native build, and these files
// come from users: the parser bounds size and nesting before it spends memory, refuses anything RFC 8259
// does not allow (NaN, Infinity, comments, trailing commas, lone surrogates, control characters in strings),
// and keeps each number's text so float32 tables parse to their exact bits (`as_float`).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace ldm_rt::native {

// Bad JSON text, or a value of the wrong kind; the message is one line naming what and where.
class JsonError : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

struct JsonLimits {
  std::size_t max_bytes = std::size_t{16} << 20;  // runtime/files.py MAX_JSON_BYTES (tokenizer.json: 64 MiB)
  int max_depth = 256;                            // nesting of arrays/objects
};

class Json {
 public:
  enum class Type { Null, Bool, Number, String, Array, Object };
  using Array = std::vector<Json>;
  using Object = std::vector<std::pair<std::string, Json>>;  // in file order; a repeated key keeps the last value

  Json() = default;  // null
  static Json boolean(bool b);
  static Json number(std::string text);  // text must be a JSON number
  static Json string(std::string s);
  static Json array(Array items);
  static Json object(Object members);

  Type type() const { return type_; }
  bool is_null() const { return type_ == Type::Null; }
  bool is_bool() const { return type_ == Type::Bool; }
  bool is_number() const { return type_ == Type::Number; }
  bool is_integer() const;  // a number written without fraction or exponent ("1", not "1.0": Python's int)
  bool is_string() const { return type_ == Type::String; }
  bool is_array() const { return type_ == Type::Array; }
  bool is_object() const { return type_ == Type::Object; }

  // Accessors throw JsonError("expected a <kind>, got <kind>") on the wrong type.
  bool as_bool() const;
  double as_double() const;          // nearest double to the written number
  float as_float() const;            // nearest float32 to the written number (not via double)
  int64_t as_int() const;            // integers only; out of int64 range throws
  const std::string& number_text() const;  // the number as written
  const std::string& as_string() const;
  const Array& as_array() const;
  const Object& as_object() const;

  std::size_t size() const;                     // array or object length
  const Json& operator[](std::size_t i) const;  // array element, bounds-checked (throws JsonError)
  const Json* find(std::string_view key) const; // object member or nullptr (also nullptr on a non-object)
  const Json& at(std::string_view key) const;   // object member; throws JsonError "missing key ..."
  bool contains(std::string_view key) const { return find(key) != nullptr; }

  static const char* type_name(Type t);  // "null", "a boolean", "a number", "a string", "an array", "an object"

  // Compact JSON text (numbers as written, strings escaped); for writing and tests.
  std::string dump() const;

 private:
  Type type_ = Type::Null;
  bool bool_ = false;
  std::string text_;  // number text or string value
  std::shared_ptr<const Array> array_;
  std::shared_ptr<const Object> object_;
};

// Parses `text` (UTF-8) as one JSON value with nothing but whitespace after it. Throws JsonError
// "<where> is not valid JSON (<reason> at line L column C)" or "<where> nests JSON too deeply ...".
Json parse_json(std::string_view text, const JsonLimits& limits = {}, std::string_view where = "JSON text");

// C++ versions of runtime/files.py's read_bounded + json_object, with the same one-line messages:
// "<path> is missing; <fix>", "<path> is not a regular file; <fix>", "<path> is N bytes, more than a <what>
// may have (L); <fix>", "<path> is not UTF-8 text (...); <fix>", "<path> is not valid JSON (...); <fix>",
// "<path> holds an array where a JSON object is expected; <fix>". Errors are JsonError.
std::string read_bounded(const std::string& path, std::size_t limit, std::string_view what, std::string_view fix);
void check_utf8(std::string_view data, const std::string& path, std::string_view fix);  // throws JsonError
Json json_object(std::string_view data, const std::string& path, std::string_view fix, int max_depth = 256);
Json read_json_object(const std::string& path, std::string_view fix, std::size_t limit = std::size_t{16} << 20,
                      std::string_view what = "JSON config");

// JSON string literal for `s` (with quotes), escaping as Python's json.dumps(ensure_ascii=...) does: by
// default the UTF-8 text is kept; with ensure_ascii every code point past ASCII is a \u escape.
std::string json_quote(std::string_view s, bool ensure_ascii = false);

// Python's truthiness of a JSON value (`cfg.get("use_dora")`, `header.pop("__metadata__", None) or {}`); null: false.
bool py_truthy(const Json* v);

}  // namespace ldm_rt::native
