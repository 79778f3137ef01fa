// Stand-in for ml-explore/mlx-swift Source/MLXNN/Module.swift (test double, never shipped):
// `Module`, `ModuleInfo`, `ParameterInfo`, `UnaryLayer`, `ModuleParameters`/`ModuleChildren`
// (`NestedDictionary`, Source/MLX/Nested.swift), `parameters()`, `leafModules()`,
// `update(parameters:verify:)`, `update(modules:verify:)`, `VerifyUpdate`, `UpdateError`.
//
// Semantics kept from mlx-swift: parameters and children are found by reflection (`Mirror`) over stored
// properties, including superclasses; a property's key is its `@ModuleInfo(key:)` / `@ParameterInfo(key:)`
// key, else its name (a wrapper's `_` prefix dropped); names starting with `_` that are not wrappers are
// not parameters; array elements are `name.0`, `name.1`, ...; `nil` optionals are absent. Updating
// parameters replaces the arrays in place (they keep the loaded dtype; dtype is never verified).
// Only `@ModuleInfo` children can be replaced by `update(modules:)` (else `needModuleInfo`).

import Foundation
import MLX

/// Source/MLX/Nested.swift: `public struct NestedDictionary<Key: Hashable, Element>`. Stored flat here
/// (dotted keys); `unflattened` / `flattened` are the identity on that representation.
public struct NestedDictionary<Key: Hashable, Element> {
    var items: [(String, Element)]

    /// `public func flattened(prefix: String? = nil) -> [(Key, Element)]`.
    public func flattened() -> [(String, Element)] { items }

    /// `public static func unflattened(_ tree: [Key: Element]) -> NestedDictionary<Key, Element>`.
    public static func unflattened(_ tree: [String: Element]) -> NestedDictionary<Key, Element> {
        NestedDictionary(items: tree.sorted { $0.key < $1.key }.map { ($0.key, $0.value) })
    }

    /// `public static func unflattened(_ tree: [(Key, Element)]) -> NestedDictionary<Key, Element>`.
    public static func unflattened(_ tree: [(String, Element)]) -> NestedDictionary<Key, Element> {
        NestedDictionary(items: tree)
    }

    public subscript(key: String) -> Element? { items.first { $0.0 == key }?.1 }
}

/// `public typealias ModuleParameters = NestedDictionary<String, MLXArray>`.
public typealias ModuleParameters = NestedDictionary<String, MLXArray>
/// `public typealias ModuleChildren = NestedDictionary<String, Module>`.
public typealias ModuleChildren = NestedDictionary<String, Module>

/// Source/MLXNN/Module.swift: `public enum UpdateError: Error` (the cases the stand-in raises).
public enum UpdateError: Error, CustomStringConvertible {
    case mismatchedSize(path: [String], modules: [String], expectedShape: [Int], actualShape: [Int])
    case keyNotFound(path: [String], modules: [String])
    case needModuleInfo(String)
    case unableToSet(String)
    case unableToCast(String)
    case unhandledKeys(path: [String], modules: [String], keys: [String])

    public var description: String {
        switch self {
        case .mismatchedSize(let path, let modules, let expected, let actual):
            return "Mismatched parameter \(path.joined(separator: ".")) in \(modules.joined(separator: ".")): "
                + "expected shape \(expected), got \(actual)"
        case .keyNotFound(let path, let modules):
            return "Key \(path.joined(separator: ".")) not found in \(modules.joined(separator: "."))"
        case .needModuleInfo(let what):
            return what
        case .unableToSet(let what):
            return "Unable to set \(what)"
        case .unableToCast(let what):
            return "Unable to cast to \(what)"
        case .unhandledKeys(_, let modules, let keys):
            return "Unhandled keys \(keys) in \(modules.joined(separator: "."))"
        }
    }
}

extension UpdateError: LocalizedError {
    public var errorDescription: String? { description }
}

/// Type-erased access to the property wrappers.
protocol WrapperProtocol: AnyObject {
    var key: String? { get }
    var anyValue: Any? { get }
    func setAny(_ value: Any) throws
}

/// Storage shared by the two wrappers: the value (nil until set) and the key.
public class WrapperStorage<T>: WrapperProtocol {
    var value: T?
    public let key: String?

    init(value: T?, key: String?) {
        self.value = value
        self.key = key
    }

    var anyValue: Any? { value.map { $0 as Any } }

    var current: T {
        guard let value else { fatalError("\(type(of: self))(key: \(key ?? "nil")) read before it was set") }
        return value
    }

    func setAny(_ newValue: Any) throws {
        guard let cast = newValue as? T else { throw UpdateError.unableToCast(String(describing: T.self)) }
        value = cast
    }
}

