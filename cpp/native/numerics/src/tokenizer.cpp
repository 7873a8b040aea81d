// tokenizer.json -> ids, following the `tokenizers` library's pipeline for one sequence:
// added tokens split out of the raw text (then out of the normalized text), normalizer, pre-tokenizer,
// model (BPE / WordLevel), truncation to max_length - 2, bos/eos from the post-processor, padding.
// Unicode (NFC, full lowercase mapping, general categories, White_Space) comes from ICU.
#include "ldm_rt/native/tokenizer.hpp"

#include <unicode/uchar.h>
#include <unicode/unorm2.h>
#include <unicode/ustring.h>
#include <unicode/utf16.h>

#include <algorithm>
#include <limits>
#include <map>
#include <optional>
#include <queue>
#include <tuple>
#include <unordered_map>

#include "ldm_rt/native/pyrepr.hpp"
#include "utf8.hpp"

namespace ldm_rt::native {

namespace {

// ---- text with alignment to the original prompt (byte offsets) ----

struct NText {
  std::u32string cps;
  std::vector<std::pair<uint32_t, uint32_t>> spans;  // per code point: [start, end) bytes of the original
};

std::string to_utf8(const std::u32string& s, std::size_t begin = 0, std::size_t end = std::u32string::npos) {
  std::string out;
  end = std::min(end, s.size());
  for (std::size_t i = begin; i < end; ++i) append_utf8(out, s[i]);
  return out;
}

// Decodes UTF-8 (invalid bytes become U+FFFD, as Python's "replace"; prompts are validated upstream).
NText decode(std::string_view s, uint32_t base = 0) {
  NText t;
  std::size_t i = 0;
  while (i < s.size()) {
    unsigned char c = static_cast<unsigned char>(s[i]);
    char32_t cp = 0xFFFD;
    std::size_t len = 1;
    if (c < 0x80) {
      cp = c;
    } else if ((c >> 5) == 6 && i + 1 < s.size()) {
      cp = ((c & 0x1F) << 6) | (s[i + 1] & 0x3F), len = 2;
    } else if ((c >> 4) == 14 && i + 2 < s.size()) {
      cp = ((c & 0x0F) << 12) | ((s[i + 1] & 0x3F) << 6) | (s[i + 2] & 0x3F), len = 3;
    } else if ((c >> 3) == 30 && i + 3 < s.size()) {
      cp = ((c & 0x07) << 18) | ((s[i + 1] & 0x3F) << 12) | ((s[i + 2] & 0x3F) << 6) | (s[i + 3] & 0x3F), len = 4;
    }
    t.cps.push_back(cp);
    t.spans.emplace_back(base + static_cast<uint32_t>(i), base + static_cast<uint32_t>(i + len));
    i += len;
  }
  return t;
}

std::u16string to_u16(const std::u32string& s) {
  std::u16string out;
  for (char32_t c : s) {
    if (c < 0x10000) {
      out += static_cast<char16_t>(c);
    } else {
      out += static_cast<char16_t>(U16_LEAD(c));
      out += static_cast<char16_t>(U16_TRAIL(c));
    }
  }
  return out;
}

std::u32string from_u16(const UChar* s, int32_t n) {
  std::u32string out;
  for (int32_t i = 0; i < n;) {
    UChar32 c;
    U16_NEXT(s, i, n, c);
    out += static_cast<char32_t>(c);
  }
  return out;
}

const UNormalizer2* nfc() {
  UErrorCode err = U_ZERO_ERROR;
  const UNormalizer2* n = unorm2_getNFCInstance(&err);
  if (U_FAILURE(err)) throw TokenizerError(std::string("ICU has no NFC normalizer (") + u_errorName(err) + ")");
  return n;
}

std::u32string nfc_chunk(const std::u32string& s) {
  std::u16string in = to_u16(s);
  UErrorCode err = U_ZERO_ERROR;
  const UNormalizer2* n = nfc();
  int32_t cap = static_cast<int32_t>(in.size()) * 3 + 16;
  std::vector<UChar> out(static_cast<std::size_t>(cap));
  int32_t len = unorm2_normalize(n, reinterpret_cast<const UChar*>(in.data()), static_cast<int32_t>(in.size()), out.data(), cap, &err);
  if (U_FAILURE(err)) throw TokenizerError(std::string("NFC normalization failed (") + u_errorName(err) + ")");
  return from_u16(out.data(), len);
}

// Length of the canonical decomposition of `c` (1 when it has none).
std::size_t nfd_length(char32_t c) {
  UErrorCode err = U_ZERO_ERROR;
  const UNormalizer2* nfd = unorm2_getNFDInstance(&err);
  if (U_FAILURE(err)) return 1;
  std::u16string in = to_u16(std::u32string(1, c));
  UChar buf[32];
  int32_t len = unorm2_normalize(nfd, reinterpret_cast<const UChar*>(in.data()), static_cast<int32_t>(in.size()), buf, 32, &err);
  if (U_FAILURE(err)) return 1;
  std::size_t n = from_u16(buf, len).size();
  return n ? n : 1;
}

// NFC over chunks that start at normalization boundaries: every output code point keeps the span of its chunk.
NText apply_nfc(const NText& t) {
  const UNormalizer2* n = nfc();
  NText out;
  std::size_t i = 0;
  while (i < t.cps.size()) {
    std::size_t j = i + 1;
    while (j < t.cps.size() && !unorm2_hasBoundaryBefore(n, static_cast<UChar32>(t.cps[j]))) ++j;
    std::u32string chunk = t.cps.substr(i, j - i);
    std::u32string norm = chunk.size() == 1 && chunk[0] < 0x300 ? chunk : nfc_chunk(chunk);
    std::pair<uint32_t, uint32_t> span{t.spans[i].first, t.spans[j - 1].second};
    // Alignment as tokenizers keeps it through NFC: positional. Each output character takes the span of the
    // original character at the current position; a composed one (its NFD is longer) also consumes the
    // characters folded into it, which map to nothing ("e\u0301" written reads back as "e"); reordered
    // marks keep the positions, not the characters.
    std::size_t pos = i;
    std::size_t budget = norm.size() < chunk.size() ? chunk.size() - norm.size() : 0;
    for (char32_t c : norm) {
      out.cps.push_back(c);
      if (pos >= j) {
        out.spans.push_back(span);
        continue;
      }
      out.spans.push_back(t.spans[pos]);
      std::size_t skip = 0;
      if (budget && c != t.cps[pos]) skip = std::min(budget, nfd_length(c) - 1);
      budget -= skip;
      pos += 1 + skip;
    }
    i = j;
  }
  return out;
}

// Rust's char::to_lowercase per code point (full mappings, no context: a lone Σ is σ).
NText apply_lowercase(const NText& t) {
  NText out;
  for (std::size_t i = 0; i < t.cps.size(); ++i) {
    char32_t c = t.cps[i];
    if (c < 0x80) {
      out.cps.push_back(c >= 'A' && c <= 'Z' ? c + 32 : c);
      out.spans.push_back(t.spans[i]);
      continue;
    }
    std::u16string in = to_u16(std::u32string(1, c));
    UChar buf[16];
    UErrorCode err = U_ZERO_ERROR;
    int32_t len = u_strToLower(buf, 16, reinterpret_cast<const UChar*>(in.data()), static_cast<int32_t>(in.size()), "", &err);
    std::u32string low = U_FAILURE(err) ? std::u32string(1, c) : from_u16(buf, len);
    for (char32_t l : low) {
      out.cps.push_back(l);
      out.spans.push_back(t.spans[i]);
    }
  }
  return out;
}

bool is_space(char32_t c) { return u_isUWhiteSpace(static_cast<UChar32>(c)); }  // onig's \s: White_Space
bool is_letter(char32_t c) { return (U_GET_GC_MASK(static_cast<UChar32>(c)) & U_GC_L_MASK) != 0; }
bool is_number(char32_t c) { return (U_GET_GC_MASK(static_cast<UChar32>(c)) & U_GC_N_MASK) != 0; }
// onig's \w as `tokenizers` builds it: Letter | Mark | Nd | Nl | Connector_Punctuation (not No: "1/2", circled digits)
bool is_word(char32_t c) {
  return (U_GET_GC_MASK(static_cast<UChar32>(c)) &
          (U_GC_L_MASK | U_GC_M_MASK | U_GC_ND_MASK | U_GC_NL_MASK | U_GC_PC_MASK)) != 0;
}
// tokenizers' Punctuation: ASCII punctuation or a Unicode P* category.
bool is_punct(char32_t c) {
  if (c < 0x80) return (c >= 0x21 && c <= 0x2F) || (c >= 0x3A && c <= 0x40) || (c >= 0x5B && c <= 0x60) || (c >= 0x7B && c <= 0x7E);
  return (U_GET_GC_MASK(static_cast<UChar32>(c)) & U_GC_P_MASK) != 0;
}

// Replace every maximal run of White_Space with `content` (the run's span covers the original run).
NText replace_whitespace_runs(const NText& t, const std::u32string& content) {
  NText out;
  std::size_t i = 0;
  while (i < t.cps.size()) {
    if (!is_space(t.cps[i])) {
      out.cps.push_back(t.cps[i]);
      out.spans.push_back(t.spans[i]);
      ++i;
      continue;
    }
    std::size_t j = i;
    while (j < t.cps.size() && is_space(t.cps[j])) ++j;
    std::pair<uint32_t, uint32_t> span{t.spans[i].first, t.spans[j - 1].second};
    for (char32_t c : content) {
      out.cps.push_back(c);
      out.spans.push_back(span);
    }
    i = j;
  }
  return out;
}

NText replace_string(const NText& t, const std::u32string& pattern, const std::u32string& content) {
  if (pattern.empty()) return t;
  NText out;
  std::size_t i = 0;
  while (i < t.cps.size()) {
    if (t.cps.compare(i, pattern.size(), pattern) == 0) {
      std::pair<uint32_t, uint32_t> span{t.spans[i].first, t.spans[i + pattern.size() - 1].second};
      for (char32_t c : content) {
        out.cps.push_back(c);
        out.spans.push_back(span);
      }
      i += pattern.size();
    } else {
      out.cps.push_back(t.cps[i]);
      out.spans.push_back(t.spans[i]);
      ++i;
    }
  }
  return out;
}

// ---- pipeline parts ----

struct NormStep {
  enum Kind { Nfc, Lowercase, ReplaceWs, ReplaceStr } kind;
  std::u32string pattern, content;
};

struct PreStep {
  enum Kind { ClipSplit, ByteLevel, Whitespace, WhitespaceSplit, Punctuation } kind;
  bool add_prefix_space = false;
  bool use_regex = true;
};

struct AddedToken {
  std::u32string content;
  int64_t id;
  bool normalized;
};

using Range = std::pair<std::size_t, std::size_t>;  // [begin, end) code points

const std::u32string kClipLiterals[] = {U"<|startoftext|>", U"<|endoftext|>", U"'s", U"'t", U"'re", U"'ve", U"'m", U"'ll", U"'d"};
const std::u32string kContractions[] = {U"'s", U"'t", U"'re", U"'ve", U"'m", U"'ll", U"'d"};

// CLIP's split pattern with behavior "removed", invert: the matches, in order; the rest (whitespace) dropped.
void clip_split(const std::u32string& s, Range r, std::vector<Range>& out) {
  std::size_t p = r.first;
  while (p < r.second) {
    std::size_t q = p;
    for (const auto& lit : kClipLiterals)
      if (p + lit.size() <= r.second && s.compare(p, lit.size(), lit) == 0) {
        q = p + lit.size();
        break;
      }
    if (q == p) {
      char32_t c = s[p];
      if (is_letter(c)) {
        while (q < r.second && is_letter(s[q])) ++q;
      } else if (is_number(c)) {
        q = p + 1;
      } else if (!is_space(c)) {
        while (q < r.second && !is_space(s[q]) && !is_letter(s[q]) && !is_number(s[q])) ++q;
      }
    }
    if (q == p) {
      ++p;  // whitespace: not matched, removed
      continue;
    }
    out.emplace_back(p, q);
    p = q;
  }
}

// GPT-2's pattern ('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+), isolated.
void gpt2_split(const std::u32string& s, Range r, std::vector<Range>& out) {
  std::size_t p = r.first;
  const std::size_t e = r.second;
  while (p < e) {
    std::size_t q = p;
    for (const auto& lit : kContractions)
      if (p + lit.size() <= e && s.compare(p, lit.size(), lit) == 0) {
        q = p + lit.size();
        break;
      }
    if (q == p) {
      std::size_t a = (s[p] == U' ' && p + 1 < e) ? p + 1 : p;
      char32_t c = s[a];
      if (a < e && is_letter(c)) {
        q = a;
        while (q < e && is_letter(s[q])) ++q;
      } else if (a < e && is_number(c)) {
        q = a;
        while (q < e && is_number(s[q])) ++q;
      } else if (a < e && !is_space(c)) {
        q = a;
        while (q < e && !is_space(s[q]) && !is_letter(s[q]) && !is_number(s[q])) ++q;
      } else {
        std::size_t w = p;
        while (w < e && is_space(s[w])) ++w;
        if (w == e || w - p == 1) q = w;  // to the end, or a single space before a non-space
        else q = w - 1;                   // leave the last space to the next word
      }
    }
    out.emplace_back(p, q);
    p = q;
  }
}

const std::u32string& byte_alphabet() {
  // GPT-2 / CLIP's reversible byte -> printable code point map.
  static const std::u32string table = [] {
    std::u32string t(256, 0);
    std::vector<bool> direct(256, false);
    for (int b = '!'; b <= '~'; ++b) direct[b] = true;
    for (int b = 0xA1; b <= 0xAC; ++b) direct[b] = true;
    for (int b = 0xAE; b <= 0xFF; ++b) direct[b] = true;
    int n = 0;
    for (int b = 0; b < 256; ++b) t[b] = direct[b] ? static_cast<char32_t>(b) : static_cast<char32_t>(256 + n++);
    return t;
  }();
  return table;
}

struct PairHash {
  std::size_t operator()(const std::pair<int64_t, int64_t>& p) const {
    return std::hash<int64_t>()(p.first * 1000003 ^ p.second);
  }
};

}  // namespace

struct PromptTokenizer::Impl {
  std::vector<NormStep> normalizers;
  std::vector<PreStep> pre;
  std::vector<AddedToken> added;
  bool bpe = false;
  std::unordered_map<std::string, int64_t> vocab;
  std::unordered_map<std::pair<int64_t, int64_t>, std::pair<int64_t, int64_t>, PairHash> merges;  // -> (rank, new id)
  std::unordered_map<int64_t, std::string> id_to_token;
  std::string suffix, prefix;
  std::optional<int64_t> unk_id;
  bool fuse_unk = false;
  bool ignore_merges = false;
  int64_t bos = 0, eos = 0, pad = 0, max_length = 0, vocab_size = 0;
  bool word_level = false;

