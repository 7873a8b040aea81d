#include "ldm_rt/native/lora.hpp"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>
#include <optional>
#include <regex>
#include <set>

#include "ldm_rt/native/json.hpp"
#include "ldm_rt/native/pyrepr.hpp"
#include "ldm_rt/native/safetensors.hpp"
#include "ldm_rt/native/tensor.hpp"

namespace ldm_rt::native {
namespace {

constexpr const char* kSafetensors = ".safetensors";
const char* const kPickleSuffixes[] = {".pt", ".pth", ".ckpt", ".bin"};
constexpr const char* kTargetsFile = "lora_targets.json";
constexpr const char* kTargetsFormat = "ldm-rt-lora-targets";
constexpr int64_t kTargetsVersion = 1;

// diffusers / kohya prefix -> component (lora.DIFFUSERS_PREFIXES; KOHYA_PREFIXES longest first, as _resolve tries them).
const std::pair<const char*, const char*> kDiffusersPrefixes[] = {
    {"unet.", "unet"}, {"text_encoder.", "text_encoder"}, {"text_encoder_2.", "text_encoder_2"}};
const std::pair<const char*, const char*> kKohyaPrefixes[] = {
    {"lora_unet_", "unet"}, {"lora_te1_", "text_encoder"}, {"lora_te2_", "text_encoder_2"}, {"lora_te_", "text_encoder"}};
// lora.SUFFIXES in its order: suffix -> role of the tensor in its layer.
const std::pair<const char*, const char*> kSuffixes[] = {
    {".lora_A.weight", "down"},     {".lora_B.weight", "up"},     {".lora_down.weight", "down"}, {".lora_up.weight", "up"},
    {".lora.down.weight", "down"}, {".lora.up.weight", "up"},   {".alpha", "alpha"}};
// lora.UNSUPPORTED: adapter kinds not applied (LoHa, LoKr, DoRA, full diffs, norms), as "." + the kind's prefix.
const char* const kUnsupported[] = {".hada_", ".lokr_", ".dora_scale", ".lora_magnitude_vector", ".diff",
                                    ".on_input", ".w_norm", ".b_norm", ".lora_mid"};

bool ends_with(const std::string& s, const std::string& tail) {
  return s.size() >= tail.size() && s.compare(s.size() - tail.size(), tail.size(), tail) == 0;
}
bool starts_with(const std::string& s, const std::string& head) { return s.compare(0, head.size(), head) == 0; }

bool is_pickle_suffix(const std::string& suffix) {
  for (const char* p : kPickleSuffixes) {
    if (suffix == p) return true;
  }
  return false;
}

// Python's float(text) for the texts a scale is written as: surrounding whitespace, a sign, digits with single
// underscores between them, a fraction, an exponent, inf/infinity/nan in any case. nullopt when Python refuses it.
std::optional<double> py_float(const std::string& text) {
  auto b = text.find_first_not_of(" \t\n\r\f\v"), e = text.find_last_not_of(" \t\n\r\f\v");
  if (b == std::string::npos) return std::nullopt;
  std::string s = text.substr(b, e - b + 1), clean;
  for (size_t k = 0; k < s.size(); ++k) {
    if (s[k] == '_') {
      if (k == 0 || k + 1 == s.size() || !std::isdigit(static_cast<unsigned char>(s[k - 1])) ||
          !std::isdigit(static_cast<unsigned char>(s[k + 1]))) {
        return std::nullopt;
      }
      continue;
    }
    clean += s[k];
  }
  std::string lower;
  for (char c : clean) lower += char(std::tolower(static_cast<unsigned char>(c)));
  std::string body = lower[0] == '+' || lower[0] == '-' ? lower.substr(1) : lower;
  if (body == "inf" || body == "infinity" || body == "nan") {
    double v = body == "nan" ? NAN : INFINITY;
    return lower[0] == '-' ? -v : v;
  }
  if (body.empty() || body.find_first_not_of("0123456789.e+-") != std::string::npos) return std::nullopt;
  char* end = nullptr;
  double v = std::strtod(clean.c_str(), &end);
  if (end != clean.c_str() + clean.size()) return std::nullopt;
  return v;
}

// "a, b, c and N more" (lora._examples).
std::string examples(const std::vector<std::string>& keys, size_t n = 3) {
  std::string shown;
  for (size_t k = 0; k < keys.size() && k < n; ++k) shown += (k ? ", " : "") + keys[k];
  if (keys.size() > n) shown += " and " + std::to_string(keys.size() - n) + " more";
  return shown;
}

int64_t prod(const std::vector<int64_t>& shape, size_t from = 0) {
  int64_t p = 1;
  for (size_t k = from; k < shape.size(); ++k) p *= shape[k];
  return p;
}

// ---- files -------------------------------------------------------------------------------------------------
struct LoraFile {
  std::string path;  // str(Path(...))
  std::string sha256;
  std::vector<std::pair<std::string, Tensor>> tensors;  // float32, in the header's order
  std::map<std::string, std::string> metadata;
  std::string name() const { return path_name(path); }
};

// lora.read_lora: a .safetensors file (pickles are refused, not opened).
LoraFile read_lora(const std::string& given) {
  std::string path = normal_path(given), suffix = path_suffix(path);
  if (is_pickle_suffix(suffix)) {
    throw LoraError("LoRA " + path + " is a pickle (" + path_suffix(path, false) +
                    "), which the runtime never loads; convert it to .safetensors (python -c \"import torch, "
                    "safetensors.torch as s; s.save_file(torch.load('IN', weights_only=True), 'OUT.safetensors')\")");
  }
  if (suffix != kSafetensors) {
    throw LoraError("LoRA " + path + ": unknown file type " + py_str_repr(path_suffix(path, false)) + "; pass a .safetensors file");
  }
  SafetensorsFile read = read_safetensors_as<LoraError>(path, kMaxLoraBytes, "LoRA");
  LoraFile file{path, read.sha256, std::move(read.tensors), std::move(read.metadata)};
  if (file.tensors.empty()) throw LoraError("LoRA " + path + " holds no tensors");
  return file;
}

// ---- layers and names -------------------------------------------------------------------------------------------
struct Layer {
  std::string key;  // prefix + module as the file writes it
  const Tensor* down = nullptr;  // (rank, in) or (rank, in, kh, kw)
  const Tensor* up = nullptr;    // (out, rank) or (out, rank, 1, 1)
  std::optional<double> alpha;
  int64_t rank() const { return down->shape[0]; }
};

// lora._pattern_value: PEFT's alpha_pattern lookup (a key matches a module whose name ends with it, or a regex of it).
const Json* pattern_value(const Json& patterns, const std::string& module) {
  if (!patterns.is_object()) return nullptr;
  for (const auto& [pattern, value] : patterns.as_object()) {
    bool hit = module == pattern || ends_with(module, "." + pattern);
    if (!hit) {
      try {
        hit = std::regex_match(module, std::regex("(.*\\.)?" + pattern));
      } catch (const std::regex_error&) {
      }
    }
    if (hit) return &value;
  }
  return nullptr;
}

double alpha_number(const Json& v, const LoraFile& lora) {
  if (v.is_bool()) return v.as_bool() ? 1.0 : 0.0;
  if (v.is_number()) return v.as_double();
  if (v.is_string()) {
    if (auto d = py_float(v.as_string())) return *d;
  }
  throw LoraError("LoRA " + lora.path + ": lora_adapter_metadata is not JSON; fix or drop the metadata");
}

// lora.split_layers: the file's layers in order of first appearance, and the keys that belong to no LoRA layer.
std::pair<std::vector<Layer>, std::vector<std::string>> split_layers(const LoraFile& lora) {
  std::vector<Layer> layers;
  std::map<std::string, size_t> at;
  std::vector<std::string> unknown;
  for (const auto& [key, value] : lora.tensors) {
    bool unsupported = false;
    for (const char* kind : kUnsupported) unsupported = unsupported || key.find(kind) != std::string::npos;
    if (unsupported) {
      unknown.push_back(key);
      continue;
    }
    bool matched = false;
    for (const auto& [suffix, role] : kSuffixes) {
      if (!ends_with(key, suffix)) continue;
      std::string name = key.substr(0, key.size() - std::strlen(suffix));
      if (!at.count(name)) at[name] = layers.size(), layers.push_back(Layer{name, nullptr, nullptr, std::nullopt});
      Layer& layer = layers[at[name]];
      if (std::string(role) == "alpha") {
        if (value.numel() != 1) {
          throw LoraError("LoRA " + lora.path + ": " + key + " must be one number, has shape " + shape_str(value.shape));
        }
        layer.alpha = double(value.data[0]);
      } else {
        if (value.ndim() != 2 && value.ndim() != 4) {
          throw LoraError("LoRA " + lora.path + ": " + key + " has shape " + shape_str(value.shape) +
                          "; LoRA matrices are 2-D (Linear) or 4-D (Conv)");
        }
        (std::string(role) == "down" ? layer.down : layer.up) = &value;
      }
      matched = true;
      break;
    }
    if (!matched) unknown.push_back(key);
  }
  std::vector<Layer> complete;
  for (const Layer& layer : layers) {
    if (layer.down && layer.up) {
      complete.push_back(layer);
    } else {
      unknown.push_back(layer.key + " (no " + (layer.down ? "up" : "down") + " matrix)");
    }
  }
  // lora._peft_alphas: per prefix ("unet", "text_encoder", ...), the PEFT config diffusers stored in the metadata.
  std::map<std::string, std::map<std::string, Json>> peft;
  auto raw = lora.metadata.find("lora_adapter_metadata");
  if (raw != lora.metadata.end() && !raw->second.empty()) {
    Json cfg;
    try {
      cfg = parse_json(raw->second, {}, "lora_adapter_metadata");
    } catch (const JsonError&) {
      throw LoraError("LoRA " + lora.path + ": lora_adapter_metadata is not JSON; fix or drop the metadata");
    }
    if (!cfg.is_object()) throw LoraError("LoRA " + lora.path + ": lora_adapter_metadata must be a JSON object");
    for (const auto& [key, value] : cfg.as_object()) {
      auto dot = key.find('.');
      if (dot != std::string::npos && dot + 1 < key.size()) {
        peft[key.substr(0, dot)][key.substr(dot + 1)] = value;
      } else {  // a PEFT config saved for one model, without prefixes
        peft[""][key] = value;
      }
    }
  }
  for (Layer& layer : complete) {
    if (layer.alpha) continue;
    auto dot = layer.key.find('.');
    std::string prefix = layer.key.substr(0, dot), module = dot == std::string::npos ? "" : layer.key.substr(dot + 1);
    const std::map<std::string, Json>* cfg = nullptr;
    if (auto it = peft.find(prefix); it != peft.end() && !it->second.empty()) {
      cfg = &it->second;
    } else if (auto all = peft.find(""); all != peft.end() && !all->second.empty()) {
      cfg = &all->second;
    }
    if (cfg == nullptr) continue;
    auto get = [cfg](const char* name) -> const Json* {
      auto it = cfg->find(name);
      return it == cfg->end() ? nullptr : &it->second;
    };
    if (py_truthy(get("use_dora"))) throw LoraError("LoRA " + lora.path + " is a DoRA adapter (use_dora), which ldm-rt does not apply");
    const Json* patterns = get("alpha_pattern");
    const Json* alpha = py_truthy(patterns) ? pattern_value(*patterns, module) : nullptr;
    if (alpha == nullptr || alpha->is_null()) alpha = get("lora_alpha");
    if (alpha != nullptr && !alpha->is_null()) {
      double a = alpha_number(*alpha, lora);
      if (py_truthy(get("use_rslora"))) a = a * std::sqrt(double(layer.rank()));  // rsLoRA: alpha / sqrt(rank) = alpha' / rank
      layer.alpha = a;
    }
  }
  return {complete, unknown};
}

struct ModuleInfo {
  std::vector<int64_t> shape;
  std::vector<std::string> aliases;
};

struct Target {
  std::string initializer;
  bool transposed = false;  // a Linear exported as MatMul holds W^T
};

struct FileTargets {
  std::string sha256, component;
  std::map<std::string, Target> targets;
  std::set<std::string> unused;  // modules the file's outputs do not depend on
};

// lora_targets.json (lora.LoraTargets).
struct Targets {
  std::vector<std::pair<std::string, std::vector<std::pair<std::string, ModuleInfo>>>> modules;  // in file order
  std::map<std::string, FileTargets> files;

