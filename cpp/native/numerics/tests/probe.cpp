// Test driver for tests/test_native_numerics.py: runs one numerics function and prints its result as JSON
// (floats as their exact float32 / float64 bits where exactness matters), so the Python test can compare
// it with numpy, tokenizers and the golden vectors.
//
//   probe rng SEED COUNT                     float32 standard normals (uint32 bits, hex)
//   probe rng-raw SEED COUNT                 PCG64 uint64 draws (hex), then next_uint32 x 3, next_double
//   probe rng-shapes SEED SHAPE_JSON...      one standard_normal(shape) per argument, bits, in order
//   probe golden VECTORS_JSON                replays every case of tests/golden/sampler_vectors.json
//   probe schedule CONFIG_JSON NAME STEPS [STRENGTH]   timesteps, sigmas, init_noise_sigma, noise_steps
//   probe loop CONFIG_JSON NAME STEPS SEED SHAPE_JSON [STRENGTH]  the golden formula loop with a real generator
//   probe batch JOBS_JSON                    many `schedule` + `loop` jobs in one process (see cmd_batch)
//   probe denoised JOBS_JSON                 SchedulerRun::denoised on given samples and model outputs (see cmd_denoised)
//   probe threads TOKENIZER_JSON N          one tokenizer and one scheduler per name shared by N threads:
//                                            each thread's ids and latents equal the single-threaded ones
//   probe guidance-embedding GUIDANCE DIM ROWS   LCM's timestep_cond embedding (bits)
//   probe usable CONFIG_JSON                 usable_schedulers: names and refusals
//   probe tokenize TOKENIZER_JSON < PROMPTS_JSON   ids, dropped, unknown, warnings per prompt
//   probe prompt-weights TOKENIZER_JSON CHUNKS < PROMPTS_JSON   per prompt its fragments (weights as float64
//                                            bits) or the error; then tokenize_weighted's chunks, weights, warnings
//   probe emphasize SEED SHAPE_JSON BATCH WEIGHTS_JSON   emphasize(default_rng(SEED) normals of SHAPE, weights) bits
//   probe json FILE                          parse: prints the compact dump, or the error (exit 2)
//   probe config CONFIG_JSON                 SchedulerConfig::from_json: "ok" or the error (exit 2)
#include <algorithm>
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <functional>
#include <iostream>
#include <sstream>
#include <string>
#include <thread>

#include "ldm_rt/native/json.hpp"
#include "ldm_rt/native/prompt_weights.hpp"
#include "ldm_rt/native/rng.hpp"
#include "ldm_rt/native/scheduler.hpp"
#include "ldm_rt/native/tokenizer.hpp"

using namespace ldm_rt::native;

