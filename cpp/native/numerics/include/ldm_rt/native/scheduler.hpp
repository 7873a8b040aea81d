// The runtime's schedulers (runtime/schedulers/, docs/sampler_spec.md) in C++, with the Python API:
//
//   auto sched = Scheduler::make("ddim", SchedulerConfig::from_json(obj));   // immutable, shareable
//   auto run = sched->set_timesteps(50);                                       // one sampling loop
//   x = x * float(run->init_noise_sigma());
//   for (size_t i = 0; i < run->size(); ++i) {
//     Tensor x_in = run->scale_model_input(x, i);
//     Tensor eps = unet(x_in, float(run->timesteps()[i]));
//     x = run->step(eps, i, x, &rng);                                          // draws noise if stochastic
//   }
//
// Arithmetic as the spec states: tables float32 as the runtime stores them, a step in float64 from the
// float32 inputs, result rounded to float32. Errors carry the runtime's one-line messages. Names: every one
// of runtime/schedulers/registry.py (scheduler_names()), including lcm, tcd, dpmpp-2s-a and dpmpp-sde(-karras).
#pragma once

#include <cstdint>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "ldm_rt/native/json.hpp"
#include "ldm_rt/native/rng.hpp"
#include "ldm_rt/native/tensor.hpp"

namespace ldm_rt::native {

// A scheduler config value or name is invalid (runtime SchedulerConfigError).
class SchedulerConfigError : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

// A run was stepped wrongly (runtime SchedulerStepError).
class SchedulerStepError : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

// runtime/schedulers/config.py SchedulerConfig: the diffusers fields; defaults are Stable Diffusion v1's.
struct SchedulerConfig {
  int64_t num_train_timesteps = 1000;
  double beta_start = 0.00085;
  double beta_end = 0.012;
  std::string beta_schedule = "scaled_linear";
  std::optional<std::vector<double>> trained_betas;
  std::string prediction_type = "epsilon";
  std::string timestep_spacing = "leading";
  int64_t steps_offset = 1;
  bool set_alpha_to_one = false;
  bool clip_sample = false;
  double clip_sample_range = 1.0;
  bool thresholding = false;
  double dynamic_thresholding_ratio = 0.995;
  double sample_max_value = 1.0;
  bool rescale_betas_zero_snr = false;
  std::optional<std::string> variance_type = std::string("fixed_small");
  bool skip_prk_steps = true;
  std::string interpolation_type = "linear";
  bool use_karras_sigmas = false;
  std::optional<double> sigma_min;
  std::optional<double> sigma_max;
  std::string final_sigmas_type = "zero";
  int64_t solver_order = 2;
  std::string algorithm_type = "dpmsolver++";
  std::string solver_type = "midpoint";
  bool lower_order_final = true;
  bool euler_at_final = false;
  std::vector<int64_t> disable_corrector;
  double lambda_min_clipped = -std::numeric_limits<double>::infinity();  // null in JSON
  int64_t original_inference_steps = 50;  // LCM / TCD: the distillation schedule's length
  double timestep_scaling = 10.0;         // LCM / TCD: factor on t in the boundary scalings

  // SchedulerConfig.from_dict: "_" keys ignored, unknown keys ignored, unsupported diffusers options refused,
  // types and values checked (same messages). Throws SchedulerConfigError.
  static SchedulerConfig from_json(const Json& object);
  // Validation of a config built in code (__post_init__); from_json calls it.
  void validate() const;
};

class SchedulerRun;

// Config + training tables of one registered scheduler (a --scheduler name); immutable, thread safe.
class Scheduler : public std::enable_shared_from_this<Scheduler> {
 public:
  // registry.make_scheduler(name, config, **options): "unknown scheduler 'x'; valid names are [...]", and the
  // class's refusals (prediction type, zero-terminal-SNR). `option`: the name's one option, "ddim"'s eta
  // (default 0), "tcd"'s gamma (default 0.3) or "dpmpp-2s-a"'s eta (default 1); other names take none.
  static std::shared_ptr<const Scheduler> make(const std::string& name, const SchedulerConfig& config,
                                               std::optional<double> option = std::nullopt);

  const std::string& name() const { return name_; }  // the registered name, e.g. "dpmpp-2m-karras"
  const std::string& diffusers_class() const { return diffusers_class_; }
  const SchedulerConfig& config() const { return config_; }  // with the name's overrides applied
  bool is_stochastic() const;
  int64_t fewest_sound_steps() const;  // 0: no known bound (the pipeline warns below it)
  const std::vector<float>& betas() const { return betas_; }
  const std::vector<float>& alphas_cumprod() const { return alphas_cumprod_; }

  // A fresh run of `steps` denoising steps; throws SchedulerConfigError
  // ("num_inference_steps must be in [1, T] (num_train_timesteps), got n", timesteps out of range, ...).
  std::unique_ptr<SchedulerRun> set_timesteps(int64_t steps) const;

  struct Kind;  // implementation detail (which class, eta / gamma)

  Scheduler(std::string name, std::string diffusers_class, SchedulerConfig config, std::shared_ptr<const Kind> kind);

