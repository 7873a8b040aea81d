// runtime/prompt_weights.py in C++. The parser is the Python module's regular expressions written out as a
// scanner over code points, with Python's character classes where they decide a match (re's \s, \d and \b).
#include "ldm_rt/native/prompt_weights.hpp"

#include <unicode/uchar.h>

#include <algorithm>
#include <clocale>
#include <cmath>
#include <cstddef>
#include <cstdlib>
#include <optional>
#include <tuple>

#include "ldm_rt/native/pyrepr.hpp"
#include "utf8.hpp"

namespace ldm_rt::native {

namespace {

constexpr double kRound = 1.1;  // prompt_weights.ROUND: (text); [text] divides by it
constexpr std::ptrdiff_t kCommaBacktrack = 20;  // prompt_weights.COMMA_BACKTRACK (A1111's comma_padding_backtrack)

std::u32string code_points(std::string_view s) {  // valid UTF-8 (the pipeline checks prompts first)
  std::u32string out;
  for (std::size_t i = 0; i < s.size();) {
    auto c = static_cast<unsigned char>(s[i]);
    std::size_t n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 1;
    if (i + n > s.size()) n = 1;
    char32_t cp = n == 1 ? c : c & (0xFF >> (n + 1));
    for (std::size_t k = 1; k < n; ++k) cp = (cp << 6) | (static_cast<unsigned char>(s[i + k]) & 0x3F);
    out += cp;
    i += n;
  }
  return out;
}

std::string utf8(const std::u32string& s, std::size_t begin = 0, std::size_t end = std::u32string::npos) {
  std::string out;
  for (std::size_t i = begin; i < std::min(end, s.size()); ++i) append_utf8(out, s[i]);
  return out;
}

// re's \s for str patterns: str.isspace() (Python's whitespace table, which has U+001C..U+001F, not White_Space's).
bool py_space(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20) || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}
// re's \d: a decimal digit (Numeric_Type=Decimal, i.e. category Nd); float() reads every script's.
bool py_digit(char32_t c) { return u_charType(static_cast<UChar32>(c)) == U_DECIMAL_DIGIT_NUMBER; }
// re's \w (for \b): str.isalnum() or '_'; isalnum is a letter or any Numeric_Type.
bool py_word(char32_t c) {
  auto u = static_cast<UChar32>(c);
  return c == U'_' || (U_GET_GC_MASK(u) & U_GC_L_MASK) != 0 || u_getIntPropertyValue(u, UCHAR_NUMERIC_TYPE) != U_NT_NONE;
}

bool bracket(char32_t c) { return c == U'(' || c == U')' || c == U'[' || c == U']'; }

// `:\s*([+-]?[.\d]+)\s*\)` at `at`: the lexeme's end and the number's [begin, end), if it matches. The classes
// are disjoint, so the greedy scan is what re's backtracking finds.
std::optional<std::tuple<std::size_t, std::size_t, std::size_t>> weight_at(const std::u32string& s, std::size_t at) {
  std::size_t p = at + 1;
  while (p < s.size() && py_space(s[p])) ++p;
  std::size_t begin = p;
  if (p < s.size() && (s[p] == U'+' || s[p] == U'-')) ++p;
  std::size_t digits = p;
  while (p < s.size() && (s[p] == U'.' || py_digit(s[p]))) ++p;
  if (p == digits) return std::nullopt;
  std::size_t end = p;
  while (p < s.size() && py_space(s[p])) ++p;
  if (p == s.size() || s[p] != U')') return std::nullopt;
  return std::make_tuple(p + 1, begin, end);
}

// float(text) for text of [+-]?[.\d]+: every script's digits read as 0-9; "1.2.3" or "." is not a number.
std::optional<double> py_float(const std::u32string& text) {
  std::string ascii;
  for (char32_t c : text) ascii += c < 0x80 ? static_cast<char>(c) : static_cast<char>('0' + u_charDigitValue(static_cast<UChar32>(c)));
  // strtod reads the C locale's "." only when the process has not set another; the lexeme has no other characters.
  std::size_t dots = std::count(ascii.begin(), ascii.end(), '.');
  bool any_digit = std::any_of(ascii.begin(), ascii.end(), [](char c) { return c >= '0' && c <= '9'; });
  if (dots > 1 || !any_digit) return std::nullopt;
  std::string localized = ascii;
  if (const std::lconv* lc = std::localeconv(); lc && lc->decimal_point && std::string(lc->decimal_point) != ".") {
    std::replace(localized.begin(), localized.end(), '.', lc->decimal_point[0]);
  }
  char* stop = nullptr;
  double v = std::strtod(localized.c_str(), &stop);
  if (stop != localized.c_str() + localized.size()) return std::nullopt;
  return v;  // an overflow is inf, as float("1" * 400)
}

// _BREAK.split(text): the pieces around each `\s*\bBREAK\b\s*`, leftmost first.
std::vector<std::u32string> split_break(const std::u32string& s) {
  static const std::u32string kBreak = U"BREAK";
  std::vector<std::u32string> pieces;
  std::size_t from = 0, p = 0;
  while (p < s.size()) {
    std::size_t q = p;
    while (q < s.size() && py_space(s[q])) ++q;
    bool boundary_before = q == 0 || !py_word(s[q - 1]);
    bool word = s.compare(q, kBreak.size(), kBreak) == 0;
    std::size_t after = q + kBreak.size();
    if (word && boundary_before && (after == s.size() || !py_word(s[after]))) {
      while (after < s.size() && py_space(s[after])) ++after;
      pieces.push_back(s.substr(from, p - from));
      from = p = after;
      continue;
    }
    ++p;
  }
  pieces.push_back(s.substr(from));
  return pieces;
}

struct Piece {
  std::u32string text;
  double weight;
  bool is_break;
};

}  // namespace