  const ModuleInfo& info(const std::string& component, const std::string& module) const {
    for (const auto& [c, ms] : modules) {
      if (c != component) continue;
      for (const auto& [m, i] : ms) {
        if (m == module) return i;
      }
    }
    throw LoraError("no module " + module);  // unreachable: modules come from this table
  }
};

std::vector<std::string> strings(const Json& list) {
  std::vector<std::string> out;
  for (const Json& v : list.as_array()) out.push_back(v.as_string());
  return out;
}

Targets read_targets(const Artifacts& a) {
  if (!a.lora_targets) {
    throw LoraError(a.root + " records no LoRA targets (" + kTargetsFile +
                    "): it was built before LoRA support; rebuild it with this ldm-rt");
  }
  std::string path = verify_manifest_file(a.root, *a.lora_targets);
  Json d;
  try {
    d = read_json_object(path, "rebuild the artifacts", kMaxLoraTargetsBytes, "LoRA targets file");
  } catch (const JsonError& e) {
    throw LoraError(e.what());
  }
  const Json *format = d.find("format"), *version = d.find("version");
  if (!(format && format->is_string() && format->as_string() == kTargetsFormat && version && version->is_number() &&
        version->as_double() == double(kTargetsVersion))) {
    throw LoraError(path + " is not an ldm-rt LoRA targets file of version " + std::to_string(kTargetsVersion) + "; rebuild the artifacts");
  }
  Targets t;
  try {  // the accessors throw JsonError on a wrong type or a missing key: LoraTargets.from_dict's one message
    for (const auto& [component, ms] : d.at("modules").as_object()) {
      std::vector<std::pair<std::string, ModuleInfo>> table;
      for (const auto& [module, i] : ms.as_object()) {
        ModuleInfo info;
        for (const Json& s : i.at("shape").as_array()) info.shape.push_back(s.as_int());
        info.aliases = strings(i.at("aliases"));
        table.emplace_back(module, std::move(info));
      }
      t.modules.emplace_back(component, std::move(table));
    }
    for (const auto& [rel, f] : d.at("files").as_object()) {
      FileTargets ft;
      ft.sha256 = f.at("sha256").as_string();
      ft.component = f.at("component").as_string();
      for (const auto& [module, pair] : f.at("targets").as_object()) {
        if (pair.size() != 2) throw JsonError("target");
        std::string layout = pair[1].as_string();
        if (layout != "W" && layout != "T") throw JsonError(layout);
        ft.targets[module] = Target{pair[0].as_string(), layout == "T"};
      }
      if (const Json* unused = f.find("unused")) {
        for (const std::string& m : strings(*unused)) ft.unused.insert(m);
      }
      t.files[rel] = std::move(ft);
    }
  } catch (const JsonError&) {
    throw LoraError(path + " is malformed; rebuild the artifacts");
  }
  return t;
}

// lora._lookups: per component, dotted name -> module and flattened (kohya) name -> module ("" when ambiguous).
struct Lookups {
  std::map<std::string, std::map<std::string, std::string>> dotted;
  std::map<std::string, std::map<std::string, std::optional<std::string>>> flat;
};

Lookups lookups(const Targets& t) {
  Lookups l;
  for (const auto& [component, modules] : t.modules) {
    auto& d = l.dotted[component];
    auto& f = l.flat[component];
    for (const auto& [module, info] : modules) {
      std::vector<std::string> names{module};
      names.insert(names.end(), info.aliases.begin(), info.aliases.end());
      for (const std::string& name : names) {
        d[name] = module;
        std::string key = name;
        std::replace(key.begin(), key.end(), '.', '_');
        auto it = f.find(key);
        f[key] = it == f.end() || it->second == module ? std::optional<std::string>(module) : std::nullopt;
      }
    }
  }
  return l;
}

struct Resolved {
  std::string component;
  std::optional<std::string> module;
  bool missing_component = false;
};

// lora._resolve: the component and module of a layer key.
Resolved resolve(const std::string& key, const Lookups& l) {
  for (const auto& [prefix, component] : kKohyaPrefixes) {
    if (!starts_with(key, prefix)) continue;
    auto table = l.flat.find(component);
    if (table == l.flat.end()) return {component, std::nullopt, true};
    auto it = table->second.find(key.substr(std::strlen(prefix)));
    return {component, it == table->second.end() ? std::nullopt : it->second, false};
  }
  for (const auto& [prefix, component] : kDiffusersPrefixes) {
    if (!starts_with(key, prefix)) continue;
    auto table = l.dotted.find(component);
    if (table == l.dotted.end()) return {component, std::nullopt, true};
    auto it = table->second.find(key.substr(std::strlen(prefix)));
    return {component, it == table->second.end() ? std::nullopt : std::optional<std::string>(it->second), false};
  }
  // A bare PEFT state dict of a UNet (diffusers' oldest layout has no prefix).
  auto table = l.dotted.find("unet");
  std::optional<std::string> module;
  if (table != l.dotted.end()) {
    if (auto it = table->second.find(key); it != table->second.end()) module = it->second;
  }
  return {"unet", module, false};
}

using FileLayers = std::map<std::string, std::vector<std::pair<std::string, Layer>>>;  // component -> (module, layer)

// lora.file_layers: every layer's delta shape checked against its module's weight; a LoraError when no key matches,
// or naming every key that does not.
FileLayers file_layers(const LoraFile& lora, const Targets& t, const Lookups& l) {
  auto [layers, unknown] = split_layers(lora);
  FileLayers out;
  std::vector<std::string> unmatched;
  std::set<std::string> missing_components;
  for (const Layer& layer : layers) {
    Resolved r = resolve(layer.key, l);
    if (!r.module) {
      unmatched.push_back(layer.key);
      if (r.missing_component) missing_components.insert(r.component);
      continue;
    }
    const std::vector<int64_t>& shape = t.info(r.component, *r.module).shape;
    if (prod(layer.up->shape, 1) != layer.rank()) {  // up.reshape(out, -1).shape[1]
      throw LoraError("LoRA " + lora.path + ": " + layer.key + ": up " + shape_str(layer.up->shape) + " and down " +
                      shape_str(layer.down->shape) + " disagree on the rank");
    }
    std::vector<int64_t> made{layer.up->shape[0], prod(layer.down->shape, 1)};  // the delta's (out, in * kh * kw)
    if (prod(made) != prod(shape)) {
      std::string out_in;
      for (size_t k = 0; k < shape.size(); ++k) out_in += (k ? ", " : "") + std::to_string(shape[k]);
      throw LoraError("LoRA " + lora.path + ": " + layer.key + " makes a (" + std::to_string(made[0]) + ", " +
                      std::to_string(made[1]) + ") delta for " + r.component + " " + *r.module + " of shape (" + out_in +
                      "): a LoRA for another architecture (e.g. SD 2.x vs 1.x vs SDXL)?");
    }
    auto& mine = out[r.component];
    for (const auto& [m, _] : mine) {
      if (m == *r.module) {
        throw LoraError("LoRA " + lora.path + ": " + r.component + " " + *r.module + " is adapted twice (e.g. as " + layer.key +
                        "); the file is inconsistent");
      }
    }
    mine.emplace_back(*r.module, layer);
  }
  if (out.empty() && unknown.empty()) {
    std::vector<std::string> keys;
    for (const auto& [k, _] : lora.tensors) keys.push_back(k);
    std::sort(keys.begin(), keys.end());
    std::string hint;
    for (const auto& c : missing_components) hint += (hint.empty() ? " (keys for " : ", ") + c;
    if (!hint.empty()) hint += ", which this model lacks)";
    throw LoraError("LoRA " + lora.path + ": none of its " + std::to_string(lora.tensors.size()) +
                    " keys names a module of this model" + hint + ", e.g. " + examples(keys) + ": a LoRA for another architecture?");
  }
  std::sort(unmatched.begin(), unmatched.end());
  std::sort(unknown.begin(), unknown.end());
  unmatched.insert(unmatched.end(), unknown.begin(), unknown.end());
  if (!unmatched.empty()) {
    throw LoraError("LoRA " + lora.path + ": " + std::to_string(unmatched.size()) +
                    " of its layers/keys match no module of this model or are of an unsupported kind (LoHa, LoKr, DoRA, ...): " +
                    examples(unmatched, 5) + "; use a LoRA made for this model");
  }
  return out;
}

// (alpha / rank) * up @ down, (out, in * kh * kw) flattened, float32 as numpy computes it (lora.LoraLayer.delta; the
// matmul accumulated in double and rounded once: within an ulp of numpy's float32 matmul).
std::vector<float> layer_delta(const Layer& layer) {
  const int64_t rank = layer.rank(), out = layer.up->shape[0], in = prod(layer.down->shape, 1);
  const float* up = layer.up->data.data();
  const float* down = layer.down->data.data();
  const float factor = float((layer.alpha ? *layer.alpha : double(rank)) / double(rank));
  std::vector<float> delta(size_t(out * in));
  std::vector<double> row(static_cast<size_t>(in));
  for (int64_t i = 0; i < out; ++i) {
    std::fill(row.begin(), row.end(), 0.0);
    for (int64_t r = 0; r < rank; ++r) {
      const double u = up[i * rank + r];
      const float* d = down + r * in;
      for (int64_t j = 0; j < in; ++j) row[size_t(j)] += u * double(d[j]);
    }
    for (int64_t j = 0; j < in; ++j) delta[size_t(i * in + j)] = float(row[size_t(j)]) * factor;
  }
  return delta;
}

}  // namespace

// ---- the LoRAs of one load -----------------------------------------------------------------------------------------
struct LoraState {
  std::vector<std::pair<LoraFile, double>> files;  // (file, scale); layers point into these tensors
  Targets targets;
  // component -> module -> each file's layer for it and that file's scale (lora.ModuleDelta.parts)
  std::map<std::string, std::map<std::string, std::vector<std::pair<Layer, double>>>> parts;

