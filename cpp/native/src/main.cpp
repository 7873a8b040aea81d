// ldm-rt-native: `ldm-rt sample` without Python. Same flags, same images for the same seed, same one-line
// errors (`ldm-rt-native: error: MESSAGE`, exit status 2, no file written).
#include <limits.h>
#include <unistd.h>

#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <sys/stat.h>
#include <vector>

#include "ldm_rt/native/controlnet.hpp"
#include "ldm_rt/native/pipeline.hpp"

using namespace ldm_rt::native;

namespace {

constexpr const char* kProg = "ldm-rt-native";

#ifndef LDM_RT_DEFAULT_MODEL
#define LDM_RT_DEFAULT_MODEL ""
#endif

// A usage error (argparse's wording, then "; see --help").
struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};
struct CliError : Error {
  using Error::Error;
};

const char* kHelp = R"(usage: ldm-rt-native [-h] [--prompt PROMPT] [--negative-prompt NEGATIVE_PROMPT] [--prompt-weighting]
                     [--steps STEPS] [--guidance GUIDANCE] [--guidance-rescale GUIDANCE_RESCALE] [--scheduler NAME] [--eta ETA]
                     [--seed SEED] [--height HEIGHT] [--width WIDTH] [--batch BATCH] [--latents LATENTS] [--init-image INIT_IMAGE]
                     [--strength STRENGTH] [--mask MASK] [--mask-blur PX] [--out OUT] [--grid] [--preview FILE.png] [--preview-every N]
                     [--preview-kind {fast,full}] [--precision {fp32,fp16}] [--threads THREADS] [--bf16]
                     [--no-compile-cache] [--model MODEL] [--lora FILE[:SCALE]] [--embedding FILE[:TOKEN]]
                     [--original-size H W] [--crops-coords-top-left TOP LEFT] [--target-size H W]
                     [--negative-original-size H W] [--negative-crops-coords-top-left TOP LEFT]
                     [--negative-target-size H W] [--aesthetic-score S] [--negative-aesthetic-score S]
                     [--refiner DIR] [--refiner-start F] [--control-image IMG] [--controlnet-scale S]
                     [--control-guidance-start F [F ...]] [--control-guidance-end F [F ...]] [--guess-mode]
                     [--verbose]

Generate images from a prompt with the native runtime (no Python): the artifacts folder's tokenizer, scheduler and
portable ONNX files on OpenVINO's C++ API. The same arguments and seed give the image `ldm-rt sample` gives.