std::vector<std::vector<Fragment>> parse_prompt_weights(std::string_view prompt) {
  const std::u32string s = code_points(prompt);
  std::vector<Piece> pieces;
  std::vector<std::size_t> open_round, open_square;  // where each open bracket's text starts in `pieces`
  auto scale = [&pieces](std::size_t start, double factor) {
    for (std::size_t k = start; k < pieces.size(); ++k)
      if (!pieces[k].is_break) pieces[k].weight *= factor;
  };
  auto text = [&pieces](const std::u32string& lexeme) {
    std::vector<std::u32string> parts = split_break(lexeme);
    for (std::size_t k = 0; k < parts.size(); ++k) {
      if (k) pieces.push_back({U"", 0.0, true});
      pieces.push_back({parts[k], 1.0, false});
    }
  };
  std::size_t p = 0;
  while (p < s.size()) {
    char32_t c = s[p];
    if (c == U'\\') {  // an escaped character, or a lone backslash (dropped: its text is empty)
      bool escaped = p + 1 < s.size() && (bracket(s[p + 1]) || s[p + 1] == U'\\');
      pieces.push_back({escaped ? s.substr(p + 1, 1) : U"", 1.0, false});
      p += escaped ? 2 : 1;
    } else if (c == U'(') {
      open_round.push_back(pieces.size());
      ++p;
    } else if (c == U'[') {
      open_square.push_back(pieces.size());
      ++p;
    } else if (c == U')' || c == U']') {
      std::vector<std::size_t>& open = c == U')' ? open_round : open_square;
      if (open.empty()) {
        text(s.substr(p, 1));  // closes nothing: text
      } else {
        scale(open.back(), c == U')' ? kRound : 1 / kRound);
        open.pop_back();
      }
      ++p;
    } else if (c == U':') {
      auto weight = weight_at(s, p);
      std::size_t end = weight ? std::get<0>(*weight) : p + 1;
      if (weight && !open_round.empty()) {
        auto [_, begin, stop] = *weight;
        std::optional<double> factor = py_float(s.substr(begin, stop - begin));
        if (!factor) {
          throw PromptWeightError("prompt weight " + py_str_repr(utf8(s, p, end)) +
                                  " is not a number; write (text:1.2), or \\( \\) for literal brackets");
        }
        scale(open_round.back(), *factor);
        open_round.pop_back();
      } else {
        text(s.substr(p, end - p));  // ":1.2)" closing nothing, or a lone colon: text
      }
      p = end;
    } else {  // a run of plain text
      std::size_t q = p;
      while (q < s.size() && s[q] != U'\\' && !bracket(s[q]) && s[q] != U':') ++q;
      text(s.substr(p, q - p));
      p = q;
    }
  }
  for (std::size_t start : open_round) scale(start, kRound);  // left open: closed at the end, round before square
  for (std::size_t start : open_square) scale(start, 1 / kRound);

  std::vector<std::vector<Fragment>> segments(1);
  for (const Piece& piece : pieces) {
    if (piece.is_break) {
      segments.emplace_back();
    } else if (!segments.back().empty() && segments.back().back().weight == piece.weight) {
      segments.back().back().text += utf8(piece.text);
    } else {
      segments.back().push_back({utf8(piece.text), piece.weight});
    }
  }
  for (auto& segment : segments)
    if (segment.empty()) segment.push_back({"", 1.0});
  return segments;
}

