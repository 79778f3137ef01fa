// Module reflection and `update(parameters:verify:)` semantics of the stand-in (mlx-swift
// Source/MLXNN/Module.swift): keys from @ModuleInfo/@ParameterInfo, `_` names skipped, arrays as
// `name.N`, and each verification option raising the mlx-swift error case.

import Foundation
import MLX
import MLXNN
import XCTest

final class Inner: Module {
    @ParameterInfo(key: "scale_factor") var scaleFactor: MLXArray
    let plain: MLXArray
    let _hidden: MLXArray
    let eps: Float = 1e-6

    override init() {
        self._scaleFactor.wrappedValue = MLXArray.ones([3])
        self.plain = MLXArray.zeros([2])
        self._hidden = MLXArray.zeros([4])
        super.init()
    }
}

final class Outer: Module {
    @ModuleInfo(key: "proj_in") var projIn: Linear
    @ModuleInfo(key: "blocks") var blocks: [Inner]
    @ModuleInfo(key: "maybe") var maybe: Linear?
    let fixed: Linear

    override init() {
        self._projIn.wrappedValue = Linear(4, 3)
        self._blocks.wrappedValue = [Inner(), Inner()]
        self.fixed = Linear(2, 2, bias: false)
        super.init()
    }
}

final class ModuleSemantics: XCTestCase {
    func keys(_ m: Module) -> [String] { m.parameters().flattened().map(\.0).sorted() }

    func testKeysFollowWrappersAndSkipUnderscoredNames() {
        XCTAssertEqual(keys(Outer()), [
            "blocks.0.plain", "blocks.0.scale_factor", "blocks.1.plain", "blocks.1.scale_factor", "fixed.weight",
            "proj_in.bias", "proj_in.weight",
        ])
        XCTAssertEqual(Outer().leafModules().flattened().map(\.0).sorted(), ["blocks.0", "blocks.1", "fixed", "proj_in"])
    }

    func full(_ m: Module) -> [String: MLXArray] {
        Dictionary(uniqueKeysWithValues: m.parameters().flattened().map { ($0.0, MLXArray.ones($0.1.shape) * 2) })
    }

    func testUpdateReplacesArraysInPlaceKeepingTheirDType() throws {
        let m = Outer()
        var weights = full(m)
        weights["proj_in.weight"] = MLXArray.ones([3, 4], dtype: .float16)
        try m.update(parameters: ModuleParameters.unflattened(weights), verify: [.all])
        XCTAssertEqual(m.projIn.weight.dtype, .float16)
        XCTAssertEqual(m.blocks[1].scaleFactor.asArray(Float.self), [2, 2, 2])
        XCTAssertEqual(m.fixed.weight.asArray(Float.self), [2, 2, 2, 2])
    }

    func testVerifyOptions() throws {
        var extra = full(Outer())
        extra["proj_out.weight"] = MLXArray.zeros([1])
        XCTAssertThrowsError(try Outer().update(parameters: ModuleParameters.unflattened(extra), verify: [.noUnusedKeys])) {
            guard case UpdateError.unhandledKeys(_, _, let keys) = $0 else { return XCTFail("\($0)") }
            XCTAssertEqual(keys, ["proj_out.weight"])
        }
        try Outer().update(parameters: ModuleParameters.unflattened(extra), verify: [.allModelKeysSet, .shapeMismatch])

        var missing = full(Outer())
        missing["blocks.1.plain"] = nil
        XCTAssertThrowsError(try Outer().update(parameters: ModuleParameters.unflattened(missing), verify: [.allModelKeysSet])) {
            guard case UpdateError.keyNotFound(let path, _) = $0 else { return XCTFail("\($0)") }
            XCTAssertEqual(path, ["blocks", "1", "plain"])
        }
        try Outer().update(parameters: ModuleParameters.unflattened(missing), verify: [.noUnusedKeys, .shapeMismatch])

        var wrong = full(Outer())
        wrong["proj_in.weight"] = MLXArray.zeros([4, 3])
        XCTAssertThrowsError(try Outer().update(parameters: ModuleParameters.unflattened(wrong), verify: [.shapeMismatch])) {
            guard case UpdateError.mismatchedSize(_, _, let expected, let actual) = $0 else { return XCTFail("\($0)") }
            XCTAssertEqual(expected, [3, 4])
            XCTAssertEqual(actual, [4, 3])
        }
        let unchecked = Outer()
        try unchecked.update(parameters: ModuleParameters.unflattened(wrong), verify: .none)
        XCTAssertEqual(unchecked.projIn.weight.shape, [4, 3])  // mlx-swift does not check without the option
    }

    func testReplacingAPlainLetChildNeedsModuleInfo() {
        let m = Outer()
        XCTAssertThrowsError(try m.update(modules: ModuleChildren.unflattened(["fixed": Linear(2, 2)]), verify: .none)) {
            guard case UpdateError.needModuleInfo = $0 else { return XCTFail("\($0)") }
        }
        XCTAssertNoThrow(try m.update(modules: ModuleChildren.unflattened(["proj_in": Linear(4, 3, bias: false)]),
                                      verify: .none))
        XCTAssertNil(m.projIn.bias)
    }
}
