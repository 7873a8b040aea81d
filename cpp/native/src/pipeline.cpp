#include "ldm_rt/native/pipeline.hpp"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cmath>
#include <limits>
#include <mutex>
#include <random>
#include <set>
#include <tuple>

#include "ldm_rt/native/controlnet.hpp"
#include "ldm_rt/native/embeddings.hpp"
#include "ldm_rt/native/image_ops.hpp"
#include "ldm_rt/native/jpeg_io.hpp"
#include "ldm_rt/native/json.hpp"
#include "ldm_rt/native/openvino_backend.hpp"
#include "ldm_rt/native/prompt_weights.hpp"
#include "ldm_rt/native/pyrepr.hpp"
#include "ldm_rt/native/rng.hpp"

namespace ldm_rt::native {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

std::string join(const std::vector<std::string>& items, const std::string& sep) {
  std::string out;
  for (size_t k = 0; k < items.size(); ++k) out += (k ? sep : "") + items[k];
  return out;
}

// Python's str() of a float in messages; repr for values shown with !r.
std::string num(double v) { return py_float_repr(v); }

// Compiled on first use (runtime/backends/base.py LAZY_COMPONENTS): only img2img and inpainting encode an image,
// so text-to-image never pays the encoder's compile time or its memory. Its file was hash-checked at load
// (Artifacts::open), so a corrupted one still fails the load.
bool opens_lazily(const std::string& name) { return name == "vae_encoder"; }

// A component the backend opens on its first run(); concurrent first callers wait for one open. A failed open
// is not kept (that call throws the backend's one-line error, the next tries again): std::call_once promises
// that too, but libstdc++'s has hung on an exception on some targets (GCC bug 66146), hence a plain mutex.
class LazyComponent final : public Component {
 public:
  LazyComponent(std::shared_ptr<const Backend> backend, std::string name, ComponentFiles files)
      : backend_(std::move(backend)), name_(std::move(name)), files_(std::move(files)) {}

  std::map<std::string, Tensor> run(const std::vector<Feed>& feeds) const override { return opened().run(feeds); }

 private:
  const Component& opened() const {
    std::lock_guard<std::mutex> lock(mutex_);  // taken once or twice per request: no contention worth avoiding
    if (!component_) component_ = backend_->open(name_, files_);
    return *component_;  // never reset once set, so it outlives the lock
  }

  std::shared_ptr<const Backend> backend_;  // kept for the open (OpenVINO's Core is thread safe)
  std::string name_;
  ComponentFiles files_;
  mutable std::mutex mutex_;
  mutable std::unique_ptr<Component> component_;
};

// params.as_prompts: a non-empty list of valid UTF-8 strings.
void check_prompts(const std::vector<std::string>& prompts, const std::string& what) {
  if (prompts.empty()) throw GenerationError(what + " must be a string or a non-empty list of strings, got an empty list");
  for (size_t i = 0; i < prompts.size(); ++i) {
    const std::string& p = prompts[i];
    size_t chars = 0;
    for (size_t k = 0; k < p.size(); ++chars) {
      auto c = static_cast<unsigned char>(p[k]);
      size_t n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
      bool ok = n > 0 && k + n <= p.size();
      for (size_t j = 1; ok && j < n; ++j) ok = (static_cast<unsigned char>(p[k + j]) & 0xC0) == 0x80;
      if (!ok) {
        std::string where = prompts.size() == 1 ? what : what + " " + std::to_string(i);
        // Python sees a byte that is not UTF-8 as a lone surrogate (surrogateescape) and names it so.
        char repr[16];
        std::snprintf(repr, sizeof repr, "'\\udc%02x'", unsigned(c));
        throw GenerationError(where + " is not valid text: character " + std::to_string(chars) + " (" + repr +
                              ") is not Unicode (bytes that are not UTF-8?); pass UTF-8 text");
      }
      k += n;
    }
  }
}

// guidance.combine: (2B, ...) [uncond, cond] -> (B, ...), with guidance rescale (Lin et al. 2024, Sec. 3.4).
Tensor combine(const Tensor& out, double guidance, double rescale) {
  int64_t rows = out.dim(0) / 2;
  size_t per_row = out.numel() / size_t(out.dim(0));
  std::vector<int64_t> shape = out.shape;
  shape[0] = rows;
  Tensor guided(shape);
  const float w = float(guidance);
  for (size_t r = 0; r < size_t(rows); ++r) {
    const float* u = out.data.data() + r * per_row;
    const float* c = out.data.data() + (size_t(rows) + r) * per_row;
    float* g = guided.data.data() + r * per_row;
    for (size_t k = 0; k < per_row; ++k) g[k] = u[k] + w * (c[k] - u[k]);
    if (rescale == 0.0) continue;
    auto std_of = [per_row](const float* x) {  // sample standard deviation (ddof=1), as diffusers
      double mean = 0.0;
      for (size_t k = 0; k < per_row; ++k) mean += x[k];
      mean /= double(per_row);
      double ss = 0.0;
      for (size_t k = 0; k < per_row; ++k) ss += (x[k] - mean) * (x[k] - mean);
      return float(std::sqrt(ss / double(per_row - 1)));
    };
    float std_guided = std_of(g), std_cond = std_of(c);
    float ratio = std_guided > 0 ? std_cond / std_guided : 1.0f;  // a constant row has no spread to match
    float factor = float(rescale) * ratio + float(1.0 - rescale);
    for (size_t k = 0; k < per_row; ++k) g[k] = g[k] * factor;
  }
  return guided;
}

Tensor doubled(const Tensor& x) { return Tensor::concat_rows({&x, &x}); }

// Inpainting's latent blend, in place: x where the (B, 1, h, w) mask repaints (1), `known` where it keeps (0).
void blend(Tensor& x, const Tensor& mask, const Tensor& known) {
  const size_t plane = size_t(mask.dim(2) * mask.dim(3)), per_image = x.numel() / size_t(x.dim(0));
  for (size_t k = 0; k < x.data.size(); ++k) {
    float m = mask.data[(k / per_image) * plane + k % plane];
    x.data[k] = m * x.data[k] + (1.0f - m) * known.data[k];
  }
}

// Each row of `x` `times` times in a row (np.repeat along axis 0).
template <typename T>
std::vector<T> repeat_rows(const std::vector<T>& x, size_t rows, size_t times) {
  size_t per = rows ? x.size() / rows : 0;
  std::vector<T> out;
  out.reserve(x.size() * times);
  for (size_t r = 0; r < rows; ++r) {
    for (size_t t = 0; t < times; ++t) out.insert(out.end(), x.begin() + long(r * per), x.begin() + long((r + 1) * per));
  }
  return out;
}

// pipeline.checked_latents: a float array of the latents' shape, finite, as float32 (`what`: latents or init_latents).
Tensor checked_latents(const LatentsInput& latents, const std::vector<int64_t>& shape, const std::string& what = "latents") {
  if (!latents.is_float) {
    throw GenerationError(what + " must be a float16/32/64 array of " + (what == "latents" ? "noise" : "latents") + ", got dtype " +
                          latents.dtype);
  }
  if (latents.shape != shape) {
    throw GenerationError(what + " have shape " + shape_str(latents.shape) + ", expected " + shape_str(shape) + " for " +
                          std::to_string(shape[0]) + " images with latents of " + std::to_string(shape[2]) + "x" +
                          std::to_string(shape[3]));
  }
  Tensor t;
  try {
    t = latents.values();
  } catch (const NpyError& e) {
    throw GenerationError("cannot read the " + what + ": " + e.what());
  }
  for (float v : t.data) {
    if (!std::isfinite(v)) throw GenerationError(what + " contain NaN or Inf");
  }
  return t;
}

// JSON's (and Python's repr's) list of ints: [1, 2, 3].
std::string int_list(const std::vector<int64_t>& values) {
  std::string out = "[";
  for (size_t k = 0; k < values.size(); ++k) out += (k ? ", " : "") + std::to_string(values[k]);
  return out + "]";
}

// registry.ETA_OPTIONS: the option a request's eta sets, by scheduler (diffusers passes eta to DDIM's and TCD's step,
// k-diffusion's DPM++ 2S a takes eta); Scheduler::make takes it as the name's one option.
const std::vector<std::pair<std::string, std::string>> kEtaOptions = {{"ddim", "eta"}, {"tcd", "gamma"}, {"dpmpp-2s-a", "eta"}};

// params.check_eta: none (the scheduler's default), or a number in [0, 1] for a scheduler that takes one.
std::optional<double> checked_eta(std::optional<double> eta, const std::string& scheduler) {
  if (!eta) return std::nullopt;
  if (!(*eta >= 0.0 && *eta <= 1.0)) throw GenerationError("eta must be a number in [0, 1] (0: no noise from the sampler), got " + num(*eta));
  std::vector<std::string> takes;
  bool found = false;
  for (const auto& [name, option] : kEtaOptions) {
    takes.push_back(option == "eta" ? name : name + " (as its " + option + ")");
    found = found || name == scheduler;
  }
  if (!found) throw GenerationError(scheduler + " takes no eta; eta applies to " + join(takes, ", ") + "; drop it or pick one of those");
  return eta;
}

// params.check_denoising_fraction: strictly inside (0, 1).
double checked_fraction(double value, const std::string& what) {
  if (!(value > 0.0 && value < 1.0)) {
    throw GenerationError(what + " must be a fraction of the schedule in (0, 1) (e.g. 0.8), got " + num(value));
  }
  return value;
}

// diffusers' discrete_timestep_cutoff: the timestep at `fraction` of the training schedule from its noisy end
// (Python's round(): half to even, as nearbyint in the default rounding mode).
double cutoff(const SchedulerRun& run, double fraction) {
  double t = double(run.scheduler().config().num_train_timesteps);
  return std::nearbyint(t - fraction * t);
}

// pipeline.steps_before: how many steps of `run` come before denoising_end (the timesteps >= the cutoff).
size_t steps_before(const SchedulerRun& run, double denoising_end, const std::string& scheduler) {
  double c = cutoff(run, denoising_end);
  size_t n = size_t(std::count_if(run.timesteps().begin(), run.timesteps().end(), [c](double t) { return t >= c; }));
  if (n == 0) {
    throw GenerationError("denoising_end " + num(denoising_end) + " leaves no " + scheduler + " step of this schedule; raise it or the steps");
  }
  return n;
}

// pipeline.start_at: the run from denoising_start on, as diffusers' SDXL img2img slices it (the timesteps
// below the cutoff, one more for a second-order scheduler whose count is even), with a fresh history.
std::unique_ptr<SchedulerRun> start_at(std::unique_ptr<SchedulerRun> run, double denoising_start, const std::string& scheduler) {
  double c = cutoff(*run, denoising_start);
  const std::vector<double>& all = run->all_timesteps();
  int64_t below = int64_t(std::count_if(all.begin(), all.end(), [c](double t) { return t < c; }));
  if (run->order() == 2 && below % 2 == 0) ++below;
  if (below == 0) {
    throw GenerationError("denoising_start " + num(denoising_start) + " leaves no " + scheduler +
                          " step of this schedule; lower it or raise the steps");
  }
  int64_t begin = int64_t(all.size()) - below;
  // with_strength is the one way a run starts late; it keeps int(n * strength) steps of n, so ask for n - k.
  int64_t n = run->num_inference_steps(), k = begin / run->order();
  if (begin) run = run->with_strength(std::min(1.0, (double(n - k) + 0.5) / double(n)));
  if (run->begin_index() != begin) {
    throw GenerationError(scheduler + " cannot start at denoising_start " + num(denoising_start) +
                          " (its steps do not split there); use euler, ddim or dpmpp-2m");
  }
  return run;
}

uint64_t fresh_seed() {
  std::random_device rd;  // secrets.randbits(63)
  return ((uint64_t(rd()) << 32) | uint64_t(rd())) >> 1;
}

}  // namespace

