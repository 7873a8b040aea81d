#include "ldm_rt/native/previews.hpp"

#include <sys/stat.h>

#include <cctype>
#include <cmath>

#include "ldm_rt/native/artifacts.hpp"
#include "ldm_rt/native/errors.hpp"
#include "ldm_rt/native/image_ops.hpp"
#include "ldm_rt/native/pyrepr.hpp"

namespace ldm_rt::native {
namespace {

// float32 of a JSON number as numpy reads Python's float (via float64), or nullopt for anything else.
std::optional<float> number(const Json& v) {
  if (!v.is_number()) return std::nullopt;
  return static_cast<float>(v.as_double());
}

// Python's PurePath.suffix of the last component of `path` ("" for a dotfile or a trailing dot).
std::string suffix_of(const std::string& path) {
  std::string name = path.substr(path.rfind('/') == std::string::npos ? 0 : path.rfind('/') + 1);
  auto dot = name.rfind('.');
  return dot == std::string::npos || dot == 0 || dot + 1 == name.size() ? "" : name.substr(dot);
}

// Python's str(Path(path).parent): "." for a bare name.
std::string parent_of(const std::string& path) {
  auto slash = path.rfind('/');
  if (slash == std::string::npos) return ".";
  return slash == 0 ? "/" : path.substr(0, slash);
}

}  // namespace

PreviewFactors PreviewFactors::from_json(const Json& d, int64_t channels, const std::string& path) {
  PreviewFactors f;
  f.channels = channels;
  const Json *format = d.find("format"), *weights = d.find("weights"), *bias = d.find("bias"), *fit = d.find("fit");
  bool ok = format && format->is_string() && format->as_string() == kPreviewFormat && weights && weights->is_array() &&
            weights->size() == size_t(channels) && bias && bias->is_array() && bias->size() == 3 && (!fit || fit->is_object());
  for (size_t c = 0; ok && c < size_t(channels); ++c) {
    const Json& row = (*weights)[c];
    ok = row.is_array() && row.size() == 3;
    for (size_t k = 0; ok && k < 3; ++k) {
      std::optional<float> w = number(row[k]);
      ok = w && std::isfinite(*w);
      if (ok) f.weights.push_back(*w);
    }
  }
  for (size_t k = 0; ok && k < 3; ++k) {
    std::optional<float> b = number((*bias)[k]);
    ok = b && std::isfinite(*b);
    if (ok) f.bias[k] = *b;
  }
  if (!ok) {
    std::string c = std::to_string(channels);
    throw ArtifactError(path + " is not a preview factors file for " + c + " latent channels (a " + c +
                        " x 3 'weights', 3 'bias', finite numbers); rebuild the artifacts");
  }
  if (const Json* db = fit ? fit->find("psnr_db") : nullptr; db && db->is_number()) f.psnr_db = db->as_double();
  return f;
}

Tensor PreviewFactors::to_rgb(const Tensor& latents, int64_t factor) const {
  const int64_t b = latents.dim(0), h = latents.dim(2), w = latents.dim(3), fh = h * factor, fw = w * factor;
  const size_t plane = size_t(h * w);
  Tensor out({b, 3, fh, fw});
  for (int64_t n = 0; n < b; ++n) {
    const float* z = latents.data.data() + size_t(n * channels) * plane;
    for (int64_t k = 0; k < 3; ++k) {
      float* rgb = out.data.data() + size_t((n * 3 + k) * fh * fw);
      for (int64_t y = 0; y < h; ++y) {
        for (int64_t x = 0; x < w; ++x) {
          size_t q = size_t(y * w + x);
          float v = z[q] * weights[size_t(k)];
          for (int64_t c = 1; c < channels; ++c) v = v + z[size_t(c) * plane + q] * weights[size_t(c * 3 + k)];
          v = v + bias[size_t(k)];
          for (int64_t dy = 0; dy < factor; ++dy) {  // the f x f block of this latent pixel
            std::fill_n(rgb + (y * factor + dy) * fw + x * factor, factor, v);
          }
        }
      }
    }
  }
  return out;
}

void check_preview(int64_t every, const std::string& kind) {
  if (every < 1) {
    throw GenerationError("preview_every must be an integer >= 1 (a preview every N steps), got " + std::to_string(every));
  }
  if (kind != "fast" && kind != "full") throw GenerationError("preview_kind must be one of fast, full, got " + py_str_repr(kind));
}

bool is_preview_file(const std::string& path) { return png_has_text_key(path, kPreviewKey); }

std::string check_preview_target(const std::string& given) {
  std::string path = normal_path(given);
  std::string suffix = suffix_of(path);
  for (char& c : suffix) c = char(std::tolower(static_cast<unsigned char>(c)));
  if (suffix != ".png") throw OutputError("--preview " + path + ": previews are written as PNG; give a name ending in .png");
  if (std::string reason = not_a_file_target(path); !reason.empty()) throw OutputError(reason);
  struct stat st {};
  std::string parent = parent_of(path);
  if (::stat(parent.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
    throw OutputError("--preview " + path + ": folder " + parent + " does not exist; create it first");
  }
  if (::stat(path.c_str(), &st) == 0 && !is_preview_file(path)) {
    throw OutputError("--preview " + path + " exists and is not a preview ldm-rt wrote; choose a new file name (it is never overwritten)");
  }
  return path;
}

void write_preview(const std::string& path, const std::vector<Image>& images, int64_t i, int64_t n) {
  std::string target = check_preview_target(path);
  TextChunks text = {{kPreviewKey, "step " + std::to_string(i + 1) + "/" + std::to_string(n)}, {"Software", "ldm-rt-native"}};
  write_files_all_or_none({{target, encode_png(images.size() == 1 ? images[0] : grid(images), text)}});
}

}  // namespace ldm_rt::native