  NText normalize(const NText& t) const {
    NText cur = t;
    for (const auto& n : normalizers) {
      switch (n.kind) {
        case NormStep::Nfc: cur = apply_nfc(cur); break;
        case NormStep::Lowercase: cur = apply_lowercase(cur); break;
        case NormStep::ReplaceWs: cur = replace_whitespace_runs(cur, n.content); break;
        case NormStep::ReplaceStr: cur = replace_string(cur, n.pattern, n.content); break;
      }
    }
    return cur;
  }

  // Pre-tokenized words of a normalized piece, as ranges of its code points.
  std::vector<Range> pre_tokenize(const std::u32string& s) const {
    std::vector<Range> words{{0, s.size()}};
    for (const auto& step : pre) {
      std::vector<Range> next;
      for (Range r : words) {
        switch (step.kind) {
          case PreStep::ClipSplit: clip_split(s, r, next); break;
          case PreStep::ByteLevel:
            if (step.use_regex) gpt2_split(s, r, next);
            else next.push_back(r);
            break;
          case PreStep::Whitespace: {  // \w+|[^\w\s]+, whitespace removed
            std::size_t p = r.first;
            while (p < r.second) {
              std::size_t q = p;
              if (is_word(s[p])) {
                while (q < r.second && is_word(s[q])) ++q;
              } else if (!is_space(s[p])) {
                while (q < r.second && !is_word(s[q]) && !is_space(s[q])) ++q;
              }
              if (q == p) {
                ++p;
                continue;
              }
              next.emplace_back(p, q);
              p = q;
            }
            break;
          }
          case PreStep::WhitespaceSplit: {
            std::size_t p = r.first;
            while (p < r.second) {
              if (is_space(s[p])) {
                ++p;
                continue;
              }
              std::size_t q = p;
              while (q < r.second && !is_space(s[q])) ++q;
              next.emplace_back(p, q);
              p = q;
            }
            break;
          }
          case PreStep::Punctuation: {  // isolated: each punctuation mark its own word
            std::size_t p = r.first;
            while (p < r.second) {
              if (is_punct(s[p])) {
                next.emplace_back(p, p + 1);
                ++p;
                continue;
              }
              std::size_t q = p;
              while (q < r.second && !is_punct(s[q])) ++q;
              next.emplace_back(p, q);
              p = q;
            }
            break;
          }
        }
      }
      words.swap(next);
    }
    return words;
  }

