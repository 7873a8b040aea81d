// A service in miniature: load the native pipeline once, then serve every request of a JSON-lines file, each
// on its own thread, and print the files written (one line per image, in request order). No Python anywhere.
//
//   native_generate_many MODEL_DIR REQUESTS.jsonl
//   {"prompt": "a red circle", "seed": 1, "steps": 25, "scheduler": "ddim", "out": "circle.png"}
//
// Fields (all optional but "out"): prompt, negative_prompt, prompt_weighting (true/false), steps, guidance,
// guidance_rescale, scheduler, seed, batch, height, width, init_image, strength, mask, mask_blur, latents (a .npy
// path); SDXL's original_size, crops_coords_top_left, target_size and their negative_* ([a, b] each),
// aesthetic_score, negative_aesthetic_score; PNG paths for images; step previews: preview (a name P: each preview is
// written to P_STEP.png), preview_every, preview_kind; eta, class_labels ([ints]), grid (true: one grid image at out);
// the hand-off by hand: init_latents (a .npy path), denoising_start, denoising_end, decode (false: the final latents
// are written to "out" as a float32 .npy instead of images); ControlNet: control_images (paths),
// controlnet_conditioning_scale, control_guidance_start, control_guidance_end (a number or a list each), guess_mode.
#include <exception>
#include <fstream>
#include <iostream>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "ldm_rt/native/controlnet.hpp"
#include "ldm_rt/native/json.hpp"
#include "ldm_rt/native/pipeline.hpp"

namespace native = ldm_rt::native;

