#include "ldm_rt/native/image_ops.hpp"

#include <algorithm>
#include <cmath>

namespace ldm_rt::native {
namespace {

// Pillow's Resample.c: Lanczos-3 (a truncated sinc), coefficients per output pixel, normalised to sum 1.
double sinc(double x) {
  if (x == 0.0) return 1.0;
  x = x * M_PI;
  return std::sin(x) / x;
}

double lanczos(double x) { return (-3.0 <= x && x < 3.0) ? sinc(x) * sinc(x / 3) : 0.0; }

struct Coeffs {
  int ksize = 0;
  std::vector<int> bounds;   // (xmin, count) per output pixel
  std::vector<double> k;     // ksize per output pixel
};

Coeffs precompute(int in_size, int out_size) {
  const double support_base = 3.0;
  double scale = double(in_size) / out_size;
  double filterscale = scale < 1.0 ? 1.0 : scale;
  double support = support_base * filterscale;
  Coeffs c;
  c.ksize = int(std::ceil(support)) * 2 + 1;
  c.bounds.resize(size_t(out_size) * 2);
  c.k.assign(size_t(out_size) * size_t(c.ksize), 0.0);
  for (int xx = 0; xx < out_size; ++xx) {
    double center = (xx + 0.5) * scale;
    double ww = 0.0, ss = 1.0 / filterscale;
    int xmin = int(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    int xmax = int(center + support + 0.5);
    if (xmax > in_size) xmax = in_size;
    xmax -= xmin;
    double* k = &c.k[size_t(xx) * size_t(c.ksize)];
    for (int x = 0; x < xmax; ++x) {
      double w = lanczos((x + xmin - center + 0.5) * ss);
      k[x] = w;
      ww += w;
    }
    for (int x = 0; x < xmax; ++x) {
      if (ww != 0.0) k[x] /= ww;
    }
    c.bounds[size_t(xx) * 2] = xmin;
    c.bounds[size_t(xx) * 2 + 1] = xmax;
  }
  return c;
}

constexpr int kPrecisionBits = 32 - 8 - 2;

std::vector<int32_t> fixed_point(const Coeffs& c) {
  std::vector<int32_t> out(c.k.size());
  for (size_t i = 0; i < c.k.size(); ++i) {
    double v = c.k[i];
    out[i] = int32_t(v < 0 ? -0.5 + v * (1 << kPrecisionBits) : 0.5 + v * (1 << kPrecisionBits));
  }
  return out;
}

uint8_t clip8(int32_t in) {
  if (in >= (1 << kPrecisionBits << 8)) return 255;
  if (in <= 0) return 0;
  return uint8_t(in >> kPrecisionBits);
}

// One 8-bit pass along x (horizontal) or y (vertical) of an interleaved image with `ch` channels.
std::vector<uint8_t> pass8(const std::vector<uint8_t>& in, int w, int h, int ch, int out_len, bool horizontal) {
  Coeffs c = precompute(horizontal ? w : h, out_len);
  std::vector<int32_t> k = fixed_point(c);
  int ow = horizontal ? out_len : w, oh = horizontal ? h : out_len;
  std::vector<uint8_t> out(size_t(ow) * size_t(oh) * size_t(ch));
  for (int y = 0; y < oh; ++y) {
    for (int x = 0; x < ow; ++x) {
      int o = horizontal ? x : y;
      int xmin = c.bounds[size_t(o) * 2], n = c.bounds[size_t(o) * 2 + 1];
      const int32_t* kk = &k[size_t(o) * size_t(c.ksize)];
      for (int b = 0; b < ch; ++b) {
        int32_t ss = 1 << (kPrecisionBits - 1);
        for (int j = 0; j < n; ++j) {
          size_t src = horizontal ? (size_t(y) * size_t(w) + size_t(xmin + j)) : (size_t(xmin + j) * size_t(w) + size_t(x));
          ss += int32_t(in[src * size_t(ch) + size_t(b)]) * kk[j];
        }
        out[(size_t(y) * size_t(ow) + size_t(x)) * size_t(ch) + size_t(b)] = clip8(ss);
      }
    }
  }
  return out;
}

std::vector<float> pass32(const std::vector<float>& in, int w, int h, int out_len, bool horizontal) {
  Coeffs c = precompute(horizontal ? w : h, out_len);
  int ow = horizontal ? out_len : w, oh = horizontal ? h : out_len;
  std::vector<float> out(size_t(ow) * size_t(oh));
  for (int y = 0; y < oh; ++y) {
    for (int x = 0; x < ow; ++x) {
      int o = horizontal ? x : y;
      int xmin = c.bounds[size_t(o) * 2], n = c.bounds[size_t(o) * 2 + 1];
      const double* kk = &c.k[size_t(o) * size_t(c.ksize)];
      double ss = 0.0;
      for (int j = 0; j < n; ++j) {
        size_t src = horizontal ? (size_t(y) * size_t(w) + size_t(xmin + j)) : (size_t(xmin + j) * size_t(w) + size_t(x));
        ss += double(in[src]) * kk[j];
      }
      out[size_t(y) * size_t(ow) + size_t(x)] = float(ss);
    }
  }
  return out;
}

}  // namespace

Image resize_lanczos(const Image& image, int height, int width) {
  if (image.height == height && image.width == width) return image;
  Image out{image.width, image.height, image.rgb};
  if (width != out.width) {  // horizontal first, as Pillow
    out.rgb = pass8(out.rgb, out.width, out.height, 3, width, true);
    out.width = width;
  }
  if (height != out.height) {
    out.rgb = pass8(out.rgb, out.width, out.height, 3, height, false);
    out.height = height;
  }
  return out;
}

Mask resize_lanczos(const Mask& mask, int height, int width) {
  if (mask.height == height && mask.width == width) return mask;
  Mask out{mask.width, mask.height, mask.values};
  if (width != out.width) {
    out.values = pass32(out.values, out.width, out.height, width, true);
    out.width = width;
  }
  if (height != out.height) {
    out.values = pass32(out.values, out.width, out.height, height, false);
    out.height = height;
  }
  for (float& v : out.values) v = std::min(std::max(v, 0.0f), 1.0f);
  return out;
}

std::vector<Image> to_uint8(const Tensor& decoded) {
  int64_t b = decoded.dim(0), h = decoded.dim(2), w = decoded.dim(3);
  std::vector<Image> images(static_cast<size_t>(b));
  size_t plane = size_t(h) * size_t(w);
  for (int64_t n = 0; n < b; ++n) {
    Image& im = images[size_t(n)];
    im.width = int(w), im.height = int(h);
    im.rgb.resize(plane * 3);
    const float* src = decoded.data.data() + size_t(n) * 3 * plane;
    for (size_t c = 0; c < 3; ++c) {
      for (size_t p = 0; p < plane; ++p) {
        float x = (src[c * plane + p] + 1.0f) / 2.0f;
        x = std::min(std::max(x, 0.0f), 1.0f);
        im.rgb[p * 3 + c] = uint8_t(std::nearbyint(x * 255.0f));  // round half to even, as np.round
      }
    }
  }
  return images;
}

Image grid(const std::vector<Image>& images) {
  const size_t b = images.size(), cols = size_t(std::ceil(std::sqrt(double(b)))), rows = (b + cols - 1) / cols;
  const size_t h = size_t(images.at(0).height), w = size_t(images[0].width);
  Image out;
  out.height = int(rows * h), out.width = int(cols * w);
  out.rgb.assign(rows * h * cols * w * 3, 0);
  for (size_t k = 0; k < b; ++k) {
    const size_t r = k / cols, q = k % cols;
    for (size_t y = 0; y < h; ++y) {
      std::copy_n(images[k].rgb.data() + y * w * 3, w * 3, out.rgb.data() + ((r * h + y) * cols * w + q * w) * 3);
    }
  }
  return out;
}

Tensor image_to_model(const Image& image) {
  size_t plane = size_t(image.height) * size_t(image.width);
  Tensor t({1, 3, image.height, image.width});
  for (size_t p = 0; p < plane; ++p) {
    for (size_t c = 0; c < 3; ++c) {
      t.data[c * plane + p] = float(image.rgb[p * 3 + c]) / 255.0f * 2.0f - 1.0f;  // diffusers' order
    }
  }
  return t;
}

namespace {

// Pillow's BoxBlur.c for an 8-bit image: ImageFilter.GaussianBlur(radius) is three passes of an extended box
// blur per direction (Gwosdek et al. 2011), in 8.24 fixed point, rounding to 8 bits after every pass.
float gaussian_box_radius(float radius, int passes) {
  float sigma2 = radius * radius / float(passes);
  float L = float(std::sqrt(12.0 * sigma2 + 1.0));
  float l = float(std::floor((L - 1.0) / 2.0));
  float a = (2 * l + 1) * (l * (l + 1) - 3 * sigma2);
  a /= 6 * (sigma2 - (l + 1) * (l + 1));
  return l + a;
}

void line_box_blur8(uint8_t* out, const uint8_t* in, int lastx, int radius, int edge_a, int edge_b, uint32_t ww, uint32_t fw) {
  uint32_t acc = uint32_t(in[0]) * uint32_t(radius + 1), bulk;
  auto move = [&](int subtract, int add) { acc += uint32_t(int(in[add]) - int(in[subtract])); };
  auto far = [&](int left, int right) { bulk = acc * ww + (uint32_t(in[left]) + uint32_t(in[right])) * fw; };
  auto save = [&](int x) { out[x] = uint8_t((bulk + (1u << 23)) >> 24); };
  for (int x = 0; x < edge_a - 1; ++x) acc += in[x];
  acc += uint32_t(in[lastx]) * uint32_t(radius - edge_a + 1);
  if (edge_a <= edge_b) {
    for (int x = 0; x < edge_a; ++x) move(0, x + radius), far(0, x + radius + 1), save(x);
    for (int x = edge_a; x < edge_b; ++x) move(x - radius - 1, x + radius), far(x - radius - 1, x + radius + 1), save(x);
    for (int x = edge_b; x <= lastx; ++x) move(x - radius - 1, lastx), far(x - radius - 1, lastx), save(x);
  } else {
    for (int x = 0; x < edge_b; ++x) move(0, x + radius), far(0, x + radius + 1), save(x);
    for (int x = edge_b; x < edge_a; ++x) move(0, lastx), far(0, lastx), save(x);
    for (int x = edge_a; x <= lastx; ++x) move(x - radius - 1, lastx), far(x - radius - 1, lastx), save(x);
  }
}

// One horizontal box-blur pass over every row of a (h, w) 8-bit image, in place.
void horizontal_box_blur(std::vector<uint8_t>& im, int w, int h, float float_radius) {
  int radius = int(float_radius);
  auto ww = uint32_t(float(1 << 24) / (float_radius * 2 + 1));
  uint32_t fw = ((1u << 24) - uint32_t(radius * 2 + 1) * ww) / 2;
  int edge_a = std::min(radius + 1, w), edge_b = std::max(w - radius - 1, 0);
  std::vector<uint8_t> line(static_cast<size_t>(w));
  for (int y = 0; y < h; ++y) {
    uint8_t* row = im.data() + size_t(y) * size_t(w);
    line_box_blur8(line.data(), row, w - 1, radius, edge_a, edge_b, ww, fw);
    std::copy(line.begin(), line.end(), row);
  }
}

std::vector<uint8_t> transpose(const std::vector<uint8_t>& im, int w, int h) {
  std::vector<uint8_t> out(im.size());
  for (int y = 0; y < h; ++y) {
    for (int x = 0; x < w; ++x) out[size_t(x) * size_t(h) + size_t(y)] = im[size_t(y) * size_t(w) + size_t(x)];
  }
  return out;
}

}  // namespace

std::vector<uint8_t> gaussian_blur8(const std::vector<uint8_t>& im, int w, int h, float radius) {
  constexpr int kPasses = 3;
  std::vector<uint8_t> out = im;
  if (radius == 0.0f) return out;
  float r = gaussian_box_radius(radius, kPasses);
  if (r != 0.0f) {
    for (int k = 0; k < kPasses; ++k) horizontal_box_blur(out, w, h, r);
    std::vector<uint8_t> t = transpose(out, w, h);
    for (int k = 0; k < kPasses; ++k) horizontal_box_blur(t, h, w, r);
    out = transpose(t, h, w);
  }
  return out;
}

void paste_kept(std::vector<Image>& images, const Image& init, const Mask& mask, double blur) {
  size_t n = mask.values.size();
  if (blur == 0.0) {
    for (Image& im : images) {
      for (size_t p = 0; p < n; ++p) {
        if (!(mask.values[p] >= 0.5f)) {
          for (size_t c = 0; c < 3; ++c) im.rgb[p * 3 + c] = init.rgb[p * 3 + c];
        }
      }
    }
    return;
  }
  std::vector<uint8_t> repaint(n);
  for (size_t p = 0; p < n; ++p) repaint[p] = mask.values[p] >= 0.5f ? 255 : 0;
  std::vector<uint8_t> seam = gaussian_blur8(repaint, mask.width, mask.height, float(blur));
  for (Image& im : images) {
    for (size_t p = 0; p < n; ++p) {
      float alpha = float(seam[p]) / 255.0f;
      for (size_t c = 0; c < 3; ++c) {
        float v = alpha * float(im.rgb[p * 3 + c]) + (1.0f - alpha) * float(init.rgb[p * 3 + c]);
        im.rgb[p * 3 + c] = uint8_t(std::nearbyint(v));
      }
    }
  }
}

}  // namespace ldm_rt::native