/// Source/MLXNN/Module.swift: `@propertyWrapper public class ModuleInfo<T>`.
@propertyWrapper
public final class ModuleInfo<T>: WrapperStorage<T> {
    public var wrappedValue: T {
        get { current }
        set {
            if value != nil {
                fatalError("a @ModuleInfo value cannot be reassigned: use update(modules:)")
            }
            value = newValue
        }
    }

    public init(wrappedValue: T, key: String? = nil) {
        super.init(value: wrappedValue, key: key)
    }

    public init(key: String? = nil) {
        super.init(value: nil, key: key)
    }
}

/// Source/MLXNN/Module.swift: `@propertyWrapper public class ParameterInfo<T>`.
@propertyWrapper
public final class ParameterInfo<T>: WrapperStorage<T> {
    public var wrappedValue: T {
        get { current }
        set { value = newValue }
    }

    public init(wrappedValue: T, key: String? = nil) {
        super.init(value: wrappedValue, key: key)
    }

    public init(key: String? = nil) {
        super.init(value: nil, key: key)
    }
}

/// Source/MLXNN/Module.swift: `public protocol UnaryLayer: Module`.
public protocol UnaryLayer: Module {
    func callAsFunction(_ x: MLXArray) -> MLXArray
}

/// Unwrap `Optional` values hidden in an `Any` (nil: absent).
func unwrapOptional(_ value: Any) -> Any? {
    let mirror = Mirror(reflecting: value)
    guard mirror.displayStyle == .optional else { return value }
    guard let inner = mirror.children.first?.value else { return nil }
    return unwrapOptional(inner)
}

/// One stored property of a module as the reflection sees it.
struct ModuleProperty {
    let key: String
    let value: Any
    let wrapper: WrapperProtocol?
}

/// Source/MLXNN/Module.swift: `open class Module`.
open class Module {
    public init() {}

    /// The module's stored properties with their keys, superclasses first (nil optionals left out).
    func properties() -> [ModuleProperty] {
        var mirrors = [Mirror]()
        var mirror: Mirror? = Mirror(reflecting: self)
        while let m = mirror {
            mirrors.insert(m, at: 0)
            mirror = m.superclassMirror
        }
        var out = [ModuleProperty]()
        for m in mirrors {
            for child in m.children {
                guard let label = child.label else { continue }
                if let wrapper = child.value as? WrapperProtocol {
                    let key = wrapper.key ?? String(label.dropFirst())
                    if let value = wrapper.anyValue.flatMap(unwrapOptional) {
                        out.append(ModuleProperty(key: key, value: value, wrapper: wrapper))
                    }
                    continue
                }
                if label.hasPrefix("_") { continue }  // Module.parameterIsValid: not a parameter
                if let value = unwrapOptional(child.value) {
                    out.append(ModuleProperty(key: label, value: value, wrapper: nil))
                }
            }
        }
        return out
    }

    /// (path, array) for every parameter, in declaration order.
    func flatParameters(prefix: String = "") -> [(String, MLXArray)] {
        var out = [(String, MLXArray)]()
        func visit(_ value: Any, _ path: String) {
            if let array = value as? MLXArray {
                out.append((path, array))
            } else if let module = value as? Module {
                out += module.flatParameters(prefix: path + ".")
            } else if let list = value as? [Any] {
                for (i, element) in list.enumerated() {
                    if let element = unwrapOptional(element) { visit(element, "\(path).\(i)") }
                }
            }
        }
        for p in properties() {
            visit(p.value, prefix + p.key)
        }
        return out
    }

    /// `public func parameters() -> ModuleParameters`.
    public func parameters() -> ModuleParameters {
        ModuleParameters(items: flatParameters())
    }

    /// Direct child modules (path, module), arrays expanded.
    func childModules() -> [(String, Module)] {
        var out = [(String, Module)]()
        for p in properties() {
            if let module = p.value as? Module {
                out.append((p.key, module))
            } else if let list = p.value as? [Any] {
                for (i, element) in list.enumerated() {
                    if let module = unwrapOptional(element) as? Module { out.append(("\(p.key).\(i)", module)) }
                }
            }
        }
        return out
    }

    /// `public func children() -> ModuleChildren`.
    public func children() -> ModuleChildren {
        ModuleChildren(items: childModules())
    }

    /// `public func leafModules() -> ModuleChildren`: modules without child modules, by path.
    public func leafModules() -> ModuleChildren {
        var out = [(String, Module)]()
        func visit(_ module: Module, _ path: String) {
            let children = module.childModules()
            if children.isEmpty {
                out.append((path, module))
            }
            for (key, child) in children {
                visit(child, path.isEmpty ? key : "\(path).\(key)")
            }
        }
        for (key, child) in childModules() {
            visit(child, key)
        }
        return ModuleChildren(items: out)
    }

