// OpenVINO's C++ API on the portable ONNX files (runtime/backends/openvino_backend.py does the same from
// Python): ov::Core::read_model on each file, compiled once for the CPU with its dynamic batch and sizes;
// INFERENCE_NUM_THREADS = threads or the physical cores; INFERENCE_PRECISION_HINT f32 unless bf16 is asked
// for and the CPU has it; CACHE_DIR = <compile_cache>/openvino. Each call borrows an idle infer request (a
// new one when all are busy), so concurrent calls never share one. A WeightPatch (LoRA) replaces the Constants it
// names (the ONNX frontend names them after their initializers) before the model compiles, without the compile cache.
#pragma once

#include <memory>

#include "ldm_rt/native/backend.hpp"

namespace ldm_rt::native {

std::unique_ptr<Backend> open_openvino(const HostOptions& host);

}  // namespace ldm_rt::native
