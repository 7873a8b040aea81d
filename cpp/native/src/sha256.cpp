#include "ldm_rt/native/sha256.hpp"

#include <openssl/evp.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <memory>
#include <vector>

#include "ldm_rt/native/errors.hpp"

namespace ldm_rt::native {
namespace {

struct Digest {
  std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> ctx{EVP_MD_CTX_new(), &EVP_MD_CTX_free};
  Digest() {
    if (!ctx || EVP_DigestInit_ex(ctx.get(), EVP_sha256(), nullptr) != 1) throw std::runtime_error("OpenSSL: no SHA-256");
  }
  void update(const void* data, size_t n) { EVP_DigestUpdate(ctx.get(), data, n); }
  std::string hex() {
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int n = 0;
    EVP_DigestFinal_ex(ctx.get(), md, &n);
    static const char* digits = "0123456789abcdef";
    std::string out;
    for (unsigned int k = 0; k < n; ++k) {
      out.push_back(digits[md[k] >> 4]);
      out.push_back(digits[md[k] & 15]);
    }
    return out;
  }
};

}  // namespace

std::string sha256_hex(std::string_view data) {
  Digest d;
  d.update(data.data(), data.size());
  return d.hex();
}

std::string sha256_hex_file(const std::string& path) {
  std::unique_ptr<FILE, int (*)(FILE*)> f(std::fopen(path.c_str(), "rb"), &std::fclose);
  if (!f) throw ArtifactError("cannot open " + path + " (" + std::strerror(errno) + "); check its permissions or rebuild the artifacts");
  Digest d;
  std::vector<char> block(1 << 20);
  size_t n;
  while ((n = std::fread(block.data(), 1, block.size(), f.get())) > 0) d.update(block.data(), n);
  if (std::ferror(f.get())) throw ArtifactError("cannot read " + path + "; rebuild the artifacts");
  return d.hex();
}

}  // namespace ldm_rt::native