options:
  -h, --help            show this help message and exit
  --prompt PROMPT       what to draw
  --negative-prompt NEGATIVE_PROMPT
                        what to steer away from (the unconditional half of guidance)
  --prompt-weighting    read A1111's emphasis in both prompts: (word) x1.1, [word] /1.1, (word:1.3), nesting
                        multiplies, \( \) for literal brackets, BREAK starts a new chunk (default: brackets are plain
                        text)
  --steps STEPS         denoising steps (default 25)
  --guidance GUIDANCE   classifier-free guidance scale; 1.0 skips the unconditional pass (default 7.5)
  --guidance-rescale GUIDANCE_RESCALE
                        pull the guided prediction back to the conditional one's spread, 0..1 (Lin et al.: 0.7 for
                        zero-SNR models; default 0)
  --scheduler NAME      sampler (default: the model's own, from its folder's scheduler class: euler for SDXL,
                        euler-a for SDXL-Turbo, lcm for LCM models, ddim for the shipped model): SCHEDULERS; pndm,
                        lms and heun cannot sample zero-terminal-SNR models such as the default one
  --eta ETA             the sampler's noise, 0..1 (diffusers' eta): DDIM's eta (default 0), TCD's gamma (default 0.3),
                        DPM++ 2S a's eta (default 1); other schedulers take none
  --seed SEED           random seed (default: random; written into the image file)
  --height HEIGHT       image height in pixels (default: the artifacts' optimum)
  --width WIDTH         image width in pixels (default: the artifacts' optimum)
  --batch BATCH         images to generate (default 1)
  --latents LATENTS     FILE.npy of unit-variance initial noise (B, C, H/f, W/f) instead of drawing it
  --init-image INIT_IMAGE
                        PNG or JPEG image to start from (img2img; with --mask, inpainting)
  --strength STRENGTH   fraction of the schedule to run from the init image, in (0, 1] (default 0.8; 1.0 with --mask)
  --mask MASK           inpainting mask image (PNG or JPEG): white = repaint, black = keep
  --mask-blur PX        with --mask: Gaussian radius in pixels of the seam where the kept pixels are pasted back
                        (default 0: hard edge)
  --out OUT             output image, .png or .jpg/.jpeg (parameters in PNG text chunks, else in EXIF; no
                        .webp); a batch writes NAME_0.png, NAME_1.png, ...; all or none are written (default
                        sample.png)
  --grid                write a batch as one grid image at --out
  --preview FILE.png    write a preview of the image being sampled here (a batch as a grid), replaced atomically at
                        each previewed step; the file must be new or an earlier preview (a user's file is never
                        overwritten)
  --preview-every N     with --preview: every N steps, and the last (default 1)
  --preview-kind {fast,full}
                        with --preview: fast (the model's fitted latent -> RGB map, almost free; default) or full (a
                        VAE decode each time, exact)
  --precision {fp32,fp16}
                        which built precision to run (default fp32)
  --threads THREADS     CPU threads per operator (default: one per physical core; at most 4 per CPU)
  --bf16                compute in bf16 where the CPU supports it (AVX512_BF16 or AMX; elsewhere a warning and f32).
                        Off by default: f32 draws the images ldm-rt sample draws; bf16 is faster on CPUs with AMX,
                        images within a few 8-bit levels
  --no-compile-cache    do not keep compiled graphs in ~/.cache/ldm-rt/openvino for the next run
  --model MODEL         artifacts folder (default: DEFAULT_MODEL)
  --lora FILE[:SCALE]   apply a LoRA (.safetensors, diffusers/PEFT or kohya layout) at SCALE (default 1) as the model
                        opens; repeatable, scales add up
  --embedding FILE[:TOKEN]
                        a textual-inversion embedding (.safetensors: diffusers, A1111 or SDXL clip_l/clip_g; torch .pt
                        and .bin files are refused with the conversion) whose trigger word TOKEN (default: the file's
                        own, else its name) then works in both prompts; repeatable
  --verbose             print per-stage timings

SDXL:
  base + refiner on latents, and the micro-conditioning (diffusers' names; sizes are HEIGHT WIDTH)

  --refiner DIR         an SDXL refiner's artifacts folder: it takes over from --model at --refiner-start of the
                        schedule
  --refiner-start F     with --refiner: the fraction of the schedule the base runs, in (0, 1) (default 0.8)
  --original-size H W   original_size (default the output size)
  --crops-coords-top-left TOP LEFT
                        crops_coords_top_left (default 0 0)
  --target-size H W     target_size (default the output size)
  --negative-original-size H W
                        negative_original_size (default --original-size)
  --negative-crops-coords-top-left TOP LEFT
                        negative_crops_coords_top_left (default --crops-coords-top-left)
  --negative-target-size H W
                        negative_target_size (default --target-size)
  --aesthetic-score S   aesthetic_score (refiner; default 6.0)
  --negative-aesthetic-score S
                        negative_aesthetic_score (refiner; default 2.5)

ControlNet:
  artifacts built with --controlnet: one control image per ControlNet, in export order

  --control-image IMG   control image (canny edges, depth, pose, ...) of the next ControlNet; resized to the output
                        size; repeatable
  --controlnet-scale S  conditioning scale of the --control-image before it (default 1.0); give none or one per
                        --control-image
  --control-guidance-start F [F ...]
                        fraction of the steps after which the ControlNets apply: one for all or one per ControlNet
                        (default 0)
  --control-guidance-end F [F ...]
                        fraction of the steps until which the ControlNets apply: one for all or one per ControlNet
                        (default 1)
  --guess-mode          ControlNets steer the conditional half only, coarse residuals weighted up (diffusers'
                        guess_mode; for empty prompts)
)";

std::string replace(std::string s, const std::string& from, const std::string& to) {
  auto at = s.find(from);
  return at == std::string::npos ? s : s.replace(at, from.size(), to);
}

std::string help_text() {
  std::string names;
  for (const auto& n : scheduler_names()) names += (names.empty() ? "" : ", ") + n;
  return replace(replace(kHelp, "SCHEDULERS", names), "DEFAULT_MODEL", std::string(LDM_RT_DEFAULT_MODEL).empty() ? "none" : LDM_RT_DEFAULT_MODEL);
}

// Python's int(): optional sign, digits (underscores between digits), surrounding whitespace.
std::optional<long long> parse_int(const std::string& text) {
  std::string s;
  size_t b = text.find_first_not_of(" \t\n"), e = text.find_last_not_of(" \t\n");
  if (b == std::string::npos) return std::nullopt;
  std::string t = text.substr(b, e - b + 1);
  for (size_t k = 0; k < t.size(); ++k) {
    if (t[k] == '_' && k > 0 && k + 1 < t.size() && std::isdigit((unsigned char)t[k - 1]) && std::isdigit((unsigned char)t[k + 1])) continue;
    s.push_back(t[k]);
  }
  size_t start = (s[0] == '+' || s[0] == '-') ? 1 : 0;
  if (start == s.size()) return std::nullopt;
  for (size_t k = start; k < s.size(); ++k) {
    if (!std::isdigit((unsigned char)s[k])) return std::nullopt;
  }
  errno = 0;
  long long v = std::strtoll(s.c_str(), nullptr, 10);
  if (errno == ERANGE) return std::nullopt;
  return v;
}

std::optional<double> parse_float(const std::string& text) {
  if (text.empty()) return std::nullopt;
  char* end = nullptr;
  double v = std::strtod(text.c_str(), &end);
  while (end && (*end == ' ' || *end == '\t' || *end == '\n')) ++end;
  if (end == text.c_str() || *end != '\0') return std::nullopt;
  return v;
}

std::string py_repr(const std::string& s) { return "'" + s + "'"; }

struct Args {
  std::string prompt, negative_prompt;
  long long steps = 25;
  double guidance = 7.5, guidance_rescale = 0.0;
  std::string scheduler;  // "": the model's own
  std::optional<long long> seed;
  std::optional<long long> height, width;
  long long batch = 1;
  std::optional<std::string> init_image, mask, model, latents, refiner;
  std::optional<double> refiner_start, eta;
  MicroRequest micro;
  std::optional<double> strength, mask_blur;
  std::string out = "sample.png";
  std::optional<std::string> preview, preview_kind;
  std::optional<long long> preview_every;
  std::string precision = "fp32";
  std::optional<long long> threads;
  std::vector<std::string> loras;  // --lora FILE[:SCALE], repeatable
  std::vector<std::string> embeddings;  // --embedding FILE[:TOKEN], repeatable
  bool bf16 = false, no_compile_cache = false, verbose = false, help = false, prompt_weighting = false, grid = false;
  std::vector<std::string> control_images;  // repeatable, export order
  std::vector<double> controlnet_scales;    // repeatable: one after each --control-image, or none
  std::optional<std::vector<double>> control_guidance_start, control_guidance_end;  // nargs="+": the last given
  bool guess_mode = false;
};

Args parse(int argc, char** argv) {
  Args a;
  std::vector<std::string> unrecognized;
  for (int k = 1; k < argc; ++k) {
    std::string arg = argv[k], value;
    bool inline_value = false;
    if (arg.rfind("--", 0) == 0 && arg.find('=') != std::string::npos) {
      value = arg.substr(arg.find('=') + 1), arg = arg.substr(0, arg.find('=')), inline_value = true;
    }
    auto flag = [&](bool& target) {
      if (inline_value) throw UsageError("argument " + arg + ": ignored explicit argument " + py_repr(value));
      target = true;
    };
    auto next = [&]() -> std::string {
      if (inline_value) return value;
      if (k + 1 >= argc || (argv[k + 1][0] == '-' && argv[k + 1][1] != '\0' && !std::isdigit((unsigned char)argv[k + 1][1]) && argv[k + 1][1] != '.')) {
        throw UsageError("argument " + arg + ": expected one argument");
      }
      return argv[++k];
    };
    auto integer = [&]() {
      std::string v = next();
      auto n = parse_int(v);
      if (!n) throw UsageError("argument " + arg + ": invalid int value: " + py_repr(v));
      return *n;
    };
    auto pair = [&]() {  // nargs=2 ints
      Pair p{};
      for (int n = 0; n < 2; ++n) {
        bool missing = inline_value || k + 1 >= argc ||
                       (argv[k + 1][0] == '-' && argv[k + 1][1] != '\0' && !std::isdigit((unsigned char)argv[k + 1][1]));
        if (missing) throw UsageError("argument " + arg + ": expected 2 arguments");
        std::string v = argv[++k];
        auto x = parse_int(v);
        if (!x) throw UsageError("argument " + arg + ": invalid int value: " + py_repr(v));
        p[size_t(n)] = *x;
      }
      return p;
    };
    auto real = [&]() {
      std::string v = next();
      auto x = parse_float(v);
      if (!x) throw UsageError("argument " + arg + ": invalid float value: " + py_repr(v));
      return *x;
    };
    auto reals = [&]() {  // nargs="+" floats: the arguments up to the next option (a negative number is a value)
      std::vector<std::string> texts;
      if (inline_value) texts.push_back(value);
      while (!inline_value && k + 1 < argc &&
             !(argv[k + 1][0] == '-' && argv[k + 1][1] != '\0' && !std::isdigit((unsigned char)argv[k + 1][1]) && argv[k + 1][1] != '.')) {
        texts.push_back(argv[++k]);
      }
      if (texts.empty()) throw UsageError("argument " + arg + ": expected at least one argument");
      std::vector<double> values;
      for (const std::string& v : texts) {
        auto x = parse_float(v);
        if (!x) throw UsageError("argument " + arg + ": invalid float value: " + py_repr(v));
        values.push_back(*x);
      }
      return values;
    };
    if (arg == "-h" || arg == "--help") a.help = true;
    else if (arg == "--prompt") a.prompt = next();
    else if (arg == "--negative-prompt") a.negative_prompt = next();
    else if (arg == "--prompt-weighting") flag(a.prompt_weighting);
    else if (arg == "--steps") a.steps = integer();
    else if (arg == "--guidance") a.guidance = real();
    else if (arg == "--guidance-rescale") a.guidance_rescale = real();
    else if (arg == "--scheduler") {
      std::string v = next();
      const auto& names = scheduler_names();
      if (std::find(names.begin(), names.end(), v) == names.end()) {
        std::string choices;
        for (const auto& n : names) choices += (choices.empty() ? "" : ", ") + py_repr(n);
        throw UsageError("argument --scheduler: invalid choice: " + py_repr(v) + " (choose from " + choices + ")");
      }
      a.scheduler = v;
    } else if (arg == "--eta") a.eta = real();
    else if (arg == "--seed") a.seed = integer();
    else if (arg == "--height") a.height = integer();
    else if (arg == "--width") a.width = integer();
    else if (arg == "--batch") a.batch = integer();
    else if (arg == "--latents") a.latents = next();
    else if (arg == "--original-size") a.micro.original_size = pair();
    else if (arg == "--crops-coords-top-left") a.micro.crops_coords_top_left = pair();
    else if (arg == "--target-size") a.micro.target_size = pair();
    else if (arg == "--negative-original-size") a.micro.negative_original_size = pair();
    else if (arg == "--negative-crops-coords-top-left") a.micro.negative_crops_coords_top_left = pair();
    else if (arg == "--negative-target-size") a.micro.negative_target_size = pair();
    else if (arg == "--aesthetic-score") a.micro.aesthetic_score = real();
    else if (arg == "--negative-aesthetic-score") a.micro.negative_aesthetic_score = real();
    else if (arg == "--refiner") a.refiner = next();
    else if (arg == "--refiner-start") a.refiner_start = real();
    else if (arg == "--control-image") a.control_images.push_back(next());
    else if (arg == "--controlnet-scale") a.controlnet_scales.push_back(real());
    else if (arg == "--control-guidance-start") a.control_guidance_start = reals();
    else if (arg == "--control-guidance-end") a.control_guidance_end = reals();
    else if (arg == "--guess-mode") flag(a.guess_mode);
    else if (arg == "--init-image") a.init_image = next();
    else if (arg == "--strength") a.strength = real();
    else if (arg == "--mask") a.mask = next();
    else if (arg == "--mask-blur") a.mask_blur = real();
    else if (arg == "--out") a.out = next();
    else if (arg == "--grid") flag(a.grid);
    else if (arg == "--preview") a.preview = next();
    else if (arg == "--preview-every") a.preview_every = integer();
    else if (arg == "--preview-kind") {
      std::string v = next();
      if (v != "fast" && v != "full") throw UsageError("argument --preview-kind: invalid choice: " + py_repr(v) + " (choose from 'fast', 'full')");
      a.preview_kind = v;
    }
    else if (arg == "--precision") {
      std::string v = next();
      if (v != "fp32" && v != "fp16") throw UsageError("argument --precision: invalid choice: " + py_repr(v) + " (choose from 'fp32', 'fp16')");
      a.precision = v;
    } else if (arg == "--threads") a.threads = integer();
    else if (arg == "--bf16") flag(a.bf16);
    else if (arg == "--no-compile-cache") flag(a.no_compile_cache);
    else if (arg == "--model") a.model = next();
    else if (arg == "--lora") a.loras.push_back(next());
    else if (arg == "--embedding") a.embeddings.push_back(next());
    else if (arg == "--verbose") flag(a.verbose);
    else unrecognized.push_back(argv[k]);
  }
  if (!unrecognized.empty() && !a.help) {
    std::string all;
    for (const auto& u : unrecognized) all += (all.empty() ? "" : " ") + u;
    throw UsageError("unrecognized arguments: " + all);
  }
  return a;
}

bool is_dir(const std::string& p) {
  struct stat st {};
  return ::stat(p.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

std::string parent_of(const std::string& path) {
  std::string p = normal_path(path);
  auto slash = p.rfind('/');
  if (slash == std::string::npos) return ".";
  return slash == 0 ? "/" : p.substr(0, slash);
}

// cli.check_writable: before any work, the format --out names, its folder and every file the run writes.
void check_writable(const std::string& out, const std::vector<std::string>& paths) {
  std::string shown = normal_path(out);
  if (is_dir(out)) throw CliError("--out " + shown + " is a folder; give a file name like " + normal_path(out + "/sample.png"));
  std::vector<std::string> all = {out};
  all.insert(all.end(), paths.begin(), paths.end());
  for (const auto& p : all) {
    std::string reason = not_a_file_target(p);
    if (!reason.empty()) throw CliError("--out " + replace(reason, p, normal_path(p)));
  }
  try {
    output_format(out);
  } catch (const OutputError& e) {
    throw CliError(std::string("--out ") + e.what());
  }
  std::string parent = parent_of(out);
  if (!is_dir(parent)) throw CliError("--out " + shown + ": folder " + parent + " does not exist; create it first");
  for (const auto& p : paths) {
    struct stat st {};
    bool exists = ::stat(p.c_str(), &st) == 0;
    if (::access(parent.c_str(), W_OK) != 0 || (exists && ::access(p.c_str(), W_OK) != 0)) {
      throw CliError("--out " + normal_path(p) + " is not writable; choose another path");
    }
    if (exists && !written_by_ldm_rt(p)) {
      throw CliError("--out " + normal_path(p) + " exists and is not an image ldm-rt wrote; choose a new file name (a file of yours is never replaced)");
    }
  }
}

// Python's Path.resolve() of a path whose folder exists: symlinks and '..' resolved, the name kept when it is new.
std::string resolved(const std::string& path) {
  std::string p = normal_path(path), parent = parent_of(p), name = p.substr(p.rfind('/') == std::string::npos ? 0 : p.rfind('/') + 1);
  char buf[PATH_MAX];
  if (::realpath(p.c_str(), buf)) return buf;
  return ::realpath(parent.c_str(), buf) ? std::string(buf) + "/" + name : p;
}

// cli.preview_arguments: the --preview file (checked before any work: new or an earlier preview), or none.
std::optional<std::string> preview_target(const Args& a) {
  if (!a.preview) {
    for (const char* flag : {"--preview-every", "--preview-kind"}) {
      if (std::string(flag) == "--preview-every" ? bool(a.preview_every) : bool(a.preview_kind)) {
        throw CliError(std::string(flag) + " needs --preview FILE.png: where the previews are written");
      }
    }
    return std::nullopt;
  }
  if (a.preview_every && *a.preview_every < 1) {
    throw CliError("--preview-every must be at least 1 (a preview every N steps), got " + std::to_string(*a.preview_every));
  }
  std::string path = check_preview_target(*a.preview);
  for (const auto& out : output_paths(a.out, size_t(std::max(a.batch, 1LL)), a.grid)) {
    if (resolved(out) == resolved(path)) {
      throw CliError("--preview " + path + " is also an output image (--out); give the preview its own file name");
    }
  }
  return path;
}

std::string fixed3(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.3f", v);
  return buf;
}

std::string format_timings(const std::map<std::string, double>& t, long long unet_steps) {
  std::vector<std::string> parts;
  for (const char* stage : {"text_encoder", "text_encoder_2", "vae_encoder", "controlnet", "unet", "vae_decoder", "preview", "total"}) {
    auto it = t.find(stage);
    if (it == t.end()) continue;
    if (std::string(stage) == "unet") {
      parts.push_back("unet " + fixed3(it->second) + "s (" + std::to_string(unet_steps) + " steps, " +
                      fixed3(it->second / double(std::max(unet_steps, 1LL))) + "s/step)");
    } else {
      parts.push_back(std::string(stage) + " " + fixed3(it->second) + "s");
    }
  }
  std::string line = "timings: ";
  for (size_t k = 0; k < parts.size(); ++k) line += (k ? ", " : "") + parts[k];
  return line;
}

int sample(const Args& a) {
  if (a.refiner_start && !a.refiner) {
    throw CliError("--refiner-start needs --refiner: the refiner takes over at that fraction of the schedule");
  }
  std::vector<LoraSpec> loras;  // a scale that is not a number: one line, before any work
  for (const std::string& text : a.loras) loras.push_back(parse_lora_arg(text));
  std::vector<EmbeddingSpec> embeddings;
  for (const std::string& text : a.embeddings) embeddings.push_back(parse_embedding_arg(text));
  if (a.batch > kMaxImagesPerCall) {
    throw GenerationError(std::to_string(a.batch) + " images (--batch) is over the runtime's limit of " +
                          std::to_string(kMaxImagesPerCall) + "; generate them in several calls");
  }
  check_writable(a.out, output_paths(a.out, size_t(std::max(a.batch, 1LL)), a.grid));
  std::optional<std::string> preview = preview_target(a);
  if (a.mask && !a.init_image) throw CliError("--mask needs --init-image: inpainting repaints part of an image");
  if (a.strength && !a.init_image) throw CliError("--strength needs --init-image: it is the fraction of the schedule run from that image");
  if (a.mask_blur && !a.mask) throw CliError("--mask-blur needs --mask: it softens the seam of the inpainted region");
  if (!a.controlnet_scales.empty() && a.controlnet_scales.size() != a.control_images.size()) {  // cli.control_arguments
    throw CliError(std::to_string(a.controlnet_scales.size()) + " --controlnet-scale values for " + std::to_string(a.control_images.size()) +
                   " --control-image; give one after each --control-image, or none");
  }
  std::optional<LatentsInput> latents;
  if (a.latents) {  // cli.load_latents: the header now, the values once the pipeline has checked them
    try {
      latents = read_npy(normal_path(*a.latents));
    } catch (const NpyError& e) {
      std::string shown = normal_path(*a.latents);
      if (std::string(e.what()) == "npz") throw CliError("--latents " + shown + " is an .npz archive; save one array with numpy.save as FILE.npy");
      throw CliError("cannot read --latents " + shown + ": " + e.what());
    }
  }
  if (a.threads && *a.threads < 1) {
    throw CliError("--threads must be at least 1, got " + std::to_string(*a.threads) + "; leave it out for one per physical core");
  }
  LoadOptions options;
  if (a.model) {
    options.model_dir = *a.model;
  } else {
    options.model_dir = LDM_RT_DEFAULT_MODEL;
    struct stat st {};
    if (options.model_dir.empty() || ::stat((options.model_dir + "/manifest.json").c_str(), &st) != 0) {
      throw ArtifactError("the shipped default model's artifacts are missing (" + options.model_dir +
                          "); pass --model DIR with a folder built by `python export/build_engines.py`");
    }
  }
  options.precision = a.precision;
  options.loras = loras;  // the base model's, not the refiner's
  options.embeddings = embeddings;  // in both (the refiner reads the same prompts)
  options.host.threads = a.threads ? int(std::min<long long>(*a.threads, 1 << 30)) : 0;
  options.host.reduced_precision = a.bf16;
  options.host.compile_cache = a.no_compile_cache ? "" : default_compile_cache();
  options.host.warn = [](const std::string& m) { std::cerr << kProg << ": WARNING: " << m << std::endl; };
  if (a.refiner && a.mask) throw CliError("--refiner does not inpaint; drop --refiner or --mask");
  auto pipe = Pipeline::load(options);
  std::shared_ptr<const Pipeline> refiner;
  if (a.refiner) {
    LoadOptions refiner_options = options;
    refiner_options.model_dir = *a.refiner;
    refiner_options.loras.clear();
    refiner = Pipeline::load(refiner_options);
  }

  Request r;
  r.prompts = {a.prompt};
  r.negative_prompts = {a.negative_prompt};
  r.prompt_weighting = a.prompt_weighting;
  r.steps = a.steps;
  r.guidance = a.guidance;
  r.guidance_rescale = a.guidance_rescale;
  r.eta = a.eta;
  r.scheduler = a.scheduler;
  if (a.seed) {
    if (*a.seed < 0) throw GenerationError("seed must be >= 0, got " + std::to_string(*a.seed));
    r.seed = uint64_t(*a.seed);
  }
  r.batch = a.batch;
  r.height = a.height;
  r.width = a.width;
  r.latents = latents;
  r.micro = a.micro;
  // Read only when there is one per ControlNet, as generate() counts them before it opens any (a wrong count, or
  // control images for a folder without ControlNets, is its one line; the placeholders never reach a network).
  const size_t nets = pipe->controlnets().size();
  for (size_t k = 0; k < a.control_images.size(); ++k) {
    r.control_images.push_back(a.control_images.size() == nets ? read_rgb_image(a.control_images[k], control_image_what(nets, k)) : Image{});
  }
  r.controlnet_conditioning_scale = a.controlnet_scales;
  r.control_guidance_start = a.control_guidance_start.value_or(std::vector<double>{});
  r.control_guidance_end = a.control_guidance_end.value_or(std::vector<double>{});
  r.guess_mode = a.guess_mode;
  if (a.init_image) r.init_image = read_rgb_image(*a.init_image, "init image");
  r.strength = a.strength;
  if (a.mask) r.mask = read_mask_image(*a.mask);
  r.mask_blur = a.mask_blur ? *a.mask_blur : 0.0;
  r.refiner = refiner;
  r.refiner_start = a.refiner_start;
  if (preview) {
    r.preview = [path = *preview](int64_t i, int64_t n, const std::vector<Image>& images) { write_preview(path, images, i, n); };
    r.preview_every = a.preview_every.value_or(1);
    r.preview_kind = a.preview_kind.value_or("fast");
  }
  long long unet_steps = 0;
  // The last stage's steps (a hand-off: the refiner's, as its unet timing and ldm-rt sample's line count them).
  r.callback = [&unet_steps](int64_t i, int64_t, double) { unet_steps = i + 1; };
  Result result = pipe->generate(r);
  for (const auto& path : result.save(a.out, a.grid)) std::cout << path << "\n";
  std::cout.flush();
  if (a.verbose) std::cerr << format_timings(result.timings, unet_steps) << std::endl;
  return 0;
}

std::string one_line(const std::string& message) {
  std::istringstream words(message);
  std::string out;
  for (std::string w; words >> w;) out += (out.empty() ? "" : " ") + w;
  return out;
}

extern "C" void on_interrupt(int) {
  const char msg[] = "ldm-rt-native: interrupted\n";
  ssize_t ignored = ::write(2, msg, sizeof msg - 1);
  (void)ignored;
  ::_exit(130);  // 128 + SIGINT
}

}  // namespace

int main(int argc, char** argv) {
  std::signal(SIGINT, on_interrupt);
  try {
    Args a = parse(argc, argv);
    if (a.help) {
      std::cout << help_text();
      return 0;
    }
    return sample(a);
  } catch (const UsageError& e) {
    std::cerr << kProg << ": error: " << one_line(e.what()) << "; see --help" << std::endl;
    return 2;
  } catch (const std::invalid_argument& e) {  // the numerics' errors (scheduler, tokenizer, JSON)
    std::cerr << kProg << ": error: " << one_line(e.what()) << std::endl;
    return 2;
  } catch (const Error& e) {
    std::cerr << kProg << ": error: " << one_line(e.what()) << std::endl;
    return 2;
  } catch (const std::exception& e) {
    std::cerr << kProg << ": internal error: " << one_line(e.what()) << std::endl;
    return 1;
  }
}
