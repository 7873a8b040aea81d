// Pixel operations of runtime/images.py that must match Pillow to the bit: the Lanczos resize of init images
// (8-bit, Pillow's fixed-point two-pass resampling) and masks (float), decoder output to uint8, and the
// inpainting paste-back.
#pragma once

#include <cstdint>
#include <vector>

#include "ldm_rt/native/png_io.hpp"
#include "ldm_rt/native/tensor.hpp"

namespace ldm_rt::native {

// Image.resize((width, height), Image.LANCZOS) of an RGB image; a copy when the size is unchanged.
Image resize_lanczos(const Image& image, int height, int width);
// The same for a float mask (Pillow mode "F"), then clipped to [0, 1] (images.resize).
Mask resize_lanczos(const Mask& mask, int height, int width);

// Decoder output (B, 3, H, W) in about [-1, 1] -> B images, as images.to_uint8.
std::vector<Image> to_uint8(const Tensor& decoded);

// images.grid: B images of one size as one, ceil(sqrt(B)) columns, row-major, black where the grid is not full.
Image grid(const std::vector<Image>& images);

// (H, W, 3) uint8 -> (1, 3, H, W) float32 in [-1, 1] (images.image_to_model).
Tensor image_to_model(const Image& image);

// images.paste_kept: the init image where the mask keeps it (mask < 0.5), the generated one where it repaints;
// blur > 0 softens the seam with Pillow's GaussianBlur(blur) of the binarised mask.
void paste_kept(std::vector<Image>& images, const Image& init, const Mask& mask, double blur);

// ImageFilter.GaussianBlur(radius) of an 8-bit (h, w) image, as Pillow computes it.
std::vector<uint8_t> gaussian_blur8(const std::vector<uint8_t>& image, int width, int height, float radius);

}  // namespace ldm_rt::native