  // lora.ModuleDelta.array: sum over files of scale * (alpha / rank) * up @ down, float32, flattened.
  std::vector<float> delta(const std::string& component, const std::string& module) const {
    std::vector<float> total;
    for (const auto& [layer, scale] : parts.at(component).at(module)) {
      std::vector<float> scaled = layer_delta(layer);
      const float s = float(scale);
      for (float& v : scaled) v *= s;
      if (total.empty()) {
        total = std::move(scaled);
      } else {
        for (size_t k = 0; k < total.size(); ++k) total[k] += scaled[k];
      }
    }
    return total;
  }
};

namespace {

// lora.patched_initializers for one ONNX file: the initializers of the modules the LoRAs adapt, each patched with its
// module's delta (computed when the backend asks, one at a time).
class LoraPatch : public WeightPatch {
 public:
  LoraPatch(std::shared_ptr<const LoraState> state, std::string component, std::string rel, const FileTargets* entry,
            std::vector<std::string> wanted)
      : state_(std::move(state)), component_(std::move(component)), rel_(std::move(rel)), entry_(entry), wanted_(std::move(wanted)) {}

  const std::string& where() const override { return rel_; }

  std::vector<std::string> weights(const std::vector<HeldWeight>&) const override {
    std::vector<std::string> out;
    for (const std::string& m : wanted_) out.push_back(entry_->targets.at(m).initializer);
    return out;
  }

