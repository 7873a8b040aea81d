// Prompt weighting in AUTOMATIC1111's syntax, `a (red:1.3) car, [blurry]` (opt-in: Request::prompt_weighting,
// `--prompt-weighting`): runtime/prompt_weights.py in C++, the same fragments, tokens, weights and messages.
//
// `(text)` x1.1, `[text]` /1.1, `(text:1.3)` x1.3, nesting multiplies, a bracket left open closes at the end, one
// that closes nothing is text; `\(` `\)` `\[` `\]` `\\` are the characters, any other backslash is dropped; BREAK
// (a word of its own) starts the next chunk. Each run of equal weight is tokenised alone; after the text encoder
// each chunk's states are weighted and rescaled to their mean before weighting (A1111's "Original" emphasis).
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "ldm_rt/native/tensor.hpp"
#include "ldm_rt/native/tokenizer.hpp"

namespace ldm_rt::native {

// A prompt's weights cannot be read or applied; what() is runtime/prompt_weights.py's one line.
class PromptWeightError : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

struct Fragment {
  std::string text;  // UTF-8
  double weight;     // Python's float arithmetic, so equal to parse_prompt_weights' to the bit
};

// parse_prompt_weights: segments separated by BREAK (one without it), runs of equal weight merged; "" is
// {{{"", 1.0}}}. Throws PromptWeightError for a weight that is not a number ("(a:1.2.3)").
std::vector<std::vector<Fragment>> parse_prompt_weights(std::string_view prompt);

// prompt_weights.tokenize: `tokenizer.encode(prompts, chunks)` for weighted prompts, with TokenizedPrompts::weights
// (per prompt, (n, L): each token's weight; bos, eos, pad 1). `unknown` holds the words of each prompt's text
// without the syntax, so warnings() reads as Python's.
TokenizedPrompts tokenize_weighted(const PromptTokenizer& tokenizer, const std::vector<std::string>& prompts,
                                   int64_t chunks = 1);

// The warnings prompt_weights.tokenize logs for `result` (tokenize_weighted of `prompts`): truncation naming each
// prompt as written, then unknown words once per text without the syntax (PromptTokenizer::warnings' wording).
std::vector<std::string> weighted_warnings(const PromptTokenizer& tokenizer, const std::vector<std::string>& prompts,
                                           const TokenizedPrompts& result, std::string_view what = "prompt");

// prompt_weights.emphasize: states (rows, n x L, D), row r holding prompt r / batch whose chunk weights are
// weights[r / batch] ((n_r <= n, L); chunks past n_r: 1). Per row and chunk: z *= w, then z *= mean(z before) /
// mean(z after) over (L, D) in float64, the result float32. All weights 1: states unchanged. Throws
// PromptWeightError when the weights cancel or overflow (a non-finite result).
Tensor emphasize(const Tensor& states, const std::vector<Tensor>& weights, int64_t batch = 1);

}  // namespace ldm_rt::native
