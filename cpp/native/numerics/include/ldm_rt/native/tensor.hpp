// A dense float32 tensor in C order: what the sampling loop hands between tokenizer, networks and scheduler.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace ldm_rt::native {

struct Tensor {
  std::vector<int64_t> shape;
  std::vector<float> data;  // numel(shape) values, C order

  Tensor() = default;
  explicit Tensor(std::vector<int64_t> shape_, float fill = 0.0f);
  Tensor(std::vector<int64_t> shape_, std::vector<float> data_);  // throws std::invalid_argument on size mismatch

  std::size_t numel() const { return data.size(); }
  int64_t dim(std::size_t axis) const { return shape.at(axis); }
  std::size_t ndim() const { return shape.size(); }
  bool same_shape(const Tensor& other) const { return shape == other.shape; }

  // Rows [begin, end) of the first axis (a copy), and the concatenation of tensors along the first axis.
  Tensor rows(int64_t begin, int64_t end) const;
  static Tensor concat_rows(const std::vector<const Tensor*>& parts);
};

// Product of `shape`; throws std::invalid_argument when a dimension is negative or the product exceeds
// `limit` elements (bound sizes before spending memory).
std::size_t numel_of(const std::vector<int64_t>& shape, std::size_t limit = std::size_t{1} << 34);

// "(1, 4, 8, 8)" as numpy prints a shape tuple (one dimension: "(3,)"), for messages.
std::string shape_str(const std::vector<int64_t>& shape);

// Integer token ids (B, L), C order: what the tokenizer returns and the text encoder takes.
struct IdTensor {
  std::vector<int64_t> shape;
  std::vector<int64_t> data;
};

}  // namespace ldm_rt::native