struct Pipeline::Start {
  Tensor x;                            // (B, C, h, w) initial latents
  Tensor noise;                        // the unit-variance noise they came from
  std::optional<Tensor> image_latents; // (B, C, h, w)
  std::optional<Tensor> mask;          // (B, 1, h, w), 1 = repaint
  std::optional<Tensor> masked_image_latents;
  std::optional<Image> pixels;         // the init image at the output size
  std::optional<Mask> pixel_mask;      // the mask at the output size
};

std::vector<std::string> output_paths(const std::string& path, std::size_t count, bool as_grid) {
  if (count == 1 || as_grid) return {path};
  auto slash = path.rfind('/');
  auto dot = path.rfind('.');
  std::string stem = path, suffix;
  if (dot != std::string::npos && (slash == std::string::npos || dot > slash + 1)) {
    stem = path.substr(0, dot), suffix = path.substr(dot);
  }
  std::vector<std::string> out;
  for (size_t k = 0; k < count; ++k) out.push_back(stem + "_" + std::to_string(k) + suffix);
  return out;
}

std::string output_format(const std::string& path) {
  auto slash = path.rfind('/');
  std::string name = path.substr(slash == std::string::npos ? 0 : slash + 1);
  auto dot = name.rfind('.');
  std::string suffix = dot == std::string::npos || dot == 0 ? "" : name.substr(dot);
  for (char& c : suffix) c = char(std::tolower(static_cast<unsigned char>(c)));
  if (suffix == ".png") return "PNG";
  if ((suffix == ".jpg" || suffix == ".jpeg") && jpeg_supported()) return "JPEG";
  std::string kind = suffix.empty() ? "a name without an extension" : suffix + " files";
  std::string names = jpeg_supported() ? "one of .png, .jpg, .jpeg" : ".png";
  std::string why = suffix == ".webp" ? " (ldm-rt-native was built without libwebp)"
                    : (suffix == ".jpg" || suffix == ".jpeg") ? " (ldm-rt-native was built without libjpeg)" : "";
  throw OutputError(normal_path(path) + ": cannot write " + kind + "; end the name with " + names + why);
}

std::vector<std::string> Result::save(const std::string& path, bool as_grid) const {
  if (images.empty()) throw GenerationError("this result holds latents only (generate(decode=False)); nothing to save");
  std::vector<std::string> paths = output_paths(path, images.size(), as_grid);
  std::vector<std::pair<std::string, std::vector<uint8_t>>> files;
  std::string format = output_format(path);  // before any encoding: a name we cannot write fails first
  if (as_grid) {
    Image all = grid(images);
    TextChunks text = params.grid_text();
    files.emplace_back(path, format == "PNG" ? encode_png(all, text) : encode_jpeg(all, text));
  }
  for (size_t k = 0; k < images.size() && !as_grid; ++k) {
    TextChunks text = params.text(k, images.size());
    files.emplace_back(paths[k], format == "PNG" ? encode_png(images[k], text) : encode_jpeg(images[k], text));
  }
  write_files_all_or_none(files);
  return paths;
}

