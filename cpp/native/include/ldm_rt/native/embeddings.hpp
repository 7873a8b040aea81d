// Textual-inversion embeddings at run time (runtime/embeddings.py; Gal et al. 2022): the files' trigger words become
// new tokens of the tokenizers and their vectors new rows of the text encoders' token tables, as the components open.
//
// Files: local .safetensors (bounded: safetensors.hpp) in the layouts Python reads: diffusers' one key, the trigger ->
// (D,) or (N, D); A1111 / Civitai `emb_params` (N, D); SDXL `clip_l` / `clip_g`. torch files (.pt, .bin), which Python
// reads through a restricted unpickler, are refused in one line with the conversion. The trigger: FILE:TOKEN's token,
// else diffusers' key, else the file's stem. Every file is read and checked (widths, triggers, duplicates) when the
// pipeline loads, before anything compiles. Messages are Python's, word for word.
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "ldm_rt/native/artifacts.hpp"
#include "ldm_rt/native/backend.hpp"
#include "ldm_rt/native/errors.hpp"

namespace ldm_rt::native {

// runtime/embeddings.py's bounds, same values.
constexpr uint64_t kMaxEmbeddingBytes = uint64_t{32} << 20;
constexpr int64_t kMaxEmbeddingVectors = 75;  // A1111's: the vectors must fit one chunk of CLIP's 77 with bos and eos
constexpr int64_t kMaxEmbeddingWidth = 8192;
constexpr std::size_t kMaxEmbeddings = 64;  // per pipeline
constexpr std::size_t kMaxTriggerChars = 128;

// A textual-inversion file or argument cannot be used (embeddings.EmbeddingError).
class EmbeddingError : public Error {
 public:
  using Error::Error;
};

// One embedding to load: its file and the trigger word to use (none: the file's own, or its stem).
struct EmbeddingSpec {
  std::string path;
  std::optional<std::string> token;
};

// "FILE[:TOKEN]" -> EmbeddingSpec (embeddings.parse_embedding_arg: the token follows the last ':' when the part before
// it names a .safetensors, .pt or .bin file), its token checked. Throws EmbeddingError.
EmbeddingSpec parse_embedding_arg(const std::string& text);
// EmbeddingSpec's check: a given trigger is 1 to kMaxTriggerChars printable characters without spaces.
void check_embedding_spec(const EmbeddingSpec& spec);

struct EmbeddingState;

// The embeddings of one load (embeddings.load_embeddings + with_embeddings).
class Embeddings {
 public:
  // Reads every file and teaches `artifacts`' tokenizers their triggers; every refusal happens here. None: an empty set.
  static Embeddings load(Artifacts& artifacts, const std::vector<EmbeddingSpec>& specs);
  bool empty() const;
  // The patch growing one text encoder's token table (embeddings.token_table); null for other components.
  std::unique_ptr<WeightPatch> patch(const std::string& component, const ComponentFiles& files) const;
  // The parameters' "embeddings" entries (embeddings.records + "applied": "run time"), JSON text with sorted keys.
  std::vector<std::string> records() const;

 private:
  std::shared_ptr<const EmbeddingState> state_;
};

}  // namespace ldm_rt::native
