// Every stand-in operation against Python MLX: inputs and MLX outputs come from
// `python -m swift_bridge.standin_fixtures FILE` (path in $STANDIN_FIXTURES). Each comparison prints
// `OPCHECK <name> <relative error> <tolerance>` (relative: max |actual - expected| / max |expected|;
// tolerance 0 means exactly equal) for the report.

import Foundation
import MLX
import MLXNN
import XCTest

final class OpChecks: XCTestCase {
    static let fixtures: [String: MLXArray]? = {
        guard let path = ProcessInfo.processInfo.environment["STANDIN_FIXTURES"] else { return nil }
        return try? loadArrays(url: URL(fileURLWithPath: path))
    }()

    func f(_ key: String) throws -> MLXArray {
        guard let all = Self.fixtures else {
            throw XCTSkip("set STANDIN_FIXTURES to the file `python -m swift_bridge.standin_fixtures` writes")
        }
        return try XCTUnwrap(all[key], "fixture \(key) is missing")
    }

    func tolerance(_ name: String) throws -> Float { try f("\(name).tol").item(Float.self) }

    func check(_ name: String, _ actual: MLXArray, _ expected: MLXArray, tolerance: Float,
               file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertEqual(actual.shape, expected.shape, "\(name): shape", file: file, line: line)
        guard actual.shape == expected.shape else { return }
        var error: Float
        if expected.dtype == .uint32 || actual.dtype == .uint32 {
            XCTAssertEqual(actual.dtype, expected.dtype, "\(name): dtype", file: file, line: line)
            error = actual.asArray(UInt32.self) == expected.asArray(UInt32.self) ? 0 : 1
        } else {
            let a = actual.asArray(Float.self)
            let e = expected.asArray(Float.self)
            let scale = max(e.map { abs($0) }.max() ?? 0, 1e-6)
            error = zip(a, e).map { abs($0 - $1) }.max() ?? 0
            if zip(a, e).contains(where: { $0.isNaN != $1.isNaN }) { error = .infinity }
            error /= scale
        }
        print("OPCHECK \(name) \(error) \(tolerance)")
        XCTAssertLessThanOrEqual(error, tolerance, "\(name): relative error \(error)", file: file, line: line)
    }

    func testBroadcastArithmetic() throws {
        let (a, b, c) = (try f("add_broadcast.a"), try f("add_broadcast.b"), try f("arith_scalars.c"))
        check("add_broadcast", a + b, try f("add_broadcast.out"), tolerance: try tolerance("add_broadcast"))
        check("arith_scalars", (a * 0.5 - b) / c + 1 - 2 * a, try f("arith_scalars.out"),
              tolerance: try tolerance("arith_scalars"))
    }

    func testUnary() throws {
        let x = try f("unary.x")
        let tol = try tolerance("unary")
        check("tanh", tanh(x), try f("unary.tanh"), tolerance: tol)
        check("abs", abs(x), try f("unary.abs"), tolerance: tol)
        check("exp", exp(x / 3), try f("unary.exp"), tolerance: tol)
        check("sigmoid", sigmoid(x), try f("unary.sigmoid"), tolerance: tol)
        check("silu", silu(x), try f("unary.silu"), tolerance: tol)
        check("geluApproximate", geluApproximate(x), try f("unary.gelu_approx"), tolerance: tol)
        check("relu", relu(x), try f("unary.relu"), tolerance: tol)
        check("clip", clip(x, min: -1, max: 0.5), try f("unary.clip"), tolerance: 0)
        check("round", round(x * 2), try f("unary.round"), tolerance: 0)
        check("rsqrt", rsqrt(abs(x) + 0.1), try f("unary.rsqrt"), tolerance: tol)
        check("sqrt", sqrt(abs(x)), try f("unary.sqrt"), tolerance: tol)
        check("erf", erf(x / 3), try f("unary.erf"), tolerance: tol)
        check("square", square(x), try f("unary.square"), tolerance: 0)
        let y = try f("binary.y")
        check("maximum", maximum(x, y), try f("binary.maximum"), tolerance: 0)
        check("minimum", minimum(x, y), try f("binary.minimum"), tolerance: 0)
        check("greater", greater(x, y).asType(.float32), try f("binary.greater"), tolerance: 0)
    }