  bool byte_level() const {
    for (const auto& p : pre)
      if (p.kind == PreStep::ByteLevel) return true;
    return false;
  }

  void model_tokens(const std::u32string& word, std::vector<int64_t>& out) const {
    if (word.empty()) return;
    std::string text;
    if (byte_level()) {
      const auto& alpha = byte_alphabet();
      std::string bytes = to_utf8(word);
      for (unsigned char b : bytes) append_utf8(text, alpha[b]);
    } else {
      text = to_utf8(word);
    }
    if (!bpe) {
      auto it = vocab.find(text);
      if (it != vocab.end()) out.push_back(it->second);
      else if (unk_id) out.push_back(*unk_id);
      else throw TokenizerError("the word-level vocabulary has no unknown token for " + py_str_repr(text));
      return;
    }
    if (ignore_merges) {
      auto it = vocab.find(text);
      if (it != vocab.end()) {
        out.push_back(it->second);
        return;
      }
    }
    // Symbols: one per character (suffix on the last, prefix on all but the first), unknowns as unk.
    NText chars = decode(text);
    std::vector<int64_t> sym;
    bool last_unk = false;
    for (std::size_t i = 0; i < chars.cps.size(); ++i) {
      std::string s;
      if (i > 0) s += prefix;
      append_utf8(s, chars.cps[i]);
      if (i + 1 == chars.cps.size()) s += suffix;
      auto it = vocab.find(s);
      if (it != vocab.end()) {
        sym.push_back(it->second);
        last_unk = false;
      } else if (unk_id) {
        if (!(fuse_unk && last_unk)) sym.push_back(*unk_id);
        last_unk = true;
      } else {
        throw TokenizerError("the BPE vocabulary has no symbol for " + py_str_repr(s) + " and no unknown token");
      }
    }
    // Merge the adjacent pair of lowest rank (leftmost first) until none is in the merges table, with a heap
    // over a linked list of symbols as tokenizers does: O(n log n), so a long word cannot stall a request.
    const std::size_t n = sym.size();
    std::vector<std::ptrdiff_t> prev(n), next(n);
    std::vector<bool> alive(n, true);
    for (std::size_t i = 0; i < n; ++i) {
      prev[i] = static_cast<std::ptrdiff_t>(i) - 1;
      next[i] = i + 1 < n ? static_cast<std::ptrdiff_t>(i + 1) : -1;
    }
    using Cand = std::tuple<int64_t, std::size_t, int64_t>;  // (rank, position of the left symbol, merged id)
    std::priority_queue<Cand, std::vector<Cand>, std::greater<Cand>> heap;
    auto push = [&](std::size_t i) {
      if (next[i] < 0) return;
      auto it = merges.find({sym[i], sym[static_cast<std::size_t>(next[i])]});
      if (it != merges.end()) heap.emplace(it->second.first, i, it->second.second);
    };
    for (std::size_t i = 0; i + 1 < n; ++i) push(i);
    while (!heap.empty()) {
      auto [rank, i, merged] = heap.top();
      heap.pop();
      if (!alive[i] || next[i] < 0) continue;
      std::size_t j = static_cast<std::size_t>(next[i]);
      auto it = merges.find({sym[i], sym[j]});
      if (it == merges.end() || it->second.second != merged) continue;  // stale: the pair has changed
      sym[i] = merged;
      alive[j] = false;
      next[i] = next[j];
      if (next[j] >= 0) prev[static_cast<std::size_t>(next[j])] = static_cast<std::ptrdiff_t>(i);
      if (prev[i] >= 0) push(static_cast<std::size_t>(prev[i]));
      push(i);
    }
    std::vector<int64_t> merged_syms;
    for (std::size_t i = 0; i < n; ++i)
      if (alive[i]) merged_syms.push_back(sym[i]);
    sym.swap(merged_syms);
    out.insert(out.end(), sym.begin(), sym.end());
  }