namespace {

// The prompts' words without the syntax (prompt_weights.tokenize's warn_unknown): segments joined by " ".
std::vector<std::string> plain_texts(const std::vector<std::vector<std::vector<Fragment>>>& parsed) {
  std::vector<std::string> out;
  for (const auto& segments : parsed) {
    std::string joined;
    for (std::size_t k = 0; k < segments.size(); ++k) {
      if (k) joined += ' ';
      for (const Fragment& f : segments[k]) joined += f.text;
    }
    out.push_back(std::move(joined));
  }
  return out;
}

}  // namespace

TokenizedPrompts tokenize_weighted(const PromptTokenizer& tokenizer, const std::vector<std::string>& prompts, int64_t chunks) {
  std::vector<std::vector<std::vector<Fragment>>> parsed;
  std::vector<std::string> texts;
  for (const std::string& prompt : prompts) {
    parsed.push_back(parse_prompt_weights(prompt));
    for (const auto& segment : parsed.back())
      for (const Fragment& f : segment) texts.push_back(f.text);
  }
  std::vector<std::vector<int64_t>> token_ids = tokenizer.token_ids(texts);
  const int64_t L = tokenizer.max_length();
  const std::size_t size = static_cast<std::size_t>(L - 2);
  TokenizedPrompts r;
  r.chunk_limit = std::max<int64_t>(chunks, 1);
  r.ids.shape = {static_cast<int64_t>(prompts.size()), L};
  std::size_t next_text = 0;
  const std::vector<int64_t> comma = tokenizer.token_ids({","}).front();
  const int64_t comma_id = comma.size() == 1 ? comma.front() : -1;  // -1: a vocabulary without a comma token never backtracks
  for (const auto& segments : parsed) {
    std::vector<std::vector<std::pair<int64_t, float>>> pieces;  // chunks of (token, weight), each at most `size`
    for (const auto& segment : segments) {
      pieces.emplace_back();  // BREAK: a new chunk, even if the one before is not full (A1111)
      std::ptrdiff_t last_comma = -1;  // where the current chunk's last comma is
      for (const Fragment& f : segment) {
        for (int64_t token : token_ids[next_text]) {
          if (token == comma_id) {
            last_comma = static_cast<std::ptrdiff_t>(pieces.back().size());
          } else if (pieces.back().size() == size && last_comma >= 0 &&
                     static_cast<std::ptrdiff_t>(size) - last_comma <= kCommaBacktrack) {
            // A1111's comma_padding_backtrack: the words after the comma move to the next chunk whole.
            std::vector<std::pair<int64_t, float>> moved(pieces.back().begin() + last_comma + 1, pieces.back().end());
            pieces.back().resize(static_cast<std::size_t>(last_comma) + 1);
            pieces.push_back(std::move(moved));
            last_comma = -1;
          }
          if (pieces.back().size() == size) {
            pieces.emplace_back();
            last_comma = -1;
          }
          pieces.back().emplace_back(token, static_cast<float>(f.weight));
        }
        ++next_text;
      }
    }
    if (pieces.size() > 1 && pieces.back().empty()) pieces.pop_back();  // a BREAK at the end starts nothing
    std::size_t kept = std::min(pieces.size(), static_cast<std::size_t>(r.chunk_limit));
    IdTensor ids{{static_cast<int64_t>(kept), L}, std::vector<int64_t>(kept * static_cast<std::size_t>(L), tokenizer.pad_id())};
    Tensor weights({static_cast<int64_t>(kept), L}, 1.0f);
    for (std::size_t k = 0; k < kept; ++k) {
      int64_t* row = ids.data.data() + k * static_cast<std::size_t>(L);
      float* w = weights.data.data() + k * static_cast<std::size_t>(L);
      row[0] = tokenizer.bos_id();
      for (std::size_t j = 0; j < pieces[k].size(); ++j) std::tie(row[1 + j], w[1 + j]) = pieces[k][j];
      row[1 + pieces[k].size()] = tokenizer.eos_id();
    }
    r.ids.data.insert(r.ids.data.end(), ids.data.begin(), ids.data.begin() + L);
    int64_t dropped = 0;
    for (std::size_t k = kept; k < pieces.size(); ++k) dropped += static_cast<int64_t>(pieces[k].size());
    r.chunks.push_back(std::move(ids));
    r.weights.push_back(std::move(weights));
    r.dropped.push_back(dropped);
    r.truncated.push_back(dropped > 0);
  }
  r.unknown = tokenizer.encode(plain_texts(parsed)).unknown;
  return r;
}