    func testReductions() throws {
        let x = try f("reductions.x")
        let tol = try tolerance("reductions")
        check("sum", x.sum(), try f("reductions.sum"), tolerance: tol)
        check("mean", x.mean(), try f("reductions.mean"), tolerance: tol)
        check("max", x.max(), try f("reductions.max"), tolerance: 0)
        check("min", x.min(), try f("reductions.min"), tolerance: 0)
        XCTAssertEqual([x.dim(0), x.dim(-1), x.ndim, x.size], [2, 4, 3, 24])
        check("sum_axis1", x.sum(axis: 1), try f("reductions.sum_axis1"), tolerance: tol)
        check("max_axis2_keepdims", x.max(axis: 2, keepDims: true), try f("reductions.max_axis2"), tolerance: 0)
    }

    func testMatmulAndLayout() throws {
        check("matmul_batched", matmul(try f("matmul_batched.a"), try f("matmul_batched.b")),
              try f("matmul_batched.out"), tolerance: try tolerance("matmul_batched"))
        let x = try f("transpose_reshape.x")
        check("transposed_reshaped", x.transposed(0, 2, 1, 3).reshaped([2, 4, -1]), try f("transpose_reshape.out"),
              tolerance: 0)
        check("squeezed", try f("squeeze_T.x").squeezed(axis: 1), try f("squeeze_T.squeezed"), tolerance: 0)
        check("T", try f("swapaxes_expand.x").T, try f("squeeze_T.T"), tolerance: 0)
        let a = try f("swapaxes_expand.x")
        check("swappedAxes_expandedDimensions", swappedAxes(a, 0, 2).expandedDimensions(axis: 1),
              try f("swapaxes_expand.out"), tolerance: 0)
        let s = try f("softmax.x")
        check("softmax_last", softmax(s, axis: -1), try f("softmax.last"), tolerance: try tolerance("softmax"))
        check("softmax_axis1", softmax(s, axis: 1), try f("softmax.axis1"), tolerance: try tolerance("softmax"))
    }

    func testNorms() throws {
        let (x, w, b) = (try f("layer_norm.x"), try f("layer_norm.w"), try f("layer_norm.b"))
        let tol = try tolerance("layer_norm")
        check("layerNorm_affine", MLXFast.layerNorm(x, weight: w, bias: b, eps: 1e-6), try f("layer_norm.affine"),
              tolerance: tol)
        check("layerNorm_plain", MLXFast.layerNorm(x, weight: nil, bias: nil, eps: 1e-6), try f("layer_norm.plain"),
              tolerance: tol)
        check("rmsNorm", MLXFast.rmsNorm(x, weight: w, eps: 1e-6), try f("rms_norm.out"),
              tolerance: try tolerance("rms_norm"))
        let layer = LayerNorm(dimensions: 16, eps: 1e-6)
        try layer.update(parameters: ModuleParameters.unflattened(["weight": w, "bias": b]), verify: [.all])
        check("LayerNorm_module", layer(x), try f("layer_norm.affine"), tolerance: tol)
    }

    func testAttention() throws {
        let (q, k, v) = (try f("sdpa.q"), try f("sdpa.k"), try f("sdpa.v"))
        let tol = try tolerance("sdpa")
        check("sdpa_gqa_none",
              MLXFast.scaledDotProductAttention(queries: q, keys: k, values: v, scale: 0.35, mask: .none),
              try f("sdpa.none"), tolerance: tol)
        check("sdpa_additive_mask",
              MLXFast.scaledDotProductAttention(queries: q, keys: k, values: v, scale: 1.0,
                                                mask: .array(try f("sdpa.mask_add"))),
              try f("sdpa.add"), tolerance: tol)
        check("sdpa_boolean_mask",
              MLXFast.scaledDotProductAttention(queries: q, keys: k, values: v, scale: 0.35,
                                                mask: .array(try f("sdpa.mask_bool"))),
              try f("sdpa.bool"), tolerance: tol)
        check("sdpa_causal",
              MLXFast.scaledDotProductAttention(queries: try f("sdpa.qc"), keys: try f("sdpa.kc"),
                                                values: try f("sdpa.vc"), scale: 0.35, mask: .causal),
              try f("sdpa.causal"), tolerance: tol)
    }