std::shared_ptr<const Pipeline> Pipeline::load(const LoadOptions& options) {
  try {
    return open(options);
  } catch (const Error&) {
    throw;
  } catch (const std::invalid_argument& e) {  // the numerics' errors (tokenizer.json, scheduler config, JSON)
    throw ArtifactError(e.what());
  }
}

std::shared_ptr<const Pipeline> Pipeline::open(const LoadOptions& options) {
  if (options.precision != "fp32" && options.precision != "fp16") {
    throw BackendError("precision must be one of fp32, fp16, got '" + options.precision + "'");
  }
  check_host_options(options.host);  // before anything is opened
  Artifacts artifacts = Artifacts::open(options.model_dir, options.precision, options.host.compile_cache);
  Loras loras = Loras::load(artifacts, options.loras);  // every file read and checked before anything is compiled
  Embeddings embeddings = Embeddings::load(artifacts, options.embeddings);  // the tokenizers learn the triggers here
  std::shared_ptr<const Backend> backend = open_openvino(options.host);
  std::map<std::string, std::unique_ptr<Component>> components;
  for (const auto& [name, files] : artifacts.components) {
    // LoRAs adapt text encoders and UNets, embeddings grow text encoders' tables: never lazy components.
    std::unique_ptr<WeightPatch> lora = loras.patch(name, files), table = embeddings.patch(name, files);
    std::vector<const WeightPatch*> patches;
    for (const WeightPatch* p : {lora.get(), table.get()}) {
      if (p != nullptr) patches.push_back(p);
    }
    components.emplace(name, opens_lazily(name) ? std::make_unique<LazyComponent>(backend, name, files)
                                                : backend->open(name, files, patches));
  }
  auto pipe = std::make_shared<Pipeline>(std::move(artifacts), std::move(components), options.precision,
                                         backend->inference_precision() == "bf16" || options.host.reduced_precision,
                                         options.host.warn);
  pipe->lora_records_ = pipe->artifacts_.fused_loras;  // fused at export first, then those applied now
  for (std::string& r : loras.records()) pipe->lora_records_.push_back(std::move(r));
  pipe->embedding_records_ = pipe->artifacts_.baked_embeddings;  // baked at export first, then those added now
  for (std::string& r : embeddings.records()) pipe->embedding_records_.push_back(std::move(r));
  return pipe;
}

Pipeline::Pipeline(Artifacts artifacts, std::map<std::string, std::unique_ptr<Component>> components, std::string precision,
                   bool reduced_precision, std::function<void(const std::string&)> warn)
    : artifacts_(std::move(artifacts)),
      components_(std::move(components)),
      precision_(std::move(precision)),
      reduced_precision_(reduced_precision),
      warn_(std::move(warn)) {
  std::vector<std::string> missing;
  for (const char* name : {"unet", "vae_decoder"}) {
    if (!components_.count(name)) missing.push_back(std::string("'") + name + "'");
  }
  if (!missing.empty()) throw GenerationError("the pipeline needs the components [" + join(missing, ", ") + "]; pass them with the others");
  const ComponentFiles& unet = artifacts_.components.at("unet");
  auto takes = [&unet](const char* input) { return std::find(unet.inputs.begin(), unet.inputs.end(), input) != unet.inputs.end(); };
  if (takes("class_labels")) num_classes_ = artifacts_.facts.num_classes;
  // SDXL: the UNet's pooled text embeds come from text_encoder_2, the time ids from the request.
  if (takes("time_ids")) time_ids_ = artifacts_.facts.time_ids;
  is_refiner_ = time_ids_ == int64_t{5};
  has_text_ = components_.count("text_encoder") > 0 || components_.count("text_encoder_2") > 0;
  if (time_ids_ && !components_.count("text_encoder_2")) {
    throw GenerationError("this UNet takes SDXL's pooled text embeds and time ids, but the model has no text_encoder_2 to make them; "
                          "rebuild the artifacts from a complete SDXL model (both text encoders, or a refiner's second)");
  }
  controlnets_ = controlnet_names(artifacts_.components);
  for (const std::string& name : controlnets_) {
    std::string input = unfed_controlnet_input(artifacts_.components.at(name));
    if (!input.empty()) throw GenerationError("this model's " + name + " takes " + input + ", which ldm-rt-native does not feed; use ldm-rt sample");
  }
  for (const std::string& input : unet.inputs) {
    bool fed = input == "sample" || input == "timestep" || input == "encoder_hidden_states" ||
               (time_ids_ && (input == "text_embeds" || input == "time_ids")) || (num_classes_ && input == "class_labels") ||
               (artifacts_.facts.time_cond_proj_dim && input == "timestep_cond") || (!controlnets_.empty() && is_controlnet_residual(input));
    if (!fed) {
      throw GenerationError("this model's UNet takes " + input + ", which ldm-rt-native does not feed; use ldm-rt sample");
    }
  }
  schedulers_ = usable_schedulers(artifacts_.scheduler_config);
  if (schedulers_.usable.empty()) throw SchedulerConfigError(schedulers_.unusable.begin()->second);
  default_scheduler_ = artifacts_.default_scheduler.empty() ? "ddim" : artifacts_.default_scheduler;
  std::vector<std::string> usable = schedulers();
  if (std::find(usable.begin(), usable.end(), default_scheduler_) == usable.end()) {
    throw GenerationError("default scheduler '" + default_scheduler_ + "' cannot sample this model; use one of " + join(usable, ", "));
  }
  int64_t lc = artifacts_.facts.latent_channels, cin = artifacts_.facts.unet_in_channels;
  if (cin != lc && cin != 2 * lc + 1) {
    throw GenerationError("a UNet with " + std::to_string(cin) + " input channels for " + std::to_string(lc) +
                          " latent channels (concat conditioning) is not supported by the runtime pipeline");
  }
  inpainting_unet_ = cin == 2 * lc + 1;
}

std::vector<std::string> Pipeline::schedulers() const {
  std::vector<std::string> names;
  for (const auto& [name, _] : schedulers_.usable) names.push_back(name);
  return names;
}

std::map<std::string, Tensor> Pipeline::call(const std::string& name, const std::vector<Feed>& feeds,
                                             std::map<std::string, double>& timings, std::optional<int64_t> step) const {
  auto t0 = Clock::now();
  std::map<std::string, Tensor> outs = components_.at(name)->run(feeds);
  timings[name] += seconds_since(t0);
  for (const auto& [key, value] : outs) {
    for (float v : value.data) {
      if (!std::isfinite(v)) {
        std::string where = step ? " at step " + std::to_string(*step) : "";
        std::string hint = precision_ == "fp16" ? " (fp16 overflow? try --precision fp32)" : "";
        throw GenerationError(name + " produced non-finite values in " + key + where + hint);
      }
    }
  }
  return outs;
}

