#include "ldm_rt/native/embeddings.hpp"

#include <algorithm>
#include <cmath>
#include <map>
#include <utility>

#include <unicode/uchar.h>

#include "ldm_rt/native/json.hpp"
#include "ldm_rt/native/pyrepr.hpp"
#include "ldm_rt/native/safetensors.hpp"
#include "ldm_rt/native/tensor.hpp"
#include "ldm_rt/native/tokenizer.hpp"

namespace ldm_rt::native {
namespace {

constexpr const char* kSafetensors = ".safetensors";
const char* const kTorchSuffixes[] = {".pt", ".bin"};
constexpr const char* kConvert = "convert it to .safetensors";
constexpr const char* kSingle = "";  // the slot of SD 1.x/2.x files' one table
// Which vectors of an SDXL file each text encoder reads (embeddings.SDXL_SLOTS), in the file layout's order.
const std::pair<const char*, const char*> kSdxlSlots[] = {{"text_encoder", "clip_l"}, {"text_encoder_2", "clip_g"}};
const char* const kEncoders[] = {"text_encoder", "text_encoder_2"};

bool is_torch_suffix(const std::string& suffix) {
  for (const char* s : kTorchSuffixes) {
    if (suffix == s) return true;
  }
  return false;
}

// Code points of UTF-8 `s`; none when it is not UTF-8.
std::optional<std::u32string> code_points(const std::string& s) {
  std::u32string out;
  for (size_t i = 0; i < s.size();) {
    auto c = static_cast<unsigned char>(s[i]);
    size_t n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
    if (n == 0 || i + n > s.size()) return std::nullopt;
    char32_t cp = n == 1 ? c : c & (0xFF >> (n + 1));
    for (size_t k = 1; k < n; ++k) {
      auto b = static_cast<unsigned char>(s[i + k]);
      if ((b & 0xC0) != 0x80) return std::nullopt;
      cp = (cp << 6) | (b & 0x3F);
    }
    out += cp;
    i += n;
  }
  return out;
}

// Python's c.isspace() or not c.isprintable(): the categories Z* and C* (ASCII controls, the space, and the rest).
bool space_or_unprintable(char32_t c) {
  int8_t t = u_charType(static_cast<UChar32>(c));
  return t == U_CONTROL_CHAR || t == U_FORMAT_CHAR || t == U_SURROGATE || t == U_PRIVATE_USE_CHAR || t == U_UNASSIGNED ||
         t == U_LINE_SEPARATOR || t == U_PARAGRAPH_SEPARATOR || t == U_SPACE_SEPARATOR;
}

// embeddings.check_token: the trigger is `token`, or a message naming the file.
const std::string& check_token(const std::string& token, const std::string& path) {
  std::optional<std::u32string> chars = code_points(token);
  bool ok = chars && !chars->empty() && chars->size() <= kMaxTriggerChars &&
            std::none_of(chars->begin(), chars->end(), space_or_unprintable);
  if (!ok) {
    throw EmbeddingError("embedding " + path_name(path) + ": trigger " + py_str_repr(token) + " must be 1 to " +
                         std::to_string(kMaxTriggerChars) + " printable characters without spaces; pass another one as FILE:TOKEN");
  }
  return token;
}

// One textual-inversion file (embeddings.Embedding): vectors per slot ("" or clip_l / clip_g), each (N, D).
struct EmbeddingFile {
  std::string path;  // str(Path(...))
  std::string sha256, token;
  std::vector<std::pair<std::string, Tensor>> vectors;  // slot -> (N, D), in the file layout's order
  int64_t count() const { return vectors.front().second.dim(0); }
  const Tensor* slot(const std::string& name) const {
    for (const auto& [s, v] : vectors) {
      if (s == name) return &v;
    }
    return nullptr;
  }
};

// embeddings._as_vectors: (N, D) from a (D,) or (N, D) tensor, bounded and finite.
Tensor as_vectors(const Tensor& value, const std::string& key, const std::string& path) {
  if ((value.ndim() != 1 && value.ndim() != 2) || value.numel() == 0) {
    throw EmbeddingError("embedding " + path + ": " + key + " is of shape " + shape_str(value.shape) +
                         ", not a vector (D,) or vectors (N, D) of floats");
  }
  int64_t d = value.shape.back(), n = int64_t(value.numel()) / d;
  if (!(1 <= n && n <= kMaxEmbeddingVectors) || !(1 <= d && d <= kMaxEmbeddingWidth)) {
    throw EmbeddingError("embedding " + path + ": " + key + " holds " + std::to_string(n) + " vectors of width " + std::to_string(d) +
                         "; textual inversion has 1 to " + std::to_string(kMaxEmbeddingVectors) + " vectors of at most " +
                         std::to_string(kMaxEmbeddingWidth));
  }
  if (!std::all_of(value.data.begin(), value.data.end(), [](float v) { return std::isfinite(v); })) {
    throw EmbeddingError("embedding " + path + ": " + key + " holds NaN or Inf; download it again");
  }
  return Tensor({n, d}, value.data);
}

// embeddings._layout: the vectors per slot of a file's tensors, and the trigger the file names (diffusers' key).
std::pair<std::vector<std::pair<std::string, Tensor>>, std::optional<std::string>> layout(
    const std::vector<std::pair<std::string, Tensor>>& tensors, const std::string& path) {
  auto find = [&tensors](const std::string& key) -> const Tensor* {
    for (const auto& [k, v] : tensors) {
      if (k == key) return &v;
    }
    return nullptr;
  };
  if (find("string_to_param")) {  // A1111's .pt layout; a tensor here, not the dict it must be
    throw EmbeddingError("embedding " + path + ": string_to_param must hold exactly one tensor; pass a textual-inversion file");
  }
  if (find("clip_l") || find("clip_g")) {  // SDXL (A1111, Civitai)
    std::vector<std::pair<std::string, Tensor>> slots;
    for (const auto& [_, slot] : kSdxlSlots) {
      if (const Tensor* t = find(slot)) slots.emplace_back(slot, as_vectors(*t, slot, path));
    }
    if (slots.size() == 2 && slots[0].second.dim(0) != slots[1].second.dim(0)) {
      throw EmbeddingError("embedding " + path + ": clip_l and clip_g hold different numbers of vectors; download it again");
    }
    return {std::move(slots), std::nullopt};
  }
  if (const Tensor* t = find("emb_params")) return {{{kSingle, as_vectors(*t, "emb_params", path)}}, std::nullopt};
  if (tensors.size() == 1) {  // diffusers: {token: vector(s)}
    const auto& [key, t] = tensors.front();
    return {{{kSingle, as_vectors(t, py_str_repr(key), path)}}, key};
  }
  std::string keys;
  for (size_t k = 0; k < tensors.size() && k < 5; ++k) keys += (k ? ", " : "") + py_str_repr(tensors[k].first);
  throw EmbeddingError("embedding " + path + " holds " + keys +
                       ": not a textual-inversion layout (diffusers' one key, A1111's string_to_param or emb_params, SDXL's "
                       "clip_l + clip_g); a LoRA or a checkpoint?");
}

// embeddings.read_embedding: the file at `given` and its trigger.
EmbeddingFile read_embedding(const std::string& given, const std::optional<std::string>& token) {
  std::string path = normal_path(given), suffix = path_suffix(path);
  SafetensorsFile file;
  if (suffix == kSafetensors) {
    file = read_safetensors_as<EmbeddingError>(path, kMaxEmbeddingBytes, "embedding");
  } else if (is_torch_suffix(suffix)) {
    try {  // a missing or oversized file says so first, as Python's reader does
      read_bounded(path, std::size_t(kMaxEmbeddingBytes), "textual-inversion file", std::string("pass an embedding file or ") + kConvert);
    } catch (const JsonError& e) {
      throw EmbeddingError(e.what());
    }
    // Python reads these through a restricted unpickler; the native runtime reads no pickles at all. The conversion
    // below uses that restricted reader, so it is as safe as `ldm-rt sample --embedding` itself.
    throw EmbeddingError("embedding " + path + " is a torch file (" + path_suffix(path, false) + "), which ldm-rt-native does not read; " + kConvert +
                         " with ldm-rt's restricted reader: python -c \"import sys; from safetensors.numpy import save_file; "
                         "from ldm_rt.runtime.embeddings import read_embedding; e = read_embedding(sys.argv[1]); "
                         "save_file({k or 'emb_params': v for k, v in e.vectors.items()}, e.token + '.safetensors')\" " + path);
  } else {
    throw EmbeddingError("embedding " + path + ": unknown file type " + py_str_repr(path_suffix(path, false)) +
                         "; pass a .safetensors, .pt or .bin textual-inversion file");
  }
  auto [vectors, named] = layout(file.tensors, path);
  std::string trigger = check_token(token ? *token : named ? *named : path_stem(path), path);
  return EmbeddingFile{path, file.sha256, trigger, std::move(vectors)};
}

// What one text encoder's token table gains (embeddings.TokenRows): `rows` (K, D) for ids first_id, first_id + 1, ...
struct TokenRows {
  int64_t first_id = 0;
  Tensor rows;
};

std::string describe(const EmbeddingFile& e) {  // embeddings._describe
  std::string out;
  for (const auto& [slot, v] : e.vectors) {
    out += (out.empty() ? "" : " + ") + (slot.empty() ? std::string("one table") : slot) + " of width " + std::to_string(v.dim(1));
  }
  return out;
}

// The width of a text encoder's token vectors: its contract's last_hidden_state's last axis.
int64_t token_width(const std::string& name, const ComponentFiles& files) {
  for (size_t k = 0; k < files.outputs.size() && k < files.output_shapes.size(); ++k) {
    if (files.outputs[k] != "last_hidden_state" || files.output_shapes[k].empty()) continue;
    const std::string& d = files.output_shapes[k].back();
    if (!d.empty() && d.find_first_not_of("0123456789") == std::string::npos && d.size() < 10) return std::stoll(d);
  }
  throw ArtifactError("the contract of " + name + " states no width of last_hidden_state; rebuild the artifacts");
}

// embeddings.grown_table as a patch: the initializer named `...token_embedding.weight` (else the one 2-D float table of
// the tokenizer's size) with the rows at their ids, in its own dtype (the backend rounds float16 as numpy's astype).
class TablePatch : public WeightPatch {
 public:
  TablePatch(std::string rel, std::string path, TokenRows rows) : rel_(std::move(rel)), path_(std::move(path)), rows_(std::move(rows)) {}

