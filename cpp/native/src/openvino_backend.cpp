#include "ldm_rt/native/openvino_backend.hpp"

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <mutex>
#include <openvino/op/constant.hpp>
#include <openvino/openvino.hpp>
#include <set>
#include <sstream>

#include "ldm_rt/native/errors.hpp"
#include "ldm_rt/native/half.hpp"
#include "ldm_rt/native/lora.hpp"
#include "ldm_rt/native/sha256.hpp"

namespace ldm_rt::native {
namespace {

constexpr const char* kDevice = "CPU";

// OpenVINO's errors span many lines (source locations first); the last non-empty one says what failed.
std::string one_line(const std::exception& e) {
  std::stringstream lines(e.what());
  std::string last;
  for (std::string line; std::getline(lines, line);) {
    auto b = line.find_first_not_of(" \t\r");
    if (b != std::string::npos) last = line.substr(b, line.find_last_not_of(" \t\r") - b + 1);
  }
  return (last.empty() ? std::string("error") : last).substr(0, 200);
}

bool make_dirs(const std::string& path) {
  std::string partial;
  std::stringstream parts(path);
  if (!path.empty() && path[0] == '/') partial = "/";
  for (std::string part; std::getline(parts, part, '/');) {
    if (part.empty()) continue;
    partial += (partial.empty() || partial.back() == '/' ? "" : "/") + part;
    if (::mkdir(partial.c_str(), 0777) != 0 && errno != EEXIST) return false;
  }
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}


// openvino_backend.replace_constants: the ONNX frontend names each weight's Constant after its initializer, so the
// Constants `patch` names are replaced, before the model compiles, by ones holding the patched values (same type; same
// shape, or a grown token table, after which the model's shapes are inferred again). The base values are the
// Constant's own: the initializer's bytes, as Python reads them from the file.
void replace_constants(ov::Model& model, const WeightPatch& patch, const std::string& onnx_path) {
  std::vector<std::shared_ptr<ov::op::v0::Constant>> constants;
  std::vector<HeldWeight> held;
  for (const auto& op : model.get_ops()) {
    auto constant = std::dynamic_pointer_cast<ov::op::v0::Constant>(op);
    if (!constant) continue;
    constants.push_back(constant);
    ov::element::Type type = constant->get_element_type();
    if (type != ov::element::f32 && type != ov::element::f16) continue;
    HeldWeight w{{constant->get_friendly_name()}, {}};
    for (const auto& n : constant->output(0).get_names()) {
      if (n != w.names[0]) w.names.push_back(n);
    }
    for (auto d : constant->get_shape()) w.shape.push_back(int64_t(d));
    held.push_back(std::move(w));
  }
  std::vector<std::string> wanted = patch.weights(held);
  std::set<std::string> names(wanted.begin(), wanted.end());
  std::map<std::string, std::shared_ptr<ov::op::v0::Constant>> found;
  for (const auto& constant : constants) {
    const auto& tensor_names = constant->output(0).get_names();
    std::set<std::string> its(tensor_names.begin(), tensor_names.end());
    its.insert(constant->get_friendly_name());
    for (const auto& n : its) {
      if (names.count(n)) found[n] = constant;
    }
  }
  std::vector<std::string> missing;
  for (const auto& n : names) {
    if (!found.count(n)) missing.push_back(n);
  }
  if (!missing.empty()) {
    std::string shown;
    for (size_t k = 0; k < missing.size() && k < 3; ++k) shown += (k ? ", " : "") + missing[k];
    throw LoraError(patch.where() + ": OpenVINO's model has no constant " + shown + "; use --backend onnxruntime for this LoRA");
  }
  bool resized = false;
  for (const auto& [name, old] : found) {
    ov::element::Type type = old->get_element_type();
    if (type != ov::element::f32 && type != ov::element::f16) {
      throw LoraError(onnx_path + ": initializer " + name + " is not float32/float16; rebuild the artifacts");
    }
    ov::Shape shape = old->get_shape();
    std::vector<int64_t> dims(shape.begin(), shape.end());
    size_t count = ov::shape_size(shape);
    std::vector<float> values(count);
    if (type == ov::element::f32) {
      std::memcpy(values.data(), old->get_data_ptr(), count * sizeof(float));
    } else {
      const auto* bits = static_cast<const uint16_t*>(old->get_data_ptr());
      for (size_t k = 0; k < count; ++k) values[k] = half_to_float(bits[k]);
    }
    patch.apply(name, dims, values);
    ov::Shape patched(dims.begin(), dims.end());
    resized = resized || patched != shape;
    std::shared_ptr<ov::op::v0::Constant> fresh;
    if (type == ov::element::f32) {
      fresh = std::make_shared<ov::op::v0::Constant>(type, patched, values.data());
    } else {
      std::vector<uint16_t> out(values.size());
      for (size_t k = 0; k < values.size(); ++k) out[k] = float_to_half(values[k]);
      fresh = std::make_shared<ov::op::v0::Constant>(type, patched, out.data());
    }
    fresh->set_friendly_name(old->get_friendly_name());
    old->output(0).replace(fresh->output(0));
  }
  if (resized) model.validate_nodes_and_infer_types();
}

class OpenVinoComponent : public Component {
 public:
  OpenVinoComponent(ov::CompiledModel compiled, std::vector<std::string> outputs)
      : compiled_(std::move(compiled)), outputs_(std::move(outputs)) {}

