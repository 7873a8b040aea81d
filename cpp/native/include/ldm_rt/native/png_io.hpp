// PNG in and out (JPEG: jpeg_io.hpp), as runtime/images.py does with Pillow: init images and masks read (8- and 16-bit, size
// bounded from the header before decoding), images written with their parameters in text chunks, and files
// written all or none (temp file beside each, renamed once all are complete).
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace ldm_rt::native {

// images.MAX_INPUT_PIXELS: init images and masks larger than 8192 x 8192 are refused from their header.
constexpr int64_t kMaxInputPixels = int64_t{8192} * 8192;

struct Image {
  int width = 0;
  int height = 0;
  std::vector<uint8_t> rgb;  // (H, W, 3), row-major
};

// (H, W) float32 in [0, 1], 1 = repaint.
struct Mask {
  int width = 0;
  int height = 0;
  std::vector<float> values;
};

using TextChunks = std::vector<std::pair<std::string, std::string>>;  // key, UTF-8 value

// An init image as Pillow's convert("RGB") gives it (alpha dropped, palette expanded; 16-bit grey scaled to
// 8 bits, 16-bit colour cut to its high byte as Pillow reads it). `what` names it in errors ("init image").
Image read_rgb_png(const std::string& path, const std::string& what = "init image");
// A mask as images.as_mask_array reads a file: 8-bit levels / 255 (colour through Pillow's "L" weights),
// 16-bit grey / 65535.
Mask read_mask_png(const std::string& path);

// An init image or mask file in any format ldm-rt-native reads (PNG; JPEG where built with libjpeg), told
// apart by its first bytes as Pillow does.
Image read_rgb_image(const std::string& path, const std::string& what = "init image");
Mask read_mask_image(const std::string& path);

// images._check_size: ImageInputError when width x height is over kMaxInputPixels.
void check_input_size(int64_t width, int64_t height, const std::string& what);

// (H, W, 3) uint8 as PNG bytes, one text chunk per entry (tEXt when the value is Latin-1, else iTXt, as Pillow).
std::vector<uint8_t> encode_png(const Image& image, const TextChunks& text);

// The name an output may not take (a folder, device, FIFO or socket): "" when `path` is new or a regular
// file, else the one-line reason (atomic.check_file_target's wording).
std::string not_a_file_target(const std::string& path);

// images.written_by_ldm_rt: whether the existing file `path` is an image ldm-rt or ldm-rt-native wrote, by its
// "Software" text (a PNG tEXt chunk before the image data; JPEG/WebP: in the EXIF UserComment's JSON): the only
// existing file --out replaces, so a file of the user's own is never overwritten.
bool written_by_ldm_rt(const std::string& path);

// Whether `path` is a PNG with a text chunk (tEXt, zTXt or iTXt) named `key` before its image data, as Pillow's
// Image.open(path).info holds them (previews.is_preview_file).
bool png_has_text_key(const std::string& path, const std::string& key);

// Write every (path, bytes): each to a temp file beside its path, renamed into place only once all are
// complete; on failure no file is written (temps removed) and an OutputError says why.
void write_files_all_or_none(const std::vector<std::pair<std::string, std::vector<uint8_t>>>& files);

}  // namespace ldm_rt::native
