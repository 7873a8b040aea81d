// The backend interface (runtime/backends/base.py): one component per exported network, run with inputs and
// outputs keyed by the contract's tensor names, float tensors float32. OpenVINO's C++ API implements it
// (openvino_backend.hpp); ONNX Runtime's C API or TensorRT can sit beside it behind the same two classes.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "ldm_rt/native/artifacts.hpp"
#include "ldm_rt/native/tensor.hpp"

namespace ldm_rt::native {

// One input of a call: float32 or int64 data (exactly one set), C order, owned by the caller.
struct Feed {
  std::string name;
  std::vector<int64_t> shape;
  const float* f32 = nullptr;
  const int64_t* i64 = nullptr;
};

// One opened network. run() is thread safe: concurrent calls never share per-call state.
class Component {
 public:
  virtual ~Component() = default;
  virtual std::map<std::string, Tensor> run(const std::vector<Feed>& feeds) const = 0;
};

// How a backend uses the host (runtime/backends/base.py HostOptions).
struct HostOptions {
  int threads = 0;                 // CPU threads per operator; 0: one per physical core
  bool reduced_precision = false;  // bf16 where the CPU has it (OpenVINO); f32 otherwise
  std::string compile_cache;       // folder where compiled graphs are kept for the next process; "": none
  std::function<void(const std::string&)> warn;  // receives warnings (one line each); may be empty
};

// A float weight a network holds (an ONNX initializer, as the backend sees it): its names and shape.
struct HeldWeight {
  std::vector<std::string> names;  // the initializer's name first, then any other name the backend gives it
  std::vector<int64_t> shape;
};

// New values for some weights of a network, set as it opens (a LoRA's deltas: lora.hpp; a token table grown by
// textual-inversion rows: embeddings.hpp). The backend finds each named weight (the ONNX initializer's name), hands
// its values to apply() widened to float32 and stores the result in the weight's own type (float16 rounded as numpy's
// astype), so the files on disk are never changed.
class WeightPatch {
 public:
  virtual ~WeightPatch() = default;
  virtual const std::string& where() const = 0;  // the ONNX file as the manifest names it (messages)
  // The initializers to patch, chosen by name or among `held` (the network's float weights); throws Error.
  virtual std::vector<std::string> weights(const std::vector<HeldWeight>& held) const = 0;
  // `values` (the weight, `shape`) patched in place, or replaced by a larger tensor with `shape` updated (a token
  // table with rows added); throws Error naming what does not fit.
  virtual void apply(const std::string& weight, std::vector<int64_t>& shape, std::vector<float>& values) const = 0;
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;
  // What the backend computes in: "f32" or "bf16" (after checking what the CPU supports).
  virtual std::string inference_precision() const = 0;
  // Opens one component from its verified ONNX file, its weights patched first by `patches` in order (and then not
  // kept in the compile cache: every LoRA set and scale, or set of embeddings, would leave another compiled copy
  // behind); throws ArtifactError / BackendError / LoraError / EmbeddingError.
  virtual std::unique_ptr<Component> open(const std::string& name, const ComponentFiles& files,
                                          const std::vector<const WeightPatch*>& patches = {}) const = 0;
};

// MAX_THREADS_PER_CPU: threads per operator are bounded by 4 per logical CPU (base.HostOptions says why).
constexpr int kMaxThreadsPerCpu = 4;
// Physical cores, as base.physical_cores (hyper-threads share one core's units).
int physical_cores();
// The default compile cache: $XDG_CACHE_HOME/ldm-rt or ~/.cache/ldm-rt ("" when neither is known).
std::string default_compile_cache();
// HostOptions' checks, with base.HostOptions' messages (BackendError).
void check_host_options(const HostOptions& host);

}  // namespace ldm_rt::native
