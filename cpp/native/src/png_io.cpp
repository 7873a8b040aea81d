#include "ldm_rt/native/png_io.hpp"

#include <fcntl.h>
#include <png.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <optional>
#include <random>
#include <sstream>

#include "ldm_rt/native/errors.hpp"
#include "ldm_rt/native/jpeg_io.hpp"

namespace ldm_rt::native {
namespace {

struct FileCloser {
  void operator()(FILE* f) const {
    if (f != nullptr) std::fclose(f);
  }
};
using File = std::unique_ptr<FILE, FileCloser>;

// Python's repr of a path string in messages ('x.png').
std::string quoted(const std::string& s) { return "'" + s + "'"; }

std::string one_decimal(double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.1f", v);
  return buf;
}

}  // namespace

void check_input_size(int64_t width, int64_t height, const std::string& what) {
  if (width * height > kMaxInputPixels) {
    throw ImageInputError(what + " is " + std::to_string(width) + "x" + std::to_string(height) + " (" +
                          one_decimal(double(width * height) / 1e6) + " MP), over the limit of " +
                          one_decimal(double(kMaxInputPixels) / 1e6) + " MP (8192x8192); downscale it first");
  }
}

namespace {

// What libpng decoded: 8-bit samples (channels 1 or 3) or 16-bit grey.
struct Decoded {
  int width = 0, height = 0, channels = 0, bit_depth = 8;
  std::vector<uint8_t> data;
  std::vector<png_bytep> rows;  // png_read_image's row table (filled pass by pass when interlaced)
  char error[256] = {0};
};

void on_png_error(png_structp png, png_const_charp message) {
  auto* out = static_cast<Decoded*>(png_get_error_ptr(png));
  std::snprintf(out->error, sizeof out->error, "%s", message);
  png_longjmp(png, 1);
}

void on_png_warning(png_structp, png_const_charp) {}

enum class Want { kRgb, kGray };

// libpng's error handling jumps out with longjmp: this function holds no C++ object of its own (the buffers
// live in `out`), so the jump skips no destructor. Returns false with out.error set on a decoding error.
bool decode(FILE* f, Decoded& out, Want want, const std::string* what, std::string* size_error) {
  png_structp png = png_create_read_struct(PNG_LIBPNG_VER_STRING, &out, on_png_error, on_png_warning);
  if (png == nullptr) return false;
  png_infop info = png_create_info_struct(png);
  if (info == nullptr || setjmp(png_jmpbuf(png))) {
    png_destroy_read_struct(&png, info ? &info : nullptr, nullptr);
    return false;
  }
  png_init_io(png, f);
  png_set_user_limits(png, 0x7fffffff, 0x7fffffff);
  png_read_info(png, info);
  png_uint_32 width = png_get_image_width(png, info), height = png_get_image_height(png, info);
  if (int64_t(width) * int64_t(height) > kMaxInputPixels) {  // refused before any pixel is decoded
    *size_error = *what;
    out.width = int(width), out.height = int(height);
    png_destroy_read_struct(&png, &info, nullptr);
    return true;
  }
  int color = png_get_color_type(png, info), depth = png_get_bit_depth(png, info);
  // Pillow reads plain 16-bit grey as "I;16" (scaled by the caller); every other 16-bit kind as 8 bits,
  // keeping the high byte.
  bool gray16 = depth == 16 && color == PNG_COLOR_TYPE_GRAY;
  if (color == PNG_COLOR_TYPE_PALETTE) png_set_palette_to_rgb(png);
  if (color == PNG_COLOR_TYPE_GRAY && depth < 8) png_set_expand_gray_1_2_4_to_8(png);
  if (depth == 16 && !gray16) png_set_strip_16(png);
  if (gray16) png_set_swap(png);  // host (little-endian) order for the uint16 view below
  // Pillow's convert("RGB"/"L") drops transparency: expand it to an alpha channel (so every kind ends the
  // same way), then strip it.
  bool trns = png_get_valid(png, info, PNG_INFO_tRNS) != 0;
  if (trns) png_set_tRNS_to_alpha(png);
  if ((color & PNG_COLOR_MASK_ALPHA) || trns) png_set_strip_alpha(png);
  bool gray_file = (color & PNG_COLOR_MASK_COLOR) == 0;
  if (want == Want::kRgb && gray_file && !gray16) png_set_gray_to_rgb(png);
  png_set_interlace_handling(png);
  png_read_update_info(png, info);
  out.width = int(width), out.height = int(height);
  out.channels = int(png_get_channels(png, info));
  out.bit_depth = int(png_get_bit_depth(png, info));
  size_t rowbytes = png_get_rowbytes(png, info);
  out.data.resize(rowbytes * height);
  out.error[0] = 0;
  out.rows.resize(height);
  for (png_uint_32 y = 0; y < height; ++y) out.rows[y] = out.data.data() + y * rowbytes;
  png_read_image(png, out.rows.data());
  png_read_end(png, nullptr);
  png_destroy_read_struct(&png, &info, nullptr);
  return true;
}

Decoded open_png(const std::string& path, const std::string& what, Want want) {
  File f(std::fopen(path.c_str(), "rb"));
  if (!f) {
    int e = errno;
    throw ImageInputError("cannot read " + what + " " + path + ": [Errno " + std::to_string(e) + "] " +
                          std::strerror(e) + ": " + quoted(path));
  }
  struct stat st {};
  if (fstat(fileno(f.get()), &st) != 0 || !S_ISREG(st.st_mode)) {
    throw ImageInputError("cannot read " + what + " " + path + ": not a regular file; give an image file");
  }
  unsigned char sig[8] = {0};
  if (std::fread(sig, 1, 8, f.get()) != 8 || png_sig_cmp(sig, 0, 8) != 0) {
    throw ImageInputError("cannot read " + what + " " + path +
                          (jpeg_supported() ? ": ldm-rt-native reads PNG and JPEG files only; convert it to PNG"
                                            : ": ldm-rt-native reads PNG files only; convert it to PNG"));
  }
  std::rewind(f.get());
  Decoded out;
  std::string size_error;
  if (!decode(f.get(), out, want, &what, &size_error)) {
    throw ImageInputError("cannot read " + what + " " + path + ": " + (out.error[0] ? out.error : "not a valid PNG"));
  }
  if (!size_error.empty()) check_input_size(out.width, out.height, what);
  return out;
}

bool is_latin1(const std::string& utf8, std::string* latin1) {
  latin1->clear();
  for (size_t i = 0; i < utf8.size(); ++i) {
    auto c = static_cast<unsigned char>(utf8[i]);
    if (c < 0x80) {
      latin1->push_back(char(c));
    } else if ((c == 0xC2 || c == 0xC3) && i + 1 < utf8.size()) {
      auto d = static_cast<unsigned char>(utf8[++i]);
      latin1->push_back(char(((c & 0x1F) << 6) | (d & 0x3F)));
    } else {
      return false;
    }
  }
  return true;
}

struct Encoded {
  std::vector<uint8_t> bytes;
  char error[256] = {0};
};

void on_write(png_structp png, png_bytep data, png_size_t length) {
  auto* out = static_cast<Encoded*>(png_get_io_ptr(png));
  out->bytes.insert(out->bytes.end(), data, data + length);
}

void on_flush(png_structp) {}

void on_write_error(png_structp png, png_const_charp message) {
  auto* out = static_cast<Encoded*>(png_get_error_ptr(png));
  std::snprintf(out->error, sizeof out->error, "%s", message);
  png_longjmp(png, 1);
}

// As decode(): no C++ object of its own between setjmp and the libpng calls.
bool encode(const Image& image, png_text* text, int count, png_bytep* rows, Encoded& out) {
  png_structp png = png_create_write_struct(PNG_LIBPNG_VER_STRING, &out, on_write_error, on_png_warning);
  if (png == nullptr) return false;
  png_infop info = png_create_info_struct(png);
  if (info == nullptr || setjmp(png_jmpbuf(png))) {
    png_destroy_write_struct(&png, info ? &info : nullptr);
    return false;
  }
  png_set_write_fn(png, &out, on_write, on_flush);
  png_set_IHDR(png, info, png_uint_32(image.width), png_uint_32(image.height), 8, PNG_COLOR_TYPE_RGB,
               PNG_INTERLACE_NONE, PNG_COMPRESSION_TYPE_DEFAULT, PNG_FILTER_TYPE_DEFAULT);
  if (count > 0) png_set_text(png, info, text, count);
  png_write_info(png, info);
  png_write_image(png, rows);
  png_write_end(png, info);
  png_destroy_write_struct(&png, &info);
  return true;
}

}  // namespace

Image read_rgb_png(const std::string& path, const std::string& what) {
  Decoded d = open_png(path, what, Want::kRgb);
  Image image;
  image.width = d.width, image.height = d.height;
  size_t n = size_t(d.width) * size_t(d.height);
  if (d.bit_depth == 16) {  // grey 16: round(float32(v / 65535) * 255), as images.as_rgb_array
    image.rgb.resize(n * 3);
    for (size_t k = 0; k < n; ++k) {
      uint16_t v;
      std::memcpy(&v, d.data.data() + 2 * k, 2);
      float unit = float(double(v) / 65535.0);
      auto level = uint8_t(std::nearbyint(unit * 255.0f));
      image.rgb[3 * k] = image.rgb[3 * k + 1] = image.rgb[3 * k + 2] = level;
    }
  } else {
    image.rgb = std::move(d.data);
  }
  return image;
}

namespace {

// A JPEG's first bytes (SOI, then a marker), as Pillow's JpegImagePlugin recognises it.
bool is_jpeg_file(const std::string& path) {
  unsigned char head[3] = {0};
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (f == nullptr) return false;
  size_t got = std::fread(head, 1, 3, f);
  std::fclose(f);
  return got == 3 && head[0] == 0xFF && head[1] == 0xD8 && head[2] == 0xFF;
}

}  // namespace

Image read_rgb_image(const std::string& path, const std::string& what) {
  return jpeg_supported() && is_jpeg_file(path) ? read_rgb_jpeg(path, what) : read_rgb_png(path, what);
}

Mask read_mask_image(const std::string& path) {
  return jpeg_supported() && is_jpeg_file(path) ? read_mask_jpeg(path) : read_mask_png(path);
}

Mask read_mask_png(const std::string& path) {
  Decoded d = open_png(path, "mask", Want::kGray);
  Mask mask;
  mask.width = d.width, mask.height = d.height;
  size_t n = size_t(d.width) * size_t(d.height);
  mask.values.resize(n);
  for (size_t k = 0; k < n; ++k) {
    if (d.bit_depth == 16) {
      uint16_t v;
      std::memcpy(&v, d.data.data() + 2 * k, 2);
      mask.values[k] = float(double(v) / 65535.0);
    } else if (d.channels == 3) {  // Pillow's convert("L"): ITU-R 601-2 luma in 16-bit fixed point
      const uint8_t* p = d.data.data() + 3 * k;
      uint32_t level = (uint32_t(p[0]) * 19595 + uint32_t(p[1]) * 38470 + uint32_t(p[2]) * 7471 + 0x8000) >> 16;
      mask.values[k] = float(level) / 255.0f;
    } else {
      mask.values[k] = float(d.data[k]) / 255.0f;
    }
  }
  return mask;
}

std::vector<uint8_t> encode_png(const Image& image, const TextChunks& text) {
  std::vector<std::string> keys, values;
  std::vector<png_text> chunks(text.size());
  keys.reserve(text.size()), values.reserve(text.size());
  for (size_t k = 0; k < text.size(); ++k) {
    keys.push_back(text[k].first);
    std::string latin1;
    bool plain = is_latin1(text[k].second, &latin1);
    values.push_back(plain ? latin1 : text[k].second);
    png_text& t = chunks[k];
    std::memset(&t, 0, sizeof t);
    t.compression = plain ? PNG_TEXT_COMPRESSION_NONE : PNG_ITXT_COMPRESSION_NONE;
    t.key = keys.back().data();
    t.text = values.back().data();
    t.text_length = plain ? values.back().size() : 0;
    t.itxt_length = plain ? 0 : values.back().size();
    t.lang = nullptr;
    t.lang_key = nullptr;
  }
  std::vector<png_bytep> rows(size_t(image.height));
  for (int y = 0; y < image.height; ++y) {
    rows[size_t(y)] = const_cast<uint8_t*>(image.rgb.data()) + size_t(y) * size_t(image.width) * 3;
  }
  Encoded out;
  if (!encode(image, chunks.data(), int(chunks.size()), rows.data(), out)) {
    throw OutputError(std::string("cannot encode the image as PNG: ") + (out.error[0] ? out.error : "libpng failed"));
  }
  return std::move(out.bytes);
}

std::string not_a_file_target(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) {
    if (errno == ENOENT) return "";
    return path + " cannot be checked (" + std::strerror(errno) + "); choose another output path";
  }
  if (S_ISREG(st.st_mode)) return "";
  std::string kind = S_ISDIR(st.st_mode) ? "a folder" : "not a regular file (a device, FIFO or socket)";
  return path + " is " + kind + "; give a new file name or an existing regular file";
}

