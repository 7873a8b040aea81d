// ldm_rt::Pipeline: generate images from C++ through the ldm-rt Python runtime, embedded in-process.
//
//     ldm_rt::Pipeline pipe("engines/build/tiny");                 // loads once: manifest, hashes, sessions
//     ldm_rt::Image im = pipe.generate("a red cube", "", 25, 7.5f, 1, 0, 0);
//
// Threading: one Pipeline may be shared by any number of threads. The Python interpreter is started once
// per process (by the first Pipeline, or by start_python) and runs without the GIL held while C++ code
// runs; each call takes the GIL for its Python parts only, and ONNX Runtime releases it while it computes.
// See cpp/README.md.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace ldm_rt {

// An error the runtime raised (bad argument, bad artifacts, missing package): what() is its one-line message.
class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& message, std::string python_type = "");
  // The Python exception class, e.g. "GenerationError", "ArtifactError"; empty for errors of the C++ layer.
  const std::string& python_type() const noexcept { return python_type_; }

 private:
  std::string python_type_;
};

// One image: rows top to bottom, pixels left to right, 3 bytes (R, G, B) each.
struct Image {
  int width = 0;
  int height = 0;
  std::vector<uint8_t> rgb;  // width * height * 3 bytes
};

// One generation request; the fields mirror `ldm-rt sample`. width/height 0: the artifacts' optimum.
struct Request {
  std::string prompt;
  std::string negative_prompt;
  int steps = 25;
  float guidance = 7.5f;
  uint64_t seed = 0;
  int width = 0;
  int height = 0;
  std::string scheduler;  // "" = the model's own (its folder's scheduler class: euler for SDXL, lcm for LCM, ...)
  // The sampler's noise, as `--eta` (DDIM's eta, TCD's gamma, DPM++ 2S a's eta); unset: the scheduler's own. Other
  // schedulers refuse it (the runtime's one-line error).
  std::optional<float> eta;
  // A1111's emphasis in the prompts, `(word:1.3)`, `(word)`, `[word]`, BREAK, as `--prompt-weighting` (the runtime's
  // prompt_weighting=); false: brackets are text.
  bool prompt_weighting = false;
  // Artifacts built with --controlnet: one control image file (PNG, JPEG, ...) per ControlNet, in export order
  // (resized to the output size), and none or one conditioning scale each (default 1.0), as `--control-image`
  // and `--controlnet-scale`.
  std::vector<std::string> control_images;
  std::vector<float> controlnet_scales;
  // SDXL micro-conditioning, diffusers' names as in the Python API; unset: the runtime's defaults (sizes: the
  // output size; crops: {0, 0}; a refiner's scores 6.0 / 2.5). Sizes are {height, width}, crops {top, left}.
  std::optional<std::array<int, 2>> original_size, crops_coords_top_left, target_size;
  std::optional<std::array<int, 2>> negative_original_size, negative_crops_coords_top_left, negative_target_size;
  std::optional<float> aesthetic_score, negative_aesthetic_score;  // an SDXL refiner's
};

// Start the embedded interpreter with the Python environment (venv) of `python_executable`, e.g.
// "/srv/app/.venv/bin/python". Optional: the first Pipeline otherwise starts it with the Python ldm-rt was
// built against (CMake's Python_EXECUTABLE). Throws Error if the interpreter already runs with another one.
void start_python(const std::string& python_executable);

// The Python executable the embedded interpreter runs as (starting it if needed).
std::string python_executable();

class Pipeline {
 public:
  // Open an artifacts folder ("" = the shipped default model) with a backend ("onnxruntime", "tensorrt",
  // "torch") at a precision ("fp32", "fp16"). Throws Error with the runtime's message.
  explicit Pipeline(const std::string& artifacts_dir = "", const std::string& backend = "onnxruntime",
                    const std::string& precision = "fp32");
  ~Pipeline();
  Pipeline(Pipeline&&) noexcept;
  Pipeline& operator=(Pipeline&&) noexcept;
  Pipeline(const Pipeline&) = delete;
  Pipeline& operator=(const Pipeline&) = delete;

  // One image; thread-safe. The same arguments and seed give the same bytes as `ldm-rt sample` and the
  // Python API. width/height 0: the artifacts' optimum. Throws Error with the runtime's message.
  Image generate(const std::string& prompt, const std::string& negative_prompt, int steps, float guidance,
                 uint64_t seed, int width, int height) const;
  Image generate(const Request& request) const;

  // sha256 of the source weights, as written into PNG metadata by `ldm-rt sample`.
  std::string model_hash() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace ldm_rt