    /// Source/MLXNN/Module.swift: `public struct VerifyUpdate: OptionSet`.
    public struct VerifyUpdate: OptionSet, Sendable {
        public init(rawValue: Int) {
            self.rawValue = rawValue
        }

        public let rawValue: Int

        /// Every key in the update names a parameter of the model.
        static public let noUnusedKeys = VerifyUpdate(rawValue: 1 << 0)
        /// Every parameter of the model is in the update.
        static public let allModelKeysSet = VerifyUpdate(rawValue: 1 << 1)
        /// Every updated parameter keeps its shape.
        static public let shapeMismatch = VerifyUpdate(rawValue: 1 << 2)

        static public let all = VerifyUpdate(rawValue: -1)
        static public let none = VerifyUpdate([])
    }

    /// `open func update(parameters: ModuleParameters, verify: VerifyUpdate, path: [String] = [],
    /// modulePath: [String] = []) throws -> Self`. Checks everything before changing anything.
    @discardableResult
    open func update(parameters: ModuleParameters, verify: VerifyUpdate, path: [String] = [],
                     modulePath: [String] = []) throws -> Self {
        let modules = modulePath.isEmpty ? [String(describing: type(of: self))] : modulePath
        let own = flatParameters()
        let ownKeys = Set(own.map(\.0))
        let given = Dictionary(parameters.flattened(), uniquingKeysWith: { $1 })
        if verify.contains(.noUnusedKeys) {
            let unused = given.keys.filter { !ownKeys.contains($0) }.sorted()
            if !unused.isEmpty {
                throw UpdateError.unhandledKeys(path: path, modules: modules, keys: unused)
            }
        }
        for (key, array) in own {
            guard let new = given[key] else {
                if verify.contains(.allModelKeysSet) {
                    throw UpdateError.keyNotFound(path: path + key.split(separator: ".").map(String.init), modules: modules)
                }
                continue
            }
            if verify.contains(.shapeMismatch) && new.shape != array.shape {
                throw UpdateError.mismatchedSize(
                    path: path + key.split(separator: ".").map(String.init), modules: modules,
                    expectedShape: array.shape, actualShape: new.shape)
            }
        }
        for (key, array) in own {
            if let new = given[key] { array._updateInternal(new) }
        }
        return self
    }

    /// `public func update(parameters: ModuleParameters) -> Self` (non-throwing: `verify: .none`).
    @discardableResult
    public func update(parameters: ModuleParameters) -> Self {
        try! update(parameters: parameters, verify: .none)
    }

    /// `open func update(modules: ModuleChildren, verify: VerifyUpdate, path: [String] = [],
    /// modulePath: [String] = []) throws -> Self`: replace the child modules at the given paths.
    @discardableResult
    open func update(modules: ModuleChildren, verify: VerifyUpdate, path: [String] = [],
                     modulePath: [String] = []) throws -> Self {
        for (key, module) in modules.flattened() {
            try replaceModule(at: key.split(separator: ".").map(String.init), with: module)
        }
        return self
    }

    /// `public func update(modules: ModuleChildren) -> Self` (non-throwing: crashes on error, as `try!`).
    @discardableResult
    public func update(modules: ModuleChildren) -> Self {
        try! update(modules: modules, verify: .none)
    }

    private func replaceModule(at path: [String], with module: Module) throws {
        guard let first = path.first else { return }
        let rest = Array(path.dropFirst())
        guard let property = properties().first(where: { $0.key == first }) else {
            throw UpdateError.keyNotFound(path: path, modules: [String(describing: type(of: self))])
        }
        if rest.isEmpty {
            guard let wrapper = property.wrapper else {
                throw UpdateError.needModuleInfo(
                    "Unable to set \(first) on \(type(of: self)): it must be declared with @ModuleInfo")
            }
            try wrapper.setAny(module)
            return
        }
        if let child = property.value as? Module {
            try child.replaceModule(at: rest, with: module)
            return
        }
        guard var list = property.value as? [Any], let index = Int(rest[0]), index < list.count else {
            throw UpdateError.keyNotFound(path: path, modules: [String(describing: type(of: self))])
        }
        if rest.count > 1 {
            guard let element = list[index] as? Module else {
                throw UpdateError.keyNotFound(path: path, modules: [String(describing: type(of: self))])
            }
            try element.replaceModule(at: Array(rest.dropFirst()), with: module)
            return
        }
        guard let wrapper = property.wrapper else {
            throw UpdateError.needModuleInfo(
                "Unable to set \(first).\(index) on \(type(of: self)): it must be declared with @ModuleInfo")
        }
        list[index] = module
        try wrapper.setAny(list)
    }
}