namespace {

// The first MiB of `path` ("" when it cannot be read): our text comes before the image data, well inside it.
std::string file_head(const std::string& path) {
  File f(std::fopen(path.c_str(), "rb"));
  if (!f) return "";
  std::string head(1 << 20, '\0');
  head.resize(std::fread(&head[0], 1, head.size(), f.get()));
  return head;
}

// The text chunks (tEXt, zTXt, iTXt) of the PNG whose start is `head`, before its image data, as (type, data);
// nullopt when `head` is not a PNG.
std::optional<std::vector<std::pair<std::string, std::string>>> png_text_chunks(const std::string& head) {
  if (head.compare(0, 8, "\x89PNG\r\n\x1a\n") != 0) return std::nullopt;
  std::vector<std::pair<std::string, std::string>> chunks;
  for (size_t at = 8; at + 12 <= head.size();) {  // length, type, data, crc
    auto u8 = [&head](size_t k) { return uint32_t(static_cast<unsigned char>(head[k])); };
    uint32_t length = u8(at) << 24 | u8(at + 1) << 16 | u8(at + 2) << 8 | u8(at + 3);
    std::string type = head.substr(at + 4, 4);
    if (type == "IDAT" || length > head.size() - at - 12) break;
    if (type == "tEXt" || type == "zTXt" || type == "iTXt") chunks.emplace_back(type, head.substr(at + 8, length));
    at += size_t(length) + 12;
  }
  return chunks;
}

}  // namespace