  const std::string& where() const override { return rel_; }

  std::vector<std::string> weights(const std::vector<HeldWeight>& held) const override {
    const int64_t width = rows_.rows.dim(1);
    std::vector<const HeldWeight*> named, sized;
    for (const HeldWeight& w : held) {
      if (w.shape.size() != 2 || w.shape[1] != width) continue;
      bool token_table = false;
      for (const std::string& n : w.names) token_table = token_table || (n.size() >= 22 && n.compare(n.size() - 22, 22, "token_embedding.weight") == 0);
      if (token_table) named.push_back(&w);
      if (w.shape[0] == rows_.first_id) sized.push_back(&w);
    }
    const std::vector<const HeldWeight*>& found = named.empty() ? sized : named;
    if (found.size() != 1) {
      throw EmbeddingError(path_ + ": cannot tell which initializer is the token-embedding table (" + std::to_string(found.size()) +
                           " candidates); rebuild the artifacts with this ldm-rt");
    }
    return {found.front()->names.front()};
  }

  void apply(const std::string&, std::vector<int64_t>& shape, std::vector<float>& values) const override {
    const int64_t width = shape[1], k = rows_.rows.dim(0);
    shape[0] = std::max(shape[0], rows_.first_id + k);
    values.resize(size_t(shape[0] * width), 0.0f);  // rows past the table and before first_id stay zero, as numpy's zeros
    std::copy(rows_.rows.data.begin(), rows_.rows.data.end(), values.begin() + rows_.first_id * width);
  }

