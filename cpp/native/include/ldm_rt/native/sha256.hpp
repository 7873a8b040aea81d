// SHA-256 as hex, for the manifest's file hashes and the model hash.
#pragma once

#include <string>
#include <string_view>

namespace ldm_rt::native {

std::string sha256_hex(std::string_view data);
// The file's hash, read in 1 MiB blocks; throws ArtifactError naming the file when it cannot be read.
std::string sha256_hex_file(const std::string& path);

}  // namespace ldm_rt::native
