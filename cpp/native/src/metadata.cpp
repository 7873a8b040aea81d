#include "ldm_rt/native/metadata.hpp"

#include <cmath>
#include <cstdio>
#include <cstdlib>

#include "ldm_rt/native/json.hpp"
#include "ldm_rt/native/pyrepr.hpp"

namespace ldm_rt::native {

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
  s += ", \"guidance\": " + py_float_repr(guidance);
  s += ", \"guidance_rescale\": " + py_float_repr(guidance_rescale);
  s += ", \"height\": " + std::to_string(height);
  s += ", \"mask_blur\": " + (mask_blur ? py_float_repr(*mask_blur) : std::string("null"));
  s += ", \"mode\": " + json_quote(mode, true);
  s += ", \"model_hash\": " + json_quote(model_hash, true);
  s += ", \"negative_prompts\": " + list(negative_prompts);
  s += ", \"precision\": " + json_quote(precision, true);
  s += ", \"prompts\": " + list(prompts);
  s += ", \"reduced_precision\": " + std::string(reduced_precision ? "true" : "false");
  s += ", \"scheduler\": " + json_quote(scheduler, true);
  s += ", \"seed\": " + std::to_string(seed);
  s += ", \"steps\": " + std::to_string(steps);
  s += ", \"strength\": " + py_float_repr(strength);
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
      {"guidance", py_float_repr(guidance)},
      {"guidance_rescale", py_float_repr(guidance_rescale)},
      {"model_hash", model_hash},
  };
  if (count > 1) t.emplace_back("batch_index", std::to_string(index));
  t.emplace_back("parameters", to_json());
  t.emplace_back("Software", "ldm-rt-native");
  return t;
}

}  // namespace ldm_rt::native