std::vector<std::string> weighted_warnings(const PromptTokenizer& tokenizer, const std::vector<std::string>& prompts,
                                           const TokenizedPrompts& result, std::string_view what) {
  // Truncation names the prompt as written; unknown words are told once per text without the syntax (Python's
  // warn_unknown is given those texts).
  TokenizedPrompts truncation = result, unknown = result;
  truncation.unknown.assign(result.unknown.size(), {});
  unknown.dropped.assign(result.dropped.size(), 0);
  std::vector<std::vector<std::vector<Fragment>>> parsed;
  for (const std::string& prompt : prompts) parsed.push_back(parse_prompt_weights(prompt));
  std::vector<std::string> out = tokenizer.warnings(prompts, truncation, what);
  for (std::string& w : tokenizer.warnings(plain_texts(parsed), unknown, what)) out.push_back(std::move(w));
  return out;
}

Tensor emphasize(const Tensor& states, const std::vector<Tensor>& weights, int64_t batch) {
  const int64_t rows = states.dim(0), tokens = states.dim(1), dim = states.dim(2);
  const int64_t L = weights.at(0).dim(1), n = tokens / L;
  std::vector<float> w(weights.size() * static_cast<std::size_t>(n * L), 1.0f);  // (prompts, n, L)
  for (std::size_t r = 0; r < weights.size(); ++r)
    std::copy(weights[r].data.begin(), weights[r].data.end(), w.begin() + static_cast<std::ptrdiff_t>(r * n * L));
  if (std::all_of(w.begin(), w.end(), [](float x) { return x == 1.0f; })) return states;
  Tensor out(states.shape);
  const std::size_t chunk = static_cast<std::size_t>(L * dim);
  std::vector<float> weighted(chunk);
  bool finite = true;
  for (int64_t row = 0; row < rows; ++row) {
    const float* chunk_weights = w.data() + (row / batch) * n * L;
    for (int64_t c = 0; c < n; ++c) {
      const std::size_t at = static_cast<std::size_t>((row * n + c)) * chunk;
      const float* z = states.data.data() + at;
      // Means in float64 as numpy's mean(dtype=float64); float32 values summed in float64 are exact here
      // whatever the order (24-bit mantissas, tens of thousands of terms), so numpy's pairwise order is not needed.
      double before = 0.0, after = 0.0;
      for (std::size_t k = 0; k < chunk; ++k) {
        weighted[k] = z[k] * chunk_weights[c * L + static_cast<int64_t>(k) / dim];
        before += static_cast<double>(z[k]);
        after += static_cast<double>(weighted[k]);
      }
      const double ratio = (before / static_cast<double>(chunk)) / (after / static_cast<double>(chunk));
      float* o = out.data.data() + at;
      for (std::size_t k = 0; k < chunk; ++k) {
        o[k] = static_cast<float>(static_cast<double>(weighted[k]) * ratio);
        finite = finite && std::isfinite(o[k]);
      }
    }
  }
  if (!finite) {
    throw PromptWeightError(
        "the prompt weights cancel or overflow the text encoding (its mean becomes 0 or infinite); use weights nearer 1");
  }
  return out;
}

}  // namespace ldm_rt::native