std::pair<Tensor, std::optional<Tensor>> Pipeline::encode_prompts(const GenerationParams& p, bool use_cfg,
                                                                  std::map<std::string, double>& timings) const {
  // Rows are [uncond..., cond...] under guidance, each prompt `batch` times in a row (as diffusers). SDXL: the
  // context is [text_encoder's, text_encoder_2's] penultimate layers on the channel axis (a refiner: the
  // second's alone), each encoder reading its own tokenizer's ids; pooled is text_encoder_2's projection. With
  // force_zeros_for_empty_prompt an empty negative prompt is zeros in both, and is not encoded at all.
  size_t prompts = p.prompts.size();
  std::vector<bool> zero(prompts, false);
  std::vector<std::string> negatives;
  if (use_cfg) {
    std::vector<bool> uncond_zero;
    for (const std::string& n : p.negative_prompts) {
      bool z = artifacts_.facts.force_zeros_for_empty_prompt && n.empty();
      uncond_zero.push_back(z);
      if (!z) negatives.push_back(n);
    }
    zero.insert(zero.begin(), uncond_zero.begin(), uncond_zero.end());
  }
  // Each prompt in up to `most` chunks of the encoder's length (--prompt-chunks; runtime/pipeline.py
  // _encode_prompts): every row takes as many as the longest prompt or negative prompt needs, the shorter padded
  // with the empty prompt's chunk, and the chunks' states follow one another on the token axis.
  auto [least, most] = artifacts_.prompt_chunks;
  std::vector<std::pair<const char*, const PromptTokenizer*>> encoders;
  for (const char* name : {"text_encoder", "text_encoder_2"}) {
    if (components_.count(name)) encoders.emplace_back(name, std::string(name) == "text_encoder" ? &*artifacts_.tokenizer : &*artifacts_.tokenizer_2);
  }
  std::vector<std::vector<IdTensor>> tokenized;  // per encoder, each row's (n_i, L) chunks: [uncond..., cond...]
  std::vector<std::vector<Tensor>> weights;      // per encoder, each row's (n_i, L) token weights (weighting)
  const bool weighting = p.prompt_weighting;
  int64_t n = least;
  for (size_t e = 0; e < encoders.size(); ++e) {
    const PromptTokenizer& tok = *encoders[e].second;
    // SDXL's second tokenizer reads the same words with the same vocabulary, so only the first warns.
    auto tokenize = [&](const std::vector<std::string>& texts, const char* what) {
      TokenizedPrompts t = weighting ? tokenize_weighted(tok, texts, most) : tok.encode(texts, most);
      if (e == 0) {
        for (const std::string& w : weighting ? weighted_warnings(tok, texts, t, what) : tok.warnings(texts, t, what)) warn(w);
      }
      return t;
    };
    TokenizedPrompts cond = tokenize(p.prompts, "prompt");
    std::vector<IdTensor> rows;
    std::vector<Tensor> row_weights;
    if (!negatives.empty()) {
      TokenizedPrompts uncond = tokenize(negatives, "negative prompt");
      rows = std::move(uncond.chunks);
      row_weights = std::move(uncond.weights);
    }
    rows.insert(rows.end(), cond.chunks.begin(), cond.chunks.end());
    row_weights.insert(row_weights.end(), cond.weights.begin(), cond.weights.end());
    for (const IdTensor& c : rows) n = std::max(n, c.shape[0]);
    tokenized.push_back(std::move(rows));
    weights.push_back(std::move(row_weights));
  }
  std::vector<Tensor> parts;
  std::optional<Tensor> pooled;
  for (size_t e = 0; e < encoders.size(); ++e) {
    const auto& [name, tok] = encoders[e];
    std::vector<int64_t> empty = tok->encode({std::string()}).ids.data, ids;  // (rows, n, L)
    for (const IdTensor& c : tokenized[e]) {
      ids.insert(ids.end(), c.data.begin(), c.data.end());
      for (int64_t k = c.shape[0]; k < n; ++k) ids.insert(ids.end(), empty.begin(), empty.end());
    }
    size_t rows = tokenized[e].size();
    ids = repeat_rows(ids, rows, size_t(p.batch));
    Feed feed{"input_ids", {int64_t(rows) * p.batch * n, tok->max_length()}, nullptr, ids.data()};
    std::map<std::string, Tensor> outs = call(name, {feed}, timings);
    Tensor states = std::move(outs.at("last_hidden_state"));  // (rows x n, L, D): one row's chunks in a row
    states.shape = {states.dim(0) / n, n * states.dim(1), states.dim(2)};
    parts.push_back(weighting ? emphasize(states, weights[e], p.batch) : std::move(states));
    if (auto it = outs.find("text_embeds"); it != outs.end()) {  // the first chunk's pooled output
      const Tensor& all = it->second;
      Tensor first({all.dim(0) / n, all.dim(1)});
      for (int64_t r = 0; r < first.dim(0); ++r) std::copy_n(all.data.data() + r * n * all.dim(1), all.dim(1), first.data.data() + r * all.dim(1));
      pooled = std::move(first);
    }
  }
  Tensor context = std::move(parts[0]);
  if (parts.size() > 1) {  // (rows, L, D1 + D2)
    const Tensor& b = parts[1];
    int64_t d1 = context.dim(2), d2 = b.dim(2), positions = context.dim(0) * context.dim(1);
    Tensor both({context.dim(0), context.dim(1), d1 + d2});
    for (int64_t q = 0; q < positions; ++q) {
      std::copy_n(context.data.data() + q * d1, d1, both.data.data() + q * (d1 + d2));
      std::copy_n(b.data.data() + q * d2, d2, both.data.data() + q * (d1 + d2) + d1);
    }
    context = std::move(both);
  }
  if (std::find(zero.begin(), zero.end(), true) != zero.end()) {  // the zero rows back in their places
    auto spread = [&](const Tensor& t) {
      std::vector<int64_t> shape = t.shape;
      shape[0] = int64_t(zero.size()) * p.batch;
      Tensor full(shape);
      size_t per_row = t.numel() / size_t(t.dim(0)), from = 0;
      for (size_t row = 0; row < size_t(shape[0]); ++row) {
        if (zero[row / size_t(p.batch)]) continue;
        std::copy_n(t.data.data() + from * per_row, per_row, full.data.data() + row * per_row);
        ++from;
      }
      return full;
    };
    context = spread(context);
    if (pooled) pooled = spread(*pooled);
  }
  return {std::move(context), std::move(pooled)};
}

Tensor Pipeline::encode_image(const std::vector<float>& image, int64_t h, int64_t w, std::map<std::string, double>& timings) const {
  Feed feed{"image", {1, 3, h, w}, image.data(), nullptr};
  Tensor params = call("vae_encoder", {feed}, timings).at("latent_parameters");  // (1, 2C or C, h, w)
  int64_t lc = artifacts_.facts.latent_channels;
  size_t plane = size_t(params.dim(2)) * size_t(params.dim(3));
  Tensor mean({1, lc, params.dim(2), params.dim(3)});
  const float scale = float(artifacts_.facts.scale_factor);
  for (size_t k = 0; k < size_t(lc) * plane; ++k) mean.data[k] = params.data[k] * scale;  // KL: the posterior mean
  return mean;
}

std::optional<std::vector<int64_t>> Pipeline::class_labels(const std::optional<std::vector<int64_t>>& given) const {
  if (!num_classes_) {
    if (given) throw GenerationError("this model is not class-conditional; drop class_labels");
    return std::nullopt;
  }
  std::string range = "[0, " + std::to_string(*num_classes_) + ")";
  if (!given) throw GenerationError("this model is class-conditional: pass class_labels (ints in " + range + ")");
  bool bad = given->empty() || std::any_of(given->begin(), given->end(), [this](int64_t c) { return c < 0 || c >= *num_classes_; });
  if (bad) throw GenerationError("class_labels must be ints in " + range + ", got " + int_list(*given));
  return given;
}

