// SDXL's micro-conditioning (Podell et al. 2023, Sec. 2.2), as runtime/params.py makes it: sizes (height,
// width) and crop offsets (top, left) in pixels, and the refiner's aesthetic scores, diffusers' names and
// defaults. A UNet with 6 time ids reads original size, crop and target size (SDXL base, Turbo); one with 5
// reads original size, crop and aesthetic score (SDXL's refiner).
#pragma once

#include <array>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace ldm_rt::native {

using Pair = std::array<int64_t, 2>;

// params.MAX_TIME_ID_PIXELS, AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE.
constexpr int64_t kMaxTimeIdPixels = 16384;
constexpr double kAestheticScore = 6.0;
constexpr double kNegativeAestheticScore = 2.5;

// What a request gives (nullopt: the default); names as params.MICRO_CONDITIONING.
struct MicroRequest {
  std::optional<Pair> original_size, crops_coords_top_left, target_size;
  std::optional<Pair> negative_original_size, negative_crops_coords_top_left, negative_target_size;
  std::optional<double> aesthetic_score, negative_aesthetic_score;

  // The names given, in MICRO_CONDITIONING order.
  std::vector<std::string> given() const;
  // Only the values a UNet of `time_ids` ids reads (none for a model without time ids): the base -> refiner
  // hand-off gives each model its own (the refiner reads aesthetic scores, no target size).
  MicroRequest read_by(std::optional<int64_t> time_ids) const;
};

// params.MicroConditioning: every value decided.
struct MicroConditioning {
  Pair original_size{}, crops_coords_top_left{}, target_size{};
  Pair negative_original_size{}, negative_crops_coords_top_left{}, negative_target_size{};
  double aesthetic_score = kAestheticScore, negative_aesthetic_score = kNegativeAestheticScore;

  // (cond, uncond) rows of the UNet's time_ids input for a model of n ids.
  std::pair<std::vector<float>, std::vector<float>> time_ids(int64_t n) const;
  // The values a model of n ids reads, name -> JSON text, for the image metadata (MicroConditioning.to_dict).
  std::map<std::string, std::string> to_json(int64_t n) const;
};

// params.make_micro_conditioning: nullopt for a model without time ids (values given are refused); each value
// checked, with the Python runtime's messages (GenerationError).
std::optional<MicroConditioning> make_micro_conditioning(std::optional<int64_t> time_ids, int64_t height, int64_t width,
                                                         const MicroRequest& given);

}  // namespace ldm_rt::native
