// The pybind11 module edgeprune_fast._C: thin bindings of the CPU ops (ops.h), with the
// keyword names the backend (edgeprune_fast/ops/backends/cpp.py) passes. The argument
// checks live in checks.h; the maths in hard_concrete.cpp and edge_mix.cpp.
#include <torch/python.h>

#include "ops.h"

#ifndef EDGEPRUNE_TORCH_VERSION
#define EDGEPRUNE_TORCH_VERSION "unknown"
#endif

namespace py = pybind11;
using namespace pybind11::literals;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "edgeprune_fast CPU kernels: hard-concrete masks and the fused edge_mix (see csrc/ops.h)";
  m.attr("built_with_torch") = EDGEPRUNE_TORCH_VERSION;
  m.def("hard_concrete_forward", &edgeprune::hard_concrete_forward, "z from log_alpha and u (or deterministic)",
        "log_alpha"_a, "u"_a, "training"_a, "beta"_a, "left"_a, "right"_a);
  m.def("hard_concrete_backward", &edgeprune::hard_concrete_backward, "grad log_alpha from grad z",
        "grad_z"_a, "log_alpha"_a, "u"_a, "training"_a, "beta"_a, "left"_a, "right"_a);
  m.def("edge_mix_forward", &edgeprune::edge_mix_forward, "sample masks and mix: (x [R, M], z_eff [R, W])",
        "log_alpha_edge"_a, "log_alpha_node"_a, "clean"_a, "corrupt"_a, "u_edge"_a, "u_node"_a, "training"_a,
        "beta"_a, "left"_a, "right"_a, "base"_a = py::none());
  m.def("mix_forward", &edgeprune::mix_forward, "x = base + sum_w z*clean + (1 - z)*corrupt", "z"_a, "clean"_a,
        "corrupt"_a, "base"_a = py::none());
  m.def("mix_backward", &edgeprune::mix_backward,
        "(grad_z [R, W], grad_clean [W, M]); with grad_clean_out, grad_clean is added into it and it is returned",
        "grad_x"_a, "z"_a, "clean"_a, "corrupt"_a, "grad_clean_out"_a = py::none());
}