    func testConv2dNHWC() throws {
        let (x, w) = (try f("conv2d.x"), try f("conv2d.w"))
        let tol = try tolerance("conv2d")
        check("conv2d_pad1", conv2d(x, w, padding: 1), try f("conv2d.pad1"), tolerance: tol)
        check("conv2d_stride2", conv2d(x, w, stride: 2), try f("conv2d.stride2"), tolerance: tol)
        check("conv2d_dilation2", conv2d(x, w, padding: 2, dilation: 2), try f("conv2d.dilation2"), tolerance: tol)
        check("conv2d_groups2", conv2d(x, try f("conv2d.wg"), padding: 1, groups: 2), try f("conv2d.groups2"),
              tolerance: tol)
        let layer = Conv2d(inputChannels: 4, outputChannels: 5, kernelSize: 3, padding: 1, bias: false)
        try layer.update(parameters: ModuleParameters.unflattened(["weight": w]), verify: [.all])
        check("Conv2d_module", layer(x), try f("conv2d.pad1"), tolerance: tol)
    }

    func testAffineQuantization() throws {
        for (bits, group) in [(4, 64), (8, 32), (2, 128)] {
            let name = "quantize_\(bits)_\(group)"
            let w = try f("\(name).w")
            let (wq, scales, biases) = quantized(w, groupSize: group, bits: bits)
            check("\(name)_words", wq, try f("\(name).wq"), tolerance: 0)
            check("\(name)_scales", scales, try f("\(name).scales"), tolerance: 0)
            check("\(name)_biases", try XCTUnwrap(biases), try f("\(name).biases"), tolerance: 0)
            check("\(name)_dequantized",
                  dequantized(try f("\(name).wq"), scales: try f("\(name).scales"), biases: try f("\(name).biases"),
                              groupSize: group, bits: bits),
                  try f("\(name).dequantized"), tolerance: 0)
            let tol = try f("\(name).tol_matmul").item(Float.self)
            check("\(name)_quantizedMM",
                  quantizedMM(try f("\(name).x"), try f("\(name).wq"), scales: try f("\(name).scales"),
                              biases: try f("\(name).biases"), transpose: true, groupSize: group, bits: bits),
                  try f("\(name).matmul"), tolerance: tol)
            // The layer path the export uses: quantize(model:) swaps Linear for QuantizedLinear, then load.
            let model = Holder(Linear(256, 6, bias: false))
            quantize(model: model) { _, _ in (group, bits, .affine) }
            try model.update(
                parameters: ModuleParameters.unflattened([
                    "layer.weight": try f("\(name).wq"), "layer.scales": try f("\(name).scales"),
                    "layer.biases": try f("\(name).biases"),
                ]), verify: [.all])
            XCTAssertTrue(model.layer is QuantizedLinear)
            check("\(name)_QuantizedLinear", model.layer(try f("\(name).x")), try f("\(name).matmul"), tolerance: tol)
        }
    }

    func testIndexing() throws {
        let t = try f("indexing.x")
        check("index_ellipsis_0", t[.ellipsis, 0], try f("indexing.ellipsis0"), tolerance: 0)
        check("index_range", t[0..., 1 ..< 3], try f("indexing.slice"), tolerance: 0)
        check("index_upto", t[0..., ..<2], try f("indexing.upto"), tolerance: 0)
        check("index_negative", t[0..., -1], try f("indexing.last"), tolerance: 0)
        check("index_newaxis", t[1, .newAxis], try f("indexing.newaxis"), tolerance: 0)
        check("index_from", t[0..., 2...], try f("indexing.from2"), tolerance: 0)
        check("index_stride", t[.ellipsis, .stride(by: 2)], try f("indexing.step2"), tolerance: 0)
        check("index_scalar", t[1, 2, 3], try f("indexing.scalar"), tolerance: 0)
    }

