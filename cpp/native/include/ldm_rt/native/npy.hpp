// Latents as `ldm-rt sample --latents FILE.npy` reads them: numpy's .npy format (versions 1-3, no pickles),
// the header parsed first and the values read only after the pipeline has checked dtype and shape (as numpy's
// memory map defers them), so a huge or wrong file costs nothing.
#pragma once

#include <cstdint>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

#include "ldm_rt/native/tensor.hpp"

namespace ldm_rt::native {

// A file numpy would not load either; what() is numpy's own message for it.
class NpyError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Initial noise for a request (pipeline.checked_latents' input): its dtype and shape, and the values as float32
// (C order), read when asked.
struct LatentsInput {
  std::string dtype = "float32";  // str(numpy dtype): float32, >f4, int64, bool, ...
  bool is_float = true;           // float16/32/64 (what the pipeline takes)
  std::vector<int64_t> shape;
  std::function<Tensor()> values;

  static LatentsInput of(Tensor t);
};

// numpy's .npy reader (np.load(path, mmap_mode="r", allow_pickle=False)) for the header; values on demand.
// Throws NpyError with numpy's message; an .npz archive is NpyError("npz").
LatentsInput read_npy(const std::string& path);

}  // namespace ldm_rt::native
