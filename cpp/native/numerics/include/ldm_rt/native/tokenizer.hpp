// Prompt -> token ids from an artifacts folder's tokenizer.json, as runtime/tokenizer.py's PromptTokenizer
// (the `tokenizers` library) computes them: CLIP's byte-level BPE and the default model's word-level
// vocabulary, padded and truncated to the file's fixed length (bos, tokens, eos, pad...).
//
// Supported tokenizer.json parts (what PromptTokenizer writes, and transformers' CLIP tokenizer.json):
// normalizers NFC, Lowercase, Replace (the whitespace-squeeze regex or a literal), Sequence; pre-tokenizers
// Split (CLIP's pattern), ByteLevel, Whitespace, WhitespaceSplit, Punctuation, Sequence; models BPE and
// WordLevel; post-processors TemplateProcessing and RobertaProcessing; added tokens matched in the text.
// Anything else is refused with a TokenizerError naming the part.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <utility>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "ldm_rt/native/json.hpp"
#include "ldm_rt/native/tensor.hpp"

namespace ldm_rt::native {

// A tokenizer file is unreadable or uses something unsupported; one line naming the file and the fix.
class TokenizerError : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

// runtime/tokenizer.py MAX_TOKENIZER_JSON_BYTES.
constexpr std::size_t kMaxTokenizerJsonBytes = std::size_t{64} << 20;

struct TokenizedPrompts {
  IdTensor ids;                                     // (B, max_length) int64: bos, tokens, eos, pad...
  std::vector<bool> truncated;                      // per prompt: tokens beyond max_length were dropped
  std::vector<int64_t> dropped;                     // per prompt: how many tokens were dropped
  std::vector<std::vector<std::string>> unknown;    // per prompt: words a word-level vocabulary lacks (as written,
                                                    // first spelling of each, in order); empty for BPE
  // Per prompt, (n, max_length): its first n <= `chunks` pieces of max_length - 2 tokens, each with its own bos, eos
  // and pad (runtime/tokenizer.py TokenizedPrompts.chunks); `ids` holds each prompt's first.
  std::vector<IdTensor> chunks;
  int64_t chunk_limit = 1;  // the `chunks` encode() was asked for (the truncation warning names it)
  // Per prompt, (n, max_length) float32: each token's weight in its chunks (tokenize_weighted, prompt_weights.hpp);
  // empty from encode().
  std::vector<Tensor> weights;
};

class PromptTokenizer {
 public:
  // From tokenizer.json text; `where` names the file in messages ("<where> is not a valid tokenizer.json
  // (...); re-export the model").
  static PromptTokenizer from_json_text(std::string_view text, std::string_view where);
  static PromptTokenizer from_json(const Json& doc, std::string_view where);
  static PromptTokenizer from_file(const std::string& path);  // bounded read (kMaxTokenizerJsonBytes)

  // Thread safe (const; no caches shared between calls).
  TokenizedPrompts encode(const std::vector<std::string>& prompts, int64_t chunks = 1) const;

  // Each text's token ids alone: no bos, eos, padding or truncation (runtime/tokenizer.py token_ids: pieces of a
  // prompt the caller puts together, prompt_weights.hpp).
  std::vector<std::vector<int64_t>> token_ids(const std::vector<std::string>& texts) const;

  // The warnings runtime/tokenizer.py logs for `result` ("prompt 0 was truncated: 3 token(s) beyond the text
  // encoder's 77 were dropped ('...'...)", "prompt 0: the model does not know 'x' (read as unknown words)");
  // `what` is "prompt" or "negative prompt".
  std::vector<std::string> warnings(const std::vector<std::string>& prompts, const TokenizedPrompts& result,
                                    std::string_view what = "prompt") const;

  // The id of `token` (an added token or a vocabulary entry, as written), none if it is neither (tokenizers'
  // token_to_id).
  std::optional<int64_t> token_id(const std::string& token) const;

  // A copy in which each (word, n) of `words` reads as n new tokens, and their ids (after the vocabulary, in order):
  // textual inversion, as runtime/tokenizer.py with_added_tokens builds it. Each new token is one private-use
  // character (U+F0000 on, after those the file already has) and a literal Replace normalizer after the model's own
  // turns the normalised word into them (longest words first). Throws TokenizerError for an empty word or two words
  // that normalise alike, with Python's message.
  std::pair<PromptTokenizer, std::vector<std::vector<int64_t>>> with_added_tokens(
      const std::vector<std::pair<std::string, int64_t>>& words) const;

  int64_t max_length() const;
  int64_t vocab_size() const;  // with added tokens
  int64_t bos_id() const;
  int64_t eos_id() const;
  int64_t pad_id() const;
  bool is_word_level() const;

  struct Impl;

 private:
  explicit PromptTokenizer(std::shared_ptr<const Impl> impl) : impl_(std::move(impl)) {}
  std::shared_ptr<const Impl> impl_;
};

}  // namespace ldm_rt::native