bool written_by_ldm_rt(const std::string& path) {
  static const char* const kOurs[] = {"ldm-rt", "ldm-rt-native"};  // images.SOFTWARE
  std::string head = file_head(path);
  if (auto chunks = png_text_chunks(head)) {
    for (const auto& [type, data] : *chunks) {
      for (const char* ours : kOurs) {
        if (type == "tEXt" && data == std::string("Software") + '\0' + ours) return true;
      }
    }
    return false;
  }
  bool jpeg = head.compare(0, 2, "\xff\xd8") == 0, webp = head.compare(0, 4, "RIFF") == 0 && head.compare(8, 4, "WEBP") == 0;
  if (!jpeg && !webp) return false;
  for (const char* ours : kOurs) {  // the UserComment's JSON in UTF-16BE, as exif_user_comment and Pillow write it
    std::string json = std::string("\"Software\": \"") + ours + "\"", utf16;
    for (char c : json) utf16 += '\0', utf16 += c;
    if (head.find(utf16) != std::string::npos) return true;
  }
  return false;
}

bool png_has_text_key(const std::string& path, const std::string& key) {
  auto chunks = png_text_chunks(file_head(path));
  if (!chunks) return false;
  for (const auto& [type, data] : *chunks) {
    if (data.compare(0, key.size() + 1, key + '\0') == 0) return true;  // every text chunk starts "key\0"
  }
  return false;
}