const PreviewFactors* Pipeline::fast_preview_factors() const {
  const std::optional<PreviewFactors>& factors = artifacts_.preview_factors;
  if (!previews_announced_.exchange(true)) {
    if (!factors) {
      warn("no fast preview factors in this model's folder (built before step previews): previews are full VAE decodes; "
           "rebuild the artifacts (or run ldm_rt.export.preview_fit.refresh_preview_factors on the folder) for fast ones");
    } else if (factors->psnr_db && *factors->psnr_db < kPoorFitDb) {
      char db[32];
      std::snprintf(db, sizeof db, "%.1f", *factors->psnr_db);
      warn(std::string("fast previews fit this model's VAE poorly (") + db +
           " dB on held-out images); full previews are exact (preview_kind='full', --preview-kind full)");
    }
  }
  return factors ? &*factors : nullptr;
}

Result Pipeline::generate(const Request& r) const {
  try {
    std::optional<ControlRequest> control = make_control_request(
        controlnets_.size(), r.control_images, r.controlnet_conditioning_scale, r.control_guidance_start, r.control_guidance_end, r.guess_mode);
    if (r.refiner) {
      if (control) throw GenerationError("refiner= with ControlNets is not supported; sample the ControlNet artifacts without a refiner");
      if (r.denoising_start || r.denoising_end || r.init_latents || !r.decode) {
        throw GenerationError("refiner= splits the schedule itself; drop denoising_start, denoising_end, init_latents and decode=False");
      }
      return with_refiner(r);
    }
    if (r.refiner_start) {
      throw GenerationError("refiner_start needs refiner: the pipeline that takes over at that fraction of the schedule");
    }
    Stage stage;
    stage.denoising_start = r.denoising_start, stage.denoising_end = r.denoising_end, stage.decode = r.decode;
    stage.control = control ? &*control : nullptr;
    return run_request(r, stage);
  } catch (const Error&) {
    throw;
  } catch (const std::invalid_argument& e) {  // the numerics' errors (scheduler, tokenizer): one type for callers
    throw GenerationError(e.what());
  }
}

Result Pipeline::with_refiner(const Request& r) const {
  const Pipeline& refiner = *r.refiner;
  if (r.mask) throw GenerationError("refiner= does not inpaint; inpaint without a refiner");
  if (is_refiner_) {
    throw GenerationError("the base model is an SDXL refiner (its UNet reads an aesthetic score); pass the base model as the "
                          "pipeline (--model) and the refiner as refiner= (--refiner)");
  }
  if (!refiner.time_ids_) {
    throw GenerationError("the refiner is not an SDXL model (its UNet takes no time ids); pass an SDXL refiner's artifacts");
  }
  double start = checked_fraction(r.refiner_start.value_or(kRefinerStart), "refiner_start");
  const ModelFacts &mine = artifacts_.facts, &theirs = refiner.artifacts_.facts;
  for (auto [fact, a, b] : {std::tuple<const char*, std::string, std::string>{"latent_channels", std::to_string(theirs.latent_channels), std::to_string(mine.latent_channels)},
                            {"latent_factor", std::to_string(theirs.latent_factor), std::to_string(mine.latent_factor)},
                            {"scale_factor", num(theirs.scale_factor), num(mine.scale_factor)}}) {
    if (a != b) {
      throw GenerationError(std::string("the refiner's latents differ from this model's (") + fact + " " + a + " != " + b +
                            "); pair a base and a refiner that share their autoencoder");
    }
  }
  // Each model reads the micro-conditioning its time ids hold (SDXL's refiner: aesthetic scores, no target size).
  MicroRequest base_micro = r.micro.read_by(time_ids_), refiner_micro = r.micro.read_by(refiner.time_ids_);
  std::vector<std::string> unused, read = base_micro.given(), also = refiner_micro.given();
  read.insert(read.end(), also.begin(), also.end());
  for (const std::string& name : r.micro.given()) {
    if (std::find(read.begin(), read.end(), name) == read.end()) unused.push_back(name);
  }
  std::sort(unused.begin(), unused.end());
  if (!unused.empty()) throw GenerationError("neither the base nor the refiner reads " + join(unused, ", ") + "; drop them");
  uint64_t seed = r.seed ? *r.seed : fresh_seed();
  Generator rng(seed);  // one for both (diffusers' recipe passes one generator to both pipelines)

  Request base_request = r;
  base_request.refiner.reset();
  base_request.refiner_start.reset();
  base_request.seed = seed;
  if (base_request.scheduler.empty()) base_request.scheduler = default_scheduler_;  // the base's, for both
  base_request.micro = base_micro;
  Stage base_stage;
  base_stage.rng = &rng, base_stage.denoising_end = start, base_stage.decode = false;
  Result base = run_request(base_request, base_stage);

  Request refiner_request = base_request;
  refiner_request.latents.reset(), refiner_request.init_image.reset(), refiner_request.strength.reset();
  refiner_request.height = base.params.height, refiner_request.width = base.params.width;
  refiner_request.micro = refiner_micro;
  Stage refiner_stage;
  refiner_stage.rng = &rng, refiner_stage.init_latents = &base.latents, refiner_stage.denoising_start = start;
  Result refined = refiner.run_request(refiner_request, refiner_stage);

  GenerationParams& p = refined.params;
  p.mode = base.params.mode + "+refiner";
  p.extra["refiner_start"] = num(start);
  p.extra["base_model_hash"] = json_quote(artifacts_.model_hash, true);
  for (const auto& [name, value] : base.params.micro) p.extra["base_" + name] = value;
  if (r.init_image) p.extra["base_strength"] = num(base.params.strength);
  double total = base.timings["total"] + refined.timings["total"];
  for (const auto& [stage, seconds] : base.timings) refined.timings["base_" + stage] = seconds;
  refined.timings["total"] = total;
  return refined;
}

