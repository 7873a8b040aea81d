// generate: the ldm_rt C++ library from the command line.
//
//     generate --model DIR --prompt "a red cube" --seed 1 --steps 25 --out cube.ppm
//     generate --model DIR --prompt "a red cube" --seed 1 --threads 3 --out cube.ppm   # cube_0..2.ppm, seeds 1..3
//
// --out FILE.ppm writes a binary PPM (P6), FILE.raw the bare RGB bytes (rows top to bottom). With
// --threads N, N threads share one Pipeline and thread k generates seed + k into NAME_k.EXT. Errors are one
// line on stderr ("generate: error: ...") with exit status 2, as `ldm-rt sample`.
#include <array>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <fstream>
#include <iostream>
#include <map>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "ldm_rt/pipeline.hpp"

namespace {

const char* const kUsage =
    "usage: generate --out FILE.ppm|FILE.raw [--model DIR] [--prompt TEXT] [--negative-prompt TEXT]\n"
    "                [--steps N] [--guidance G] [--seed N] [--width W] [--height H] [--scheduler NAME] [--eta E]\n"
    "                [--prompt-weighting]   (A1111's (word:1.3) emphasis, as ldm-rt sample)\n"
    "                [--backend NAME] [--precision fp32|fp16] [--threads N] [--python PATH]\n"
    "                [--control-image FILE [--controlnet-scale S]]...   (ControlNet artifacts, export order)\n"
    "                [--original-size H W] [--crops-coords-top-left TOP LEFT] [--target-size H W]\n"
    "                [--negative-original-size H W] [--negative-crops-coords-top-left TOP LEFT]\n"
    "                [--negative-target-size H W] [--aesthetic-score S] [--negative-aesthetic-score S]   (SDXL)";

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Options {
  std::string model, out, backend = "onnxruntime", precision = "fp32", python;
  ldm_rt::Request request;
  bool seed_given = false;
  int threads = 1;
};

long long to_integer(const std::string& flag, const std::string& value) {
  try {
    size_t used = 0;
    long long n = std::stoll(value, &used);
    if (used == value.size()) return n;
  } catch (const std::exception&) {
  }
  throw UsageError(flag + " needs an integer, got '" + value + "'");
}

// SDXL micro-conditioning, as `ldm-rt sample` spells it: two integers (sizes H W, crops TOP LEFT) or one score.
const std::vector<std::pair<std::string, std::optional<std::array<int, 2>> ldm_rt::Request::*>> kPairFlags = {
    {"--original-size", &ldm_rt::Request::original_size},
    {"--crops-coords-top-left", &ldm_rt::Request::crops_coords_top_left},
    {"--target-size", &ldm_rt::Request::target_size},
    {"--negative-original-size", &ldm_rt::Request::negative_original_size},
    {"--negative-crops-coords-top-left", &ldm_rt::Request::negative_crops_coords_top_left},
    {"--negative-target-size", &ldm_rt::Request::negative_target_size}};
// One optional number each: SDXL's scores, and the sampler's eta.
const std::vector<std::pair<std::string, std::optional<float> ldm_rt::Request::*>> kScoreFlags = {
    {"--aesthetic-score", &ldm_rt::Request::aesthetic_score},
    {"--negative-aesthetic-score", &ldm_rt::Request::negative_aesthetic_score},
    {"--eta", &ldm_rt::Request::eta}};

Options parse(int argc, char** argv) {
  std::map<std::string, std::string> values;
  std::map<std::string, std::array<std::string, 2>> pairs;  // the SDXL flags above that take two values
  std::map<std::string, std::vector<std::string>> repeated;  // --control-image, --controlnet-scale: one per ControlNet
  bool prompt_weighting = false;  // the one flag without a value
  const std::vector<std::string> flags = {"--model",  "--prompt", "--negative-prompt", "--steps",     "--guidance",
                                          "--seed",   "--width",  "--height",          "--scheduler", "--backend",
                                          "--precision", "--threads", "--out",         "--python"};
  for (int i = 1; i < argc; ++i) {
    std::string flag = argv[i];
    if (flag == "-h" || flag == "--help") {
      std::cout << kUsage << "\n";
      std::exit(0);
    }
    if (flag == "--prompt-weighting") {
      prompt_weighting = true;
      continue;
    }
    bool known = false;
    for (const auto& f : flags) known = known || f == flag;
    bool pair = false;
    for (const auto& f : kPairFlags) pair = pair || f.first == flag;
    for (const auto& f : kScoreFlags) known = known || f.first == flag;
    if (pair) {
      const bool two = i + 2 < argc && std::string(argv[i + 1]).rfind("--", 0) != 0 && std::string(argv[i + 2]).rfind("--", 0) != 0;
      if (!two) throw UsageError(flag + " needs two values");
      pairs[flag] = {argv[i + 1], argv[i + 2]};
      i += 2;
      continue;
    }
    const bool repeatable = flag == "--control-image" || flag == "--controlnet-scale";
    if (!known && !repeatable) throw UsageError("unknown argument '" + flag + "'");
    if (i + 1 >= argc) throw UsageError(flag + " needs a value");
    if (repeatable) {
      repeated[flag].push_back(argv[++i]);
      continue;
    }
    values[flag] = argv[++i];
  }
  Options o;
  auto has = [&](const char* f) { return values.count(f) > 0; };
  if (!has("--out")) throw UsageError("--out FILE.ppm or FILE.raw is required");
  o.out = values["--out"];
  if (o.out.size() < 4 || (o.out.substr(o.out.size() - 4) != ".ppm" && o.out.substr(o.out.size() - 4) != ".raw")) {
    throw UsageError("--out " + o.out + ": the name must end in .ppm (binary PPM) or .raw (bare RGB bytes)");
  }
  if (has("--model")) o.model = values["--model"];
  if (has("--backend")) o.backend = values["--backend"];
  if (has("--precision")) o.precision = values["--precision"];
  if (has("--python")) o.python = values["--python"];
  if (has("--prompt")) o.request.prompt = values["--prompt"];
  if (has("--negative-prompt")) o.request.negative_prompt = values["--negative-prompt"];
  if (has("--scheduler")) o.request.scheduler = values["--scheduler"];
  o.request.prompt_weighting = prompt_weighting;
  // Ranges are the runtime's to check (its message names the allowed values); only the C++ types are checked here.
  if (has("--steps")) o.request.steps = static_cast<int>(to_integer("--steps", values["--steps"]));
  if (has("--width")) o.request.width = static_cast<int>(to_integer("--width", values["--width"]));
  if (has("--height")) o.request.height = static_cast<int>(to_integer("--height", values["--height"]));
  if (has("--guidance")) {
    try {
      o.request.guidance = std::stof(values["--guidance"]);
    } catch (const std::exception&) {
      throw UsageError("--guidance needs a number, got '" + values["--guidance"] + "'");
    }
  }
  if (has("--seed")) {
    long long seed = to_integer("--seed", values["--seed"]);
    if (seed < 0) throw UsageError("--seed must be >= 0, got " + values["--seed"]);
    o.request.seed = static_cast<uint64_t>(seed);
    o.seed_given = true;
  }
  o.request.control_images = repeated["--control-image"];
  for (const auto& scale : repeated["--controlnet-scale"]) {
    try {
      o.request.controlnet_scales.push_back(std::stof(scale));
    } catch (const std::exception&) {
      throw UsageError("--controlnet-scale needs a number, got '" + scale + "'");
    }
  }
  if (!o.request.controlnet_scales.empty() && o.request.controlnet_scales.size() != o.request.control_images.size()) {
    throw UsageError("give one --controlnet-scale after each --control-image, or none");
  }
  // Ranges (sizes in [1, 16384], crops in [0, 16384], scores in [0, 10]) are the runtime's to check, as above.
  for (const auto& [flag, field] : kPairFlags) {
    if (pairs.count(flag) == 0) continue;
    std::array<int, 2> v{};
    for (int k = 0; k < 2; ++k) {
      long long n = to_integer(flag, pairs[flag][k]);
      if (n < -(1LL << 30) || n > (1LL << 30)) throw UsageError(flag + " values must be in [0, 16384], got " + pairs[flag][k]);
      v[k] = static_cast<int>(n);
    }
    o.request.*field = v;
  }
  for (const auto& [flag, field] : kScoreFlags) {
    if (!has(flag.c_str())) continue;
    try {
      o.request.*field = std::stof(values[flag]);
    } catch (const std::exception&) {
      throw UsageError(flag + " needs a number, got '" + values[flag] + "'");
    }
  }
  if (has("--threads")) {
    long long n = to_integer("--threads", values["--threads"]);
    if (n < 1 || n > 64) throw UsageError("--threads must be in [1, 64], got " + values["--threads"]);
    o.threads = static_cast<int>(n);
  }
  return o;
}

std::string output_path(const std::string& out, int index, int count) {
  if (count == 1) return out;
  const std::string stem = out.substr(0, out.size() - 4), ext = out.substr(out.size() - 4);
  return stem + "_" + std::to_string(index) + ext;
}

void write_image(const std::string& path, const ldm_rt::Image& image) {
  std::ofstream file(path, std::ios::binary);
  if (!file) throw std::runtime_error("cannot write " + path + "; check that its folder exists and is writable");
  if (path.substr(path.size() - 4) == ".ppm") file << "P6\n" << image.width << " " << image.height << "\n255\n";
  file.write(reinterpret_cast<const char*>(image.rgb.data()), static_cast<std::streamsize>(image.rgb.size()));
  if (!file) throw std::runtime_error("writing " + path + " failed (disk full?)");
}

int run(const Options& options) {
  if (!options.python.empty()) ldm_rt::start_python(options.python);
  const ldm_rt::Pipeline pipe(options.model, options.backend, options.precision);
  ldm_rt::Request base = options.request;
  if (!options.seed_given) {
    base.seed = (static_cast<uint64_t>(std::random_device{}()) << 31) ^ std::random_device{}();
    std::cerr << "seed " << base.seed << "\n";
  }
  std::vector<ldm_rt::Image> images(options.threads);
  std::vector<std::exception_ptr> errors(options.threads);
  std::vector<std::thread> workers;
  for (int k = 0; k < options.threads; ++k) {
    workers.emplace_back([&, k] {
      try {
        ldm_rt::Request request = base;
        request.seed = base.seed + static_cast<uint64_t>(k);
        images[k] = pipe.generate(request);
      } catch (...) {
        errors[k] = std::current_exception();
      }
    });
  }
  for (auto& w : workers) w.join();
  for (const auto& e : errors) {
    if (e) std::rethrow_exception(e);
  }
  for (int k = 0; k < options.threads; ++k) {
    const std::string path = output_path(options.out, k, options.threads);
    write_image(path, images[k]);
    std::cout << path << "\n";
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(parse(argc, argv));
  } catch (const UsageError& e) {
    std::cerr << "generate: error: " << e.what() << " (see --help)\n";
  } catch (const std::exception& e) {  // ldm_rt::Error carries the runtime's one-line message
    std::cerr << "generate: error: " << e.what() << "\n";
  }
  return 2;
}
