#include "ldm_rt/native/artifacts.hpp"

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cctype>
#include <filesystem>
#include <memory>
#include <sstream>
#include <tuple>

#include "ldm_rt/native/errors.hpp"
#include "ldm_rt/native/json.hpp"
#include "ldm_rt/native/metadata.hpp"
#include "ldm_rt/native/sha256.hpp"

namespace ldm_rt::native {
namespace {

namespace fs = std::filesystem;

constexpr const char* kManifest = "manifest.json";
constexpr const char* kFormat = "ldm-rt-artifacts";
constexpr int64_t kFormatVersion = 1;
constexpr const char* kRebuild = "rebuild the artifacts";
// runtime/manifest.py MAX_MANIFEST_BYTES, MAX_SCHEDULER_CONFIG_BYTES.
constexpr std::size_t kMaxManifestBytes = std::size_t{16} << 20;
constexpr std::size_t kMaxSchedulerConfigBytes = std::size_t{1} << 20;

std::string join(const std::string& folder, const std::string& rel) { return normal_path(folder + "/" + rel); }

// Python's repr of a JSON value in a message: 'text', None, True, 12.
std::string py_repr(const Json* v) {
  if (v == nullptr || v->is_null()) return "None";
  if (v->is_string()) return "'" + v->as_string() + "'";
  if (v->is_bool()) return v->as_bool() ? "True" : "False";
  if (v->is_number()) return v->number_text();
  return v->dump();
}

using FileEntry = ManifestFile;

// The manifest's structure errors, worded as manifest.Manifest.parse words them.
[[noreturn]] void malformed(const std::string& manifest_path, const std::string& what) {
  throw ArtifactError(manifest_path + " is malformed (" + what + "); rebuild the artifacts");
}

const Json& key(const Json& obj, const std::string& name, const std::string& manifest_path) {
  if (!obj.is_object()) malformed(manifest_path, "TypeError('expected a JSON object')");
  const Json* v = obj.find(name);
  if (v == nullptr) malformed(manifest_path, "KeyError('" + name + "')");
  return *v;
}

// A failed bf16 parity record (precision entry -> parity -> bf16), in one line naming the worst case ("" if none),
// and whether OpenVINO's own bf16 measured it (else the emulation did).
std::pair<std::string, bool> bf16_failure(const std::string& name, const Json& precision_entry) {
  const Json* parity = precision_entry.is_object() ? precision_entry.find("parity") : nullptr;
  const Json* bf16 = parity && parity->is_object() ? parity->find("bf16") : nullptr;
  const Json* passed = bf16 && bf16->is_object() ? bf16->find("passed") : nullptr;
  if (!passed || !passed->is_bool() || passed->as_bool()) return {"", false};
  const Json* openvino = bf16->find("openvino");
  bool measured = openvino && openvino->is_object();
  const Json* r = measured ? openvino : bf16->find("emulated");
  const Json *errs = r && r->is_object() ? r->find("max_abs_err") : nullptr, *bounds = r && r->is_object() ? r->find("bound") : nullptr;
  const Json* backend = r && r->is_object() ? r->find("backend") : nullptr;
  if (errs && errs->is_array() && bounds && bounds->is_array()) {
    double err = 0, bound = 0, over = -1e300;
    for (size_t i = 0; i < errs->as_array().size() && i < bounds->as_array().size(); ++i) {
      const Json &e = errs->as_array()[i], &b = bounds->as_array()[i];
      if (e.is_number() && b.is_number() && e.as_double() - b.as_double() > over) {
        err = e.as_double(), bound = b.as_double(), over = err - bound;
      }
    }
    if (over != -1e300) {
      char text[96];
      std::snprintf(text, sizeof text, "max abs error %.3g > bound %.3g", err, bound);
      return {name + " failed bf16 parity at export (" + (backend && backend->is_string() ? backend->as_string() : "bf16") + ": " + text + ")", measured};
    }
  }
  return {name + " failed bf16 parity at export", measured};
}

FileEntry file_entry(const Json& v, const std::string& what, const std::string& mp) {
  if (!v.is_object()) malformed(mp, "TypeError('" + what + " must be a JSON object, got " + Json::type_name(v.type()) + "')");
  const Json& file = key(v, "file", mp);
  const Json& sha = key(v, "sha256", mp);
  const Json& bytes = key(v, "bytes", mp);
  if (!file.is_string() || !sha.is_string()) malformed(mp, "TypeError('file and sha256 must be strings')");
  if (!bytes.is_integer() || bytes.as_int() < 0) {
    malformed(mp, "TypeError('bytes must be a non-negative integer, got " + py_repr(&bytes) + " for \\'" + file.as_string() + "\\'')");
  }
  return {file.as_string(), sha.as_string(), bytes.as_int()};
}

int64_t int_fact(const Json& facts, const std::string& name, const std::string& mp) {
  const Json& v = key(facts, name, mp);
  if (!v.is_integer()) malformed(mp, "TypeError('ModelFacts field " + name + " has the wrong type: " + py_repr(&v) + "')");
  return v.as_int();
}

std::optional<int64_t> optional_int_fact(const Json& facts, const std::string& name, const std::string& mp) {
  const Json* v = facts.find(name);
  if (v == nullptr) malformed(mp, "TypeError(\"ModelFacts.__init__() missing required argument: '" + name + "'\")");
  if (v->is_null()) return std::nullopt;
  if (!v->is_integer()) malformed(mp, "TypeError('ModelFacts field " + name + " has the wrong type: " + py_repr(v) + "')");
  return v->as_int();
}

// A fact older manifests may lack (ModelFacts' defaulted fields): the default when absent.
std::optional<int64_t> defaulted_int_fact(const Json& facts, const std::string& name, const std::string& mp) {
  if (facts.find(name) == nullptr) return std::nullopt;
  return optional_int_fact(facts, name, mp);
}

bool bool_fact(const Json& facts, const std::string& name, bool fallback, const std::string& mp) {
  const Json* v = facts.find(name);
  if (v == nullptr) return fallback;
  if (!v->is_bool()) malformed(mp, "TypeError('ModelFacts field " + name + " has the wrong type: " + py_repr(v) + "')");
  return v->as_bool();
}

std::array<int64_t, 3> range(const Json& v, const std::string& what, const std::string& mp) {
  bool ok = v.is_array() && v.size() == 3;
  for (std::size_t k = 0; ok && k < 3; ++k) ok = v[k].is_integer();
  std::array<int64_t, 3> r{};
  if (ok) r = {v[0].as_int(), v[1].as_int(), v[2].as_int()};
  if (!ok || !(0 < r[0] && r[0] <= r[1] && r[1] <= r[2])) {
    malformed(mp, "ValueError('" + what + " must be [min, opt, max] with 0 < min <= opt <= max, got " + v.dump() + "')");
  }
  return r;
}

// files.inside: folder/rel when `rel` is a relative POSIX path that stays inside `folder` with symlinks
// resolved (decided from names and links alone, before anything is opened); nullopt otherwise.
std::optional<std::string> inside(const std::string& folder, const std::string& rel) {
  if (rel.empty() || rel.find('\0') != std::string::npos || rel.find('\\') != std::string::npos) return std::nullopt;
  if (rel.size() >= 2 && rel[1] == ':' && std::isalpha(static_cast<unsigned char>(rel[0]))) return std::nullopt;  // a drive
  if (rel[0] == '/') return std::nullopt;
  std::stringstream parts(rel);
  for (std::string part; std::getline(parts, part, '/');) {
    if (part == "..") return std::nullopt;
  }
  std::error_code ec;
  fs::path base = fs::weakly_canonical(fs::path(folder), ec);
  if (ec) return std::nullopt;
  fs::path resolved = fs::weakly_canonical(base / rel, ec);
  if (ec) return std::nullopt;
  auto b = base.begin(), r = resolved.begin();
  for (; b != base.end(); ++b, ++r) {
    if (r == resolved.end() || *b != *r) return std::nullopt;
  }
  return join(folder, rel);
}

std::string confined(const std::string& folder, const std::string& rel) {
  auto path = inside(folder, rel);
  if (!path) {
    throw ArtifactError(join(folder, kManifest) + " names the file '" + rel + "', which lies outside the artifacts folder " +
                        normal_path(folder) + " (an absolute path, '..', a backslash or drive, or a symlink out of it); "
                        "refusing to read it; rebuild the artifacts");
  }
  return *path;
}

std::string read_bounded_artifact(const std::string& path, std::size_t limit, const std::string& what) {
  try {
    return read_bounded(path, limit, what, kRebuild);
  } catch (const JsonError& e) {
    throw ArtifactError(e.what());
  }
}

// Manifest.verify_file: inside the folder, present, size and sha256 as the manifest says.
std::string verify_file(const std::string& folder, const FileEntry& entry) {
  std::string path = confined(folder, entry.file);
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) throw ArtifactError(path + " is missing; rebuild the artifacts");
  if (int64_t(st.st_size) != entry.bytes || sha256_hex_file(path) != entry.sha256) {
    throw ArtifactError(path + " does not match the manifest's hash (truncated or changed); rebuild the artifacts");
  }
  return path;
}

// base.verified_file's stamp of the file at `path` (stat `st`), or "" when its real path cannot be had.
std::string verified_stamp(const std::string& path, const struct stat& st, const std::string& sha256) {
  std::unique_ptr<char, void (*)(void*)> real(::realpath(path.c_str(), nullptr), &std::free);
  if (!real) return "";
  // Python's stamp has os.fsdecode's surrogates for a path that is not UTF-8: such a path gets no record (hashed each time).
  try {
    check_utf8(real.get(), path, kRebuild);
  } catch (const JsonError&) {
    return "";
  }
  auto ns = [](const struct timespec& t) { return std::to_string(int64_t(t.tv_sec) * 1000000000 + int64_t(t.tv_nsec)); };
  return "[" + json_quote(real.get(), true) + ", " + std::to_string(static_cast<unsigned long long>(st.st_dev)) + ", " +
         std::to_string(static_cast<unsigned long long>(st.st_ino)) + ", " + std::to_string(int64_t(st.st_size)) + ", " +
         ns(st.st_mtim) + ", " + ns(st.st_ctim) + ", " + json_quote(sha256, true) + "]";
}

// Manifest.read_file: a small side file's bytes, bounded and checked against the manifest's size and hash.
std::string read_side_file(const std::string& folder, const FileEntry& entry, std::size_t limit, const std::string& what) {
  std::string path = confined(folder, entry.file);
  if (entry.bytes > int64_t(limit)) {
    throw ArtifactError(join(folder, kManifest) + " lists " + entry.file + " at " + std::to_string(entry.bytes) +
                        " bytes, more than a " + what + " may have (" + std::to_string(limit) + "); rebuild the artifacts");
  }
  std::string data = read_bounded_artifact(path, limit, what);
  if (int64_t(data.size()) != entry.bytes || sha256_hex(data) != entry.sha256) {
    throw ArtifactError(path + " does not match the manifest's hash (truncated or changed); rebuild the artifacts");
  }
  return data;
}

std::vector<std::string> tensor_names(const Json& list, const std::string& mp) {
  std::vector<std::string> names;
  if (!list.is_array()) malformed(mp, "TypeError('contract tensors must be a JSON array')");
  for (const Json& t : list.as_array()) {
    const Json& name = key(t, "name", mp);
    if (!name.is_string()) malformed(mp, "TypeError('a tensor name must be a string')");
    names.push_back(name.as_string());
  }
  return names;
}

// Each tensor's shape in `list` as text (a number's digits or a name), in order.
std::vector<std::vector<std::string>> tensor_shapes(const Json& list, const std::string& mp) {
  std::vector<std::vector<std::string>> shapes;
  for (const Json& t : list.as_array()) {
    const Json* shape = t.find("shape");
    std::vector<std::string> dims;
    if (shape && !shape->is_array()) malformed(mp, "TypeError('a tensor shape must be a JSON array')");
    for (size_t k = 0; shape && k < shape->size(); ++k) {
      const Json& d = (*shape)[k];
      if (!d.is_string() && !d.is_integer()) malformed(mp, "TypeError('a tensor dimension must be an int or a name')");
      dims.push_back(d.is_string() ? d.as_string() : std::to_string(d.as_int()));
    }
    shapes.push_back(std::move(dims));
  }
  return shapes;
}

// (fewest, most) prompt chunks the UNet's context takes (runtime/pipeline.Pipeline.prompt_chunks): its
// encoder_hidden_states' token axis is a contract dim (a multiple of the encoder's length) in builds made with
// --prompt-chunks, a fixed size otherwise (1, 1).
std::pair<int64_t, int64_t> unet_prompt_chunks(const Json& unet_contract, int64_t context_length) {
  const Json* inputs = unet_contract.find("inputs");
  const Json* dims = unet_contract.find("dims");
  if (!inputs || !inputs->is_array() || !dims || !dims->is_array() || context_length < 1) return {1, 1};
  for (const Json& t : inputs->as_array()) {
    const Json *name = t.is_object() ? t.find("name") : nullptr, *shape = t.is_object() ? t.find("shape") : nullptr;
    if (!name || !name->is_string() || name->as_string() != "encoder_hidden_states" || !shape || !shape->is_array() ||
        shape->as_array().size() != 3 || !shape->as_array()[1].is_string()) {
      continue;
    }
    for (const Json& d : dims->as_array()) {
      const Json *dn = d.is_object() ? d.find("name") : nullptr, *lo = d.is_object() ? d.find("min") : nullptr,
                 *hi = d.is_object() ? d.find("max") : nullptr;
      if (dn && dn->is_string() && dn->as_string() == shape->as_array()[1].as_string() && lo && lo->is_integer() && hi &&
          hi->is_integer()) {
        return {std::max<int64_t>(lo->as_int() / context_length, 1), std::max<int64_t>(hi->as_int() / context_length, 1)};
      }
    }
  }
  return {1, 1};
}

}  // namespace