  // Added tokens found in `t` (leftmost, longest first); pieces in between are returned unmatched (id -1).
  struct Piece {
    NText text;
    int64_t id;
  };
  std::vector<Piece> split_added(const NText& t, bool normalized) const {
    std::vector<Piece> out;
    std::size_t start = 0, p = 0;
    while (p < t.cps.size()) {
      const AddedToken* match = nullptr;
      for (const auto& a : added) {
        if (a.normalized != normalized || a.content.empty()) continue;
        if (t.cps.compare(p, a.content.size(), a.content) == 0 && (!match || a.content.size() > match->content.size()))
          match = &a;
      }
      if (!match) {
        ++p;
        continue;
      }
      if (p > start) out.push_back({slice(t, start, p), -1});
      out.push_back({slice(t, p, p + match->content.size()), match->id});
      p += match->content.size();
      start = p;
    }
    if (start < t.cps.size() || out.empty()) out.push_back({slice(t, start, t.cps.size()), -1});
    return out;
  }

  static NText slice(const NText& t, std::size_t a, std::size_t b) {
    NText s;
    s.cps = t.cps.substr(a, b - a);
    s.spans.assign(t.spans.begin() + static_cast<std::ptrdiff_t>(a), t.spans.begin() + static_cast<std::ptrdiff_t>(b));
    return s;
  }

