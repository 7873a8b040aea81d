// The native sampling loop (runtime/pipeline.py without Python): load an artifacts folder once, then generate
// from any number of threads. Same seed, same arguments, same image as `ldm-rt sample` (to float rounding of
// two inference engines): one numpy-compatible generator per request, the initial noise drawn first, then
// each stochastic step's noise.
//
//   #include <ldm_rt/native/pipeline.hpp>
//   auto pipe = ldm_rt::native::Pipeline::load({"path/to/artifacts"});
//   ldm_rt::native::Request r;
//   r.prompts = {"a red circle on a white background"};
//   r.seed = 1;
//   auto result = pipe->generate(r);                 // throws ldm_rt::native::Error (one line) on bad input
//   result.save("circle.png");
//
// Thread safety: a Pipeline holds only read-only things (artifacts, compiled networks, immutable schedulers);
// everything a call changes (scheduler run, generator) is local to generate(). The VAE encoder is compiled by the
// first request that encodes an image (img2img, inpainting), once, under a lock; text-to-image never compiles it.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "ldm_rt/native/artifacts.hpp"
#include "ldm_rt/native/backend.hpp"
#include "ldm_rt/native/errors.hpp"
#include "ldm_rt/native/embeddings.hpp"
#include "ldm_rt/native/lora.hpp"
#include "ldm_rt/native/metadata.hpp"
#include "ldm_rt/native/micro_conditioning.hpp"
#include "ldm_rt/native/npy.hpp"
#include "ldm_rt/native/png_io.hpp"
#include "ldm_rt/native/previews.hpp"
#include "ldm_rt/native/scheduler.hpp"

