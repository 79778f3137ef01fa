"""Inputs and Python-MLX outputs for every operation of the mlx-swift stand-in (``swift_bridge/standin``).

``python -m swift_bridge.standin_fixtures OUT.safetensors`` writes one file; the stand-in's XCTests
(``Tests/StandInTests/OpChecks.swift``, file named by ``$STANDIN_FIXTURES``) recompute each output with
the stand-in and compare at the tolerance stored beside it (``<case>.tol``, max |error| relative to
max |expected|; 0 means bit-exact). Case names are shared by both sides: ``<case>.<input>`` and
``<case>.out``. The stand-in is only as good as this check.
"""

from __future__ import annotations

import sys
from pathlib import Path

import mlx_video  # noqa: F401  (fast BLAS before MLX)
import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .weights import write_safetensors

SEED = 20260901
FP32 = 2e-6  # fp32 results computed in a different order (sums, matmuls, exp/tanh/erf implementations)


def cases() -> dict[str, mx.array]:
    rng = np.random.default_rng(SEED)

    def r(*shape, scale=1.0):
        return mx.array((scale * rng.standard_normal(shape)).astype(np.float32))

    out: dict[str, mx.array] = {}

    def case(name: str, tol: float, **arrays):
        for k, v in arrays.items():
            out[f"{name}.{k}"] = v if isinstance(v, mx.array) else mx.array(v)
        out[f"{name}.tol"] = mx.array(np.float32(tol))

    # broadcasting arithmetic
    a, b, c = r(2, 3, 4), r(3, 1), r(4) + 3
    case("add_broadcast", 0, a=a, b=b, out=a + b)
    case("arith_scalars", FP32, a=a, b=b, c=c, out=(a * 0.5 - b) / c + 1 - 2 * a)
    x = r(3, 5, scale=3)
    case("unary", FP32, x=x, tanh=mx.tanh(x), abs=mx.abs(x), exp=mx.exp(x / 3), sigmoid=mx.sigmoid(x),
         silu=nn.silu(x), gelu_approx=nn.gelu_approx(x), relu=nn.relu(x), clip=mx.clip(x, -1, 0.5),
         round=mx.round(x * 2), rsqrt=mx.rsqrt(mx.abs(x) + 0.1), sqrt=mx.sqrt(mx.abs(x)), erf=mx.erf(x / 3),
         square=mx.square(x), out=x)
    y = r(5)
    case("binary", 0, x=x, y=y, maximum=mx.maximum(x, y), minimum=mx.minimum(x, y),
         greater=(x > y).astype(mx.float32), out=x)
    case("reductions", FP32, x=a, sum=a.sum(), mean=a.mean(), max=a.max(), min=a.min(), sum_axis1=a.sum(axis=1),
         max_axis2=a.max(axis=2, keepdims=True), out=a)
    m, n = r(2, 1, 3, 4), r(3, 4, 5)
    case("matmul_batched", FP32, a=m, b=n, out=m @ n)
    case("transpose_reshape", 0, x=r(2, 3, 4, 5), out=r(1))
    out["transpose_reshape.out"] = out["transpose_reshape.x"].transpose(0, 2, 1, 3).reshape(2, 4, -1)
    case("swapaxes_expand", 0, x=a, out=mx.expand_dims(mx.swapaxes(a, 0, 2), 1))
    case("squeeze_T", 0, x=b, squeezed=mx.squeeze(b, 1), T=a.T, out=b)
    s = r(2, 3, 7, scale=4)
    case("softmax", FP32, x=s, last=mx.softmax(s, axis=-1), axis1=mx.softmax(s, axis=1), out=s)

    # norms (MLXFast)
    h, w, bias = r(2, 5, 16, scale=2) + 0.5, r(16) + 1, r(16)
    case("layer_norm", 1e-5, x=h, w=w, b=bias, affine=mx.fast.layer_norm(h, w, bias, 1e-6),
         plain=mx.fast.layer_norm(h, None, None, 1e-6), out=h)
    case("rms_norm", 1e-5, x=h, w=w, out=mx.fast.rms_norm(h, w, 1e-6))

    # attention: GQA (4 query heads over 2 key heads), additive mask, boolean mask, causal
    q, k, v = r(1, 4, 5, 8), r(1, 2, 7, 8), r(1, 2, 7, 8)
    madd = r(1, 1, 5, 7)
    mbool = mx.array(rng.random((1, 4, 5, 7)) > 0.3)
    qc, kc, vc = r(2, 2, 6, 8), r(2, 2, 6, 8), r(2, 2, 6, 8)
    sdpa = mx.fast.scaled_dot_product_attention
    case("sdpa", 1e-5, q=q, k=k, v=v, mask_add=madd, mask_bool=mbool,
         none=sdpa(q, k, v, scale=0.35), add=sdpa(q, k, v, scale=1.0, mask=madd),
         bool=sdpa(q, k, v, scale=0.35, mask=mbool), qc=qc, kc=kc, vc=vc,
         causal=sdpa(qc, kc, vc, scale=0.35, mask="causal"), out=q)

    # conv2d, channels last: weight [O, kH, kW, I]
    xc, wc, wg = r(2, 6, 7, 4), r(5, 3, 3, 4, scale=0.3), r(6, 3, 3, 2, scale=0.3)
    case("conv2d", 1e-5, x=xc, w=wc, wg=wg, pad1=mx.conv2d(xc, wc, padding=1),
         stride2=mx.conv2d(xc, wc, stride=2), dilation2=mx.conv2d(xc, wc, padding=2, dilation=2),
         groups2=mx.conv2d(xc, wg, padding=1, groups=2), out=xc)

    # affine quantization (bit-exact words, scales, biases) and the quantized matmul
    for bits, group in ((4, 64), (8, 32), (2, 128)):
        wq_in = r(6, 256, scale=0.2)
        wq, scales, biases = mx.quantize(wq_in, group_size=group, bits=bits)
        xq = r(3, 256)
        case(f"quantize_{bits}_{group}", 0, w=wq_in, wq=wq, scales=scales, biases=biases,
             dequantized=mx.dequantize(wq, scales, biases, group_size=group, bits=bits), x=xq,
             matmul=mx.quantized_matmul(xq, wq, scales, biases, transpose=True, group_size=group, bits=bits),
             out=wq_in)
        out[f"quantize_{bits}_{group}.tol_matmul"] = mx.array(np.float32(1e-5))

    # indexing and layout ops
    t = r(2, 3, 4)
    case("indexing", 0, x=t, ellipsis0=t[..., 0], slice=t[:, 1:3], upto=t[:, :2], last=t[:, -1],
         newaxis=t[1, None], from2=t[:, 2:], step2=t[..., ::2], scalar=t[1, 2, 3], out=t)
    case("concat_stack_split", 0, a=a, b=r(2, 3, 4), out=a)
    out["concat_stack_split.concat"] = mx.concatenate([a, out["concat_stack_split.b"]], axis=1)
    out["concat_stack_split.stack"] = mx.stack([a, out["concat_stack_split.b"]], axis=-1)
    out["concat_stack_split.split1"] = mx.split(a, 3, axis=1)[1]
    table, idx = r(10, 3), mx.array(rng.integers(0, 10, (4, 4)).astype(np.int32))
    case("take", 0, table=table, idx=idx, out=mx.take(table, idx, axis=0))
    case("pad", 0, x=a, out=mx.pad(a, [(0, 0), (1, 2), (0, 0)]))
    cond = mx.array(rng.random((3, 1)) > 0.5)
    case("where", 0, cond=cond, a=a, b=b, out=mx.where(cond, a, b))
    case("broadcast_to", 0, x=b, out=mx.broadcast_to(b, (2, 3, 4)))
    case("less", 0, a=a, b=b, out=(a < b).astype(mx.float32))

    # dtypes: float16 / bfloat16 rounding, integer casts
    big = r(64, scale=300)
    case("astype", 0, x=big, f16=big.astype(mx.float16), bf16=big.astype(mx.bfloat16),
         i32=big.astype(mx.int32), out=big)

    # PRNG (Threefry): keys, split, uniform, normal (odd and even counts)
    key = mx.random.key(7)
    case("random", 1e-6, key=key, split3=mx.random.split(key, 3), uniform5=mx.random.uniform(shape=(5,), key=key),
         normal6=mx.random.normal((2, 3), key=key), normal7=mx.random.normal((7,), key=mx.random.split(key, 2)[1]),
         out=mx.zeros((1,)))
    return out


def write(path: Path) -> int:
    arrays = cases()
    mx.eval(arrays)
    write_safetensors(Path(path), arrays, {"generator": "swift_bridge.standin_fixtures"})
    return sum(1 for k in arrays if k.endswith(".tol"))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python -m swift_bridge.standin_fixtures OUT.safetensors", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {write(Path(sys.argv[1]))} op cases to {sys.argv[1]}")