 private:
  std::string rel_, path_;
  TokenRows rows_;
};

}  // namespace

struct EmbeddingState {
  std::vector<EmbeddingFile> files;
  std::map<std::string, TokenRows> tables;  // text encoder -> the rows its table gains
};

void check_embedding_spec(const EmbeddingSpec& spec) {
  if (spec.token) check_token(*spec.token, spec.path);
}

EmbeddingSpec parse_embedding_arg(const std::string& text) {
  auto colon = text.rfind(':');
  EmbeddingSpec spec{normal_path(text), std::nullopt};
  if (colon != std::string::npos && colon > 0) {
    std::string head = text.substr(0, colon), suffix = path_suffix(head);
    if (suffix == kSafetensors || is_torch_suffix(suffix)) spec = EmbeddingSpec{normal_path(head), text.substr(colon + 1)};
  }
  check_embedding_spec(spec);
  return spec;
}

Embeddings Embeddings::load(Artifacts& artifacts, const std::vector<EmbeddingSpec>& specs) {
  Embeddings out;
  if (specs.size() > kMaxEmbeddings) {
    throw EmbeddingError(std::to_string(specs.size()) + " embeddings given; at most " + std::to_string(kMaxEmbeddings) +
                         " can be loaded at once");
  }
  if (specs.empty()) return out;
  auto state = std::make_shared<EmbeddingState>();
  for (const EmbeddingSpec& s : specs) {
    check_embedding_spec(s);
    state->files.push_back(read_embedding(s.path, s.token));
  }
  // embeddings.with_embeddings: the text encoders present, each with its tokenizer and token width.
  std::optional<PromptTokenizer>* tokenizers[2] = {&artifacts.tokenizer, &artifacts.tokenizer_2};
  std::vector<int> present;
  for (int k = 0; k < 2; ++k) {
    if (*tokenizers[k] && artifacts.components.count(kEncoders[k])) present.push_back(k);
  }
  if (present.empty()) {
    throw EmbeddingError(artifacts.root + " has no text encoder: textual-inversion embeddings need a text-conditioned model");
  }
  // embeddings.prepare: every file checked against every encoder before any tokenizer changes.
  std::map<std::string, std::string> seen;  // trigger -> the file that took it
  for (const EmbeddingFile& e : state->files) {
    if (auto it = seen.find(e.token); it != seen.end()) {
      throw EmbeddingError("embeddings " + path_name(it->second) + " and " + path_name(e.path) + " both use the trigger " +
                           py_str_repr(e.token) + "; give one another (FILE:TOKEN)");
    }
    seen[e.token] = e.path;
  }
  const bool sdxl = present.back() == 1;  // encoder_slots: SDXL's clip_l / clip_g (a refiner: clip_g alone)
  std::vector<std::pair<int, PromptTokenizer>> grown;
  for (int k : present) {
    const std::string name = kEncoders[k];
    const std::string slot = sdxl ? kSdxlSlots[k].second : kSingle;
    const int64_t width = token_width(name, artifacts.components.at(name));
    const PromptTokenizer& tokenizer = **tokenizers[k];
    std::vector<std::pair<std::string, int64_t>> words;
    std::vector<const Tensor*> parts;
    for (const EmbeddingFile& e : state->files) {
      const Tensor* v = e.slot(slot);
      if (v == nullptr) {
        std::string reads = !slot.empty() ? "this SDXL model's " + name + " reads its " + slot +
                                                " vectors (SDXL files hold clip_l (768) and clip_g (1280))"
                                          : "this SD 1.x/2.x model's " + name + " reads one table of vectors";
        throw EmbeddingError("embedding " + path_name(e.path) + " holds " + describe(e) + "; " + reads +
                             ": use an embedding made for this model");
      }
      if (v->dim(1) != width) {
        throw EmbeddingError("embedding " + path_name(e.path) + ": its " + (slot.empty() ? std::string("vectors") : slot) + " are " +
                             std::to_string(v->dim(1)) + " wide, " + name + "'s tokens " + std::to_string(width) +
                             " (SD 1.x: 768, SD 2.x: 1024, SDXL: 768 + 1280): use an embedding made for this model");
      }
      if (tokenizer.token_id(e.token)) {  // diffusers refuses these too: the word would lose its meaning
        throw EmbeddingError("embedding " + path_name(e.path) + ": " + py_str_repr(e.token) +
                             " is already a token of the model's vocabulary; pass another trigger (FILE:TOKEN)");
      }
      words.emplace_back(e.token, e.count());
      parts.push_back(v);
    }
    try {
      auto [with_words, ids] = tokenizer.with_added_tokens(words);
      grown.emplace_back(k, std::move(with_words));
      state->tables[name] = TokenRows{ids.front().front(), Tensor::concat_rows(parts)};
    } catch (const TokenizerError& err) {
      throw EmbeddingError(std::string("embeddings: ") + err.what());
    }
  }
  for (auto& [k, t] : grown) *tokenizers[k] = std::move(t);
  out.state_ = state;
  return out;
}

bool Embeddings::empty() const { return state_ == nullptr; }

std::unique_ptr<WeightPatch> Embeddings::patch(const std::string& component, const ComponentFiles& files) const {
  if (!state_) return nullptr;
  auto it = state_->tables.find(component);
  if (it == state_->tables.end()) return nullptr;
  return std::make_unique<TablePatch>(files.onnx_entry.file, files.onnx, it->second);
}

std::vector<std::string> Embeddings::records() const {
  std::vector<std::string> out;
  if (!state_) return out;
  for (const EmbeddingFile& e : state_->files) {
    out.push_back("{\"applied\": \"run time\", \"file\": " + json_quote(path_name(e.path), true) + ", \"sha256\": " +
                  json_quote(e.sha256, true) + ", \"token\": " + json_quote(e.token, true) + ", \"vectors\": " +
                  std::to_string(e.count()) + "}");
  }
  return out;
}

}  // namespace ldm_rt::native
