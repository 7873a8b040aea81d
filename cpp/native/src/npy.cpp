#include "ldm_rt/native/npy.hpp"

#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <memory>

#include "ldm_rt/native/half.hpp"

namespace ldm_rt::native {
namespace {

constexpr std::size_t kMaxHeaderBytes = 10000;  // numpy's max_header_size

std::string py_quote(const std::string& s) { return "'" + s + "'"; }

[[noreturn]] void bad_header(const std::string& header) {
  throw NpyError("Cannot parse header: " + py_quote(header));
}

// The value after 'key': in the header's dict literal, as text up to its end (a quoted string, True/False,
// or a parenthesised tuple).
std::string field(const std::string& header, const std::string& key) {
  std::string quoted = "'" + key + "':";
  auto at = header.find(quoted);
  if (at == std::string::npos) {
    throw NpyError("Header does not contain the correct keys: " + py_quote(header));
  }
  std::size_t k = at + quoted.size();
  while (k < header.size() && header[k] == ' ') ++k;
  if (k >= header.size()) bad_header(header);
  std::size_t end;
  if (header[k] == '\'') {
    end = header.find('\'', k + 1);
    if (end == std::string::npos) bad_header(header);
    return header.substr(k + 1, end - k - 1);
  }
  if (header[k] == '(' || header[k] == '[') {
    end = header.find(header[k] == '(' ? ')' : ']', k);
    if (end == std::string::npos) bad_header(header);
    return header.substr(k, end - k + 1);
  }
  end = header.find_first_of(",}", k);
  if (end == std::string::npos) bad_header(header);
  return header.substr(k, end - k);
}

struct Dtype {
  std::string name;
  char kind = 'V';
  int itemsize = 0;
  bool swap = false;  // stored big-endian
};

Dtype parse_dtype(const std::string& descr) {
  Dtype d;
  if (descr.empty() || descr[0] == '[') {  // a structured dtype
    d.name = descr;
    return d;
  }
  char order = descr[0];
  std::string rest = (order == '<' || order == '>' || order == '|' || order == '=') ? descr.substr(1) : descr;
  if (rest.empty()) throw NpyError("data type " + py_quote(descr) + " not understood");
  d.kind = rest[0];
  d.itemsize = std::atoi(rest.c_str() + 1);
  d.swap = order == '>';
  static const char* names[][2] = {{"f2", "float16"}, {"f4", "float32"}, {"f8", "float64"}, {"f16", "float128"},
                                   {"i1", "int8"},    {"i2", "int16"},   {"i4", "int32"},   {"i8", "int64"},
                                   {"u1", "uint8"},   {"u2", "uint16"},  {"u4", "uint32"},  {"u8", "uint64"},
                                   {"b1", "bool"},    {"c8", "complex64"}, {"c16", "complex128"}};
  d.name = rest;
  for (auto& [code, name] : names) {
    if (rest == code) d.name = d.swap && d.itemsize > 1 ? descr : name;
  }
  if (d.kind == 'O') throw NpyError("Array can't be memory-mapped: Python objects in dtype.");
  return d;
}

std::vector<int64_t> parse_shape(const std::string& text, const std::string& header) {
  if (text.size() < 2 || text.front() != '(' || text.back() != ')') bad_header(header);
  std::vector<int64_t> shape;
  std::string inner = text.substr(1, text.size() - 2);
  std::size_t k = 0;
  while (k < inner.size()) {
    while (k < inner.size() && (inner[k] == ' ' || inner[k] == ',')) ++k;
    if (k >= inner.size()) break;
    std::size_t end = k;
    while (end < inner.size() && std::isdigit(static_cast<unsigned char>(inner[end]))) ++end;
    if (end == k || end - k > 15) bad_header(header);
    shape.push_back(std::stoll(inner.substr(k, end - k)));
    k = end;
  }
  return shape;
}

}  // namespace

LatentsInput LatentsInput::of(Tensor t) {
  LatentsInput in;
  in.shape = t.shape;
  auto shared = std::make_shared<const Tensor>(std::move(t));
  in.values = [shared] { return *shared; };
  return in;
}

LatentsInput read_npy(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) {
    int err = errno;
    throw NpyError("[Errno " + std::to_string(err) + "] " + std::strerror(err) + ": " + py_quote(path));
  }
  if (S_ISDIR(st.st_mode)) throw NpyError("[Errno 21] Is a directory: " + py_quote(path));
  std::ifstream f(path, std::ios::binary);
  if (!f) throw NpyError("[Errno 13] Permission denied: " + py_quote(path));
  char magic[8] = {};
  f.read(magic, 8);
  std::size_t got = std::size_t(f.gcount());
  if (got >= 4 && std::memcmp(magic, "PK\x03\x04", 4) == 0) throw NpyError("npz");
  if (got < 8 || std::memcmp(magic, "\x93NUMPY", 6) != 0) {
    if (got == 0) throw NpyError("No data left in file");
    throw NpyError("This file contains pickled (object) data. If you trust the file you can load it unsafely using the "
                   "`allow_pickle=` keyword argument or `pickle.load()`.");
  }
  int major = magic[6];
  if (major < 1 || major > 3) {
    throw NpyError("we only support format version (1,0), (2,0), and (3,0), not (" + std::to_string(major) + ", " +
                   std::to_string(int(magic[7])) + ")");
  }
  unsigned char len_bytes[4] = {};
  int len_size = major == 1 ? 2 : 4;
  f.read(reinterpret_cast<char*>(len_bytes), len_size);
  std::size_t header_len = len_bytes[0] | std::size_t(len_bytes[1]) << 8;
  if (len_size == 4) header_len |= std::size_t(len_bytes[2]) << 16 | std::size_t(len_bytes[3]) << 24;
  if (header_len > kMaxHeaderBytes) {
    throw NpyError("Header info length (" + std::to_string(header_len) + ") is large and may not be safe to load securely.  "
                   "To allow loading, adjust `max_header_size` or fully trust the `.npy` file using `allow_pickle=True`.  "
                   "For safety against large resource use or crashes, sandboxing may be necessary.");
  }
  std::string header(header_len, '\0');
  f.read(header.data(), std::streamsize(header_len));
  if (std::size_t(f.gcount()) != header_len) throw NpyError("EOF: reading array header, expected " + std::to_string(header_len) +
                                                           " bytes got " + std::to_string(f.gcount()));
  std::size_t offset = 8 + std::size_t(len_size) + header_len;
  Dtype d = parse_dtype(field(header, "descr"));
  std::string fortran = field(header, "fortran_order");
  if (fortran != "True" && fortran != "False") bad_header(header);
  std::vector<int64_t> shape = parse_shape(field(header, "shape"), header);

