// Step previews (runtime/previews.py): the model's x0 estimate (SchedulerRun::denoised) shown every N steps, "fast"
// through the folder's fitted latent -> RGB map (preview_factors.json, fitted at export by export/preview_fit.py and
// listed in the manifest with its sha256), repeated to the image size, or "full" through the VAE decoder. The preview
// files the CLI writes carry the text kPreviewKey, so each runtime may replace the other's and never a user's file.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "ldm_rt/native/json.hpp"
#include "ldm_rt/native/png_io.hpp"
#include "ldm_rt/native/tensor.hpp"

namespace ldm_rt::native {

constexpr const char* kPreviewFormat = "ldm-rt-preview-factors";
// The PNG text key that marks a preview file as ours (previews.PREVIEW_KEY).
constexpr const char* kPreviewKey = "ldm-rt preview";
// previews.MAX_FACTORS_BYTES: ours are under 2 kB; anything past this is not a factors file.
constexpr std::size_t kMaxPreviewFactorsBytes = std::size_t{64} << 10;
// previews.POOR_FIT_DB: below this held-out PSNR the map explains the VAE poorly, said once in the log.
constexpr double kPoorFitDb = 15.0;

// Request::preview: (step index, steps, the B images of that step's x0 estimate), on the generating thread.
using PreviewCallback = std::function<void(int64_t, int64_t, const std::vector<Image>&)>;

// previews.PreviewFactors: rgb = latents . weights + bias, (B, C, h, w) scaled latents -> decoder units.
struct PreviewFactors {
  int64_t channels = 0;
  std::vector<float> weights;  // (C, 3), row-major
  std::array<float, 3> bias{};
  std::optional<double> psnr_db;  // the fit's held-out PSNR (fit.psnr_db) where the file records a number

  // PreviewFactors.from_dict: the factors for `channels` latent channels, else ArtifactError naming `path`.
  static PreviewFactors from_json(const Json& d, int64_t channels, const std::string& path);
  // (B, C, h, w) -> (B, 3, h f, w f): the map at latent resolution (float32, channels summed in order, as numpy's
  // einsum), each latent pixel repeated to its f x f block (nearest).
  Tensor to_rgb(const Tensor& latents, int64_t factor) const;
};

// previews.check_preview: preview_every >= 1 and a known kind, else GenerationError naming the bad one.
void check_preview(int64_t every, const std::string& kind);

// previews.due: whether step i (0-based) of n gets a preview: every `every`-th step, and always the last.
inline bool preview_due(int64_t i, int64_t n, int64_t every) { return (i + 1) % every == 0 || i + 1 == n; }

// previews.is_preview_file: a PNG whose text (before the image data) carries kPreviewKey.
bool is_preview_file(const std::string& path);

// previews.check_preview_target: `path` (Python's str(Path(path))) when it is a new file or a preview we wrote;
// else OutputError: not .png, a folder or device, a missing folder, or a user's file (never overwritten).
std::string check_preview_target(const std::string& path);

// previews.write_preview: step i of n (a batch as one grid) written atomically over the previous preview, after
// checking again that `path` is still new or ours.
void write_preview(const std::string& path, const std::vector<Image>& images, int64_t i, int64_t n);

}  // namespace ldm_rt::native