namespace ldm_rt::native {

// runtime/params.py: what one call may produce, whatever the profile allows.
constexpr int64_t kMaxImagesPerCall = 1024;
constexpr int64_t kMaxPixelsPerCall = int64_t{1} << 28;
// runtime/pipeline.py: img2img keeps 80 % of the steps; inpainting starts from pure noise.
constexpr double kImg2ImgStrength = 0.8;
constexpr double kInpaintStrength = 1.0;
// params.REFINER_START: the fraction of the schedule an SDXL base runs before its refiner takes over.
constexpr double kRefinerStart = 0.8;

class Pipeline;
struct ControlRequest;

struct LoadOptions {
  std::string model_dir;             // an artifacts folder written by export
  std::string precision = "fp32";    // which built ONNX files: "fp32" or "fp16"
  HostOptions host;                  // threads, bf16, compile cache, warnings
  // LoRA files applied as the components open (lora.hpp; Pipeline.load(loras=...)): their deltas are added to the
  // weights they adapt, the files on disk untouched; recorded in every result's parameters (file, sha256, scale).
  std::vector<LoraSpec> loras;
  // Textual-inversion files (embeddings.hpp; Pipeline.load(embeddings=...)): their triggers become tokens of the
  // tokenizers and their vectors rows of the text encoders' token tables; recorded in every result's parameters.
  std::vector<EmbeddingSpec> embeddings;
};

// One request (Pipeline.generate's arguments).
struct Request {
  std::vector<std::string> prompts{""};
  std::vector<std::string> negative_prompts{""};  // one, or one per prompt
  // Read A1111's emphasis in the prompts and negative prompts, `(word:1.3)`, `(word)`, `[word]`, BREAK
  // (prompt_weights.hpp; off: brackets are text); recorded in the parameters when on.
  bool prompt_weighting = false;
  int64_t steps = 25;
  double guidance = 7.5;
  double guidance_rescale = 0.0;
  std::string scheduler;              // "": the model's own (manifest default_scheduler, else ddim)
  std::optional<uint64_t> seed;       // none: a fresh random seed (recorded in the result)
  int64_t batch = 1;                  // images per prompt
  std::optional<int64_t> height, width;  // default: the init image's size, else the profile's optimum
  // Unit-variance initial noise (B, C, H/f, W/f) instead of drawing it (multiplied by the scheduler's
  // init_noise_sigma, as diffusers' latents=); LatentsInput::of(tensor), or read_npy(path).
  std::optional<LatentsInput> latents;
  std::optional<Image> init_image;    // img2img; with mask, inpainting
  std::optional<double> strength;     // default 0.8 (1.0 with a mask)
  std::optional<Mask> mask;           // 1 = repaint
  std::optional<double> mask_blur = 0.0;  // 0: hard seam; nullopt: the decoder's pixels everywhere
  MicroRequest micro;                 // SDXL: sizes, crops, aesthetic scores (defaults: diffusers')
  // After every denoising step: (step index, steps, timestep). Called on the generating thread.
  std::function<void(int64_t, int64_t, double)> callback;
  // Step previews (previews.hpp; generate's preview=, preview_every=, preview_kind=): `preview` receives the images of
  // the model's x0 estimate every `preview_every` steps and at the last step, whose preview is the final latents (a
  // "full" one is the final image, inpainting's paste-back included, with no second decode). "fast": the folder's
  // fitted latent -> RGB map, repeated to the image size (almost free; a folder built before previews gives full ones,
  // saying so once); "full": a VAE decode each time. Previews do not change the result and are not recorded in its
  // parameters; with a refiner, the base's steps are previewed, then the refiner's, each numbered from 0.
  PreviewCallback preview;
  int64_t preview_every = 1;
  std::string preview_kind = "fast";
  // SDXL base -> refiner hand-off (generate's refiner= / refiner_start=, `ldm-rt sample --refiner`): this
  // pipeline runs the schedule up to refiner_start (default kRefinerStart), `refiner` the rest from its latents
  // (no noise added), one generator for both. Not with a mask.
  std::shared_ptr<const Pipeline> refiner;
  std::optional<double> refiner_start;
  // The sampler's noise in [0, 1] (generate's eta=, --eta): DDIM's eta, TCD's gamma, DPM++ 2S a's eta; none: the
  // scheduler's default (0, 0.3, 1). Recorded in the parameters when given; other schedulers refuse it.
  std::optional<double> eta;
  // Class-conditional models (generate's class_labels=): one label in [0, num_classes) per prompt (one prompt with
  // several labels: that prompt once per label); recorded in the parameters, repeated per batch.
  std::optional<std::vector<int64_t>> class_labels;
  // The hand-off's halves by hand (generate's init_latents=, denoising_start=, denoising_end=, decode=):
  // denoising_end with decode = false stops at that fraction of the schedule (Result::latents, no images), and
  // another call continues from init_latents at denoising_start (no noise added). init_latents without
  // denoising_start: img2img from scaled latents (B, C, h, w) instead of an image.
  std::optional<LatentsInput> init_latents;
  std::optional<double> denoising_start, denoising_end;
  bool decode = true;
  // ControlNet (a folder built with --controlnet; generate's control_image=, controlnet_conditioning_scale=,
  // control_guidance_start= / _end=, guess_mode=; controlnet.hpp): one control image per ControlNet in export
  // order, resized to the output size; each number list empty for diffusers' default (1.0, 0.0, 1.0), one value
  // for all ControlNets, or one per ControlNet; recorded in the parameters with each control image's sha256.
  std::vector<Image> control_images;
  std::vector<double> controlnet_conditioning_scale, control_guidance_start, control_guidance_end;
  bool guess_mode = false;
};

struct Result {
  std::vector<Image> images;             // none when the request asked for latents only (decode = false)
  GenerationParams params;
  std::map<std::string, double> timings;  // seconds: text_encoder(_2), vae_encoder, controlnet, unet, vae_decoder, preview, total
                                          // (a hand-off: the refiner's, the base's as base_*, total of both)
  Tensor latents;                         // the final latents (B, C, h, w)

  // Image files with their parameters (PNG: text chunks; JPEG: the EXIF UserComment; by extension): `path`
  // for one image, NAME_0.png, NAME_1.png, ... for a batch, or with as_grid one grid image at `path`
  // (images.grid); all are written or none. Returns the paths.
  std::vector<std::string> save(const std::string& path, bool as_grid = false) const;
};

// The format an output name asks for ("PNG" or "JPEG", by extension), else OutputError naming those written.
std::string output_format(const std::string& path);

// The files a save(path, as_grid) of `count` images writes (images.output_paths).
std::vector<std::string> output_paths(const std::string& path, std::size_t count, bool as_grid = false);

class Pipeline {
 public:
  // Every error is an ldm_rt::native::Error (ArtifactError, GenerationError, ImageInputError, OutputError,
  // BackendError) whose what() is the Python runtime's one-line message for the same input.
  static std::shared_ptr<const Pipeline> load(const LoadOptions& options);
  Result generate(const Request& request) const;