namespace {

// A number, or a list of numbers (one per ControlNet).
std::vector<double> numbers(const native::Json* v) {
  std::vector<double> out;
  if (v && v->is_array()) {
    for (const native::Json& x : v->as_array()) out.push_back(x.as_double());
  } else if (v) {
    out.push_back(v->as_double());
  }
  return out;
}

native::Request request_from(const native::Json& j, size_t controlnets) {
  native::Request r;
  if (auto* v = j.find("prompt")) r.prompts = {v->as_string()};
  if (auto* v = j.find("negative_prompt")) r.negative_prompts = {v->as_string()};
  if (auto* v = j.find("prompt_weighting")) r.prompt_weighting = v->as_bool();
  if (auto* v = j.find("steps")) r.steps = v->as_int();
  if (auto* v = j.find("guidance")) r.guidance = v->as_double();
  if (auto* v = j.find("guidance_rescale")) r.guidance_rescale = v->as_double();
  if (auto* v = j.find("scheduler")) r.scheduler = v->as_string();
  if (auto* v = j.find("seed")) r.seed = uint64_t(v->as_int());
  if (auto* v = j.find("batch")) r.batch = v->as_int();
  if (auto* v = j.find("height")) r.height = v->as_int();
  if (auto* v = j.find("width")) r.width = v->as_int();
  if (auto* v = j.find("init_image")) r.init_image = native::read_rgb_image(v->as_string());
  if (auto* v = j.find("strength")) r.strength = v->as_double();
  if (auto* v = j.find("mask")) r.mask = native::read_mask_image(v->as_string());
  if (auto* v = j.find("mask_blur")) r.mask_blur = v->as_double();
  if (auto* v = j.find("latents")) r.latents = native::read_npy(v->as_string());
  auto pair = [&j](const char* name) -> std::optional<native::Pair> {
    const native::Json* v = j.find(name);
    if (!v) return std::nullopt;
    return native::Pair{(*v)[0].as_int(), (*v)[1].as_int()};
  };
  r.micro.original_size = pair("original_size");
  r.micro.crops_coords_top_left = pair("crops_coords_top_left");
  r.micro.target_size = pair("target_size");
  r.micro.negative_original_size = pair("negative_original_size");
  r.micro.negative_crops_coords_top_left = pair("negative_crops_coords_top_left");
  r.micro.negative_target_size = pair("negative_target_size");
  if (auto* v = j.find("aesthetic_score")) r.micro.aesthetic_score = v->as_double();
  if (auto* v = j.find("negative_aesthetic_score")) r.micro.negative_aesthetic_score = v->as_double();
  if (auto* v = j.find("preview")) {
    r.preview = [prefix = v->as_string()](int64_t i, int64_t n, const std::vector<native::Image>& images) {
      native::write_preview(prefix + "_" + std::to_string(i) + ".png", images, i, n);
    };
  }
  if (auto* v = j.find("preview_every")) r.preview_every = v->as_int();
  if (auto* v = j.find("preview_kind")) r.preview_kind = v->as_string();
  if (auto* v = j.find("eta")) r.eta = v->as_double();
  if (auto* v = j.find("class_labels")) {
    r.class_labels.emplace();
    for (size_t k = 0; k < v->size(); ++k) r.class_labels->push_back((*v)[k].as_int());
  }
  if (auto* v = j.find("init_latents")) r.init_latents = native::read_npy(v->as_string());
  if (auto* v = j.find("denoising_start")) r.denoising_start = v->as_double();
  if (auto* v = j.find("denoising_end")) r.denoising_end = v->as_double();
  if (auto* v = j.find("decode")) r.decode = v->as_bool();
  if (auto* v = j.find("control_images")) {
    for (size_t k = 0; k < v->size(); ++k) {  // read when there is one per ControlNet (else generate() says the count)
      r.control_images.push_back(v->size() == controlnets ? native::read_rgb_image((*v)[k].as_string(), native::control_image_what(controlnets, k))
                                                          : native::Image{});
    }
  }
  r.controlnet_conditioning_scale = numbers(j.find("controlnet_conditioning_scale"));
  r.control_guidance_start = numbers(j.find("control_guidance_start"));
  r.control_guidance_end = numbers(j.find("control_guidance_end"));
  if (auto* v = j.find("guess_mode")) r.guess_mode = v->as_bool();
  return r;
}

// numpy's .npy v1 of a float32 tensor (little-endian hosts), for decode = false.
std::vector<std::string> save_npy(const native::Tensor& t, const std::string& path) {
  std::string shape;
  for (int64_t d : t.shape) shape += std::to_string(d) + ", ";
  std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': (" + shape.substr(0, shape.size() - (t.shape.size() > 1 ? 2 : 1)) + "), }";
  header.append(64 - (10 + header.size() + 1) % 64, ' ').push_back('\n');
  std::ofstream out(path, std::ios::binary);
  out.write("\x93NUMPY\x01\x00", 8);
  uint16_t n = uint16_t(header.size());
  out.write(reinterpret_cast<const char*>(&n), 2);
  out << header;
  out.write(reinterpret_cast<const char*>(t.data.data()), std::streamsize(t.data.size() * sizeof(float)));
  return {path};
}

std::vector<std::string> serve(const native::Pipeline& pipe, const native::Json& j) {
  native::Result result = pipe.generate(request_from(j, pipe.controlnets().size()));
  const std::string out = j.at("out").as_string();
  if (result.images.empty()) return save_npy(result.latents, out);
  const native::Json* grid = j.find("grid");
  return result.save(out, grid && grid->as_bool());
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::cerr << "usage: native_generate_many MODEL_DIR REQUESTS.jsonl\n";
    return 2;
  }
  try {
    std::vector<native::Json> requests;
    std::ifstream file(argv[2]);
    for (std::string line; std::getline(file, line);) {
      if (!line.empty()) requests.push_back(native::parse_json(line, {}, argv[2]));
    }
    native::LoadOptions options;
    options.model_dir = argv[1];
    options.host.compile_cache = native::default_compile_cache();
    auto pipe = native::Pipeline::load(options);  // shared by every thread

    std::vector<std::string> errors(requests.size());
    std::vector<std::vector<std::string>> written(requests.size());
    std::vector<std::thread> threads;
    for (size_t k = 0; k < requests.size(); ++k) {
      threads.emplace_back([&, k] {
        try {  // no exception may leave a thread
          written[k] = serve(*pipe, requests[k]);
        } catch (const std::exception& e) {
          errors[k] = e.what();
        }
      });
    }
    for (auto& t : threads) t.join();
    int status = 0;
    for (size_t k = 0; k < requests.size(); ++k) {
      if (!errors[k].empty()) {
        std::cerr << "native_generate_many: error: request " << k << ": " << errors[k] << "\n";
        status = 2;
      }
      for (const auto& path : written[k]) std::cout << path << "\n";
    }
    return status;
  } catch (const std::exception& e) {
    std::cerr << "native_generate_many: error: " << e.what() << "\n";
    return 2;
  }
}