 private:
  std::string name_, diffusers_class_;
  SchedulerConfig config_;
  std::shared_ptr<const Kind> kind_;
  std::vector<float> betas_, alphas_cumprod_;
  friend class SchedulerRun;
};

// Every registered name, in registry order.
const std::vector<std::string>& scheduler_names();

// registry.usable_schedulers(config): name -> scheduler for every name that takes `config`, and
// name -> the refusal message for the rest.
struct UsableSchedulers {
  std::vector<std::pair<std::string, std::shared_ptr<const Scheduler>>> usable;  // registry order
  std::map<std::string, std::string> unusable;
};
UsableSchedulers usable_schedulers(const SchedulerConfig& config);

// lcm.py guidance_embedding: the (rows, dim) float32 w-embedding an LCM-distilled UNet takes as its
// `timestep_cond` input (sinusoidal embedding of (guidance - 1) * 1000), computed in float32 as diffusers does.
// Most values bit-exact; the rest within 2 ulps of the argument w * 1000 * f (5e-4 at guidance 8): numpy's
// float32 exp / sin / cos are SIMD code that is not correctly rounded.
Tensor guidance_embedding(double guidance, int64_t dim, int64_t rows);

// One sampling loop's state (timesteps, sigmas, multistep history). Not thread safe; one per request.
// Index i is the position in timesteps(); after with_strength tables are read at begin_index() + i.
class SchedulerRun {
 public:
  virtual ~SchedulerRun() = default;

  const std::vector<double>& timesteps() const { return timesteps_; }  // fed to the UNet as float32
  const std::vector<double>& all_timesteps() const { return all_timesteps_; }  // before with_strength's cut
  std::size_t size() const { return timesteps_.size(); }
  int64_t num_inference_steps() const { return num_inference_steps_; }
  int64_t begin_index() const { return begin_index_; }
  virtual int64_t order() const { return 1; }  // diffusers' scheduler.order (Heun: 2)
  virtual double init_noise_sigma() const { return 1.0; }
  const Scheduler& scheduler() const { return *scheduler_; }

  // Step indices that draw noise (`noise_steps` of the spec), for this run as it stands.
  std::vector<int64_t> noise_steps() const;

  // scale_model_input(x, i): float32.
  Tensor scale_model_input(const Tensor& sample, std::size_t i) const;

  // x at the next step from the model output at step i. A stochastic step draws
  // standard_normal(sample.shape, float32) from `rng`, or takes `noise` (shaped like the sample); a step
  // that needs noise and has neither throws SchedulerStepError. Multistep runs must be stepped 0, 1, 2, ...
  Tensor step(const Tensor& model_output, std::size_t i, const Tensor& sample, Generator* rng,
              const Tensor* noise = nullptr);

  // The model's estimate of x0 at step i from its output on `sample` (base.py SchedulerRun.denoised: diffusers'
  // pred_original_sample, k-diffusion's denoised), unclipped, float32. Reads no history, so it may be called beside
  // step (step previews).
  Tensor denoised(const Tensor& model_output, std::size_t i, const Tensor& sample) const;

  // Forward process to the noise level of timesteps()[i] (img2img, inpainting).
  Tensor add_noise(const Tensor& original, const Tensor& noise, std::size_t i) const;

  // A fresh run that skips the first steps as diffusers' img2img get_timesteps (keeps int(n * strength));
  // "strength must be in (0, 1], got s", "strength s with n steps leaves no denoising step; ...".
  virtual std::unique_ptr<SchedulerRun> with_strength(double strength) const;

  // Sigma table (sigma runs; empty otherwise), indexed by begin_index + i, with the tail sigma.
  const std::vector<double>& sigmas() const { return sigmas_; }

 protected:
  SchedulerRun(std::shared_ptr<const Scheduler> scheduler, std::vector<double> all_timesteps, int64_t n);
  virtual std::unique_ptr<SchedulerRun> clone() const = 0;
  virtual void reset_history() {}
  virtual bool multistep() const { return false; }
  virtual bool step_draws_noise(int64_t g) const;  // at global index g
  virtual void scale_input(std::vector<double>& x, int64_t g) const;  // in place, float64
  void reset() { next_index_ = 0; reset_history(); }
  // One step at global index g = begin_index + k on float64 values; returns x at the next step. `draw()`
  // returns the step's noise (from the generator or the caller), called only when the step needs it.
  // `pv`: the predicted variance channels of a learned-variance model output (else null).
  using Draw = std::function<std::vector<double>()>;
  virtual std::vector<double> do_step(const std::vector<double>& m, int64_t g, int64_t k, const std::vector<double>& x,
                                      const std::vector<int64_t>& shape, const Draw& draw,
                                      const std::vector<double>* pv) = 0;
  virtual bool accepts_learned_variance() const { return false; }
  // x0 from the model output m on x at global index g (VP at the timestep's alpha_bar: DDIM, DDPM, PNDM, LCM, TCD).
  virtual std::vector<double> do_denoised(const std::vector<double>& m, int64_t g, const std::vector<double>& x) const;
  // The model output as float64, its learned-variance channels split off into `pv` (base.py _split_model_output).
  std::vector<double> prediction(const Tensor& model_output, const Tensor& sample, std::vector<double>* pv) const;
  virtual void do_add_noise(std::vector<double>& x0, const std::vector<double>& z, int64_t g) const;
  std::size_t global_index(std::size_t i, const char* what) const;

  std::shared_ptr<const Scheduler> scheduler_;
  const SchedulerConfig& config() const { return scheduler_->config(); }
  std::vector<double> all_timesteps_, timesteps_, sigmas_;
  int64_t num_inference_steps_ = 0;
  int64_t begin_index_ = 0;
  int64_t next_index_ = 0;
};

}  // namespace ldm_rt::native
