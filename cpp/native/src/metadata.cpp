#include "ldm_rt/native/metadata.hpp"

#include <algorithm>
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

std::string json_dumps_sorted(const Json& v) {
  switch (v.type()) {
    case Json::Type::Null: return "null";
    case Json::Type::Bool: return v.as_bool() ? "true" : "false";
    case Json::Type::Number: return v.is_integer() ? v.number_text() : py_float_repr(v.as_double());
    case Json::Type::String: return json_quote(v.as_string(), true);
    case Json::Type::Array: {
      std::string s = "[";
      for (size_t k = 0; k < v.size(); ++k) s += (k ? ", " : "") + json_dumps_sorted(v[k]);
      return s + "]";
    }
    case Json::Type::Object: {
      std::map<std::string, const Json*> sorted;  // a repeated key keeps its last value, as json.loads
      for (const auto& [key, value] : v.as_object()) sorted[key] = &value;
      std::string s = "{";
      for (const auto& [key, value] : sorted) s += (s.size() > 1 ? ", " : "") + json_quote(key, true) + ": " + json_dumps_sorted(*value);
      return s + "}";
    }
  }
  return "null";
}

std::string GenerationParams::to_json() const {
  std::map<std::string, std::string> entries = micro;  // std::map: keys in sorted order, as sort_keys=True
  entries.insert(extra.begin(), extra.end());
  entries["backend"] = json_quote(backend, true);
  entries["batch"] = std::to_string(batch);
  entries["guidance"] = py_float_repr(guidance);
  entries["guidance_rescale"] = py_float_repr(guidance_rescale);
  entries["height"] = std::to_string(height);
  entries["mask_blur"] = mask_blur ? py_float_repr(*mask_blur) : std::string("null");
  entries["mode"] = json_quote(mode, true);
  entries["model_hash"] = json_quote(model_hash, true);
  entries["negative_prompts"] = list(negative_prompts);
  entries["precision"] = json_quote(precision, true);
  entries["prompts"] = list(prompts);
  if (prompt_weighting) entries["prompt_weighting"] = "true";
  entries["reduced_precision"] = reduced_precision ? "true" : "false";
  entries["scheduler"] = json_quote(scheduler, true);
  entries["seed"] = std::to_string(seed);
  entries["steps"] = std::to_string(steps);
  entries["strength"] = py_float_repr(strength);
  entries["width"] = std::to_string(width);
  std::string s = "{";
  for (const auto& [key, value] : entries) s += (s.size() > 1 ? ", " : "") + json_quote(key, true) + ": " + value;
  return s + "}";
}

TextChunks GenerationParams::text(std::size_t index, std::size_t count) const {
  size_t prompt = index / size_t(batch);
  TextChunks t = chunks(prompts.at(prompt), negative_prompts.at(prompt));
  if (count > 1) t.emplace_back("batch_index", std::to_string(index));
  t.emplace_back("parameters", to_json());
  t.emplace_back("Software", "ldm-rt-native");
  return t;
}

TextChunks GenerationParams::grid_text() const {
  auto one = [](const std::vector<std::string>& v) {  // v[0] if len(set(v)) == 1 else json.dumps(list(v))
    return std::all_of(v.begin(), v.end(), [&v](const std::string& s) { return s == v[0]; }) ? v[0] : list(v);
  };
  TextChunks t = chunks(one(prompts), one(negative_prompts));
  t.emplace_back("parameters", to_json());
  t.emplace_back("Software", "ldm-rt-native");
  return t;
}

TextChunks GenerationParams::chunks(const std::string& prompt, const std::string& negative_prompt) const {
  return {
      {"prompt", prompt},
      {"negative_prompt", negative_prompt},
      {"seed", std::to_string(seed)},
      {"steps", std::to_string(steps)},
      {"scheduler", scheduler},
      {"guidance", py_float_repr(guidance)},
      {"guidance_rescale", py_float_repr(guidance_rescale)},
      {"model_hash", model_hash},
  };
}

}  // namespace ldm_rt::native