  void apply(const std::string& weight, std::vector<int64_t>& shape, std::vector<float>& values) const override {
    std::string module;
    for (const std::string& m : wanted_) {
      if (entry_->targets.at(m).initializer == weight) module = m;
    }
    const Target& t = entry_->targets.at(module);
    std::vector<int64_t> d_shape = state_->targets.info(component_, module).shape;
    std::vector<float> d = state_->delta(component_, module);
    const int64_t out = d_shape.empty() ? 1 : d_shape[0], rest = int64_t(d.size()) / std::max<int64_t>(out, 1);
    if (t.transposed) d_shape = {rest, out};  // d.reshape(out, -1).T
    if (d_shape != shape && prod(shape) == int64_t(d.size())) d_shape = shape;
    if (d_shape != shape) {
      throw LoraError(rel_ + ": initializer " + weight + " has shape " + shape_str(shape) + ", the LoRA delta of " + module + " " +
                      shape_str(d_shape) + "; rebuild the artifacts");
    }
    if (!t.transposed) {
      for (size_t k = 0; k < values.size(); ++k) values[k] += d[k];
    } else {  // values viewed as (rest, out) += d (out, rest) transposed
      for (int64_t i = 0; i < rest; ++i) {
        for (int64_t j = 0; j < out; ++j) values[size_t(i * out + j)] += d[size_t(j * rest + i)];
      }
    }
  }