void write_files_all_or_none(const std::vector<std::pair<std::string, std::vector<uint8_t>>>& files) {
  std::random_device seed;
  std::vector<std::string> temps;
  auto cleanup = [&temps] {
    for (const auto& t : temps) ::unlink(t.c_str());
  };
  try {
    for (const auto& [path, bytes] : files) {
      std::string reason = not_a_file_target(path);
      if (!reason.empty()) throw OutputError(reason);
      auto slash = path.rfind('/');
      std::string dir = slash == std::string::npos ? "" : path.substr(0, slash + 1);
      std::string name = slash == std::string::npos ? path : path.substr(slash + 1);
      int fd = -1;
      std::string tmp;
      for (int attempt = 0; attempt < 100 && fd < 0; ++attempt) {
        std::ostringstream s;
        s << dir << "." << name << "." << std::hex << seed() << seed() << ".tmp";
        tmp = s.str();
        // 0666 through the process umask, as the Python runtime's files (atomic.FILE_MODE).
        fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
        if (fd < 0 && errno != EEXIST) break;
      }
      if (fd < 0) throw OutputError("cannot write " + path + ": " + std::strerror(errno) + "; no image was written");
      temps.push_back(tmp);
      size_t done = 0;
      while (done < bytes.size()) {
        ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) {
          int e = errno;
          ::close(fd);
          throw OutputError("cannot write " + path + ": " + std::strerror(e) + "; no image was written");
        }
        done += size_t(n);
      }
      if (::fsync(fd) != 0 || ::close(fd) != 0) {
        throw OutputError("cannot write " + path + ": " + std::strerror(errno) + "; no image was written");
      }
    }
  } catch (...) {
    cleanup();
    throw;
  }
  for (size_t k = 0; k < files.size(); ++k) {
    if (::rename(temps[k].c_str(), files[k].first.c_str()) != 0) {
      int e = errno;
      for (size_t j = k; j < temps.size(); ++j) ::unlink(temps[j].c_str());
      throw OutputError("cannot write " + files[k].first + ": " + std::strerror(e));
    }
  }
}

}  // namespace ldm_rt::native
