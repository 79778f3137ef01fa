// Python bindings of the mlx-video native kernels (nanobind, sharing MLX's nanobind domain so that
// mlx.core.array passes straight through, as in MLX's examples/extensions).
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>

#include "kernels.h"

namespace nb = nanobind;
using namespace nb::literals;

NB_MODULE(_native, m) {
  m.doc() = "mlx-video native CPU kernels (fp32 MLX primitives with threaded eval_cpu)";
  m.attr("mlx_version") = MLX_BUILT_VERSION;
  m.def("blas_available", &mlx_video::blas_available, "True when cblas_sgemm resolves in this process");
  m.def("num_threads", &mlx_video::num_threads, "Worker threads the kernels use");
  m.def("flash_attention", &mlx_video::flash_attention, "q"_a, "k"_a, "v"_a, "scale"_a, nb::kw_only(),
        "stream"_a = nb::none(), "softmax(q k^T scale) v over [B, H, L, D] inputs, no score matrix kept");
  m.def("modulated_layer_norm", &mlx_video::modulated_layer_norm, "x"_a, "mul"_a, "add"_a, "eps"_a, nb::kw_only(),
        "stream"_a = nb::none(), "LayerNorm(x) * mul + add with fp32 statistics; x [B, L, D]");
  m.def("gelu_tanh", &mlx_video::gelu_tanh, "x"_a, nb::kw_only(), "stream"_a = nb::none(),
        "GELU with the tanh approximation, fp32");
  m.def("conv3x3", &mlx_video::conv3x3, "xs"_a, "w"_a, "bias"_a = nb::none(), "relu"_a = false, nb::kw_only(),
        "stream"_a = nb::none(),
        "conv3x3(concatenate(xs, -1), w) + bias (then ReLU), NHWC, w [O, 3, 3, C], padding 1");
  m.def("upconv3x3", &mlx_video::upconv3x3, "x"_a, "w"_a, "bias"_a = nb::none(), nb::kw_only(),
        "stream"_a = nb::none(), "conv3x3(upsample_nearest(x, 2), w) + bias, w [O, 3, 3, C], padding 1");
  m.def("gelu_tanh_inplace", &mlx_video::gelu_tanh_inplace, "x"_a,
        "gelu_tanh over an evaluated, row-contiguous float32 array the caller owns, in place");
  m.def("rope", &mlx_video::rope, "x"_a, "cos"_a, "sin"_a, nb::kw_only(), "stream"_a = nb::none(),
        "Wan's interleaved-pair RoPE on x [B, L, H, D] with cos/sin [L, D/2]");
}