  std::map<std::string, Tensor> run(const std::vector<Feed>& feeds) const override {
    ov::InferRequest request = borrow();
    try {
      for (const Feed& f : feeds) {
        ov::Shape shape(f.shape.begin(), f.shape.end());
        // Wraps the caller's memory (read only during infer): no copy in.
        ov::Tensor t = f.f32 != nullptr ? ov::Tensor(ov::element::f32, shape, const_cast<float*>(f.f32))
                                        : ov::Tensor(ov::element::i64, shape, const_cast<int64_t*>(f.i64));
        request.set_tensor(f.name, t);
      }
      request.infer();
      std::map<std::string, Tensor> out;
      for (const std::string& name : outputs_) {
        ov::Tensor t = request.get_tensor(name);
        if (t.get_element_type() != ov::element::f32) {
          throw BackendError("OpenVINO returned " + t.get_element_type().get_type_name() + " for " + name + "; expected f32");
        }
        Tensor result;
        for (auto d : t.get_shape()) result.shape.push_back(int64_t(d));
        const float* p = t.data<const float>();
        result.data.assign(p, p + t.get_size());
        out.emplace(name, std::move(result));
      }
      give_back(std::move(request));
      return out;
    } catch (const ov::Exception& e) {
      throw BackendError("OpenVINO failed to run the network (" + one_line(e) + ")");
    }
  }

 private:
  ov::InferRequest borrow() const {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!idle_.empty()) {
        ov::InferRequest r = std::move(idle_.back());
        idle_.pop_back();
        return r;
      }
    }
    return compiled_.create_infer_request();  // at most one per concurrent call
  }
  void give_back(ov::InferRequest r) const {
    std::lock_guard<std::mutex> lock(mutex_);
    idle_.push_back(std::move(r));
  }

  mutable ov::CompiledModel compiled_;
  std::vector<std::string> outputs_;
  mutable std::mutex mutex_;
  mutable std::vector<ov::InferRequest> idle_;
};

class OpenVinoBackend : public Backend {
 public:
  explicit OpenVinoBackend(const HostOptions& host) : warn_(host.warn) {
    try {
      precision_ = ov::element::f32;
      if (host.reduced_precision) {
        auto caps = core_.get_property(kDevice, ov::device::capabilities);
        if (std::find(caps.begin(), caps.end(), ov::device::capability::BF16) != caps.end()) {
          precision_ = ov::element::bf16;
        } else if (host.warn) {
          host.warn("this CPU has no bf16 support OpenVINO can use; computing in f32");
        }
      }
      config_.emplace(ov::inference_num_threads(host.threads > 0 ? host.threads : physical_cores()));
      config_.emplace(ov::hint::inference_precision(precision_));
      if (!host.compile_cache.empty()) {
        std::string folder = host.compile_cache + "/openvino";
        if (make_dirs(folder)) {
          cache_ = folder;  // each file's folder inside it is set as it opens
        } else if (host.warn) {
          host.warn("no compile cache: cannot create " + folder + " (" + std::strerror(errno) + "); pass --no-compile-cache to silence this");
        }
      }
    } catch (const ov::Exception& e) {
      throw BackendError("OpenVINO cannot be set up (" + one_line(e) + ")");
    }
  }

  std::string name() const override { return "openvino"; }
  std::string inference_precision() const override { return precision_ == ov::element::bf16 ? "bf16" : "f32"; }

