// JPEG in and out as runtime/images.py does with Pillow, through the system's libjpeg(-turbo) when the build
// found it (Debian: libjpeg-dev; jpeg_supported() says): init images and masks read as Pillow reads them
// (accurate integer IDCT, fancy upsampling; grey as grey), images written at quality 95 with the parameters
// as one JSON object in the EXIF UserComment (character code UNICODE, UTF-16BE), as `ldm-rt sample` writes
// them. WebP is not native (no libwebp headers where this was built): it is refused in one line.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "ldm_rt/native/png_io.hpp"

namespace ldm_rt::native {

// images.LOSSY_QUALITY.
constexpr int kJpegQuality = 95;

bool jpeg_supported();
// Pillow's convert("RGB") of a JPEG (grey replicated). CMYK/YCCK files are refused (ImageInputError).
Image read_rgb_jpeg(const std::string& path, const std::string& what = "init image");
// images.as_mask_array of a JPEG: grey levels / 255, colour through Pillow's "L" weights.
Mask read_mask_jpeg(const std::string& path);
// (H, W, 3) uint8 as JPEG bytes with `text` in the EXIF UserComment; OutputError when it cannot be written.
std::vector<uint8_t> encode_jpeg(const Image& image, const TextChunks& text);

}  // namespace ldm_rt::native
