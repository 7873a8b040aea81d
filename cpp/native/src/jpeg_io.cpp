#include "ldm_rt/native/jpeg_io.hpp"

#include <sys/stat.h>

#include <cerrno>
#include <csetjmp>
#include <cstdio>
#include <cstring>
#include <memory>

#include "ldm_rt/native/errors.hpp"
#include "ldm_rt/native/json.hpp"

#ifdef LDM_RT_NATIVE_JPEG
#include <jpeglib.h>
#endif

namespace ldm_rt::native {

#ifndef LDM_RT_NATIVE_JPEG
bool jpeg_supported() { return false; }
Image read_rgb_jpeg(const std::string& path, const std::string& what) {
  throw ImageInputError("cannot read " + what + " " + path + ": this ldm-rt-native was built without libjpeg; convert it to PNG");
}
Mask read_mask_jpeg(const std::string& path) {
  read_rgb_jpeg(path, "mask");  // throws
  return {};
}
std::vector<uint8_t> encode_jpeg(const Image&, const TextChunks&) {
  throw OutputError("this ldm-rt-native was built without libjpeg (install libjpeg-dev and rebuild); write a .png instead");
}
#else

namespace {

struct ErrorManager {
  jpeg_error_mgr base;
  std::jmp_buf jump;
  char message[JMSG_LENGTH_MAX];
};

void on_error(j_common_ptr cinfo) {
  auto* err = reinterpret_cast<ErrorManager*>(cinfo->err);
  (*cinfo->err->format_message)(cinfo, err->message);
  std::longjmp(err->jump, 1);
}

void on_message(j_common_ptr) {}  // warnings (corrupt but decodable data) are not printed, as Pillow

struct Decoded {
  int width = 0, height = 0, channels = 0;
  bool cmyk = false, too_large = false;
  std::vector<uint8_t> data;
};

// Everything libjpeg may longjmp out of sits in this one frame, with no C++ object constructed inside it.
bool decode(std::FILE* file, Decoded* out, char* message) {
  jpeg_decompress_struct cinfo;
  ErrorManager err;
  cinfo.err = jpeg_std_error(&err.base);
  err.base.error_exit = on_error;
  err.base.output_message = on_message;
  if (setjmp(err.jump)) {
    std::snprintf(message, JMSG_LENGTH_MAX, "%s", err.message);
    jpeg_destroy_decompress(&cinfo);
    return false;
  }
  jpeg_create_decompress(&cinfo);
  jpeg_stdio_src(&cinfo, file);
  jpeg_read_header(&cinfo, TRUE);
  out->width = int(cinfo.image_width), out->height = int(cinfo.image_height);
  if (int64_t(cinfo.image_width) * int64_t(cinfo.image_height) > kMaxInputPixels) {  // from the header, before decoding
    out->too_large = true;
    jpeg_destroy_decompress(&cinfo);
    return true;
  }
  if (cinfo.jpeg_color_space == JCS_CMYK || cinfo.jpeg_color_space == JCS_YCCK) {
    out->cmyk = true;
    jpeg_destroy_decompress(&cinfo);
    return true;
  }
  // Pillow's decoder settings: libjpeg's defaults (JDCT_ISLOW, fancy upsampling), grey stays grey.
  cinfo.out_color_space = cinfo.jpeg_color_space == JCS_GRAYSCALE ? JCS_GRAYSCALE : JCS_RGB;
  jpeg_start_decompress(&cinfo);
  out->channels = cinfo.output_components;
  size_t row = size_t(cinfo.output_width) * size_t(cinfo.output_components);
  out->data.resize(row * cinfo.output_height);
  while (cinfo.output_scanline < cinfo.output_height) {
    JSAMPROW p = out->data.data() + row * cinfo.output_scanline;
    jpeg_read_scanlines(&cinfo, &p, 1);
  }
  jpeg_finish_decompress(&cinfo);
  jpeg_destroy_decompress(&cinfo);
  return true;
}

struct FileCloser {
  void operator()(std::FILE* f) const { std::fclose(f); }
};

Decoded open_jpeg(const std::string& path, const std::string& what) {
  std::unique_ptr<std::FILE, FileCloser> f(std::fopen(path.c_str(), "rb"));
  if (!f) {
    int e = errno;
    throw ImageInputError("cannot read " + what + " " + path + ": [Errno " + std::to_string(e) + "] " + std::strerror(e) + ": '" + path + "'");
  }
  Decoded d;
  char message[JMSG_LENGTH_MAX] = {0};
  if (!decode(f.get(), &d, message)) throw ImageInputError("cannot read " + what + " " + path + ": " + message);
  if (d.too_large) check_input_size(d.width, d.height, what);
  if (d.cmyk) throw ImageInputError("cannot read " + what + " " + path + ": a CMYK JPEG; save it as RGB first");
  return d;
}

// UTF-8 (valid: it came from the checked prompts) to UTF-16BE, surrogate pairs above U+FFFF.
void append_utf16be(const std::string& s, std::vector<uint8_t>& out) {
  for (size_t k = 0; k < s.size();) {
    auto c = static_cast<unsigned char>(s[k]);
    uint32_t cp;
    size_t n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : 4;
    cp = n == 1 ? c : n == 2 ? c & 0x1F : n == 3 ? c & 0x0F : c & 0x07;
    for (size_t j = 1; j < n && k + j < s.size(); ++j) cp = (cp << 6) | (static_cast<unsigned char>(s[k + j]) & 0x3F);
    k += n;
    auto unit = [&out](uint32_t u) {
      out.push_back(uint8_t(u >> 8));
      out.push_back(uint8_t(u & 0xFF));
    };
    if (cp >= 0x10000) {
      cp -= 0x10000;
      unit(0xD800 + (cp >> 10));
      unit(0xDC00 + (cp & 0x3FF));
    } else {
      unit(cp);
    }
  }
}

void put16(std::vector<uint8_t>& b, uint32_t v) { b.push_back(uint8_t(v)), b.push_back(uint8_t(v >> 8)); }
void put32(std::vector<uint8_t>& b, uint32_t v) { put16(b, v & 0xFFFF), put16(b, v >> 16); }

// "Exif\0\0" + a little-endian TIFF: IFD0 holding only the Exif IFD pointer, the Exif IFD holding only the
// UserComment (UNDEFINED: "UNICODE\0" + UTF-16BE), as Pillow writes Image.Exif for these two tags.
std::vector<uint8_t> exif_user_comment(const TextChunks& text) {
  std::string json = "{";
  for (const auto& [key, value] : text) json += (json.size() > 1 ? ", " : "") + json_quote(key, false) + ": " + json_quote(value, false);
  json += "}";
  std::vector<uint8_t> comment = {'U', 'N', 'I', 'C', 'O', 'D', 'E', 0};
  append_utf16be(json, comment);
  std::vector<uint8_t> b = {'E', 'x', 'i', 'f', 0, 0, 'I', 'I', 42, 0};
  put32(b, 8);                       // IFD0 at 8
  put16(b, 1);                       // one entry: ExifIFD pointer
  put16(b, 0x8769), put16(b, 4), put32(b, 1), put32(b, 26);  // Exif IFD at 8 + 2 + 12 + 4 = 26
  put32(b, 0);                       // no IFD1
  put16(b, 1);                       // Exif IFD: one entry, UserComment
  put16(b, 0x9286), put16(b, 7), put32(b, uint32_t(comment.size())), put32(b, 44);  // data at 26 + 2 + 12 + 4
  put32(b, 0);
  b.insert(b.end(), comment.begin(), comment.end());
  return b;
}

struct Encoded {
  unsigned char* buffer = nullptr;
  unsigned long size = 0;
};

bool encode(const Image& image, const std::vector<uint8_t>& exif, Encoded* out, char* message) {
  jpeg_compress_struct cinfo;
  ErrorManager err;
  cinfo.err = jpeg_std_error(&err.base);
  err.base.error_exit = on_error;
  err.base.output_message = on_message;
  if (setjmp(err.jump)) {
    std::snprintf(message, JMSG_LENGTH_MAX, "%s", err.message);
    jpeg_destroy_compress(&cinfo);
    return false;
  }
  jpeg_create_compress(&cinfo);
  jpeg_mem_dest(&cinfo, &out->buffer, &out->size);
  cinfo.image_width = JDIMENSION(image.width), cinfo.image_height = JDIMENSION(image.height);
  cinfo.input_components = 3, cinfo.in_color_space = JCS_RGB;
  jpeg_set_defaults(&cinfo);  // 4:2:0, JDCT_ISLOW, baseline: Pillow's defaults
  jpeg_set_quality(&cinfo, kJpegQuality, TRUE);
  jpeg_start_compress(&cinfo, TRUE);
  jpeg_write_marker(&cinfo, JPEG_APP0 + 1, exif.data(), unsigned(exif.size()));
  size_t row = size_t(image.width) * 3;
  while (cinfo.next_scanline < cinfo.image_height) {
    JSAMPROW p = const_cast<uint8_t*>(image.rgb.data()) + row * cinfo.next_scanline;
    jpeg_write_scanlines(&cinfo, &p, 1);
  }
  jpeg_finish_compress(&cinfo);
  jpeg_destroy_compress(&cinfo);
  return true;
}

}  // namespace

bool jpeg_supported() { return true; }

Image read_rgb_jpeg(const std::string& path, const std::string& what) {
  Decoded d = open_jpeg(path, what);
  Image image;
  image.width = d.width, image.height = d.height;
  if (d.channels == 3) {
    image.rgb = std::move(d.data);
  } else {
    image.rgb.resize(d.data.size() * 3);
    for (size_t k = 0; k < d.data.size(); ++k) image.rgb[3 * k] = image.rgb[3 * k + 1] = image.rgb[3 * k + 2] = d.data[k];
  }
  return image;
}

Mask read_mask_jpeg(const std::string& path) {
  Decoded d = open_jpeg(path, "mask");
  Mask mask;
  mask.width = d.width, mask.height = d.height;
  size_t n = size_t(d.width) * size_t(d.height);
  mask.values.resize(n);
  for (size_t k = 0; k < n; ++k) {
    uint32_t level = d.data[k];
    if (d.channels == 3) {  // Pillow's convert("L"): ITU-R 601-2 luma in 16-bit fixed point
      const uint8_t* p = d.data.data() + 3 * k;
      level = (uint32_t(p[0]) * 19595 + uint32_t(p[1]) * 38470 + uint32_t(p[2]) * 7471 + 0x8000) >> 16;
    }
    mask.values[k] = float(level) / 255.0f;
  }
  return mask;
}

std::vector<uint8_t> encode_jpeg(const Image& image, const TextChunks& text) {
  std::vector<uint8_t> exif = exif_user_comment(text);
  if (exif.size() > 65533) {  // one APP1 segment's limit
    throw OutputError("the parameters do not fit a JPEG file's EXIF (EXIF data is too long); write a .png instead");
  }
  Encoded out;
  char message[JMSG_LENGTH_MAX] = {0};
  bool ok = encode(image, exif, &out, message);
  std::vector<uint8_t> bytes;
  if (ok) bytes.assign(out.buffer, out.buffer + out.size);
  std::free(out.buffer);
  if (!ok) throw OutputError(std::string("cannot encode a JPEG: ") + message);
  return bytes;
}

#endif

}  // namespace ldm_rt::native
