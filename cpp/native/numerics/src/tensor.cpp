#include "ldm_rt/native/tensor.hpp"

#include <algorithm>
#include <cstring>

namespace ldm_rt::native {

std::size_t numel_of(const std::vector<int64_t>& shape, std::size_t limit) {
  std::size_t n = 1;
  for (int64_t d : shape) {
    if (d < 0) throw std::invalid_argument("shape " + shape_str(shape) + " has a negative dimension");
    if (d != 0 && n > limit / static_cast<std::size_t>(d))
      throw std::invalid_argument("shape " + shape_str(shape) + " has more than " + std::to_string(limit) + " elements");
    n *= static_cast<std::size_t>(d);
  }
  return n;
}

std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "(";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  if (shape.size() == 1) s += ",";
  return s + ")";
}

Tensor::Tensor(std::vector<int64_t> shape_, float fill) : shape(std::move(shape_)), data(numel_of(shape), fill) {}

Tensor::Tensor(std::vector<int64_t> shape_, std::vector<float> data_) : shape(std::move(shape_)), data(std::move(data_)) {
  if (numel_of(shape) != data.size())
    throw std::invalid_argument("tensor of shape " + shape_str(shape) + " needs " + std::to_string(numel_of(shape)) +
                                " values, got " + std::to_string(data.size()));
}

Tensor Tensor::rows(int64_t begin, int64_t end) const {
  if (shape.empty() || begin < 0 || end < begin || end > shape[0])
    throw std::invalid_argument("rows [" + std::to_string(begin) + ", " + std::to_string(end) +
                                ") are out of range for shape " + shape_str(shape));
  std::size_t row = shape[0] ? data.size() / static_cast<std::size_t>(shape[0]) : 0;
  std::vector<int64_t> s = shape;
  s[0] = end - begin;
  return Tensor(std::move(s), std::vector<float>(data.begin() + begin * row, data.begin() + end * row));
}

Tensor Tensor::concat_rows(const std::vector<const Tensor*>& parts) {
  if (parts.empty()) throw std::invalid_argument("concat_rows needs at least one tensor");
  std::vector<int64_t> s = parts[0]->shape;
  if (s.empty()) throw std::invalid_argument("concat_rows needs tensors with a first axis");
  s[0] = 0;
  std::vector<float> out;
  for (const Tensor* t : parts) {
    if (t->shape.size() != s.size() || !std::equal(t->shape.begin() + 1, t->shape.end(), s.begin() + 1))
      throw std::invalid_argument("concat_rows: shape " + shape_str(t->shape) + " does not match " +
                                  shape_str(parts[0]->shape) + " after the first axis");
    s[0] += t->shape[0];
    out.insert(out.end(), t->data.begin(), t->data.end());
  }
  return Tensor(std::move(s), std::move(out));
}

}  // namespace ldm_rt::native
