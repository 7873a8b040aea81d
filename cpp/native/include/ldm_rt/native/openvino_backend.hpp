// OpenVINO's C++ API on the portable ONNX files (runtime/backends/openvino_backend.py does the same from
// Python): each file compiled once for the CPU with its dynamic batch and sizes; INFERENCE_NUM_THREADS = threads or
// the physical cores; INFERENCE_PRECISION_HINT f32 unless bf16 is asked for and the CPU has it. With a compile cache,
// an unpatched file is compiled from its path with CACHE_DIR = <compile_cache>/openvino/<the first 24 hex of
// sha256 of its manifest hashes (ONNX, then external data; one space between)>: a warm start then neither parses
// the file nor reads its weights twice, and a model rebuilt in place compiles afresh. Each call borrows an idle
// infer request (a new one when all are busy), so concurrent calls never share one. A WeightPatch (LoRA) replaces
// the Constants it names (the ONNX frontend names them after their initializers) of the read model before it
// compiles, without the compile cache.
#pragma once

#include <memory>

#include "ldm_rt/native/backend.hpp"

namespace ldm_rt::native {

std::unique_ptr<Backend> open_openvino(const HostOptions& host);

}  // namespace ldm_rt::native