  std::unique_ptr<Component> open(const std::string&, const ComponentFiles& files,
                                  const std::vector<const WeightPatch*>& patches) const override {
    if (precision_ == ov::element::bf16 && !files.bf16_failure.empty()) {
      if (files.bf16_failure_measured) throw BackendError(files.bf16_failure + ": run without --bf16 (reduced_precision=False)");
      if (warn_) warn_(files.bf16_failure + ": its images may drift more than a few levels in bf16");
    }
    ov::AnyMap config = config_;
    if (!cache_.empty() && patches.empty()) {
      // Compiled from its path: OpenVINO keys the cache entry on the path and the settings alone and, when the entry
      // exists, neither parses the ONNX file nor reads or hashes its weights (compiling a read model hashes every
      // weight for the key, and the first call reads them again from the blob). As the key ignores what the file
      // holds, each file has a cache folder of its own named after its manifest hash (checked at Artifacts::open),
      // so a model rebuilt in place compiles afresh: openvino_backend.py's key, to the character.
      std::string hashes = files.onnx_entry.sha256 + (files.external_data_entry ? " " + files.external_data_entry->sha256 : "");
      config.emplace(ov::cache_dir(cache_ + "/" + sha256_hex(hashes).substr(0, 24)));
      try {
        return std::make_unique<OpenVinoComponent>(core_.compile_model(files.onnx, kDevice, config), files.outputs);
      } catch (const ov::Exception& e) {
        read(files.onnx);  // an unreadable file is the artifacts' fault, said as such
        throw cannot_compile(files.onnx, e);
      }
    }
    // Patched (or no cache): read, patched, compiled without the cache.
    std::shared_ptr<ov::Model> model = read(files.onnx);
    for (const WeightPatch* patch : patches) replace_constants(*model, *patch, files.onnx);
    try {
      ov::CompiledModel compiled = core_.compile_model(model, kDevice, config);
      return std::make_unique<OpenVinoComponent>(std::move(compiled), files.outputs);
    } catch (const ov::Exception& e) {
      throw cannot_compile(files.onnx, e);
    }
  }

 private:
  static std::string version() { return ov::get_openvino_version().buildNumber; }

  std::shared_ptr<ov::Model> read(const std::string& onnx) const {
    try {
      return core_.read_model(onnx);
    } catch (const ov::Exception& e) {
      throw ArtifactError(onnx + " cannot be read by OpenVINO " + version() + " (" + one_line(e) + "); rebuild the artifacts");
    }
  }

  static BackendError cannot_compile(const std::string& onnx, const ov::Exception& e) {
    return BackendError("OpenVINO " + version() + " cannot compile " + onnx + " (" + one_line(e) + ")");
  }

  mutable ov::Core core_;  // read_model / compile_model are thread safe: at load, and for the VAE encoder on first use
  std::function<void(const std::string&)> warn_;  // HostOptions::warn
  ov::element::Type precision_;
  ov::AnyMap config_;  // threads and precision; open() adds each file's CACHE_DIR
  std::string cache_;  // <compile_cache>/openvino ("": no cache)
};

}  // namespace

int physical_cores() {
  std::set<std::pair<std::string, std::string>> cores;
  for (int cpu = 0;; ++cpu) {
    std::string dir = "/sys/devices/system/cpu/cpu" + std::to_string(cpu);
    struct stat st {};
    if (::stat(dir.c_str(), &st) != 0) break;
    std::ifstream package(dir + "/topology/physical_package_id"), core(dir + "/topology/core_id");
    std::string p, c;
    if (package >> p && core >> c) cores.emplace(p, c);
  }
  if (!cores.empty()) return int(cores.size());
  long n = ::sysconf(_SC_NPROCESSORS_ONLN);
  return n > 0 ? int(n) : 1;
}

std::string default_compile_cache() {
  const char* xdg = std::getenv("XDG_CACHE_HOME");
  if (xdg != nullptr && *xdg) return std::string(xdg) + "/ldm-rt";
  const char* home = std::getenv("HOME");
  if (home != nullptr && *home) return std::string(home) + "/.cache/ldm-rt";
  return "";
}

void check_host_options(const HostOptions& host) {
  if (host.threads < 0) {
    throw BackendError("threads must be a whole number >= 1 (or None: one per physical core), got " + std::to_string(host.threads));
  }
  long cpus = ::sysconf(_SC_NPROCESSORS_ONLN);
  if (cpus < 1) cpus = 1;
  if (host.threads > kMaxThreadsPerCpu * cpus) {
    throw BackendError("threads " + std::to_string(host.threads) + " is more than " + std::to_string(kMaxThreadsPerCpu) +
                       "x this host's " + std::to_string(cpus) + " CPUs; leave it out for one per physical core");
  }
  struct stat st {};
  if (!host.compile_cache.empty() && ::stat(host.compile_cache.c_str(), &st) == 0 && S_ISREG(st.st_mode)) {
    throw BackendError("compile cache " + host.compile_cache + " is a file; give a folder (or no cache)");
  }
}

std::unique_ptr<Backend> open_openvino(const HostOptions& host) {
  check_host_options(host);
  return std::make_unique<OpenVinoBackend>(host);
}

}  // namespace ldm_rt::native