  // The sequence's tokens and, per token, the span of the original text it came from.
  void encode_one(const std::string& prompt, std::vector<int64_t>& ids, std::vector<std::pair<uint32_t, uint32_t>>& spans) const {
    NText raw = decode(prompt);
    for (auto& outer : split_added(raw, false)) {
      if (outer.id >= 0) {
        ids.push_back(outer.id);
        spans.push_back({outer.text.spans.front().first, outer.text.spans.back().second});
        continue;
      }
      if (outer.text.cps.empty()) continue;
      NText norm = normalize(outer.text);
      for (auto& inner : split_added(norm, true)) {
        if (inner.id >= 0) {
          ids.push_back(inner.id);
          spans.push_back({inner.text.spans.front().first, inner.text.spans.back().second});
          continue;
        }
        for (Range r : pre_tokenize(inner.text.cps)) {
          if (r.first == r.second) continue;
          std::size_t before = ids.size();
          model_tokens(inner.text.cps.substr(r.first, r.second - r.first), ids);
          std::pair<uint32_t, uint32_t> span{inner.text.spans[r.first].first, inner.text.spans[r.second - 1].second};
          for (std::size_t k = before; k < ids.size(); ++k) spans.push_back(span);
        }
      }
    }
  }
};

namespace {

std::u32string u32(const std::string& s) { return decode(s).cps; }

[[noreturn]] void unsupported(std::string_view where, const std::string& what) {
  throw TokenizerError(std::string(where) + " uses " + what +
                       ", which the native runtime does not support; export the model's tokenizer with ldm-rt-export");
}

void parse_normalizer(const Json& n, std::vector<NormStep>& out, std::string_view where) {
  if (n.is_null()) return;
  const std::string& type = n.at("type").as_string();
  if (type == "Sequence") {
    for (const Json& x : n.at("normalizers").as_array()) parse_normalizer(x, out, where);
  } else if (type == "NFC") {
    out.push_back({NormStep::Nfc, {}, {}});
  } else if (type == "Lowercase") {
    out.push_back({NormStep::Lowercase, {}, {}});
  } else if (type == "Replace") {
    const Json& pat = n.at("pattern");
    std::u32string content = u32(n.at("content").as_string());
    if (const Json* re = pat.find("Regex")) {
      if (re->as_string() != "\\s+") unsupported(where, "the Replace normalizer pattern " + py_str_repr(re->as_string()));
      out.push_back({NormStep::ReplaceWs, {}, content});
    } else {
      out.push_back({NormStep::ReplaceStr, u32(pat.at("String").as_string()), content});
    }
  } else {
    unsupported(where, "the " + type + " normalizer");
  }
}

const char* kClipPattern =
    "<\\|startoftext\\|>|<\\|endoftext\\|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+";

void parse_pre(const Json& p, std::vector<PreStep>& out, std::string_view where) {
  if (p.is_null()) return;
  const std::string& type = p.at("type").as_string();
  if (type == "Sequence") {
    for (const Json& x : p.at("pretokenizers").as_array()) parse_pre(x, out, where);
  } else if (type == "Split") {
    const Json* re = p.at("pattern").find("Regex");
    const Json* behavior = p.find("behavior");
    const Json* invert = p.find("invert");
    bool ok = re && re->as_string() == kClipPattern && behavior && behavior->as_string() == "Removed" && invert &&
              invert->as_bool();
    if (!ok) unsupported(where, "a Split pre-tokenizer other than CLIP's");
    out.push_back({PreStep::ClipSplit});
  } else if (type == "ByteLevel") {
    PreStep s{PreStep::ByteLevel};
    if (const Json* a = p.find("add_prefix_space")) s.add_prefix_space = a->as_bool();
    if (const Json* u = p.find("use_regex")) s.use_regex = u->as_bool();
    if (s.add_prefix_space) unsupported(where, "ByteLevel with add_prefix_space");
    out.push_back(s);
  } else if (type == "Whitespace") {
    out.push_back({PreStep::Whitespace});
  } else if (type == "WhitespaceSplit") {
    out.push_back({PreStep::WhitespaceSplit});
  } else if (type == "Punctuation") {
    const Json* b = p.find("behavior");
    if (b && b->as_string() != "Isolated") unsupported(where, "the Punctuation pre-tokenizer with behavior " + b->as_string());
    out.push_back({PreStep::Punctuation});
  } else {
    unsupported(where, "the " + type + " pre-tokenizer");
  }
}

std::pair<int64_t, int64_t> bos_eos(const Json& post, std::string_view where) {
  auto fail = [&]() -> std::pair<int64_t, int64_t> {
    throw TokenizerError(std::string(where) +
                         ": the tokenizer's post-processor does not add a start and an end token; build it with "
                         "PromptTokenizer.from_clip_files or PromptTokenizer.word_level");
  };
  if (post.is_null()) return fail();
  std::vector<const Json*> candidates;
  if (post.at("type").as_string() == "Sequence") {
    for (const Json& p : post.at("processors").as_array()) candidates.push_back(&p);
  } else {
    candidates.push_back(&post);
  }
  for (const Json* p : candidates) {
    const std::string& type = p->at("type").as_string();
    if (type == "RobertaProcessing") return {p->at("cls")[1].as_int(), p->at("sep")[1].as_int()};
    if (type == "TemplateProcessing") {
      const Json& single = p->at("single");
      if (single.size() < 2) continue;
      const Json* first = single[0].find("SpecialToken");
      const Json* last = single[single.size() - 1].find("SpecialToken");
      if (first && last) {
        const Json& st = p->at("special_tokens");
        return {st.at(first->at("id").as_string()).at("ids")[0].as_int(), st.at(last->at("id").as_string()).at("ids")[0].as_int()};
      }
    }
  }
  return fail();
}

}  // namespace

PromptTokenizer PromptTokenizer::from_json(const Json& doc, std::string_view where) {
  auto impl = std::make_shared<Impl>();
  try {
    const Json& padding = doc.at("padding");
    const Json& truncation = doc.at("truncation");
    const Json* fixed = padding.is_null() ? nullptr : padding.at("strategy").find("Fixed");
    if (!fixed || truncation.is_null())
      throw TokenizerError(std::string(where) +
                           ": the tokenizer does not pad and truncate to a fixed length; pass max_length when loading it");
    int64_t length = fixed->as_int(), trunc = truncation.at("max_length").as_int();
    if (trunc != length)
      throw TokenizerError(std::string(where) + ": the tokenizer truncates to " + std::to_string(trunc) + " but pads to " +
                           std::to_string(length) + "; pass max_length to make them agree");
    if (length < 3 || length > 1 << 16)
      throw TokenizerError(std::string(where) + ": max_length " + std::to_string(length) + " is outside [3, 65536]; re-export the model");
    if (padding.at("direction").as_string() != "Right" || truncation.at("direction").as_string() != "Right")
      unsupported(where, "left padding or truncation");
    if (const Json* stride = truncation.find("stride"); stride && stride->as_int() != 0) unsupported(where, "a truncation stride");
    if (const Json* m = padding.find("pad_to_multiple_of"); m && !m->is_null()) unsupported(where, "pad_to_multiple_of");
    impl->max_length = length;
    impl->pad = padding.at("pad_id").as_int();

    parse_normalizer(doc.at("normalizer"), impl->normalizers, where);
    parse_pre(doc.at("pre_tokenizer"), impl->pre, where);

    const Json& model = doc.at("model");
    const std::string& type = model.contains("type") ? model.at("type").as_string() : std::string("BPE");
    for (const auto& [token, id] : model.at("vocab").as_object()) {
      impl->vocab[token] = id.as_int();
      impl->id_to_token[id.as_int()] = token;
    }
    if (type == "WordLevel") {
      impl->word_level = true;
      if (const Json* u = model.find("unk_token"); u && !u->is_null()) {
        auto it = impl->vocab.find(u->as_string());
        if (it != impl->vocab.end()) impl->unk_id = it->second;
      }
    } else if (type == "BPE") {
      impl->bpe = true;
      if (const Json* d = model.find("dropout"); d && !d->is_null() && d->as_double() != 0.0) unsupported(where, "BPE dropout");
      if (const Json* b = model.find("byte_fallback"); b && b->as_bool()) unsupported(where, "BPE byte_fallback");
      if (const Json* s = model.find("end_of_word_suffix"); s && !s->is_null()) impl->suffix = s->as_string();
      if (const Json* s = model.find("continuing_subword_prefix"); s && !s->is_null()) impl->prefix = s->as_string();
      if (const Json* f = model.find("fuse_unk"); f && !f->is_null()) impl->fuse_unk = f->as_bool();
      if (const Json* g = model.find("ignore_merges"); g && !g->is_null()) impl->ignore_merges = g->as_bool();
      if (const Json* u = model.find("unk_token"); u && !u->is_null()) {
        auto it = impl->vocab.find(u->as_string());
        if (it != impl->vocab.end()) impl->unk_id = it->second;
      }
      int64_t rank = 0;
      for (const Json& m : model.at("merges").as_array()) {
        std::string a, b;
        if (m.is_string()) {
          const std::string& s = m.as_string();
          std::size_t sp = s.find(' ');
          if (sp == std::string::npos) throw TokenizerError(std::string(where) + ": BPE merge " + py_str_repr(s) + " is not two symbols");
          a = s.substr(0, sp);
          b = s.substr(sp + 1);
        } else {
          a = m[0].as_string();
          b = m[1].as_string();
        }
        auto ia = impl->vocab.find(a), ib = impl->vocab.find(b);
        std::string merged = a + (b.compare(0, impl->prefix.size(), impl->prefix) == 0 ? b.substr(impl->prefix.size()) : b);
        auto im = impl->vocab.find(merged);
        if (ia == impl->vocab.end() || ib == impl->vocab.end() || im == impl->vocab.end())
          throw TokenizerError(std::string(where) + ": BPE merge " + py_str_repr(a + " " + b) +
                               " uses symbols the vocabulary lacks; re-export the model");
        impl->merges.emplace(std::make_pair(ia->second, ib->second), std::make_pair(rank, im->second));  // first wins
        ++rank;
      }
    } else {
      unsupported(where, "the " + type + " model");
    }

    int64_t extra = 0;
    for (const Json& a : doc.at("added_tokens").as_array()) {
      bool lstrip = a.find("lstrip") && a.at("lstrip").as_bool();
      bool rstrip = a.find("rstrip") && a.at("rstrip").as_bool();
      bool single = a.find("single_word") && a.at("single_word").as_bool();
      if (lstrip || rstrip || single) unsupported(where, "added tokens with lstrip, rstrip or single_word");
      AddedToken t{u32(a.at("content").as_string()), a.at("id").as_int(), a.find("normalized") && a.at("normalized").as_bool()};
      if (!impl->vocab.count(a.at("content").as_string())) ++extra;
      impl->added.push_back(std::move(t));
    }
    impl->vocab_size = static_cast<int64_t>(impl->vocab.size()) + extra;
    std::tie(impl->bos, impl->eos) = bos_eos(doc.at("post_processor"), where);
  } catch (const JsonError& e) {
    throw TokenizerError(std::string(where) + " is not a valid tokenizer.json (" + e.what() + "); re-export the model");
  }
  return PromptTokenizer(impl);
}

PromptTokenizer PromptTokenizer::from_json_text(std::string_view text, std::string_view where) {
  Json doc;
  try {
    doc = parse_json(text, JsonLimits{kMaxTokenizerJsonBytes, 64}, where);
  } catch (const JsonError& e) {
    throw TokenizerError(std::string(e.what()) + "; re-export the model");
  }
  if (!doc.is_object()) throw TokenizerError(std::string(where) + " is not a valid tokenizer.json (not a JSON object); re-export the model");
  return from_json(doc, where);
}

PromptTokenizer PromptTokenizer::from_file(const std::string& path) {
  std::string data;
  try {
    data = read_bounded(path, kMaxTokenizerJsonBytes, "tokenizer.json", "re-export the model");
    check_utf8(data, path, "re-export the model");
  } catch (const JsonError& e) {
    throw TokenizerError(e.what());
  }
  return from_json_text(data, path);
}

TokenizedPrompts PromptTokenizer::encode(const std::vector<std::string>& prompts, int64_t chunks) const {
  const Impl& im = *impl_;
  const int64_t L = im.max_length;
  const std::size_t room = static_cast<std::size_t>(L - 2);  // the post-processor adds bos and eos
  TokenizedPrompts r;
  r.chunk_limit = std::max<int64_t>(chunks, 1);
  r.ids.shape = {static_cast<int64_t>(prompts.size()), L};
  r.ids.data.assign(prompts.size() * static_cast<std::size_t>(L), im.pad);
  for (std::size_t b = 0; b < prompts.size(); ++b) {
    std::vector<int64_t> ids;
    std::vector<std::pair<uint32_t, uint32_t>> spans;
    im.encode_one(prompts[b], ids, spans);
    // Pieces of `room` tokens (an empty prompt: one), as tokenizers' overflowing pieces with stride 0.
    std::size_t pieces = std::min<std::size_t>(std::max<std::size_t>((ids.size() + room - 1) / room, 1), std::size_t(r.chunk_limit));
    IdTensor rows{{static_cast<int64_t>(pieces), L}, std::vector<int64_t>(pieces * static_cast<std::size_t>(L), im.pad)};
    for (std::size_t c = 0; c < pieces; ++c) {
      int64_t* row = rows.data.data() + c * static_cast<std::size_t>(L);
      std::size_t from = c * room, n = std::min(ids.size() - std::min(ids.size(), from), room);
      row[0] = im.bos;
      for (std::size_t k = 0; k < n; ++k) row[1 + k] = ids[from + k];
      row[1 + n] = im.eos;
    }
    std::copy_n(rows.data.begin(), L, r.ids.data.begin() + b * static_cast<std::size_t>(L));
    std::size_t kept = std::min(ids.size(), room);  // the first piece's (unknown words are looked for there)
    int64_t dropped = static_cast<int64_t>(ids.size() - std::min(ids.size(), pieces * room));
    r.chunks.push_back(std::move(rows));
    r.dropped.push_back(dropped);
    r.truncated.push_back(dropped > 0);
    std::vector<std::string> unknown;
    if (im.word_level && im.unk_id) {
      // unknown_words(): the distinct words (as written) held as the unknown token, first spelling of each.
      std::vector<std::string> seen_lower;
      for (std::size_t k = 0; k < kept; ++k) {
        if (ids[k] != *im.unk_id) continue;
        std::string word = prompts[b].substr(spans[k].first, spans[k].second - spans[k].first);
        std::string lower = to_utf8(apply_lowercase(decode(word)).cps);
        if (std::find(seen_lower.begin(), seen_lower.end(), lower) != seen_lower.end()) continue;
        seen_lower.push_back(lower);
        unknown.push_back(word);
      }
    }
    r.unknown.push_back(std::move(unknown));
  }
  return r;
}

std::vector<std::vector<int64_t>> PromptTokenizer::token_ids(const std::vector<std::string>& texts) const {
  std::vector<std::vector<int64_t>> out;
  for (const std::string& text : texts) {
    std::vector<int64_t> ids;
    std::vector<std::pair<uint32_t, uint32_t>> spans;
    impl_->encode_one(text, ids, spans);
    out.push_back(std::move(ids));
  }
  return out;
}

std::vector<std::string> PromptTokenizer::warnings(const std::vector<std::string>& prompts, const TokenizedPrompts& result,
                                                   std::string_view what) const {
  std::vector<std::string> out;
  for (std::size_t i = 0; i < result.dropped.size() && i < prompts.size(); ++i) {
    if (!result.dropped[i]) continue;
    // "%.40r": the prompt's repr cut to 40 characters
    NText rep = decode(py_str_repr(prompts[i]));
    std::string room = result.chunk_limit == 1 ? "the text encoder's " + std::to_string(impl_->max_length)
                                                : std::to_string(result.chunk_limit) + " chunks of the text encoder's " + std::to_string(impl_->max_length);
    out.push_back(std::string(what) + " " + std::to_string(i) + " was truncated: " + std::to_string(result.dropped[i]) +
                  " token(s) beyond " + room + " were dropped (" + to_utf8(rep.cps, 0, 40) + "...)" +
                  (result.chunk_limit == 1 ? "; artifacts built with --prompt-chunks N take longer prompts" : ""));
  }
  std::vector<std::string> warned;
  for (std::size_t i = 0; i < result.unknown.size() && i < prompts.size(); ++i) {
    const auto& unknown = result.unknown[i];
    if (unknown.empty() || std::find(warned.begin(), warned.end(), prompts[i]) != warned.end()) continue;
    warned.push_back(prompts[i]);
    std::string shown;
    for (std::size_t k = 0; k < unknown.size() && k < 10; ++k) shown += (k ? ", " : "") + py_str_repr(unknown[k]);
    std::string more = unknown.size() > 10 ? " and " + std::to_string(unknown.size() - 10) + " more" : "";
    out.push_back(std::string(what) + " " + std::to_string(i) + ": the model does not know " + shown + more +
                  " (read as unknown words)");
  }
  return out;
}

std::optional<int64_t> PromptTokenizer::token_id(const std::string& token) const {
  std::u32string content = u32(token);
  for (const auto& a : impl_->added) {
    if (a.content == content) return a.id;
  }
  auto it = impl_->vocab.find(token);
  if (it != impl_->vocab.end()) return it->second;
  return std::nullopt;
}

std::pair<PromptTokenizer, std::vector<std::vector<int64_t>>> PromptTokenizer::with_added_tokens(
    const std::vector<std::pair<std::string, int64_t>>& words) const {
  constexpr char32_t kPrivateUse = 0xF0000;  // runtime/tokenizer.py PRIVATE_USE
  auto impl = std::make_shared<Impl>(*impl_);
  int64_t next_id = impl->vocab_size;
  char32_t next_char = kPrivateUse;
  for (const auto& a : impl->added) {
    if (a.content.size() == 1 && a.content[0] >= kPrivateUse) ++next_char;
  }
  std::vector<std::vector<int64_t>> ids;
  std::vector<std::pair<std::u32string, std::u32string>> replaces;  // normalised word -> its tokens' characters
  for (const auto& [word, n] : words) {
    std::u32string key = impl_->normalize(decode(word)).cps;
    bool twin = false;
    for (const auto& r : replaces) twin = twin || r.first == key;
    if (key.empty() || twin) {
      throw TokenizerError(py_str_repr(word) + " is empty or another word's twin to this tokenizer (it normalises to " +
                           py_str_repr(to_utf8(key)) + "); pick another");
    }
    std::vector<int64_t> group;
    std::u32string chars;
    for (int64_t k = 0; k < n; ++k) {
      group.push_back(next_id + k);
      chars += static_cast<char32_t>(next_char + char32_t(k));
      impl->added.push_back(AddedToken{std::u32string(1, static_cast<char32_t>(next_char + char32_t(k))), next_id + k, true});
    }
    ids.push_back(std::move(group));
    replaces.emplace_back(key, chars);
    next_id += n;
    next_char += char32_t(n);
  }
  impl->vocab_size = next_id;
  // sorted(key=len, reverse=True): longest first, ties in the order given (Python's sort is stable).
  std::stable_sort(replaces.begin(), replaces.end(), [](const auto& a, const auto& b) { return a.first.size() > b.first.size(); });
  for (const auto& [key, chars] : replaces) impl->normalizers.push_back({NormStep::ReplaceStr, key, chars});
  return {PromptTokenizer(impl), ids};
}

int64_t PromptTokenizer::max_length() const { return impl_->max_length; }
int64_t PromptTokenizer::vocab_size() const { return impl_->vocab_size; }
int64_t PromptTokenizer::bos_id() const { return impl_->bos; }
int64_t PromptTokenizer::eos_id() const { return impl_->eos; }
int64_t PromptTokenizer::pad_id() const { return impl_->pad; }
bool PromptTokenizer::is_word_level() const { return impl_->word_level; }

}  // namespace ldm_rt::native
