#include "ldm_rt/native/micro_conditioning.hpp"

#include <algorithm>

#include "ldm_rt/native/errors.hpp"
#include "ldm_rt/native/pyrepr.hpp"

namespace ldm_rt::native {
namespace {

// params.TIME_ID_LAYOUTS: what each count of time ids holds.
const std::map<int64_t, std::vector<std::string>>& layouts() {
  static const std::map<int64_t, std::vector<std::string>> l = {
      {6, {"original_size", "crops_coords_top_left", "target_size"}},
      {5, {"original_size", "crops_coords_top_left", "aesthetic_score"}},
  };
  return l;
}

std::string strip_negative(const std::string& name) { return name.rfind("negative_", 0) == 0 ? name.substr(9) : name; }

bool reads(int64_t n, const std::string& name) {
  const auto& used = layouts().at(n);
  return std::find(used.begin(), used.end(), strip_negative(name)) != used.end();
}

std::string join(const std::vector<std::string>& items) {
  std::string out;
  for (const auto& s : items) out += (out.empty() ? "" : ", ") + s;
  return out;
}

std::string pair_text(const Pair& p) { return "[" + std::to_string(p[0]) + ", " + std::to_string(p[1]) + "]"; }

Pair checked_pair(const Pair& p, const std::string& what, int64_t low) {
  for (int64_t v : p) {
    if (v < low || v > kMaxTimeIdPixels) {
      throw GenerationError(what + " must be integers in [" + std::to_string(low) + ", " + std::to_string(kMaxTimeIdPixels) +
                            "] pixels, got " + pair_text(p));
    }
  }
  return p;
}

double checked_score(double v, const std::string& what) {
  if (!(v >= 0.0 && v <= 10.0)) throw GenerationError(what + " must be a number in [0, 10] (an aesthetic score), got " + py_float_repr(v));
  return v;
}

}  // namespace

MicroRequest MicroRequest::read_by(std::optional<int64_t> time_ids) const {
  auto keep = [&](const char* name) { return time_ids && layouts().count(*time_ids) && reads(*time_ids, name); };
  MicroRequest r;
  if (keep("original_size")) r.original_size = original_size, r.negative_original_size = negative_original_size;
  if (keep("crops_coords_top_left")) {
    r.crops_coords_top_left = crops_coords_top_left, r.negative_crops_coords_top_left = negative_crops_coords_top_left;
  }
  if (keep("target_size")) r.target_size = target_size, r.negative_target_size = negative_target_size;
  if (keep("aesthetic_score")) r.aesthetic_score = aesthetic_score, r.negative_aesthetic_score = negative_aesthetic_score;
  return r;
}

std::vector<std::string> MicroRequest::given() const {
  std::vector<std::string> names;
  auto add = [&](bool has, const char* name) {
    if (has) names.emplace_back(name);
  };
  add(original_size.has_value(), "original_size");
  add(crops_coords_top_left.has_value(), "crops_coords_top_left");
  add(target_size.has_value(), "target_size");
  add(negative_original_size.has_value(), "negative_original_size");
  add(negative_crops_coords_top_left.has_value(), "negative_crops_coords_top_left");
  add(negative_target_size.has_value(), "negative_target_size");
  add(aesthetic_score.has_value(), "aesthetic_score");
  add(negative_aesthetic_score.has_value(), "negative_aesthetic_score");
  return names;
}

std::pair<std::vector<float>, std::vector<float>> MicroConditioning::time_ids(int64_t n) const {
  std::vector<float> rows[2];
  for (int neg = 0; neg < 2; ++neg) {
    for (const std::string& name : layouts().at(n)) {
      if (name == "aesthetic_score") {
        rows[neg].push_back(float(neg ? negative_aesthetic_score : aesthetic_score));
        continue;
      }
      const Pair& v = name == "original_size"  ? (neg ? negative_original_size : original_size)
                      : name == "target_size" ? (neg ? negative_target_size : target_size)
                                              : (neg ? negative_crops_coords_top_left : crops_coords_top_left);
      rows[neg].push_back(float(v[0]));
      rows[neg].push_back(float(v[1]));
    }
  }
  return {rows[0], rows[1]};
}

std::map<std::string, std::string> MicroConditioning::to_json(int64_t n) const {
  std::map<std::string, std::string> all = {
      {"original_size", pair_text(original_size)},
      {"crops_coords_top_left", pair_text(crops_coords_top_left)},
      {"target_size", pair_text(target_size)},
      {"negative_original_size", pair_text(negative_original_size)},
      {"negative_crops_coords_top_left", pair_text(negative_crops_coords_top_left)},
      {"negative_target_size", pair_text(negative_target_size)},
      {"aesthetic_score", py_float_repr(aesthetic_score)},
      {"negative_aesthetic_score", py_float_repr(negative_aesthetic_score)},
  };
  std::map<std::string, std::string> out;
  for (const auto& [name, text] : all) {
    if (reads(n, name)) out[name] = text;
  }
  return out;
}

std::optional<MicroConditioning> make_micro_conditioning(std::optional<int64_t> time_ids, int64_t height, int64_t width,
                                                         const MicroRequest& r) {
  std::vector<std::string> given = r.given();
  std::vector<std::string> sorted_given = given;
  std::sort(sorted_given.begin(), sorted_given.end());
  if (!time_ids) {
    if (!given.empty()) {
      throw GenerationError("this model takes no micro-conditioning (an SDXL UNet's time ids); drop " + join(sorted_given));
    }
    return std::nullopt;
  }
  if (!layouts().count(*time_ids)) {
    throw GenerationError("the UNet takes " + std::to_string(*time_ids) + " time ids; the runtime knows layouts of [5, 6]");
  }
  std::vector<std::string> unused;
  for (const auto& name : sorted_given) {
    if (!reads(*time_ids, name)) unused.push_back(name);
  }
  if (!unused.empty()) {
    std::string kind = *time_ids == 5 ? "a refiner's (5 time ids: sizes, crop and aesthetic score)"
                                      : "a base model's (6 time ids: sizes and crop)";
    throw GenerationError("this UNet is " + kind + " and does not read " + join(unused) + "; drop them");
  }
  MicroConditioning m;
  const Pair size = {height, width}, origin = {0, 0};
  // Each negative value defaults to its positive counterpart.
  auto decide = [](const std::optional<Pair>& v, const std::string& name, int64_t low, const Pair& fallback) {
    return v ? checked_pair(*v, name, low) : fallback;
  };
  m.original_size = decide(r.original_size, "original_size", 1, size);
  m.negative_original_size = decide(r.negative_original_size, "negative_original_size", 1, m.original_size);
  m.crops_coords_top_left = decide(r.crops_coords_top_left, "crops_coords_top_left", 0, origin);
  m.negative_crops_coords_top_left = decide(r.negative_crops_coords_top_left, "negative_crops_coords_top_left", 0, m.crops_coords_top_left);
  m.target_size = decide(r.target_size, "target_size", 1, size);
  m.negative_target_size = decide(r.negative_target_size, "negative_target_size", 1, m.target_size);
  m.aesthetic_score = checked_score(r.aesthetic_score.value_or(kAestheticScore), "aesthetic_score");
  m.negative_aesthetic_score = checked_score(r.negative_aesthetic_score.value_or(kNegativeAestheticScore), "negative_aesthetic_score");
  return m;
}

}  // namespace ldm_rt::native
