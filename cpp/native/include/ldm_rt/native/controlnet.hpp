// ControlNet at run time (Zhang, Rao & Agrawala 2023), as runtime/controlnet.py runs it (diffusers'
// StableDiffusionControlNetPipeline): a folder built with --controlnet has one `controlnet_<k>` component per
// ControlNet (export order) and a UNet that takes their summed residuals.
//
// - each control image is resized to the output size (Pillow's Lanczos), scaled to [0, 1] and repeated for the
//   ControlNets' batch (prepare_control_image);
// - at step i of n, ControlNet k runs at scale[k] when i/n >= start[k] and (i+1)/n <= end[k] (controlnet_keep),
//   else it is not run (nor at scale 0: the same sum);
// - guess mode: under guidance the ControlNets see the conditional half only, the unconditional half gets zero
//   residuals, and residual j of m is weighted by 10^(j/(m-1) - 1) (not a pooling ControlNet's);
// - several ControlNets: their residuals are summed (MultiControlNetModel).
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "ldm_rt/native/artifacts.hpp"
#include "ldm_rt/native/backend.hpp"
#include "ldm_rt/native/metadata.hpp"
#include "ldm_rt/native/png_io.hpp"
#include "ldm_rt/native/tensor.hpp"

namespace ldm_rt::native {

// controlnet.py: diffusers' defaults, and the bound on a scale (published recipes use 0.2-2).
constexpr double kControlScale = 1.0;
constexpr double kControlGuidanceStart = 0.0;
constexpr double kControlGuidanceEnd = 1.0;
constexpr double kMaxControlScale = 100.0;
// controlnet.GUESS_MODE_FIRST_SCALE_LOG10: guess mode weights residual j of m by 10^(j/(m-1) - 1), 0.1 .. 1.0.
constexpr double kGuessModeFirstScaleLog10 = -1.0;

// controlnet.guess_mode_scales: (count,) 10 ** np.linspace(-1, 0, count) in float64, then float32.
std::vector<float> guess_mode_scales(std::size_t count);

// contracts.controlnet_names: controlnet_0, controlnet_1, ... among `components`, in export order.
std::vector<std::string> controlnet_names(const std::map<std::string, ComponentFiles>& components);

// How errors name control image k of `count` ("control image" when there is one).
std::string control_image_what(std::size_t count, std::size_t k);

// What a request asks of the folder's ControlNets, checked (one entry per ControlNet, export order).
struct ControlRequest {
  std::vector<Image> images;  // as given
  std::vector<double> scales, starts, ends;
  bool guess_mode = false;

  // ControlRequest.to_dict into p.extra: "controlnets" (each image's sha256 and size, scale, window, the
  // ControlNet's sha256 from the manifest) and "guess_mode".
  void record(GenerationParams& p, const std::vector<std::string>& controlnet_sha256) const;
};

// make_control_request for a folder with `count` ControlNets (nullopt: it has none and none was asked for).
// scales / starts / ends: empty = the default, one value for all, or one per ControlNet.
std::optional<ControlRequest> make_control_request(std::size_t count, const std::vector<Image>& images,
                                                   const std::vector<double>& scales, const std::vector<double>& starts,
                                                   const std::vector<double>& ends, bool guess_mode);

// Whether a UNet input is one of the ControlNet residuals ControlRun feeds (contracts.residual_input_names).
bool is_controlnet_residual(const std::string& unet_input);

// The inputs controlnet_<k> takes that the sampler does not feed ("" when it feeds them all): checked at load.
std::string unfed_controlnet_input(const ComponentFiles& controlnet);

// One request's ControlNets over its denoising loop (controlnet.ControlRun).
class ControlRun {
 public:
  using Call = std::function<std::map<std::string, Tensor>(const std::string& name, const std::vector<Feed>& feeds)>;

  // `images`: images per call (B); `steps`: the run's timesteps (controlnet_keep's n); context (rows, L, D) and
  // SDXL's text_embeds / time_ids: the UNet's per-request inputs, rows [uncond, cond] under guidance.
  ControlRun(const ControlRequest& request, const Artifacts& artifacts, int64_t height, int64_t width, int64_t images,
             std::size_t steps, bool use_cfg, const std::optional<Tensor>& context, const std::optional<Tensor>& text_embeds,
             const std::optional<Tensor>& time_ids);

  // The UNet's residual inputs at `step` (name, tensor), contract order: the scaled residuals summed, zeros where
  // none applies. `sample`: the UNet's (rows, C', h, w) input (an inpainting UNet's extra channels are dropped).
  std::vector<std::pair<std::string, Tensor>> residuals(std::size_t step, const Tensor& sample, double timestep,
                                                        const Call& call) const;

 private:
  std::vector<std::string> names_;              // controlnet_<k>, export order
  std::vector<const ComponentFiles*> files_;    // theirs
  const ComponentFiles* unet_ = nullptr;
  std::vector<Tensor> images_;                  // (rows, 3, H, W) float32 in [0, 1]
  std::vector<double> scales_;
  std::vector<std::vector<float>> keep_;        // (steps, count) 1 where ControlNet k applies at step i
  bool guess_mode_ = false;                     // as run: asked for, or the first ControlNet pools
  bool use_cfg_ = false;
  std::map<std::string, Tensor> fixed_;         // encoder_hidden_states (text_embeds, time_ids): the ControlNets' rows
  int64_t latent_channels_ = 0;
};

}  // namespace ldm_rt::native