  const Artifacts& artifacts() const { return artifacts_; }
  // Scheduler names this model can use, in registry order.
  std::vector<std::string> schedulers() const;
  // What an empty Request::scheduler samples with: the folder's own, else ddim (scheduler_choice.FALLBACK).
  const std::string& default_scheduler() const { return default_scheduler_; }
  // The folder's ControlNets (controlnet_0, ...), export order: a request passes one control image for each.
  const std::vector<std::string>& controlnets() const { return controlnets_; }

  Pipeline(Artifacts artifacts, std::map<std::string, std::unique_ptr<Component>> components, std::string precision,
           bool reduced_precision, std::function<void(const std::string&)> warn);

 private:
  struct Start;
  // One part of a split schedule (pipeline.py _generate's rng, init_latents, denoising_start / _end, decode): the
  // refiner hand-off's, or a request's own (Request::denoising_*); the default is a whole request.
  struct Stage {
    Generator* rng = nullptr;              // continue this generator instead of seeding one
    const Tensor* init_latents = nullptr;  // start from these latents at denoising_start, no noise added
    std::optional<double> denoising_start, denoising_end;
    bool decode = true;
    const ControlRequest* control = nullptr;  // the request's ControlNets, checked (generate's control)
  };
  static std::shared_ptr<const Pipeline> open(const LoadOptions& options);
  Result run_request(const Request& request, const Stage& stage) const;
  Result with_refiner(const Request& request) const;
  // (context (rows, L, D), pooled (rows, P) for SDXL): runtime/pipeline.py _encode_prompts; with
  // p.prompt_weighting, A1111's emphasis on each encoder's states (the pooled output is not weighted).
  std::pair<Tensor, std::optional<Tensor>> encode_prompts(const GenerationParams& p, bool use_cfg,
                                                          std::map<std::string, double>& timings) const;
  Tensor encode_image(const std::vector<float>& image, int64_t h, int64_t w, std::map<std::string, double>& timings) const;
  std::map<std::string, Tensor> call(const std::string& name, const std::vector<Feed>& feeds,
                                     std::map<std::string, double>& timings, std::optional<int64_t> step = {}) const;
  void warn(const std::string& message) const {
    if (warn_) warn_(message);
  }
  // The folder's fast-preview map, or null (then "fast" previews are full decodes); the first call says in the log
  // when there is none or it fits the VAE poorly (pipeline.py Pipeline.preview_factors).
  const PreviewFactors* fast_preview_factors() const;
  // pipeline._class_labels: the request's labels, checked against a class-conditional UNet's classes (none otherwise).
  std::optional<std::vector<int64_t>> class_labels(const std::optional<std::vector<int64_t>>& given) const;

  Artifacts artifacts_;
  std::map<std::string, std::unique_ptr<Component>> components_;
  std::string precision_;
  bool reduced_precision_ = false;
  std::function<void(const std::string&)> warn_;
  UsableSchedulers schedulers_;
  std::string default_scheduler_;
  bool inpainting_unet_ = false;
  bool has_text_ = false;             // SD's text encoder, SDXL's two, or a refiner's second only
  std::optional<int64_t> time_ids_;   // SDXL: the UNet's time ids (6 base, 5 refiner)
  std::optional<int64_t> num_classes_;  // a class-conditional UNet's (it takes class_labels)
  bool is_refiner_ = false;
  std::vector<std::string> controlnets_;  // controlnet_<k>, export order
  std::vector<std::string> lora_records_;  // fused at export and applied at load: the parameters' "loras" entries (JSON)
  std::vector<std::string> embedding_records_;  // baked at export, then added at load: the "embeddings" entries (JSON)
  mutable std::atomic<bool> previews_announced_{false};
};

}  // namespace ldm_rt::native
