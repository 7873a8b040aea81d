// The text an image file carries, byte for byte as the Python runtime writes it (pipeline.Result.metadata):
// one entry per images.TEXT_KEYS, batch_index when there are several, all parameters as JSON under
// "parameters" (json.dumps(params, sort_keys=True)), and "Software".
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "ldm_rt/native/png_io.hpp"

namespace ldm_rt::native {

class Json;

// json.dumps(value, sort_keys=True) of a value json.loads read from a file (a manifest's records): keys sorted, ASCII
// only, integers as written, other numbers as Python's float repr.
std::string json_dumps_sorted(const Json& value);

// What produced the images (runtime/params.py GenerationParams + model hash, backend, precision, mode).
struct GenerationParams {
  std::vector<std::string> prompts;
  std::vector<std::string> negative_prompts;  // one per prompt
  int64_t steps = 0;
  double guidance = 0.0;
  std::string scheduler;
  uint64_t seed = 0;
  int64_t batch = 1;  // images per prompt
  int64_t height = 0, width = 0;
  double strength = 1.0;
  double guidance_rescale = 0.0;
  std::optional<double> mask_blur = 0.0;  // nullopt: no paste-back
  std::string model_hash;
  std::string backend = "openvino";
  std::string precision = "fp32";
  bool reduced_precision = false;
  std::string mode = "txt2img";  // "img2img", "inpaint"
  bool prompt_weighting = false;  // recorded only when on, as Python records it
  // SDXL: the micro-conditioning the UNet read (MicroConditioning::to_json), name -> JSON text.
  std::map<std::string, std::string> micro;
  // More entries, name -> JSON text: the refiner hand-off's (refiner_start, denoising_*, base_model_hash, base_*),
  // eta and class_labels when given.
  std::map<std::string, std::string> extra;

  int64_t images() const { return int64_t(prompts.size()) * batch; }
  // json.dumps(params, sort_keys=True) as Python writes it (ensure_ascii, ", " and ": ").
  std::string to_json() const;
  // The text chunks of image `index` of `count` (Result.metadata(index)).
  TextChunks text(std::size_t index, std::size_t count) const;
  // The text chunks of all images as one grid (Result.metadata(None)): one prompt if they all agree, else the list.
  TextChunks grid_text() const;

 private:
  // images.TEXT_KEYS' chunks for these prompts (the rest: parameters and Software follow).
  TextChunks chunks(const std::string& prompt, const std::string& negative_prompt) const;
};


}  // namespace ldm_rt::native