  LatentsInput in;
  in.dtype = d.name;
  in.is_float = d.kind == 'f' && (d.itemsize == 2 || d.itemsize == 4 || d.itemsize == 8);
  in.shape = shape;
  bool is_fortran = fortran == "True";
  in.values = [path, d, shape, offset, is_fortran, size = std::size_t(st.st_size)]() {
    std::size_t n = numel_of(shape);
    if (offset + n * std::size_t(d.itemsize) > size) throw NpyError("mmap length is greater than file size");
    std::ifstream file(path, std::ios::binary);
    file.seekg(std::streamoff(offset));
    std::vector<unsigned char> raw(n * std::size_t(d.itemsize));
    file.read(reinterpret_cast<char*>(raw.data()), std::streamsize(raw.size()));
    if (std::size_t(file.gcount()) != raw.size()) throw NpyError("mmap length is greater than file size");
    Tensor t(shape);
    for (std::size_t k = 0; k < n; ++k) {
      unsigned char b[8];
      std::memcpy(b, raw.data() + k * std::size_t(d.itemsize), std::size_t(d.itemsize));
      if (d.swap) std::reverse(b, b + d.itemsize);
      if (d.itemsize == 2) {
        uint16_t h;
        std::memcpy(&h, b, 2);
        t.data[k] = half_to_float(h);
      } else if (d.itemsize == 4) {
        std::memcpy(&t.data[k], b, 4);
      } else {
        double v;
        std::memcpy(&v, b, 8);
        t.data[k] = float(v);  // astype(float32): round to nearest
      }
    }
    if (is_fortran) {  // column-major on disk: the C-order element (i0, ..., in) sits at sum(i_k * prod(dims before k))
      Tensor c(shape);
      std::vector<int64_t> idx(shape.size(), 0);
      for (std::size_t k = 0; k < n; ++k) {
        std::size_t at = 0, stride = 1;
        for (std::size_t a = 0; a < shape.size(); ++a) at += std::size_t(idx[a]) * stride, stride *= std::size_t(shape[a]);
        c.data[k] = t.data[at];
        for (std::size_t a = shape.size(); a-- > 0;) {
          if (++idx[a] < shape[a]) break;
          idx[a] = 0;
        }
      }
      t = std::move(c);
    }
    return t;
  };
  return in;
}

}  // namespace ldm_rt::native
