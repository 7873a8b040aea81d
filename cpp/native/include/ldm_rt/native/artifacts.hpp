// An artifacts folder opened for sampling, as runtime/artifacts.py + manifest.py read it: manifest.json
// (format checked, bounded), tokenizer.json, scheduler_config.json and preview_factors.json (read once, bounded,
// hash-checked), and each component's portable ONNX file (confined to the folder, size and sha256 checked before a
// backend opens it; a large one once per compile cache: verified_manifest_file). Every path named by the manifest
// stays inside the folder (no absolute paths, '..', backslashes or symlinks out of it). Errors are ArtifactError with
// the Python runtime's messages.
#pragma once

#include <array>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "ldm_rt/native/json.hpp"
#include "ldm_rt/native/previews.hpp"
#include "ldm_rt/native/scheduler.hpp"
#include "ldm_rt/native/tokenizer.hpp"

namespace ldm_rt::native {

// runtime/contracts.py ModelFacts (the fields the sampler reads).
struct ModelFacts {
  int64_t latent_channels = 0;
  int64_t latent_factor = 0;
  int64_t unet_factor = 0;
  int64_t unet_in_channels = 0;
  int64_t unet_out_channels = 0;
  std::optional<int64_t> context_length;
  std::optional<int64_t> context_dim;
  std::optional<int64_t> num_classes;
  std::string autoencoder_kind;  // "kl" or "vq"
  double scale_factor = 1.0;
  // SDXL (contracts.ModelFacts says what each holds): the second text encoder's sequence width (after the
  // first's in the context), its pooled projection's width (the UNet's text_embeds), how many time ids the
  // UNet takes (6: base, 5: refiner), and whether an empty negative prompt means zero embeddings.
  bool has_text_encoder = true;
  std::optional<int64_t> text_encoder_2_dim;
  std::optional<int64_t> pooled_dim;
  std::optional<int64_t> time_ids;
  bool force_zeros_for_empty_prompt = false;
  // LCM-distilled UNet (diffusers' time_cond_proj_dim): guidance as a w-embedding of this width (timestep_cond).
  std::optional<int64_t> time_cond_proj_dim;
  int64_t pixel_multiple() const { return latent_factor * unet_factor; }
};

// runtime/contracts.py ShapeProfile: [min, opt, max] of images per call, height and width in pixels.
struct ShapeProfile {
  std::array<int64_t, 3> batch{}, height{}, width{};
};

// A file the manifest lists (manifest.FileEntry): its path relative to the folder, sha256 and size.
struct ManifestFile {
  std::string file, sha256;
  int64_t bytes = 0;
};

// One component's portable ONNX file at the chosen precision, verified, and its tensor names.
struct ComponentFiles {
  std::string onnx;                       // verified path inside the folder
  ManifestFile onnx_entry;                // the manifest's entry for it (lora_targets.json names files by it)
  std::optional<ManifestFile> external_data_entry;  // its external-data file's entry (read beside it), if any
  std::vector<std::string> inputs;        // the contract's input names
  std::vector<std::string> outputs;       // the contract's output names
  std::vector<std::vector<std::string>> output_shapes;  // each output's shape, as input_shapes
  // Each input's shape as the contract states it, in input order: a number as its digits, an axis name, or
  // "scale:AXIS:k" / "div:AXIS:k" (contracts.TensorSpec.resolve; controlnet.cpp resolves the residuals').
  std::vector<std::vector<std::string>> input_shapes;
  Json extra;                             // the contract's `extra` facts (an object; null when absent)
  // Why these files should not be computed in bf16: their bf16 parity failed at export (export/bf16.py); "" if it
  // passed or was not recorded. Worded as runtime/manifest.Manifest.bf16_failure words it. Measured: OpenVINO's own
  // bf16 failed (refuse bf16), else only the emulation did (warn).
  std::string bf16_failure;
  bool bf16_failure_measured = false;
};

struct Artifacts {
  std::string root;
  ModelFacts facts;
  ShapeProfile profile;
  std::map<std::string, ComponentFiles> components;  // text_encoder(_2), unet, vae_decoder, vae_encoder
  std::optional<PromptTokenizer> tokenizer;
  std::optional<PromptTokenizer> tokenizer_2;  // SDXL's second (text_encoder_2's ids; its own pad token)
  SchedulerConfig scheduler_config;
  std::string model_hash;  // the source weights' sha256 (what image metadata names)
  std::string default_scheduler;  // manifest default_scheduler, the folder's own ("": none named, ddim)
  // (fewest, most) chunks of the text encoder's length a prompt may take (build_engines.py --prompt-chunks).
  std::pair<int64_t, int64_t> prompt_chunks{1, 1};
  // The fast step previews' latent -> RGB map (preview_factors.json: bounded, hash-checked, read at open); none in
  // folders built before previews, whose fast previews are full ones (previews.hpp).
  std::optional<PreviewFactors> preview_factors;
  // source.controlnets[k].sha256 of each ControlNet in export order ("" where none is recorded): image metadata.
  std::vector<std::string> controlnet_sha256;
  // Where each LoRA-adaptable weight sits in the ONNX files (lora_targets.json; read by lora.cpp when LoRAs are
  // given); none in folders built before LoRA support.
  std::optional<ManifestFile> lora_targets;
  // The LoRAs fused into these weights at export (manifest source.loras): the parameters' "loras" entries, as JSON
  // with sorted keys and "applied": "export" (pipeline.py Pipeline.loras).
  std::vector<std::string> fused_loras;
  // The textual-inversion embeddings baked in at export (manifest source.embeddings): the parameters' "embeddings"
  // entries, as JSON with sorted keys, without "path", with "applied": "export" (pipeline.py Pipeline.embeddings).
  std::vector<std::string> baked_embeddings;

  // Reads and checks the folder; component files at `precision` ("fp32" or "fp16") are hash-checked here, the large
  // ones once per `compile_cache` ("": every time; verified_manifest_file).
  static Artifacts open(const std::string& dir, const std::string& precision = "fp32", const std::string& compile_cache = "");
};

// Manifest.verify_file: the path of `entry` inside `folder` (confined), present, of the manifest's size and sha256;
// else ArtifactError with Python's message.
std::string verify_manifest_file(const std::string& folder, const ManifestFile& entry);

// Files the manifest lists at least this large are hashed once per compile cache (base.VERIFIED_FROM_BYTES).
constexpr int64_t kVerifiedFromBytes = int64_t{64} << 20;
// base.verified_file: verify_manifest_file, without hashing again a file of at least kVerifiedFromBytes that this
// compile cache saw verified and that is unchanged since. The record is <compile_cache>/verified/<the first 32 hex of
// sha256(stamp)> holding stamp + "\n", stamp = Python's json.dumps([realpath, st_dev, st_ino, st_size, st_mtime_ns,
// st_ctime_ns, entry.sha256]) to the byte, so the Python runtime and this one share records. Written after a
// successful hash (write errors ignored: the next start hashes again). Without a compile cache ("") or for smaller
// files, the file is hashed every time. Errors: verify_manifest_file's.
std::string verified_manifest_file(const std::string& folder, const ManifestFile& entry, const std::string& compile_cache);

// Python's str(Path(p)): '.' parts and repeated or trailing slashes dropped ("" -> ".").
std::string normal_path(const std::string& p);
// Path(p).name, Path(p).suffix.lower() and Path(p).stem (pathlib's rules: a leading dot is no suffix).
std::string path_name(const std::string& path);
std::string path_suffix(const std::string& path, bool lower = true);  // lower = false: Path(p).suffix as written
std::string path_stem(const std::string& path);

}  // namespace ldm_rt::native