 private:
  std::shared_ptr<const LoraState> state_;
  std::string component_, rel_;
  const FileTargets* entry_;
  std::vector<std::string> wanted_;  // modules adapted, in the targets' order
};

}  // namespace

void check_lora_spec(const LoraSpec& spec) {
  if (!std::isfinite(spec.scale) || std::fabs(spec.scale) > kMaxLoraScale) {
    char bound[32];
    std::snprintf(bound, sizeof bound, "%g", kMaxLoraScale);  // Python's {MAX_SCALE:g}
    throw LoraError("LoRA scale for " + path_name(spec.path) + " must be a finite number within +-" + bound + ", got " +
                    py_float_repr(spec.scale));
  }
}

LoraSpec parse_lora_arg(const std::string& text) {
  auto colon = text.rfind(':');
  LoraSpec spec{text, 1.0};
  if (colon != std::string::npos && colon > 0) {
    std::string head = text.substr(0, colon), tail = text.substr(colon + 1), suffix = path_suffix(head);
    if (suffix == kSafetensors || is_pickle_suffix(suffix)) {
      std::optional<double> scale = py_float(tail);
      if (!scale) {
        throw LoraError("--lora " + text + ": scale " + py_str_repr(tail) +
                        " is not a number; use FILE or FILE:SCALE, e.g. style.safetensors:0.8");
      }
      spec = LoraSpec{head, *scale};
    }
  }
  check_lora_spec(spec);
  return spec;
}

Loras Loras::load(const Artifacts& artifacts, const std::vector<LoraSpec>& specs) {
  Loras loras;
  if (specs.empty()) return loras;
  if (specs.size() > kMaxLoras) {
    throw LoraError(std::to_string(specs.size()) + " LoRAs given; at most " + std::to_string(kMaxLoras) + " can be applied at once");
  }
  auto state = std::make_shared<LoraState>();
  for (const LoraSpec& s : specs) {
    check_lora_spec(s);
    state->files.emplace_back(read_lora(s.path), s.scale);
  }
  state->targets = read_targets(artifacts);
  Lookups l = lookups(state->targets);
  for (const auto& [file, scale] : state->files) {
    for (auto& [component, layers] : file_layers(file, state->targets, l)) {
      for (auto& [module, layer] : layers) state->parts[component][module].emplace_back(layer, scale);
    }
  }
  std::string missing;
  for (const auto& [component, _] : state->parts) {
    if (!artifacts.components.count(component)) missing += (missing.empty() ? "" : ", ") + component;
  }
  if (!missing.empty()) {
    throw LoraError("the LoRA adapts " + missing + ", which " + artifacts.root + " has no ONNX file for; rebuild the artifacts");
  }
  loras.state_ = state;
  return loras;
}

bool Loras::empty() const { return state_ == nullptr; }

std::unique_ptr<WeightPatch> Loras::patch(const std::string& component, const ComponentFiles& files) const {
  if (!state_ || !state_->parts.count(component)) return nullptr;
  const std::string& rel = files.onnx_entry.file;
  auto entry = state_->targets.files.find(rel);
  if (entry == state_->targets.files.end() || entry->second.sha256 != files.onnx_entry.sha256) {
    throw LoraError(rel + " is not described by " + kTargetsFile + " (rebuilt since?); rebuild the artifacts");
  }
  const FileTargets& f = entry->second;
  std::vector<std::string> wanted, missing;
  for (const auto& [module, _] : state_->parts.at(component)) {
    if (f.unused.count(module)) continue;
    (f.targets.count(module) ? wanted : missing).push_back(module);
  }
  if (!missing.empty()) {
    throw LoraError(rel + ": the LoRA adapts " + f.component + " modules whose weights the export could not locate (" +
                    examples(missing) + "); fuse the LoRA at export instead (--lora)");
  }
  return std::make_unique<LoraPatch>(state_, component, rel, &f, std::move(wanted));
}

std::vector<std::string> Loras::records() const {
  std::vector<std::string> out;
  if (!state_) return out;
  for (const auto& [file, scale] : state_->files) {
    out.push_back("{\"applied\": \"run time\", \"file\": " + json_quote(file.name(), true) + ", \"scale\": " + py_float_repr(scale) +
                  ", \"sha256\": " + json_quote(file.sha256, true) + "}");
  }
  return out;
}

}  // namespace ldm_rt::native