std::string verify_manifest_file(const std::string& folder, const ManifestFile& entry) { return verify_file(folder, entry); }

std::string verified_manifest_file(const std::string& folder, const ManifestFile& entry, const std::string& compile_cache) {
  if (compile_cache.empty() || entry.bytes < kVerifiedFromBytes) return verify_file(folder, entry);
  std::string path = confined(folder, entry.file);
  struct stat st {};
  std::string stamp = ::stat(path.c_str(), &st) == 0 ? verified_stamp(path, st, entry.sha256) : "";
  if (stamp.empty()) return verify_file(folder, entry);  // gone or unreachable: verify_file says which
  std::error_code ec;
  fs::path records = fs::path(compile_cache) / "verified";
  fs::create_directories(records, ec);
  std::string record = fs::is_directory(records, ec) ? (records / sha256_hex(stamp).substr(0, 32)).string() : "";
  struct stat seen {};
  if (!record.empty() && ::stat(record.c_str(), &seen) == 0 && S_ISREG(seen.st_mode) && S_ISREG(st.st_mode) &&
      int64_t(st.st_size) == entry.bytes) {
    return path;  // verified before, unchanged since
  }
  std::string verified = verify_file(folder, entry);
  if (!record.empty()) {  // written whole or not at all (a partial record would vouch all the same); errors ignored
    std::string part = record + "." + std::to_string(::getpid()) + ".part", text = stamp + "\n";
    std::unique_ptr<FILE, int (*)(FILE*)> f(std::fopen(part.c_str(), "wb"), &std::fclose);
    bool written = f && std::fwrite(text.data(), 1, text.size(), f.get()) == text.size() && std::fclose(f.release()) == 0;
    if (!written || std::rename(part.c_str(), record.c_str()) != 0) std::remove(part.c_str());
  }
  return verified;
}