namespace {

std::string bits32(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  char b[16];
  std::snprintf(b, sizeof b, "\"%08x\"", u);
  return b;
}

std::string f64(double d) {
  char b[40];
  std::snprintf(b, sizeof b, "%.17g", d);
  if (std::strstr(b, "inf") || std::strstr(b, "nan")) return "null";
  return b;
}

std::string tensor_bits(const Tensor& t) {
  std::string s = "[";
  for (std::size_t i = 0; i < t.data.size(); ++i) s += (i ? "," : "") + bits32(t.data[i]);
  return s + "]";
}

std::string vec_json(const std::vector<double>& v) {
  std::string s = "[";
  for (std::size_t i = 0; i < v.size(); ++i) s += (i ? "," : "") + f64(v[i]);
  return s + "]";
}

std::vector<int64_t> shape_of(const Json& j) {
  std::vector<int64_t> s;
  for (const Json& d : j.as_array()) s.push_back(d.as_int());
  return s;
}

Tensor tensor_of(const Json& arr, const std::vector<int64_t>& shape) {
  std::vector<float> d;
  for (const Json& v : arr.as_array()) d.push_back(v.as_float());
  return Tensor(shape, std::move(d));
}

// The golden vectors' stand-in UNet: float32(0.1 * x_in + 0.01 * t / 1000) in float64 (sampler_spec.py).
Tensor model_output(const Tensor& x_in, double t) {
  double t64 = static_cast<double>(static_cast<float>(t));
  Tensor out(x_in.shape);
  for (std::size_t i = 0; i < x_in.data.size(); ++i)
    out.data[i] = static_cast<float>(0.1 * static_cast<double>(x_in.data[i]) + 0.01 * t64 / 1000.0);
  return out;
}

std::string read_all(std::istream& in) {
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

Json load(const std::string& path) { return read_json_object(path, "fix the test file", std::size_t{64} << 20); }

int cmd_golden(const std::string& path) {
  Json doc = load(path);
  const Json& configs = doc.at("configs");
  std::vector<int64_t> shape = shape_of(doc.at("shape"));
  std::string out = "[";
  bool first = true;
  for (const Json& c : doc.at("cases").as_array()) {
    const auto& names = scheduler_names();
    if (std::find(names.begin(), names.end(), c.at("scheduler").as_string()) == names.end()) {
      out += std::string(first ? "" : ",") + "{\"skipped\":true}";  // the test reports names not ported
      first = false;
      continue;
    }
    SchedulerConfig config = SchedulerConfig::from_json(configs.at(c.at("config").as_string()));
    auto sched = Scheduler::make(c.at("scheduler").as_string(), config);
    auto run = sched->set_timesteps(c.at("steps").as_int());
    Tensor noise = tensor_of(c.at("initial_noise"), shape);
    Tensor x = noise;
    float ins = static_cast<float>(run->init_noise_sigma());
    for (float& v : x.data) v = v * ins;
    std::string steps = "[";
    const Json& loop = c.at("loop");
    for (std::size_t i = 0; i < run->size(); ++i) {
      Tensor x_in = run->scale_model_input(x, i);
      // Feed the recorded model input's output so one step's rounding does not cascade into the next.
      Tensor m = model_output(x_in, run->timesteps()[i]);
      const Json* z = i < loop.size() ? &loop[i].at("noise") : nullptr;
      Tensor zt;
      if (z && !z->is_null()) zt = tensor_of(*z, shape);
      x = run->step(m, i, x, nullptr, z && !z->is_null() ? &zt : nullptr);
      steps += std::string(i ? "," : "") + "{\"t\":" + f64(run->timesteps()[i]) + ",\"model_input\":" + tensor_bits(x_in) +
               ",\"model_output\":" + tensor_bits(m) + ",\"sample\":" + tensor_bits(x) + "}";
    }
    steps += "]";
    out += std::string(first ? "" : ",") + "{\"init_noise_sigma\":" + f64(run->init_noise_sigma()) +
           ",\"timesteps\":" + vec_json(run->timesteps()) + ",\"loop\":" + steps + ",\"final\":" + tensor_bits(x) + "}";
    first = false;
  }
  std::cout << out << "]\n";
  return 0;
}

std::unique_ptr<SchedulerRun> make_run(const std::string& config_path, const std::string& name, int64_t steps,
                                       const char* strength) {
  SchedulerConfig config = SchedulerConfig::from_json(load(config_path));
  auto sched = Scheduler::make(name, config);
  auto run = sched->set_timesteps(steps);
  if (strength) run = run->with_strength(std::strtod(strength, nullptr));
  return run;
}

int cmd_schedule(int argc, char** argv) {
  auto run = make_run(argv[2], argv[3], std::atoll(argv[4]), argc > 5 ? argv[5] : nullptr);
  std::string ns = "[";
  auto steps = run->noise_steps();
  for (std::size_t i = 0; i < steps.size(); ++i) ns += (i ? "," : "") + std::to_string(steps[i]);
  std::cout << "{\"timesteps\":" << vec_json(run->timesteps()) << ",\"sigmas\":" << vec_json(run->sigmas())
            << ",\"init_noise_sigma\":" << f64(run->init_noise_sigma()) << ",\"noise_steps\":" << ns << "]"
            << ",\"begin_index\":" << run->begin_index() << ",\"order\":" << run->order()
            << ",\"alphas_cumprod\":[";
  const auto& ac = run->scheduler().alphas_cumprod();
  for (std::size_t i = 0; i < ac.size(); ++i) std::cout << (i ? "," : "") << bits32(ac[i]);
  std::cout << "]}\n";
  return 0;
}

// The probe's sampling loop over `run` with the closed-form model_output: noise drawn from `rng`, scaled by
// init_noise_sigma, or (`img2img`) added at the run's first step to a fixed "image latent" (0.5 everywhere).
Tensor sample_loop(SchedulerRun& run, const std::vector<int64_t>& shape, Generator& rng, bool img2img) {
  Tensor noise = rng.standard_normal(shape);
  Tensor x;
  if (img2img) {
    x = run.add_noise(Tensor(shape, 0.5f), noise, 0);
  } else {
    x = noise;
    float ins = static_cast<float>(run.init_noise_sigma());
    for (float& v : x.data) v = v * ins;
  }
  for (std::size_t i = 0; i < run.size(); ++i) {
    Tensor x_in = run.scale_model_input(x, i);
    x = run.step(model_output(x_in, run.timesteps()[i]), i, x, &rng);
  }
  return x;
}

int cmd_loop(int argc, char** argv) {
  auto run = make_run(argv[2], argv[3], std::atoll(argv[4]), argc > 7 ? argv[7] : nullptr);
  Generator rng(std::strtoull(argv[5], nullptr, 10));
  std::vector<int64_t> shape = shape_of(parse_json(argv[6]));
  Tensor x = sample_loop(*run, shape, rng, argc > 7);
  std::cout << "{\"final\":" << tensor_bits(x) << "}\n";
  return 0;
}

// Each job of the JSON list at `path` answered by `answer` (a JSON object's text), or by {"error": message} where the
// numerics refuse it; printed as one JSON list.
int answer_jobs(const std::string& path, const std::function<std::string(const Json&)>& answer) {
  Json jobs = parse_json(read_bounded(path, std::size_t{64} << 20, "jobs file", "fix the test"), JsonLimits{std::size_t{64} << 20, 64}, path);
  std::cout << "[";
  for (std::size_t j = 0; j < jobs.size(); ++j) {
    std::cout << (j ? ",\n" : "");
    try {
      std::cout << answer(jobs[j]);
    } catch (const std::invalid_argument& e) {
      std::cout << "{\"error\":" << json_quote(e.what()) << "}";
    }
  }
  std::cout << "]\n";
  return 0;
}

// A job's run: Scheduler::make(name, config, option), set_timesteps(steps), then with_strength(strength) unless null.
std::unique_ptr<SchedulerRun> job_run(const Json& job) {
  const Json* option = job.find("option");
  auto sched = Scheduler::make(job.at("name").as_string(), SchedulerConfig::from_json(job.at("config")),
                               option && !option->is_null() ? std::optional<double>(option->as_double()) : std::nullopt);
  auto run = sched->set_timesteps(job.at("steps").as_int());
  if (const Json& strength = job.at("strength"); !strength.is_null()) run = run->with_strength(strength.as_double());
  return run;
}

// JOBS_JSON: [{"config": {...}, "name": "ddim", "steps": 4, "seed": 0, "shape": [1,4,4,4], "strength": null|0.6,
//              "option": null|eta|gamma}]
// -> per job {"error": message} or {"timesteps", "sigmas", "init_noise_sigma", "noise_steps", "final"}.
int cmd_batch(const std::string& path) {
  return answer_jobs(path, [](const Json& job) {
    auto run = job_run(job);
    std::vector<int64_t> shape = shape_of(job.at("shape"));
    Generator rng(static_cast<uint64_t>(job.at("seed").as_int()));
    Tensor x = sample_loop(*run, shape, rng, !job.at("strength").is_null());
    std::string ns = "[";
    auto steps = run->noise_steps();
    for (std::size_t i = 0; i < steps.size(); ++i) ns += (i ? "," : "") + std::to_string(steps[i]);
    std::ostringstream out;
    out << "{\"timesteps\":" << vec_json(run->timesteps()) << ",\"sigmas\":" << vec_json(run->sigmas())
        << ",\"init_noise_sigma\":" << f64(run->init_noise_sigma()) << ",\"noise_steps\":" << ns
        << "],\"final\":" << tensor_bits(x) << "}";
    return out.str();
  });
}

// JOBS_JSON: [{"config": {...}, "name": "ddim", "steps": 4, "strength": null|0.6, "option": null|value, "shape": [...],
//              "samples": [[...] per step], "outputs": [[...] per step]}]
// -> per job {"error": message} or {"denoised": [bits of denoised(outputs[i], i, samples[i]) per step]}.
int cmd_denoised(const std::string& path) {
  return answer_jobs(path, [](const Json& job) {
    auto run = job_run(job);
    std::vector<int64_t> shape = shape_of(job.at("shape"));
    std::vector<int64_t> out_shape = job.find("output_shape") ? shape_of(job.at("output_shape")) : shape;
    const Json &samples = job.at("samples"), &outputs = job.at("outputs");
    std::string steps;
    for (std::size_t i = 0; i < samples.size(); ++i) {
      Tensor d = run->denoised(tensor_of(outputs[i], out_shape), i, tensor_of(samples[i], shape));
      steps += (i ? "," : "") + tensor_bits(d);
    }
    return "{\"denoised\":[" + steps + "]}";
  });
}

// Everything one request computes from shared immutable objects: ids of a few prompts, then the formula loop
// of every scheduler with its own generator. Returned as text so threads' results compare exactly.
std::string one_request(const PromptTokenizer& tok, const UsableSchedulers& scheds, uint64_t seed) {
  std::vector<std::string> prompts = {"a red circle on a white background", "naïve café ΣΟΦΙΑ 日本語", std::string(300, 'x')};
  TokenizedPrompts ids = tok.encode(prompts);
  std::string out;
  for (int64_t v : ids.ids.data) out += std::to_string(v) + ",";
  for (const auto& [name, sched] : scheds.usable) {
    auto run = sched->set_timesteps(6);
    Generator rng(seed);
    Tensor x = rng.standard_normal({2, 4, 5, 5});
    float ins = static_cast<float>(run->init_noise_sigma());
    for (float& v : x.data) v = v * ins;
    for (std::size_t i = 0; i < run->size(); ++i)
      x = run->step(model_output(run->scale_model_input(x, i), run->timesteps()[i]), i, x, &rng);
    out += name + ":" + tensor_bits(x) + ";";
  }
  return out;
}

int cmd_threads(const std::string& path, int n) {
  PromptTokenizer tok = PromptTokenizer::from_file(path);
  UsableSchedulers scheds = usable_schedulers(SchedulerConfig{});
  std::vector<std::string> expected;
  for (int k = 0; k < n; ++k) expected.push_back(one_request(tok, scheds, static_cast<uint64_t>(k)));
  std::vector<std::string> got(static_cast<std::size_t>(n));
  std::vector<std::string> errors(static_cast<std::size_t>(n));
  std::vector<std::thread> threads;
  for (int k = 0; k < n; ++k)
    threads.emplace_back([&, k] {
      try {  // nothing escapes a thread
        for (int rep = 0; rep < 3; ++rep) got[k] = one_request(tok, scheds, static_cast<uint64_t>(k));
      } catch (const std::exception& e) {
        errors[k] = e.what();
      }
    });
  for (auto& t : threads) t.join();
  int same = 0;
  for (int k = 0; k < n; ++k) same += got[k] == expected[k] && errors[k].empty();
  std::cout << "{\"threads\":" << n << ",\"identical\":" << same << ",\"schedulers\":" << scheds.usable.size() << "}\n";
  return same == n ? 0 : 1;
}

int cmd_usable(const std::string& path) {
  UsableSchedulers u = usable_schedulers(SchedulerConfig::from_json(load(path)));
  std::cout << "{\"usable\":[";
  for (std::size_t i = 0; i < u.usable.size(); ++i) std::cout << (i ? "," : "") << json_quote(u.usable[i].first);
  std::cout << "],\"unusable\":{";
  bool first = true;
  for (const auto& [k, v] : u.unusable) {
    std::cout << (first ? "" : ",") << json_quote(k) << ":" << json_quote(v);
    first = false;
  }
  std::cout << "}}\n";
  return 0;
}

int cmd_tokenize(const std::string& path) {
  PromptTokenizer tok = PromptTokenizer::from_file(path);
  Json prompts_json = parse_json(read_all(std::cin), JsonLimits{std::size_t{256} << 20, 16}, "stdin");
  std::vector<std::string> prompts;
  for (const Json& p : prompts_json.as_array()) prompts.push_back(p.as_string());
  TokenizedPrompts r = tok.encode(prompts);
  std::vector<std::string> warnings = tok.warnings(prompts, r);
  const int64_t L = tok.max_length();
  std::cout << "{\"max_length\":" << L << ",\"bos\":" << tok.bos_id() << ",\"eos\":" << tok.eos_id()
            << ",\"pad\":" << tok.pad_id() << ",\"vocab_size\":" << tok.vocab_size() << ",\"ids\":[";
  for (std::size_t b = 0; b < prompts.size(); ++b) {
    std::cout << (b ? "," : "") << "[";
    for (int64_t k = 0; k < L; ++k) std::cout << (k ? "," : "") << r.ids.data[b * L + k];
    std::cout << "]";
  }
  std::cout << "],\"dropped\":[";
  for (std::size_t b = 0; b < prompts.size(); ++b) std::cout << (b ? "," : "") << r.dropped[b];
  std::cout << "],\"unknown\":[";
  for (std::size_t b = 0; b < prompts.size(); ++b) {
    std::cout << (b ? "," : "") << "[";
    for (std::size_t k = 0; k < r.unknown[b].size(); ++k) std::cout << (k ? "," : "") << json_quote(r.unknown[b][k]);
    std::cout << "]";
  }
  std::cout << "],\"warnings\":[";
  for (std::size_t k = 0; k < warnings.size(); ++k) std::cout << (k ? "," : "") << json_quote(warnings[k]);
  std::cout << "]}\n";
  return 0;
}

std::string bits64(double d) {
  uint64_t u;
  std::memcpy(&u, &d, 8);
  char b[24];
  std::snprintf(b, sizeof b, "\"%016" PRIx64 "\"", u);
  return b;
}

int cmd_prompt_weights(const std::string& path, int64_t chunks) {
  PromptTokenizer tok = PromptTokenizer::from_file(path);
  Json prompts_json = parse_json(read_all(std::cin), JsonLimits{std::size_t{64} << 20, 16}, "stdin");
  std::vector<std::string> prompts;
  for (const Json& p : prompts_json.as_array()) prompts.push_back(p.as_string());
  std::cout << "{\"parsed\":[";
  bool ok = true;
  for (std::size_t i = 0; i < prompts.size(); ++i) {
    std::cout << (i ? "," : "");
    try {
      auto segments = parse_prompt_weights(prompts[i]);
      std::cout << "[";
      for (std::size_t k = 0; k < segments.size(); ++k) {
        std::cout << (k ? "," : "") << "[";
        for (std::size_t j = 0; j < segments[k].size(); ++j)
          std::cout << (j ? "," : "") << "[" << json_quote(segments[k][j].text) << "," << bits64(segments[k][j].weight) << "]";
        std::cout << "]";
      }
      std::cout << "]";
    } catch (const PromptWeightError& e) {
      std::cout << "{\"error\":" << json_quote(e.what()) << "}";
      ok = false;
    }
  }
  std::cout << "]";
  if (ok) {
    TokenizedPrompts r = tokenize_weighted(tok, prompts, chunks);
    std::cout << ",\"chunks\":[";
    for (std::size_t b = 0; b < prompts.size(); ++b) {
      std::cout << (b ? "," : "") << "[";
      for (std::size_t k = 0; k < r.chunks[b].data.size(); ++k) std::cout << (k ? "," : "") << r.chunks[b].data[k];
      std::cout << "]";
    }
    std::cout << "],\"weights\":[";
    for (std::size_t b = 0; b < prompts.size(); ++b) std::cout << (b ? "," : "") << tensor_bits(r.weights[b]);
    std::cout << "],\"ids\":[";
    for (std::size_t k = 0; k < r.ids.data.size(); ++k) std::cout << (k ? "," : "") << r.ids.data[k];
    std::cout << "],\"dropped\":[";
    for (std::size_t b = 0; b < prompts.size(); ++b) std::cout << (b ? "," : "") << r.dropped[b];
    std::cout << "],\"warnings\":[";
    std::vector<std::string> warnings = weighted_warnings(tok, prompts, r);
    for (std::size_t k = 0; k < warnings.size(); ++k) std::cout << (k ? "," : "") << json_quote(warnings[k]);
    std::cout << "]";
  }
  std::cout << "}\n";
  return 0;
}

int cmd_emphasize(uint64_t seed, const std::string& shape_json, int64_t batch, const std::string& weights_json) {
  Generator g(seed);
  Tensor states = g.standard_normal(shape_of(parse_json(shape_json)));
  std::vector<Tensor> weights;
  Json all = parse_json(weights_json);
  for (const Json& w : all.as_array()) {  // per prompt: [[chunk weights...]...]
    std::vector<float> values;
    for (const Json& row : w.as_array())
      for (const Json& v : row.as_array()) values.push_back(v.as_float());
    int64_t n = int64_t(w.size());
    weights.emplace_back(std::vector<int64_t>{n, n ? int64_t(values.size()) / n : 0}, std::move(values));
  }
  std::cout << tensor_bits(emphasize(states, weights, batch)) << "\n";
  return 0;
}

int run(int argc, char** argv) {
  if (argc < 2) {
    std::cerr << "usage: probe COMMAND ...\n";
    return 2;
  }
  std::string cmd = argv[1];
  if (cmd == "rng" && argc == 4) {
    Generator g(std::strtoull(argv[2], nullptr, 10));
    long n = std::atol(argv[3]);
    std::string s = "[";
    for (long i = 0; i < n; ++i) s += (i ? "," : "") + bits32(g.standard_normal_f());
    std::cout << s << "]\n";
    return 0;
  }
  if (cmd == "rng-raw" && argc == 4) {
    Generator g(std::strtoull(argv[2], nullptr, 10));
    long n = std::atol(argv[3]);
    std::cout << "{\"uint64\":[";
    for (long i = 0; i < n; ++i) std::printf("%s\"%016" PRIx64 "\"", i ? "," : "", g.next_uint64());
    std::fflush(stdout);
    uint32_t a = g.next_uint32(), b = g.next_uint32(), c = g.next_uint32();
    std::cout << "],\"uint32\":[" << a << "," << b << "," << c << "],\"double\":" << f64(g.next_double()) << "}\n";
    return 0;
  }
  if (cmd == "rng-shapes" && argc >= 3) {
    Generator g(std::strtoull(argv[2], nullptr, 10));
    std::cout << "[";
    for (int k = 3; k < argc; ++k) std::cout << (k > 3 ? "," : "") << tensor_bits(g.standard_normal(shape_of(parse_json(argv[k]))));
    std::cout << "]\n";
    return 0;
  }
  if (cmd == "golden" && argc == 3) return cmd_golden(argv[2]);
  if (cmd == "schedule" && argc >= 5) return cmd_schedule(argc, argv);
  if (cmd == "loop" && argc >= 7) return cmd_loop(argc, argv);
  if (cmd == "guidance-embedding" && argc == 5) {
    std::cout << tensor_bits(guidance_embedding(std::strtod(argv[2], nullptr), std::atoll(argv[3]), std::atoll(argv[4]))) << "\n";
    return 0;
  }
  if (cmd == "threads" && argc == 4) return cmd_threads(argv[2], std::atoi(argv[3]));
  if (cmd == "batch" && argc == 3) return cmd_batch(argv[2]);
  if (cmd == "denoised" && argc == 3) return cmd_denoised(argv[2]);
  if (cmd == "usable" && argc == 3) return cmd_usable(argv[2]);
  if (cmd == "tokenize" && argc == 3) return cmd_tokenize(argv[2]);
  if (cmd == "prompt-weights" && argc == 4) return cmd_prompt_weights(argv[2], std::atoll(argv[3]));
  if (cmd == "emphasize" && argc == 6) return cmd_emphasize(std::strtoull(argv[2], nullptr, 10), argv[3], std::atoll(argv[4]), argv[5]);
  if (cmd == "json" && argc == 3) {
    std::string data = read_bounded(argv[2], std::size_t{64} << 20, "JSON file", "fix it");
    std::cout << parse_json(data, {}, argv[2]).dump() << "\n";
    return 0;
  }
  if (cmd == "config" && argc == 3) {
    SchedulerConfig::from_json(parse_json(read_bounded(argv[2], 1 << 20, "config", "fix it"), {}, argv[2]));
    std::cout << "ok\n";
    return 0;
  }
  std::cerr << "probe: unknown command or wrong arguments\n";
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::cout << std::flush;
    std::cerr << "error: " << e.what() << "\n";
    return 2;
  }
}
