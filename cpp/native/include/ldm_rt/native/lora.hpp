// LoRA adapters at run time (runtime/lora.py; Hu et al. 2021), applied as the components open:
//
//     W' = W + sum over files of  scale * (alpha / rank) * up @ down
//
// Files: local .safetensors only (bounded, F32/F16/BF16/F64 widened to float32; pickles refused with the conversion
// to use). Key layouts: diffusers / PEFT (`unet.<module>.lora_A.weight` / `lora_B.weight`, `.lora.down/up.weight`,
// alphas from `lora_adapter_metadata` or `.alpha` keys, else alpha = rank) and kohya / A1111 (`lora_unet_*`,
// `lora_te_*`, `lora_te1_*` / `lora_te2_*`, LoCon's k x k conv down). Modules resolve through the folder's
// lora_targets.json (hash-checked through the manifest): kohya's flattened names are looked up among the flattened
// real names, never split by guessing. Every file is checked whole when the pipeline loads, before anything compiles;
// each module's delta is computed as its weight is patched (one at a time). Messages are Python's, word for word.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "ldm_rt/native/artifacts.hpp"
#include "ldm_rt/native/backend.hpp"
#include "ldm_rt/native/errors.hpp"

namespace ldm_rt::native {

// runtime/lora.py's bounds, same values.
constexpr uint64_t kMaxLoraBytes = uint64_t{8} << 30;
constexpr std::size_t kMaxLoras = 32;  // per pipeline; each costs a pass over the targeted weights
constexpr double kMaxLoraScale = 1e3;  // beyond this a scale is a typo
constexpr std::size_t kMaxLoraTargetsBytes = std::size_t{64} << 20;

// A LoRA file or argument cannot be used (lora.LoraError).
class LoraError : public Error {
 public:
  using Error::Error;
};

// One LoRA to apply: its file and its scale (A1111's `<lora:name:scale>`).
struct LoraSpec {
  std::string path;
  double scale = 1.0;
};

// "FILE[:SCALE]" -> LoraSpec (lora.parse_lora_arg: the scale follows the last ':' when the part before it names a LoRA
// file), its scale checked as LoraSpec checks it. Throws LoraError.
LoraSpec parse_lora_arg(const std::string& text);
// LoraSpec's check: a finite scale within +-kMaxLoraScale. Throws LoraError.
void check_lora_spec(const LoraSpec& spec);

struct LoraState;

// The LoRAs of one load, read and resolved against an artifacts folder (lora.load_loras + run_time_deltas).
class Loras {
 public:
  // Reads every file (a file given twice is read twice: its scales add up) and resolves its layers; every refusal
  // happens here. No LoRA: an empty set.
  static Loras load(const Artifacts& artifacts, const std::vector<LoraSpec>& specs);
  bool empty() const;
  // The patch of one component's ONNX file (lora.patched_initializers); null when no LoRA adapts the component.
  std::unique_ptr<WeightPatch> patch(const std::string& component, const ComponentFiles& files) const;
  // The parameters' "loras" entries (lora.records + "applied": "run time"), each as JSON text with sorted keys.
  std::vector<std::string> records() const;

 private:
  std::shared_ptr<const LoraState> state_;
};

}  // namespace ldm_rt::native
