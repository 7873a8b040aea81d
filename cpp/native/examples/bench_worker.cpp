// The native runtime as a benchmark peer (benchmarks/run.py's "ours-native" row): the worker protocol of
// benchmarks/peers/worker_common.py, spoken by a C++ process with no Python in it.
//
//   native_bench_worker --spec '{"model": DIR, "prompt": ..., "steps": 20, "noise_file": F.npy, ...}'
//   stdout  LDMRT_BENCH {"event": "ready", "first_image_at": ..., ...}   after loading and the first image
//   stdin   warmup | run | exit, one per line, each answered by one LDMRT_BENCH line
//   any failure: LDMRT_BENCH {"event": "final", "status": "failed", "error": "..."} and exit status 1
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

#include "ldm_rt/native/json.hpp"
#include "ldm_rt/native/pipeline.hpp"
#include "ldm_rt/native/pyrepr.hpp"

namespace native = ldm_rt::native;
using Clock = std::chrono::steady_clock;

namespace {

const char* kPrefix = "LDMRT_BENCH ";

void emit(const std::string& json) { std::cout << kPrefix << json << std::endl; }

std::string num(double v) { return native::py_float_repr(v); }

double wall_now() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

// worker_common.peak_rss_mb: VmHWM of this process.
std::string peak_rss_mb() {
  std::ifstream status("/proc/self/status");
  for (std::string line; std::getline(status, line);) {
    if (line.rfind("VmHWM:", 0) == 0) return num(std::stod(line.substr(6)) / 1024.0);
  }
  return "null";
}

// worker_common.save_uint8: the first call's images (B, H, W, 3) uint8 as .npy, for the harness's comparison.
void save_npy(const std::string& path, const std::vector<native::Image>& images) {
  if (path.empty() || images.empty()) return;
  const native::Image& first = images[0];
  std::string header = "{'descr': '|u1', 'fortran_order': False, 'shape': (" + std::to_string(images.size()) + ", " +
                       std::to_string(first.height) + ", " + std::to_string(first.width) + ", 3), }";
  while ((10 + header.size() + 1) % 64 != 0) header += ' ';
  header += '\n';
  std::ofstream out(path, std::ios::binary);
  out.write("\x93NUMPY\x01\x00", 8);
  char len[2] = {char(header.size() & 0xFF), char(header.size() >> 8)};
  out.write(len, 2);
  out << header;
  for (const auto& im : images) out.write(reinterpret_cast<const char*>(im.rgb.data()), std::streamsize(im.rgb.size()));
}

std::string times_json(const std::map<std::string, double>& t, const std::vector<double>& unet) {
  std::string steps;
  for (double s : unet) steps += (steps.empty() ? "" : ", ") + num(s);
  auto stage = [&t](const char* name) { return t.count(name) ? t.at(name) : 0.0; };
  return "\"text_encoder\": " + num(stage("text_encoder") + stage("text_encoder_2")) + ", \"unet\": [" + steps +
         "], \"vae_decoder\": " + num(stage("vae_decoder"));
}

}  // namespace

int main(int argc, char** argv) {
  try {
    if (argc != 3 || std::string(argv[1]) != "--spec") throw std::runtime_error("usage: native_bench_worker --spec JSON");
    native::Json spec = native::parse_json(argv[2], {}, "--spec");
    auto text = [&spec](const char* key, const std::string& fallback = "") {
      const native::Json* v = spec.find(key);
      return v && v->is_string() ? v->as_string() : fallback;
    };
    auto t0 = Clock::now();
    native::LoadOptions options;
    options.model_dir = text("model");
    options.host.threads = int(spec.at("threads").as_int());
    options.host.compile_cache = text("compile_cache");  // "" (the default): compile every start, a true cold start
    const native::Json* bf16 = spec.find("reduced_precision");
    options.host.reduced_precision = bf16 && bf16->is_bool() && bf16->as_bool();
    auto pipe = native::Pipeline::load(options);
    double load_s = std::chrono::duration<double>(Clock::now() - t0).count();

    native::Request r;
    r.prompts = {text("prompt")};
    r.negative_prompts = {text("negative_prompt")};
    r.steps = spec.at("steps").as_int();
    r.guidance = spec.at("guidance").as_double();
    r.scheduler = text("scheduler", "ddim");
    r.seed = uint64_t(spec.at("seed").as_int());
    r.batch = spec.at("batch").as_int();
    r.height = spec.at("height").as_int();
    r.width = spec.at("width").as_int();
    if (!text("noise_file").empty()) r.latents = native::read_npy(text("noise_file"));
    std::vector<double> unet;
    Clock::time_point step_start;
    r.callback = [&](int64_t, int64_t, double) {  // the scheduler step is inside this interval, as it is for the others
      auto now = Clock::now();
      unet.push_back(std::chrono::duration<double>(now - step_start).count());
      step_start = now;
    };
    auto generate = [&]() {
      unet.clear();
      step_start = Clock::now();
      return pipe->generate(r);
    };

    auto first_start = Clock::now();
    native::Result first = generate();
    double first_s = std::chrono::duration<double>(Clock::now() - first_start).count();
    emit("{\"event\": \"ready\", \"first_image_s\": " + num(first_s) + ", \"first_image_at\": " + num(wall_now()) +
         ", \"import_s\": 0.0, \"load_s\": " + num(load_s) + ", \"threads\": " + std::to_string(options.host.threads) +
         ", \"versions\": {\"ldm-rt-native\": \"" + LDM_RT_NATIVE_VERSION + "\"}, \"precision\": \"" +
         (options.host.reduced_precision ? "bf16" : "f32") + "\"}");
    save_npy(text("image_out"), first.images);
    for (std::string line; std::getline(std::cin, line);) {
      if (line == "exit") break;
      auto start = Clock::now();
      native::Result result = generate();
      double total = std::chrono::duration<double>(Clock::now() - start).count();
      emit(line == "run" ? "{\"event\": \"run\", \"total\": " + num(total) + ", " + times_json(result.timings, unet) + "}"
                         : "{\"event\": \"done\"}");
    }
    emit("{\"event\": \"final\", \"status\": \"ok\", \"peak_rss_mb\": " + peak_rss_mb() + "}");
    return 0;
  } catch (const std::exception& e) {
    std::cerr << "native_bench_worker: " << e.what() << std::endl;
    emit("{\"event\": \"final\", \"status\": \"failed\", \"error\": " + native::json_quote(e.what(), true) + "}");
    return 1;
  }
}