Result Pipeline::run_request(const Request& r, const Stage& stage) const {
  auto start_time = Clock::now();
  check_prompts(r.prompts, "prompt");
  check_preview(r.preview_every, r.preview_kind);
  // Where the run starts from latents: the hand-off's (stage), or the caller's (Request::init_latents).
  const bool from_latents = stage.init_latents || r.init_latents;
  if (r.mask && !r.init_image) throw GenerationError("mask needs init_image: inpainting repaints part of an image");
  if (r.strength && !r.init_image && !from_latents) {
    throw GenerationError("strength needs init_image: it is the fraction of the schedule run from that image");
  }
  if (r.mask_blur && *r.mask_blur != 0.0 && !r.mask) {
    throw GenerationError("mask_blur needs mask: it softens the seam of the inpainted region");
  }
  if (inpainting_unet_ && !r.mask) throw GenerationError("this is an inpainting model: pass init_image and mask");
  if (stage.denoising_start) checked_fraction(*stage.denoising_start, "denoising_start");
  if (stage.denoising_end) checked_fraction(*stage.denoising_end, "denoising_end");
  if (is_refiner_ && !r.init_image && !from_latents) {
    throw GenerationError("this model is an SDXL refiner: it continues from an image or latents, it does not start from noise; "
                          "pass init_image (img2img), or use it as the refiner of a base model (refiner=, --refiner)");
  }
  if (from_latents && r.init_image) throw GenerationError("pass init_image or init_latents, not both: both are the starting point");
  if (stage.denoising_start) {
    if (!from_latents) {
      throw GenerationError("denoising_start needs init_latents: the latents an earlier pipeline stopped at (denoising_end)");
    }
    if (r.strength) throw GenerationError("denoising_start decides where the schedule starts; drop strength");
    if (stage.denoising_end && *stage.denoising_end <= *stage.denoising_start) {
      throw GenerationError("denoising_end " + num(*stage.denoising_end) + " must be after denoising_start " + num(*stage.denoising_start));
    }
  }
  double strength_in = r.strength ? *r.strength : r.mask ? kInpaintStrength : kImg2ImgStrength;
  std::optional<int64_t> height = r.height, width = r.width;
  if (r.init_image) {
    const Image& im = *r.init_image;
    if (im.width < 1 || im.height < 1 || im.rgb.size() != size_t(im.width) * size_t(im.height) * 3) {
      throw ImageInputError("init image must be uint8 (H, W, 3), got " + std::to_string(im.rgb.size()) + " bytes for " +
                            std::to_string(im.width) + "x" + std::to_string(im.height));
    }
    if (int64_t(im.width) * im.height > kMaxInputPixels) {
      throw ImageInputError("init image is " + std::to_string(im.width) + "x" + std::to_string(im.height) +
                            ", over the limit of 67.1 MP (8192x8192); downscale it first");
    }
    if (!height) height = im.height;
    if (!width) width = im.width;
  }
  if (r.init_latents && r.init_latents->shape.size() == 4) {  // the latents' own size, as diffusers' refiner reads it
    const int64_t lf = artifacts_.facts.latent_factor;
    if (!height) height = r.init_latents->shape[2] * lf;
    if (!width) width = r.init_latents->shape[3] * lf;
  }
  std::optional<std::vector<int64_t>> labels = class_labels(r.class_labels);
  std::vector<std::string> prompts = r.prompts;
  if (labels && prompts.size() == 1 && labels->size() > 1) prompts.assign(labels->size(), prompts[0]);  // one per label
  bool has_text = has_text_;
  if (!has_text) {
    for (const auto& p : prompts) {
      if (!p.empty()) throw GenerationError("this model has no text encoder and takes no prompt; pass prompt=''");
    }
  }

  // ---- params.make_params -----------------------------------------------------------------------------
  GenerationParams p;
  p.prompts = prompts;
  check_prompts(r.negative_prompts, "negative_prompt");
  p.negative_prompts = r.negative_prompts;
  if (p.negative_prompts.size() == 1) p.negative_prompts.assign(p.prompts.size(), r.negative_prompts[0]);
  if (p.negative_prompts.size() != p.prompts.size()) {
    throw GenerationError("got " + std::to_string(r.negative_prompts.size()) + " negative prompts for " +
                          std::to_string(p.prompts.size()) + " prompts; give one, or one per prompt");
  }
  if (r.steps < 1) throw GenerationError("steps must be >= 1, got " + std::to_string(r.steps));
  p.steps = r.steps;
  if (!std::isfinite(r.guidance)) throw GenerationError("guidance must be a finite number, got " + num(r.guidance));
  p.guidance = r.guidance;
  const auto& names = scheduler_names();
  p.scheduler = r.scheduler.empty() ? default_scheduler_ : r.scheduler;
  if (std::find(names.begin(), names.end(), p.scheduler) == names.end()) {
    throw GenerationError("unknown scheduler '" + p.scheduler + "'; choose one of " + join(names, ", "));
  }
  p.seed = r.seed ? *r.seed : fresh_seed();
  if (r.batch < 1) throw GenerationError("batch must be >= 1, got " + std::to_string(r.batch));
  p.batch = r.batch;
  const ShapeProfile& profile = artifacts_.profile;
  int64_t images = p.images();
  std::string per_call = std::to_string(images) + " images per call (" + std::to_string(p.prompts.size()) +
                         " prompts x batch " + std::to_string(p.batch) + ")";
  if (images > kMaxImagesPerCall) {
    throw GenerationError(per_call + " is over the runtime's limit of " + std::to_string(kMaxImagesPerCall) +
                          "; generate them in several calls");
  }
  if (images < profile.batch[0] || images > profile.batch[2]) {
    throw GenerationError(per_call + " is outside the artifacts' batch range [" + std::to_string(profile.batch[0]) + ", " +
                          std::to_string(profile.batch[2]) + "]; rebuild with a wider --batch-range");
  }
  int64_t multiple = artifacts_.facts.pixel_multiple();
  for (auto [name, value, range] : {std::tuple<const char*, std::optional<int64_t>, std::array<int64_t, 3>>{"height", height, profile.height},
                                    {"width", width, profile.width}}) {
    int64_t v = value ? *value : range[1];
    if (v % multiple != 0 || v < range[0] || v > range[2]) {
      throw GenerationError(std::string(name) + " " + std::to_string(v) + " must be a multiple of " + std::to_string(multiple) +
                            " in [" + std::to_string(range[0]) + ", " + std::to_string(range[2]) +
                            "] for these artifacts; rebuild with a wider --" + name + "-range for other sizes");
    }
    (std::string(name) == "height" ? p.height : p.width) = v;
  }
  if (images * p.height * p.width > kMaxPixelsPerCall) {
    throw GenerationError(std::to_string(images) + " images of " + std::to_string(p.width) + "x" + std::to_string(p.height) +
                          " in one call is over the runtime's limit of " + std::to_string(kMaxPixelsPerCall) +
                          " pixels per call; generate them in several calls");
  }
  if (!(strength_in > 0.0 && strength_in <= 1.0)) throw GenerationError("strength must be in (0, 1], got " + num(strength_in));
  p.strength = strength_in;
  if (!(r.guidance_rescale >= 0.0 && r.guidance_rescale <= 1.0)) {
    throw GenerationError("guidance_rescale must be in [0, 1] (0: plain guidance; 0.7 as Lin et al.), got " + num(r.guidance_rescale));
  }
  p.guidance_rescale = r.guidance_rescale;
  if (r.mask_blur) {
    int64_t largest = std::max(p.height, p.width);
    if (!(*r.mask_blur >= 0.0 && *r.mask_blur <= double(largest))) {
      throw GenerationError("mask_blur must be a number of pixels in [0, " + std::to_string(largest) + "] (0: hard edge), got " +
                            num(*r.mask_blur));
    }
  }
  p.mask_blur = r.mask_blur;
  p.model_hash = artifacts_.model_hash;
  p.precision = precision_;
  p.reduced_precision = reduced_precision_;
  p.mode = r.mask ? "inpaint" : r.init_image ? "img2img" : "txt2img";
  p.prompt_weighting = r.prompt_weighting;
  if (!lora_records_.empty()) p.extra["loras"] = "[" + join(lora_records_, ", ") + "]";
  if (!embedding_records_.empty()) p.extra["embeddings"] = "[" + join(embedding_records_, ", ") + "]";
  std::optional<MicroConditioning> micro = make_micro_conditioning(time_ids_, p.height, p.width, r.micro);
  if (micro) p.micro = micro->to_json(*time_ids_);
  if (labels && labels->size() != p.prompts.size()) {
    throw GenerationError(std::to_string(labels->size()) + " class labels for " + std::to_string(p.prompts.size()) +
                          " prompts; pass one per prompt");
  }

  const ModelFacts& f = artifacts_.facts;
  std::vector<int64_t> shape = {images, f.latent_channels, p.height / f.latent_factor, p.width / f.latent_factor};
  std::optional<Tensor> given_noise, given_init;
  if (r.latents) given_noise = checked_latents(*r.latents, shape);
  if (r.init_latents) given_init = checked_latents(*r.init_latents, shape, "init_latents");
  const Tensor* init_latents = stage.init_latents ? stage.init_latents : given_init ? &*given_init : nullptr;

  // ---- scheduler ----------------------------------------------------------------------------------------
  if (auto it = schedulers_.unusable.find(p.scheduler); it != schedulers_.unusable.end()) {
    throw GenerationError(it->second + "; this model can use " + join(schedulers(), ", "));
  }
  std::optional<double> eta = checked_eta(r.eta, p.scheduler);
  std::shared_ptr<const Scheduler> scheduler;
  for (const auto& [name, s] : schedulers_.usable) {
    if (name == p.scheduler) scheduler = eta ? Scheduler::make(name, artifacts_.scheduler_config, eta) : s;
  }
  int64_t fewest = scheduler->fewest_sound_steps();
  if (p.steps < fewest) {
    warn(p.scheduler + " has given broken images on this model's schedule below " + std::to_string(fewest) + " steps; running " +
         std::to_string(p.steps) + " (use more steps or another scheduler)");
  }
  std::unique_ptr<SchedulerRun> run = scheduler->set_timesteps(p.steps);
  if (stage.denoising_start) {
    run = start_at(std::move(run), *stage.denoising_start, p.scheduler);
  } else if (r.init_image || init_latents) {
    run = run->with_strength(p.strength);
  }
  size_t num_steps = stage.denoising_end ? steps_before(*run, *stage.denoising_end, p.scheduler) : run->size();

  std::map<std::string, double> timings;
  // manifest GUIDANCE: guidance <= 1.0 skips the unconditional half; an LCM-distilled UNet takes guidance as its
  // timestep_cond input instead, with no unconditional half at all.
  const std::optional<int64_t> lcm_dim = f.time_cond_proj_dim;
  bool use_cfg = has_text && p.guidance > 1.0 && !lcm_dim;
  if (lcm_dim && std::any_of(p.negative_prompts.begin(), p.negative_prompts.end(), [](const std::string& n) { return !n.empty(); })) {
    warn("this LCM-distilled model takes guidance as an embedding, with no unconditional batch: the negative prompt is not used");
  }
  std::optional<Tensor> context, pooled;
  if (has_text) std::tie(context, pooled) = encode_prompts(p, use_cfg, timings);
  // SDXL's UNet inputs besides the context: text_embeds (rows, P) and time_ids (rows, N), rows as the context's.
  std::optional<Tensor> time_ids;
  if (time_ids_ && micro && pooled) {
    auto [cond, uncond] = micro->time_ids(*time_ids_);
    int64_t n = int64_t(cond.size());
    Tensor ids({(use_cfg ? 2 : 1) * images, n});
    float* at = ids.data.data();
    for (const std::vector<float>* row : {use_cfg ? &uncond : nullptr, &cond}) {
      for (int64_t b = 0; row && b < images; ++b, at += n) std::copy(row->begin(), row->end(), at);
    }
    time_ids = std::move(ids);
  }
  std::optional<Generator> own;
  if (!stage.rng) own.emplace(p.seed);
  Generator& rng = stage.rng ? *stage.rng : *own;
  Tensor noise;  // continued latents add no noise, so none is drawn (diffusers draws none)
  if (given_noise) {
    noise = std::move(*given_noise);
  } else if (!stage.denoising_start) {
    noise = rng.standard_normal(shape);  // drawn first
  }

  // ---- the starting point (Pipeline._start) ------------------------------------------------------------
  Start start;
  start.noise = noise;
  const float sigma0 = float(run->init_noise_sigma());
  auto scaled_noise = [&] {
    Tensor x = noise;
    for (float& v : x.data) v = v * sigma0;
    return x;
  };
  if (stage.denoising_start) {
    start.x = *init_latents;  // continue where the other pipeline stopped
  } else if (init_latents) {  // img2img from latents
    start.image_latents = *init_latents;
    start.x = run->add_noise(*init_latents, noise, 0);
  } else if (!r.init_image) {
    start.x = scaled_noise();
  } else {
    Image pixels = resize_lanczos(*r.init_image, int(p.height), int(p.width));
    Tensor image = image_to_model(pixels);  // (1, 3, H, W)
    Tensor one = encode_image(image.data, p.height, p.width, timings);
    std::vector<const Tensor*> copies(size_t(images), &one);
    start.image_latents = Tensor::concat_rows(copies);  // (B, C, h, w)
    if (!r.mask) {
      start.x = run->add_noise(*start.image_latents, noise, 0);
    } else {
      const Mask& given = *r.mask;
      if (given.width < 1 || given.height < 1 || given.values.size() != size_t(given.width) * size_t(given.height)) {
        throw ImageInputError("mask must be (H, W), got " + std::to_string(given.values.size()) + " values for " +
                              std::to_string(given.width) + "x" + std::to_string(given.height));
      }
      for (float v : given.values) {
        if (!std::isfinite(v)) throw ImageInputError("mask contains NaN or Inf; give values in [0, 1] (1 = repaint, 0 = keep)");
        if (v < 0.0f || v > 1.0f) throw ImageInputError("mask values must lie in [0, 1]; scale it first");
      }
      Mask pixel_mask = resize_lanczos(given, int(p.height), int(p.width));
      int64_t lf = f.latent_factor, h = shape[2], w = shape[3];
      Tensor latent_mask({images, 1, h, w});
      for (int64_t y = 0; y < h; ++y) {
        for (int64_t x = 0; x < w; ++x) {  // nearest downsampling of the binarised mask, m[::f, ::f]
          float m = pixel_mask.values[size_t(y * lf) * size_t(p.width) + size_t(x * lf)] >= 0.5f ? 1.0f : 0.0f;
          for (int64_t b = 0; b < images; ++b) latent_mask.data[size_t((b * h + y) * w + x)] = m;
        }
      }
      if (inpainting_unet_) {
        Tensor masked = image;
        size_t plane = size_t(p.height) * size_t(p.width);
        for (size_t c = 0; c < 3; ++c) {
          for (size_t q = 0; q < plane; ++q) {
            if (pixel_mask.values[q] >= 0.5f) masked.data[c * plane + q] = 0.0f;
          }
        }
        Tensor enc = encode_image(masked.data, p.height, p.width, timings);
        std::vector<const Tensor*> reps(size_t(images), &enc);
        start.masked_image_latents = Tensor::concat_rows(reps);
      }
      start.x = p.strength == 1.0 ? scaled_noise() : run->add_noise(*start.image_latents, noise, 0);
      start.mask = std::move(latent_mask);
      start.pixels = std::move(pixels);
      start.pixel_mask = std::move(pixel_mask);
    }
  }

  // ControlNets see the UNet's per-request inputs (guess mode: the conditional half).
  std::optional<ControlRun> control;
  if (stage.control) control.emplace(*stage.control, artifacts_, p.height, p.width, images, run->size(), use_cfg, context, pooled, time_ids);

  // Decoder output -> the images (previews' too): 8 bits, inpainting's kept pixels pasted back.
  auto finish = [&](const Tensor& decoded) {
    std::vector<Image> images = to_uint8(decoded);
    if (start.pixel_mask && p.mask_blur) paste_kept(images, *start.pixels, *start.pixel_mask, *p.mask_blur);
    return images;
  };
  // ---- step previews (runtime/previews.py Previewer) ----------------------------------------------------
  const PreviewFactors* factors = r.preview && r.preview_kind == "fast" ? fast_preview_factors() : nullptr;
  // "full" when the final image is decoded anyway: the last preview is that image, not a second decode.
  const bool defer_final = stage.decode && !factors;
  std::optional<int64_t> pending;  // the deferred last preview's step
  auto show = [&](size_t i, Tensor latents, bool final) {  // step i's preview of x0 (the final latents when final)
    if (final && defer_final) {
      pending = int64_t(i);
      return;
    }
    auto t0 = Clock::now();
    // An x0 estimate can be inf where alpha_bar is 0 (epsilon prediction at zero terminal SNR): np.nan_to_num to 0.
    for (float& v : latents.data) v = std::isfinite(v) ? v : 0.0f;
    Tensor decoded;
    if (factors) {
      decoded = factors->to_rgb(latents, f.latent_factor);
    } else {  // the decoder's run, not call(): a non-finite preview must not end the run
      Feed latent{"latent", latents.shape, latents.data.data(), nullptr};
      decoded = components_.at("vae_decoder")->run({latent}).at("image");
      for (float& v : decoded.data) {  // np.nan_to_num: NaN 0, +-inf the largest finite float32
        v = std::isnan(v) ? 0.0f : std::isinf(v) ? std::copysign(std::numeric_limits<float>::max(), v) : v;
      }
    }
    std::vector<Image> images = finish(decoded);
    timings["preview"] += seconds_since(t0);
    r.preview(int64_t(i), int64_t(num_steps), images);
  };

  // ---- the loop (Pipeline._denoise) --------------------------------------------------------------------
  std::vector<int64_t> unet_labels;  // (B or 2B,): each prompt's label `batch` times, [uncond, cond] under guidance
  if (labels) unet_labels = repeat_rows(*labels, labels->size(), size_t(p.batch));
  const std::vector<int64_t> recorded_labels = unet_labels;
  if (use_cfg) unet_labels.insert(unet_labels.end(), recorded_labels.begin(), recorded_labels.end());
  std::optional<Tensor> timestep_cond;  // (B, time_cond_proj_dim), the same every step
  if (lcm_dim) timestep_cond = guidance_embedding(p.guidance, *lcm_dim, images);
  Tensor x = start.x;
  size_t n = run->size();
  for (size_t i = 0; i < num_steps; ++i) {
    double t = run->timesteps()[i];
    Tensor x_in = run->scale_model_input(x, i);
    if (inpainting_unet_) {  // (B, 2C+1, h, w): [x_in, mask, masked image latents] along channels
      int64_t c = f.latent_channels, plane = shape[2] * shape[3];
      Tensor cat({images, 2 * c + 1, shape[2], shape[3]});
      for (int64_t b = 0; b < images; ++b) {
        float* dst = cat.data.data() + size_t(b * (2 * c + 1) * plane);
        std::copy_n(x_in.data.data() + size_t(b * c * plane), size_t(c * plane), dst);
        std::copy_n(start.mask->data.data() + size_t(b * plane), size_t(plane), dst + c * plane);
        std::copy_n(start.masked_image_latents->data.data() + size_t(b * c * plane), size_t(c * plane), dst + (c + 1) * plane);
      }
      x_in = std::move(cat);
    }
    if (use_cfg) x_in = doubled(x_in);  // (2B, ...) [uncond, cond]
    std::vector<float> timestep(size_t(x_in.dim(0)), float(t));
    std::vector<Feed> feeds = {{"sample", x_in.shape, x_in.data.data(), nullptr},
                               {"timestep", {x_in.dim(0)}, timestep.data(), nullptr}};
    if (context) feeds.push_back({"encoder_hidden_states", context->shape, context->data.data(), nullptr});
    if (time_ids) {
      feeds.push_back({"text_embeds", pooled->shape, pooled->data.data(), nullptr});
      feeds.push_back({"time_ids", time_ids->shape, time_ids->data.data(), nullptr});
    }
    if (!unet_labels.empty()) feeds.push_back({"class_labels", {int64_t(unet_labels.size())}, nullptr, unet_labels.data()});
    if (timestep_cond) feeds.push_back({"timestep_cond", timestep_cond->shape, timestep_cond->data.data(), nullptr});
    std::vector<std::pair<std::string, Tensor>> residuals;
    if (control) {  // the ControlNets' summed residuals for this step (controlnet.hpp), timed together
      residuals = control->residuals(i, x_in, t, [&](const std::string& name, const std::vector<Feed>& f) {
        std::map<std::string, double> own;
        std::map<std::string, Tensor> outs = call(name, f, own, int64_t(i));
        timings["controlnet"] += own[name];
        return outs;
      });
      for (const auto& [name, value] : residuals) feeds.push_back({name, value.shape, value.data.data(), nullptr});
    }
    Tensor out = call("unet", feeds, timings, int64_t(i)).at("out_sample");
    Tensor eps = use_cfg ? combine(out, p.guidance, p.guidance_rescale) : std::move(out);
    // The x0 estimate (before the step overwrites x) for a preview of this step.
    std::optional<Tensor> denoised;
    if (r.preview && preview_due(int64_t(i), int64_t(num_steps), r.preview_every)) denoised = run->denoised(eps, i, x);
    x = run->step(eps, i, x, &rng);
    if (start.mask && !inpainting_unet_) {
      // Latent blend (diffusers' inpainting with a plain UNet): the known region at the next step's noise
      // level, and clean after the last step.
      blend(x, *start.mask, i + 1 == n ? *start.image_latents : run->add_noise(*start.image_latents, start.noise, i + 1));
    }
    if (denoised) {
      bool final = i + 1 == n;  // the run's own result: what the final image is decoded from
      if (!final && start.mask) blend(*denoised, *start.mask, *start.image_latents);  // the kept region as it will be
      show(i, final ? x : std::move(*denoised), final);
    }
    if (r.callback) r.callback(int64_t(i), int64_t(num_steps), t);
  }
  Result result;
  if (stage.decode) {
    Feed latent{"latent", x.shape, x.data.data(), nullptr};
    result.images = finish(call("vae_decoder", {latent}, timings).at("image"));
    if (pending) r.preview(*pending, int64_t(num_steps), result.images);
  }
  if (init_latents) p.mode = "img2img";
  if (eta) p.extra["eta"] = num(*eta);
  if (stage.control) stage.control->record(p, artifacts_.controlnet_sha256);
  if (stage.denoising_start || stage.denoising_end) {
    p.extra["denoising_start"] = stage.denoising_start ? num(*stage.denoising_start) : "null";
    p.extra["denoising_end"] = stage.denoising_end ? num(*stage.denoising_end) : "null";
  }
  if (labels) p.extra["class_labels"] = int_list(recorded_labels);
  result.latents = std::move(x);
  timings["total"] = seconds_since(start_time);
  result.params = std::move(p);
  result.timings = std::move(timings);
  return result;
}

}  // namespace ldm_rt::native
