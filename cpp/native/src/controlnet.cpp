#include "ldm_rt/native/controlnet.hpp"

#include <algorithm>
#include <cmath>

#include "ldm_rt/native/errors.hpp"
#include "ldm_rt/native/image_ops.hpp"
#include "ldm_rt/native/json.hpp"
#include "ldm_rt/native/pyrepr.hpp"
#include "ldm_rt/native/sha256.hpp"

namespace ldm_rt::native {
namespace {

const std::string kPrefix = "controlnet_";
// contracts.CONTROLNET_DOWN / CONTROLNET_MID (ControlNet outputs), UNET_DOWN_RESIDUAL / UNET_MID_RESIDUAL (its inputs).
const std::string kDown = "down_block_res_sample_", kMid = "mid_block_res_sample";
const std::string kUnetDown = "down_block_additional_residual_", kUnetMid = "mid_block_additional_residual";
// What ControlRun feeds a ControlNet (contracts.add_controlnets' inputs).
const char* const kFed[] = {"sample", "timestep", "encoder_hidden_states", "controlnet_cond", "conditioning_scale",
                            "text_embeds", "time_ids"};

std::string num(double v) { return py_float_repr(v); }

// controlnet._per_controlnet: one value for all ControlNets, or one per ControlNet, each finite and passing `check`.
std::vector<double> per_controlnet(const std::vector<double>& given, double fallback, std::size_t count, const std::string& what,
                                   bool (*check)(double), const std::string& allowed) {
  std::vector<double> values = given.empty() ? std::vector<double>{fallback} : given;
  if (values.size() == 1) values.assign(count, values[0]);
  if (values.size() != count) {
    throw GenerationError(std::to_string(values.size()) + " values of " + what + " for " + std::to_string(count) +
                          " ControlNet(s); give one, or one per ControlNet");
  }
  for (double v : values) {
    if (!std::isfinite(v) || !check(v)) throw GenerationError(what + " must be " + allowed + ", got " + num(v));
  }
  return values;
}

// A contract fact of `extra` that is true (Python's bool(extra.get(name))).
bool extra_flag(const ComponentFiles& files, const char* name) {
  const Json* v = files.extra.find(name);
  return v && ((v->is_bool() && v->as_bool()) || (v->is_number() && v->as_double() != 0.0));
}

// The contract's shape of input `name`, or null when it takes none.
const std::vector<std::string>* input_shape(const ComponentFiles& files, const std::string& name) {
  for (std::size_t k = 0; k < files.inputs.size() && k < files.input_shapes.size(); ++k) {
    if (files.inputs[k] == name) return &files.input_shapes[k];
  }
  return nullptr;
}

// contracts.TensorSpec.resolve: numbers, axis names, "scale:AXIS:k" (AXIS * k) and "div:AXIS:k" (AXIS // k).
std::vector<int64_t> resolve(const std::vector<std::string>& dims, const std::map<std::string, int64_t>& sizes) {
  std::vector<int64_t> shape;
  for (const std::string& d : dims) {
    if (!d.empty() && (std::isdigit(static_cast<unsigned char>(d[0])) || d[0] == '-')) {
      shape.push_back(std::stoll(d));
      continue;
    }
    auto colon = d.find(':'), last = d.rfind(':');
    std::string axis = colon == std::string::npos ? d : d.substr(colon + 1, last - colon - 1);
    auto it = sizes.find(axis);
    if (it == sizes.end()) throw GenerationError("the UNet's ControlNet residuals have an unknown axis " + d + "; rebuild the artifacts");
    int64_t k = colon == std::string::npos ? 1 : std::stoll(d.substr(last + 1));
    if (k < 1 || k > 64) throw GenerationError("the UNet's ControlNet residuals have a malformed axis " + d + "; rebuild the artifacts");
    shape.push_back(d.rfind("scale:", 0) == 0 ? it->second * k : d.rfind("div:", 0) == 0 ? it->second / k : it->second);
  }
  return shape;
}

// The latents' channels of a (rows, C', h, w) sample, rows [first, rows): (rows - first, channels, h, w).
Tensor latent_rows(const Tensor& sample, int64_t first, int64_t channels) {
  int64_t rows = sample.dim(0), plane = sample.dim(2) * sample.dim(3), per_row = sample.dim(1) * plane;
  Tensor x({rows - first, channels, sample.dim(2), sample.dim(3)});
  for (int64_t r = first; r < rows; ++r) {
    std::copy_n(sample.data.data() + r * per_row, channels * plane, x.data.data() + (r - first) * channels * plane);
  }
  return x;
}

}  // namespace

std::vector<float> guess_mode_scales(std::size_t count) {
  std::vector<float> scales;  // y = j * step + start, the last exactly stop (numpy's linspace)
  const double step = count > 1 ? 1.0 / double(count - 1) : 0.0;
  for (std::size_t j = 0; j < count; ++j) {
    double y = count > 1 && j + 1 == count ? 0.0 : double(j) * step + kGuessModeFirstScaleLog10;
    scales.push_back(float(std::pow(10.0, y)));
  }
  return scales;
}

std::vector<std::string> controlnet_names(const std::map<std::string, ComponentFiles>& components) {
  std::vector<std::string> found;
  for (const auto& [name, _] : components) {
    std::string index = name.rfind(kPrefix, 0) == 0 ? name.substr(kPrefix.size()) : "";
    if (!index.empty() && std::all_of(index.begin(), index.end(), [](char c) { return c >= '0' && c <= '9'; })) found.push_back(name);
  }
  std::sort(found.begin(), found.end(), [](const std::string& a, const std::string& b) {  // export order: 2 before 10
    return std::make_pair(a.size(), a) < std::make_pair(b.size(), b);
  });
  return found;
}

std::string control_image_what(std::size_t count, std::size_t k) {
  return count == 1 ? "control image" : "control image " + std::to_string(k);
}

std::optional<ControlRequest> make_control_request(std::size_t count, const std::vector<Image>& images,
                                                   const std::vector<double>& scales, const std::vector<double>& starts,
                                                   const std::vector<double>& ends, bool guess_mode) {
  if (count == 0) {
    // A value differs from the default when several are given, or the one given is not the default.
    auto asked = [](const std::vector<double>& v, double fallback) { return v.size() > 1 || (v.size() == 1 && v[0] != fallback); };
    std::vector<std::string> named;
    if (asked(scales, kControlScale)) named.push_back("controlnet_conditioning_scale");
    if (asked(starts, kControlGuidanceStart)) named.push_back("control_guidance_start");
    if (asked(ends, kControlGuidanceEnd)) named.push_back("control_guidance_end");
    if (!images.empty() || guess_mode || !named.empty()) {
      std::string what = "a control image";
      if (images.empty()) {
        what = "";
        for (const auto& n : named) what += (what.empty() ? "" : ", ") + n;
        if (what.empty()) what = "guess_mode";
      }
      throw GenerationError("these artifacts have no ControlNet, so " + what + " has nothing to steer; drop it, or build the artifacts "
                            "with `python export/build_engines.py --controlnet CN_SRC`");
    }
    return std::nullopt;
  }
  if (images.empty()) {
    throw GenerationError("these artifacts have " + std::to_string(count) +
                          " ControlNet(s): pass a control image for each (control_image=, --control-image IMG), in the order they were exported");
  }
  if (images.size() != count) {
    throw GenerationError(std::to_string(images.size()) + " control image(s) for " + std::to_string(count) +
                          " ControlNet(s); pass one per ControlNet, in the order they were exported");
  }
  ControlRequest request;
  for (std::size_t k = 0; k < count; ++k) {  // images.as_rgb_array of an (H, W, 3) uint8 array
    const Image& im = images[k];
    std::string what = control_image_what(count, k);
    if (im.width < 1 || im.height < 1 || im.rgb.size() != std::size_t(im.width) * std::size_t(im.height) * 3) {
      throw ImageInputError(what + " must be uint8 (H, W, 3), got " + std::to_string(im.rgb.size()) + " bytes for " +
                            std::to_string(im.width) + "x" + std::to_string(im.height));
    }
    check_input_size(im.width, im.height, what);
  }
  request.images = images;
  request.scales = per_controlnet(scales, kControlScale, count, "controlnet_conditioning_scale",
                                  [](double v) { return std::abs(v) <= kMaxControlScale; }, "a number in [-100, 100]");
  request.starts = per_controlnet(starts, kControlGuidanceStart, count, "control_guidance_start",
                                  [](double v) { return 0.0 <= v && v < 1.0; }, "in [0, 1)");
  request.ends = per_controlnet(ends, kControlGuidanceEnd, count, "control_guidance_end",
                                [](double v) { return 0.0 < v && v <= 1.0; }, "in (0, 1]");
  for (std::size_t k = 0; k < count; ++k) {
    if (request.starts[k] >= request.ends[k]) {
      throw GenerationError("control_guidance_start " + num(request.starts[k]) + " must be before control_guidance_end " +
                            num(request.ends[k]));
    }
  }
  request.guess_mode = guess_mode;
  return request;
}

void ControlRequest::record(GenerationParams& p, const std::vector<std::string>& controlnet_sha256) const {
  std::string nets = "[";
  for (std::size_t k = 0; k < images.size(); ++k) {
    const Image& im = images[k];
    std::map<std::string, std::string> entry = {  // sorted keys, as json.dumps(sort_keys=True)
        {"control_image_sha256", json_quote(sha256_hex({reinterpret_cast<const char*>(im.rgb.data()), im.rgb.size()}), true)},
        {"control_image_size", "[" + std::to_string(im.height) + ", " + std::to_string(im.width) + "]"},
        {"conditioning_scale", num(scales[k])},
        {"control_guidance_start", num(starts[k])},
        {"control_guidance_end", num(ends[k])},
    };
    if (k < controlnet_sha256.size() && !controlnet_sha256[k].empty()) entry["controlnet_sha256"] = json_quote(controlnet_sha256[k], true);
    std::string text;
    for (const auto& [key, value] : entry) text += (text.empty() ? "{" : ", ") + json_quote(key, true) + ": " + value;
    nets += (k ? ", " : "") + text + "}";
  }
  p.extra["controlnets"] = nets + "]";
  p.extra["guess_mode"] = guess_mode ? "true" : "false";
}

bool is_controlnet_residual(const std::string& unet_input) {
  return unet_input.rfind(kUnetDown, 0) == 0 || unet_input == kUnetMid;
}

std::string unfed_controlnet_input(const ComponentFiles& controlnet) {
  for (const std::string& input : controlnet.inputs) {
    if (std::find(std::begin(kFed), std::end(kFed), input) == std::end(kFed)) return input;
  }
  return "";
}

ControlRun::ControlRun(const ControlRequest& request, const Artifacts& artifacts, int64_t height, int64_t width, int64_t images,
                       std::size_t steps, bool use_cfg, const std::optional<Tensor>& context, const std::optional<Tensor>& text_embeds,
                       const std::optional<Tensor>& time_ids)
    : names_(controlnet_names(artifacts.components)), scales_(request.scales), use_cfg_(use_cfg) {
  for (const std::string& name : names_) files_.push_back(&artifacts.components.at(name));
  unet_ = &artifacts.components.at("unet");
  guess_mode_ = request.guess_mode || extra_flag(*files_[0], "global_average_pooling");
  const bool cond_only = guess_mode_ && use_cfg;  // the ControlNets see the conditional half only
  const int64_t rows = cond_only || !use_cfg ? images : 2 * images;
  auto half = [cond_only](const Tensor& t) { return cond_only ? t.rows(t.dim(0) / 2, t.dim(0)) : t; };
  if (context) fixed_["encoder_hidden_states"] = half(*context);
  if (text_embeds) fixed_["text_embeds"] = half(*text_embeds);
  if (time_ids) fixed_["time_ids"] = half(*time_ids);
  // prepare_control_image: Lanczos to the output size, / 255 in float32, (rows, 3, H, W).
  const std::size_t plane = std::size_t(height) * std::size_t(width);
  for (const Image& image : request.images) {
    Image sized = resize_lanczos(image, int(height), int(width));
    Tensor t({rows, 3, height, width});
    for (std::size_t q = 0; q < plane; ++q) {
      for (std::size_t c = 0; c < 3; ++c) t.data[c * plane + q] = float(sized.rgb[q * 3 + c]) / 255.0f;
    }
    for (int64_t r = 1; r < rows; ++r) std::copy_n(t.data.begin(), 3 * plane, t.data.begin() + long(std::size_t(r) * 3 * plane));
    images_.push_back(std::move(t));
  }
  for (std::size_t k = 0; k < files_.size(); ++k) {
    const std::vector<std::string>* cond = input_shape(*files_[k], "controlnet_cond");
    if (cond && cond->size() > 1 && (*cond)[1] != "3") {
      throw GenerationError(names_[k] + " takes " + (*cond)[1] + "-channel control images; only RGB ones are supported");
    }
  }
  latent_channels_ = artifacts.facts.latent_channels;
  // controlnet_keep: 1 - (i/n < start or (i+1)/n > end), in Python's float division.
  for (std::size_t i = 0; i < steps; ++i) {
    std::vector<float> row;
    for (std::size_t k = 0; k < names_.size(); ++k) {
      bool off = double(i) / double(steps) < request.starts[k] || double(i + 1) / double(steps) > request.ends[k];
      row.push_back(off ? 0.0f : 1.0f);
    }
    keep_.push_back(std::move(row));
  }
}

std::vector<std::pair<std::string, Tensor>> ControlRun::residuals(std::size_t step, const Tensor& sample, double timestep,
                                                                  const Call& call) const {
  const int64_t rows = sample.dim(0);
  const std::map<std::string, int64_t> sizes = {{"unet_batch", rows}, {"latent_height", sample.dim(2)}, {"latent_width", sample.dim(3)}};
  const Json* declared = unet_->extra.find("controlnet_residuals");
  const std::size_t count = declared && declared->is_integer() ? std::size_t(std::max<int64_t>(declared->as_int(), 0)) : 0;
  std::vector<std::pair<std::string, Tensor>> total;  // (name, zeros) in contract order: one per input block, then the middle's
  for (std::size_t j = 0; j <= count; ++j) {
    std::string name = j < count ? kUnetDown + std::to_string(j) : kUnetMid;
    const std::vector<std::string>* dims = input_shape(*unet_, name);
    if (!dims) throw GenerationError("the UNet takes no ControlNet residual " + name + "; rebuild the artifacts");
    std::vector<int64_t> shape = resolve(*dims, sizes);
    // Bounded before it is allocated: SD's widest residual is 80 times the latents (320 channels for 4).
    if (shape.size() != 4 || numel_of(shape, std::size_t(1) << 40) > 1024 * sample.numel()) {
      throw GenerationError("the UNet's ControlNet residual " + name + " has shape " + shape_str(shape) + " for latents " +
                            shape_str(sample.shape) + "; rebuild the artifacts");
    }
    total.emplace_back(name, Tensor(shape));
  }
  const bool cond_only = guess_mode_ && use_cfg_;
  const Tensor x = latent_rows(sample, cond_only ? rows / 2 : 0, latent_channels_);  // the latents' channels
  const std::vector<float> guess = guess_mode_ ? guess_mode_scales(count + 1) : std::vector<float>{};
  const std::vector<float> t(std::size_t(x.dim(0)), float(timestep));
  for (std::size_t k = 0; k < names_.size(); ++k) {
    const double scale = scales_[k] * double(keep_.at(step)[k]);
    if (scale == 0.0) continue;  // residuals times 0: the same sum, without running it
    const float scale32 = float(scale);
    std::vector<Feed> feeds;
    for (const std::string& input : files_[k]->inputs) {
      if (input == "sample") feeds.push_back({input, x.shape, x.data.data(), nullptr});
      else if (input == "timestep") feeds.push_back({input, {x.dim(0)}, t.data(), nullptr});
      else if (input == "controlnet_cond") feeds.push_back({input, images_[k].shape, images_[k].data.data(), nullptr});
      else if (input == "conditioning_scale") feeds.push_back({input, {1}, &scale32, nullptr});
      else if (auto v = fixed_.find(input); v != fixed_.end()) feeds.push_back({input, v->second.shape, v->second.data.data(), nullptr});
      else throw GenerationError(names_[k] + " takes " + input + ", which this model's UNet does not; rebuild the artifacts");
    }
    std::map<std::string, Tensor> outs = call(names_[k], feeds);
    const bool pooled = extra_flag(*files_[k], "global_average_pooling");
    for (std::size_t j = 0; j <= count; ++j) {
      const std::string output = j < count ? kDown + std::to_string(j) : kMid;
      auto found = outs.find(output);
      Tensor& sum = total[j].second;
      const std::size_t first = cond_only ? sum.numel() / 2 : 0, spread = pooled ? std::size_t(sum.dim(2) * sum.dim(3)) : 1;
      if (found == outs.end() || found->second.numel() * spread != sum.numel() - first) {
        throw GenerationError(names_[k] + " gives no " + output + " of the size the UNet's " + total[j].first +
                              " takes; rebuild the artifacts");
      }
      const Tensor& out = found->second;
      const bool weighted = !guess.empty() && !pooled;
      // The unconditional half stays zero under cond_only; a pooling ControlNet's (r, C, 1, 1) broadcasts over h, w.
      for (std::size_t q = 0; q < sum.numel() - first; ++q) {
        const float v = out.data[q / spread];
        sum.data[first + q] += weighted ? v * guess[j] : v;
      }
    }
  }
  return total;
}

}  // namespace ldm_rt::native