std::string normal_path(const std::string& p) {
  if (p.empty()) return ".";
  bool absolute = p[0] == '/';
  std::string out;
  std::stringstream parts(p);
  for (std::string part; std::getline(parts, part, '/');) {
    if (part.empty() || part == ".") continue;
    if (!out.empty()) out += "/";
    out += part;
  }
  if (absolute) return "/" + out;
  return out.empty() ? "." : out;
}

std::string path_name(const std::string& path) {
  std::string p = normal_path(path);
  if (p == "." || p == "/") return "";
  return p.substr(p.rfind('/') == std::string::npos ? 0 : p.rfind('/') + 1);
}

namespace {
// Where Path(p).suffix starts in Path(p).name (pathlib's rules: a leading or trailing dot is no suffix); npos: none.
std::size_t suffix_at(const std::string& name) {
  auto dot = name.rfind('.');
  return dot == std::string::npos || dot == 0 || dot + 1 == name.size() ? std::string::npos : dot;
}
}  // namespace

std::string path_suffix(const std::string& path, bool lower) {
  std::string name = path_name(path);
  std::size_t dot = suffix_at(name);
  std::string s = dot == std::string::npos ? "" : name.substr(dot);
  if (lower) for (char& c : s) c = char(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

std::string path_stem(const std::string& path) {
  std::string name = path_name(path);
  return name.substr(0, suffix_at(name));
}

Artifacts Artifacts::open(const std::string& dir, const std::string& precision, const std::string& compile_cache) {
  Artifacts a;
  a.root = normal_path(dir);
  struct stat st {};
  if (::stat(a.root.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
    throw ArtifactError(a.root + " is not a folder; pass --model DIR with a built artifacts folder");
  }
  std::string mp = confined(a.root, kManifest);
  if (::stat(mp.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) {
    throw ArtifactError(mp + " not found: " + a.root + " is not a finished artifacts folder; build one with "
                        "`python export/build_engines.py --model SRC --out DIR`");
  }
  std::string manifest_bytes = read_bounded_artifact(mp, kMaxManifestBytes, "manifest");
  Json d;
  try {
    d = json_object(manifest_bytes, mp, kRebuild);
  } catch (const JsonError& e) {
    throw ArtifactError(e.what());
  }
  const Json* format = d.find("format");
  const Json* version = d.find("format_version");
  if (!(format && format->is_string() && format->as_string() == kFormat && version && version->is_integer() &&
        version->as_int() == kFormatVersion)) {
    throw ArtifactError(mp + ": format " + py_repr(format) + " v" + (version ? py_repr(version) : "None") + " is not '" +
                        kFormat + "' v1; rebuild the artifacts with this ldm-rt");
  }
  try {
    const Json& facts = key(d, "facts", mp);
    if (!facts.is_object()) malformed(mp, "TypeError('facts must be a JSON object')");
    ModelFacts& f = a.facts;
    f.latent_channels = int_fact(facts, "latent_channels", mp);
    f.latent_factor = int_fact(facts, "latent_factor", mp);
    f.unet_factor = int_fact(facts, "unet_factor", mp);
    f.unet_in_channels = int_fact(facts, "unet_in_channels", mp);
    f.unet_out_channels = int_fact(facts, "unet_out_channels", mp);
    f.context_length = optional_int_fact(facts, "context_length", mp);
    f.context_dim = optional_int_fact(facts, "context_dim", mp);
    f.num_classes = optional_int_fact(facts, "num_classes", mp);
    const Json& kind = key(facts, "autoencoder_kind", mp);
    const Json& scale = key(facts, "scale_factor", mp);
    if (!kind.is_string() || !scale.is_number()) malformed(mp, "TypeError('ModelFacts field autoencoder_kind or scale_factor has the wrong type')");
    f.autoencoder_kind = kind.as_string();
    f.scale_factor = scale.as_double();
    f.has_text_encoder = bool_fact(facts, "has_text_encoder", true, mp);
    f.text_encoder_2_dim = defaulted_int_fact(facts, "text_encoder_2_dim", mp);
    f.pooled_dim = defaulted_int_fact(facts, "pooled_dim", mp);
    f.time_ids = defaulted_int_fact(facts, "time_ids", mp);
    f.force_zeros_for_empty_prompt = bool_fact(facts, "force_zeros_for_empty_prompt", false, mp);
    f.time_cond_proj_dim = defaulted_int_fact(facts, "time_cond_proj_dim", mp);
    if (f.time_ids && (!f.pooled_dim || *f.time_ids < 1)) {
      malformed(mp, "ContractError(\"model facts: time_ids " + std::to_string(*f.time_ids) +
                        " needs pooled_dim (the UNet's text_embeds); the model's config is inconsistent\")");
    }
    if (f.latent_channels < 1 || f.latent_factor < 1 || f.unet_factor < 1 || f.unet_in_channels < 1) {
      malformed(mp, "ValueError('latent sizes and channels must be positive')");
    }
    const Json& prof = key(d, "profile", mp);
    a.profile.batch = range(key(prof, "batch", mp), "profile.batch", mp);
    a.profile.height = range(key(prof, "height", mp), "profile.height", mp);
    a.profile.width = range(key(prof, "width", mp), "profile.width", mp);

    const Json& comps = key(d, "components", mp);
    if (!comps.is_object()) malformed(mp, "TypeError('components must be a JSON object')");
    std::map<std::string, FileEntry> onnx, external;
    for (const auto& [name, c] : comps.as_object()) {
      const Json& contract = key(c, "contract", mp);
      ComponentFiles files;
      files.inputs = tensor_names(key(contract, "inputs", mp), mp);
      files.outputs = tensor_names(key(contract, "outputs", mp), mp);
      files.input_shapes = tensor_shapes(key(contract, "inputs", mp), mp);
      files.output_shapes = tensor_shapes(key(contract, "outputs", mp), mp);
      if (const Json* extra = contract.find("extra"); extra && extra->is_object()) files.extra = *extra;
      const Json& precisions = key(c, "precisions", mp);
      if (!precisions.is_object()) malformed(mp, "TypeError('components." + name + ".precisions must be a JSON object')");
      if (const Json* pe = precisions.find(precision)) {
        std::string at = "components." + name + ".precisions." + precision;
        onnx[name] = file_entry(key(*pe, "onnx", mp), at + ".onnx", mp);
        if (const Json* ext = pe->find("external_data"); ext && !ext->is_null()) {
          external[name] = file_entry(*ext, at + ".external_data", mp);
        }
        std::tie(files.bf16_failure, files.bf16_failure_measured) = bf16_failure(name, *pe);
      } else {
        std::string built;
        for (const auto& [p, _] : precisions.as_object()) built += (built.empty() ? "" : ", ") + p;
        throw BackendError(a.root + " has no " + precision + " " + name + " (built: " + (built.empty() ? "none" : built) +
                           "); rebuild with --fp16 or use --precision fp32");
      }
      a.components[name] = files;
      if (name == "unet" && f.context_length) a.prompt_chunks = unet_prompt_chunks(contract, *f.context_length);
    }
    // manifest._default_scheduler: "" (built before models named their own) or a registered name.
    if (const Json* ds = d.find("default_scheduler"); ds && !(ds->is_string() && ds->as_string().empty())) {
      std::vector<std::string> names = scheduler_names();
      if (!ds->is_string() || std::find(names.begin(), names.end(), ds->as_string()) == names.end()) {
        std::sort(names.begin(), names.end());
        std::string listed;
        for (const auto& n : names) listed += (listed.empty() ? "'" : ", '") + n + "'";
        malformed(mp, "ValueError(\"default_scheduler must be one of [" + listed + "], got " + py_repr(ds) + "\")");
      }
      a.default_scheduler = ds->as_string();
    }
    std::optional<FileEntry> tokenizers[2];
    const char* tokenizer_keys[2] = {"tokenizer", "tokenizer_2"};
    for (int k = 0; k < 2; ++k) {
      if (const Json* t = d.find(tokenizer_keys[k]); t && !t->is_null()) tokenizers[k] = file_entry(*t, tokenizer_keys[k], mp);
    }
    FileEntry scheduler = file_entry(key(d, "scheduler", mp), "scheduler", mp);
    std::optional<FileEntry> preview;  // manifest.preview_factors: None in builds made before step previews
    if (const Json* t = d.find("preview_factors"); t && !t->is_null()) preview = file_entry(*t, "preview_factors", mp);
    if (const Json* t = d.find("lora_targets"); t && !t->is_null()) a.lora_targets = file_entry(*t, "lora_targets", mp);
    std::string source_hash;
    if (const Json* source = d.find("source")) {
      if (!source->is_object()) malformed(mp, "TypeError('source must be a JSON object, got " + std::string(Json::type_name(source->type())) + "')");
      if (const Json* sha = source->find("sha256")) {
        if (!sha->is_string()) malformed(mp, "TypeError('source.sha256 must be a string, got " + py_repr(sha) + "')");
        source_hash = sha->as_string();
      }
      // runtime/pipeline.py: a ControlNet record's sha256 when it is a non-empty string.
      if (const Json* nets = source->find("controlnets"); nets && nets->is_array()) {
        for (const Json& net : nets->as_array()) {
          const Json* sha = net.is_object() ? net.find("sha256") : nullptr;
          a.controlnet_sha256.push_back(sha && sha->is_string() ? sha->as_string() : "");
        }
      }
      if (const Json* fused = source->find("loras"); fused && fused->is_array()) {
        for (const Json& r : fused->as_array()) {
          if (!r.is_object()) continue;
          Json::Object record = r.as_object();
          record.emplace_back("applied", Json::string("export"));
          a.fused_loras.push_back(json_dumps_sorted(Json::object(std::move(record))));
        }
      }
      if (const Json* baked = source->find("embeddings"); baked && baked->is_array()) {
        for (const Json& r : baked->as_array()) {
          if (!r.is_object()) continue;
          Json::Object record;  // {**r, "applied": "export"} without "path"
          for (const auto& [k, v] : r.as_object()) {
            if (k != "path" && k != "applied") record.emplace_back(k, v);
          }
          record.emplace_back("applied", Json::string("export"));
          a.baked_embeddings.push_back(json_dumps_sorted(Json::object(std::move(record))));
        }
      }
    }

    // Side files (Artifacts.open), then the ONNX files (the backend's verify_file in Python).
    const char* encoders[2] = {"text_encoder", "text_encoder_2"};
    for (int k = 0; k < 2; ++k) {
      if (tokenizers[k]) {
        std::string data = read_side_file(a.root, *tokenizers[k], kMaxTokenizerJsonBytes, "tokenizer.json");
        std::string where = join(a.root, tokenizers[k]->file);
        try {
          check_utf8(data, where, kRebuild);
        } catch (const JsonError& e) {
          throw ArtifactError(e.what());
        }
        (k == 0 ? a.tokenizer : a.tokenizer_2) = PromptTokenizer::from_json_text(data, where);
      } else if (a.components.count(encoders[k])) {
        throw ArtifactError(mp + " lists " + encoders[k] + " but not its tokenizer; rebuild the artifacts");
      }
    }
    std::string sched_data = read_side_file(a.root, scheduler, kMaxSchedulerConfigBytes, "scheduler config");
    std::string sched_where = join(a.root, scheduler.file);
    Json sched_json;
    try {
      sched_json = json_object(sched_data, sched_where, kRebuild);
    } catch (const JsonError& e) {
      throw ArtifactError(e.what());
    }
    try {
      a.scheduler_config = SchedulerConfig::from_json(sched_json);
    } catch (const SchedulerConfigError& e) {
      throw SchedulerConfigError(sched_where + ": " + e.what());
    }
    // scheduler_choice.karras_variant: builds made before heun-karras and lms-karras recorded the plain name.
    if (a.scheduler_config.use_karras_sigmas && !a.default_scheduler.empty()) {
      std::vector<std::string> names = scheduler_names();
      std::string twin = a.default_scheduler + "-karras";
      if (std::find(names.begin(), names.end(), twin) != names.end()) a.default_scheduler = twin;
    }
    if (preview) {  // previews.PreviewFactors.read
      std::string data = read_side_file(a.root, *preview, kMaxPreviewFactorsBytes, "preview factors file");
      std::string where = join(a.root, preview->file);
      try {
        a.preview_factors = PreviewFactors::from_json(json_object(data, where, kRebuild), a.facts.latent_channels, where);
      } catch (const JsonError& e) {
        throw ArtifactError(e.what());
      }
    }
    a.model_hash = source_hash.empty() ? sha256_hex(manifest_bytes) : source_hash;
    for (auto& [name, files] : a.components) {
      if (external.count(name)) {  // read by the backend beside the ONNX file
        verified_manifest_file(a.root, external[name], compile_cache);
        files.external_data_entry = external[name];
      }
      files.onnx = verified_manifest_file(a.root, onnx[name], compile_cache);
      files.onnx_entry = onnx[name];
    }
  } catch (const JsonError& e) {
    malformed(mp, std::string("TypeError('") + e.what() + "')");
  }
  return a;
}

}  // namespace ldm_rt::native
