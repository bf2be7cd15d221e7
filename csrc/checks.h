// Argument checks of the extension's entry points, in one place.
//
// Each macro names the failing argument (its C++ name, which is the Python keyword of the
// binding) and says what was expected and what came. They raise c10::ValueError, which
// pybind11 turns into Python's ValueError.
#pragma once

#include <ATen/ATen.h>

#include <sstream>
#include <string>

namespace edgeprune {

inline std::string shape_of(const at::Tensor& t) {
  std::ostringstream os;
  os << t.sizes() << " " << t.scalar_type() << " on " << t.device();
  return os.str();
}

}  // namespace edgeprune

#define EP_CHECK_CPU(x) \
  TORCH_CHECK_VALUE((x).device().is_cpu(), #x ": expected a CPU tensor, got ", edgeprune::shape_of(x))

#define EP_CHECK_CONTIGUOUS(x) \
  TORCH_CHECK_VALUE((x).is_contiguous(), #x ": expected a contiguous tensor, got strides ", (x).strides())

#define EP_CHECK_DIM(x, n) \
  TORCH_CHECK_VALUE((x).dim() == (n), #x ": expected ", (n), " dimensions, got ", edgeprune::shape_of(x))

#define EP_CHECK_SIZE(x, d, n) \
  TORCH_CHECK_VALUE((x).size(d) == (n), #x ": expected size ", (n), " in dimension ", (d), ", got ", \
                    edgeprune::shape_of(x))

#define EP_CHECK_SAME_SHAPE(x, y) \
  TORCH_CHECK_VALUE((x).sizes() == (y).sizes(), #x ": expected the shape of " #y " ", (y).sizes(), ", got ", \
                    edgeprune::shape_of(x))

#define EP_CHECK_SAME_DTYPE(x, y)                                                                           \
  TORCH_CHECK_VALUE((x).scalar_type() == (y).scalar_type(), #x ": expected the dtype of " #y " (",          \
                    (y).scalar_type(), "), got ", edgeprune::shape_of(x))

// Mask tensors (log_alpha, u, z) are computed in float32, or float64 for float64 inputs.
#define EP_CHECK_MASK_DTYPE(x)                                                                              \
  TORCH_CHECK_VALUE((x).scalar_type() == at::kFloat || (x).scalar_type() == at::kDouble,                  \
                    #x ": expected float32 or float64, got ", edgeprune::shape_of(x))

// Writer outputs (clean, corrupt, grad_x) may be any of the four floating types.
#define EP_CHECK_DATA_DTYPE(x)                                                                              \
  TORCH_CHECK_VALUE((x).scalar_type() == at::kFloat || (x).scalar_type() == at::kDouble ||                \
                        (x).scalar_type() == at::kBFloat16 || (x).scalar_type() == at::kHalf,             \
                    #x ": expected float32, float64, bfloat16 or float16, got ", edgeprune::shape_of(x))

// A CPU, contiguous mask tensor (the shape is checked by the caller).
#define EP_CHECK_MASK(x) \
  EP_CHECK_CPU(x);       \
  EP_CHECK_CONTIGUOUS(x); \
  EP_CHECK_MASK_DTYPE(x)

// A CPU, contiguous [W, M] writer tensor.
#define EP_CHECK_DATA(x)  \
  EP_CHECK_CPU(x);        \
  EP_CHECK_CONTIGUOUS(x); \
  EP_CHECK_DATA_DTYPE(x); \
  EP_CHECK_DIM(x, 2)