    func testConcatStackSplitTakePadWhere() throws {
        let (a, b) = (try f("concat_stack_split.a"), try f("concat_stack_split.b"))
        check("concatenated", concatenated([a, b], axis: 1), try f("concat_stack_split.concat"), tolerance: 0)
        check("stacked", stacked([a, b], axis: -1), try f("concat_stack_split.stack"), tolerance: 0)
        check("split", split(a, parts: 3, axis: 1)[1], try f("concat_stack_split.split1"), tolerance: 0)
        check("take", take(try f("take.table"), try f("take.idx"), axis: 0), try f("take.out"), tolerance: 0)
        let embedding = Embedding(embeddingCount: 10, dimensions: 3)
        try embedding.update(parameters: ModuleParameters.unflattened(["weight": try f("take.table")]), verify: [.all])
        check("Embedding_module", embedding(try f("take.idx")), try f("take.out"), tolerance: 0)
        check("padded", padded(try f("pad.x"), widths: [0, [1, 2], 0]), try f("pad.out"), tolerance: 0)
        check("where", MLX.where(try f("where.cond"), try f("where.a"), try f("where.b")), try f("where.out"),
              tolerance: 0)
        check("broadcast", broadcast(try f("broadcast_to.x"), to: [2, 3, 4]), try f("broadcast_to.out"), tolerance: 0)
        check("less", less(try f("less.a"), try f("less.b")).asType(.float32), try f("less.out"), tolerance: 0)
    }

    func testDTypes() throws {
        let x = try f("astype.x")
        let f16 = try f("astype.f16")
        XCTAssertEqual(f16.dtype, .float16)
        check("astype_float16", x.asType(.float16), f16, tolerance: 0)
        check("astype_bfloat16", x.asType(.bfloat16), try f("astype.bf16"), tolerance: 0)
        check("astype_int32", x.asType(.int32), try f("astype.i32"), tolerance: 0)
    }

    /// save(arrays:metadata:url:) then loadArraysAndMetadata(url:): every dtype back bit for bit.
    func testSafetensorsRoundTrip() throws {
        let x = try f("astype.x")
        let arrays: [String: MLXArray] = [
            "f32": x, "f16": x.asType(.float16), "bf16": x.asType(.bfloat16), "i32": x.asType(.int32),
            "u32": try f("quantize_4_64.wq"), "bool": try f("sdpa.mask_bool"),
        ]
        let url = FileManager.default.temporaryDirectory.appendingPathComponent("standin-\(getpid()).safetensors")
        defer { try? FileManager.default.removeItem(at: url) }
        try save(arrays: arrays, metadata: ["format": "mlx"], url: url)
        let (loaded, metadata) = try loadArraysAndMetadata(url: url)
        XCTAssertEqual(metadata, ["format": "mlx"])
        XCTAssertEqual(Set(loaded.keys), Set(arrays.keys))
        for (key, array) in arrays {
            XCTAssertEqual(loaded[key]?.dtype, array.dtype, key)
            check("safetensors_\(key)", try XCTUnwrap(loaded[key]), array, tolerance: 0)
        }
    }

    func testRandom() throws {
        let key = try f("random.key")
        check("random_key", MLXRandom.key(7), key, tolerance: 0)
        let words = MLXRandom.split(key: key, into: 3).flatMap { $0.asArray(UInt32.self) }
        check("random_split", MLXArray(words, [3, 2]), try f("random.split3"), tolerance: 0)
        let tol = try tolerance("random")
        check("random_uniform", MLXRandom.uniform(0 ..< 1, [5], key: key), try f("random.uniform5"), tolerance: tol)
        check("random_normal_even", MLXRandom.normal([2, 3], key: key), try f("random.normal6"), tolerance: tol)
        check("random_normal_odd", MLXRandom.normal([7], key: MLXRandom.split(key: key, into: 2)[1]),
              try f("random.normal7"), tolerance: tol)
    }
}

/// A module with one quantizable child, for the quantize(model:) path.
final class Holder: Module {
    @ModuleInfo(key: "layer") var layer: Linear

    init(_ layer: Linear) {
        self._layer.wrappedValue = layer
        super.init()
    }
}
