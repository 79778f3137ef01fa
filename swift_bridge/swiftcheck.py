"""Checks of generated Swift that run without a Swift toolchain (Linux): tree-sitter-swift parsing.

Two checks (``shared/reference/swift.md`` §8.2):

- **Syntax**: every file parses with zero ``ERROR``/``MISSING`` nodes. The generator avoids the
  constructs tree-sitter-swift 0.7 rejects although Swift accepts them (lines *starting* with a binary
  operator, ``#if`` inside ``switch``, typed ``throws(E)``, ``sending``), so a problem here is a real one.
- **Parameter tree**: the key paths that mlx-swift's ``Module`` reflection will look for, read from the
  parse tree (``@ModuleInfo(key:)`` / ``@ParameterInfo(key:)`` properties, their types, and the
  ``self._x.wrappedValue = ...`` assignments in each ``init``), each with its rank. Compared with the
  keys of an exported safetensors file, this is what ``update(parameters:verify: [.all])`` will check on
  the device, minus exact shapes (those need the arithmetic in the Swift initialisers; the exporter checks
  them against the Python model instead).

What the key walk understands (and the templates therefore use): each Module class's single ``init`` is
interpreted structurally: ``self._p.wrappedValue = <call | array literal | local array | nil>``, local
``var xs: [Module] = [...]`` grown with ``+=`` / ``append``, ``(a ..< b).map { T(...) }``, ``for _ in
a ..< b``, and ``if``/ternaries on boolean config fields. Counts are integer literals, ``config.field`` or
``config.field.count``, resolved through the configuration struct's ``CodingKeys`` against the
``config.json`` section. Leaf layers are the MLXNN ones in :data:`LIBRARY_LAYERS` (``bias: false`` and
``affine: false`` are read from the call). Anything else is reported as unsupported, never guessed.

Command line: ``python -m swift_bridge.swiftcheck FILE.swift ...`` prints problems and exits 1 on any.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable

__all__ = ["SwiftParseError", "syntax_problems", "SwiftSources", "compare_parameters", "LIBRARY_LAYERS"]


class SwiftParseError(Exception):
    """Generated Swift does not parse, or declares a parameter tree this checker cannot read."""


@lru_cache(maxsize=1)
def _parser():
    try:
        import tree_sitter_swift
        from tree_sitter import Language, Parser
    except ImportError as exc:  # a test/dev dependency only
        raise SwiftParseError("checking Swift needs tree-sitter and tree-sitter-swift: "
                              "pip install 'mlx-video[dev]'") from exc
    return Parser(Language(tree_sitter_swift.language()))


def parse(source: bytes | str):
    return _parser().parse(source.encode() if isinstance(source, str) else source)


def syntax_problems(source: bytes | str, name: str = "<swift>", limit: int = 10) -> list[str]:
    """``name:line:col: ERROR|MISSING <node type> <snippet>`` for the first ``limit`` problem nodes."""
    tree = parse(source)
    out: list[str] = []
    stack = [tree.root_node]
    while stack:
        node = stack.pop()
        if node.is_error or node.is_missing:
            kind = "MISSING" if node.is_missing else "ERROR"
            snippet = node.text.decode(errors="replace").splitlines()[0][:60] if node.text else ""
            line, col = node.start_point
            out.append(f"{name}:{line + 1}:{col + 1}: {kind} {node.type} {snippet!r}")
            continue
        stack.extend(reversed(node.children))
    out.sort(key=lambda s: [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", s)])
    return out[:limit] if limit else out


# --------------------------------------------------------------------------------------------------
# mlx-swift facts: parameters of the MLXNN layers the generated code uses (swift.md §2.2, §5)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LibraryLayer:
    params: dict[str, int]  # key -> rank
    optional: dict[str, tuple[str, str]] = field(default_factory=dict)  # key -> (init label, value that drops it)
    quantizable: bool = False


_CONV_BIAS = {"bias": ("bias", "false")}
LIBRARY_LAYERS: dict[str, LibraryLayer] = {
    "Linear": LibraryLayer({"weight": 2, "bias": 1}, _CONV_BIAS, quantizable=True),
    "Embedding": LibraryLayer({"weight": 2}, quantizable=True),
    "RMSNorm": LibraryLayer({"weight": 1}),
    "LayerNorm": LibraryLayer({"weight": 1, "bias": 1}, {"weight": ("affine", "false"), "bias": ("bias", "false")}),
    "GroupNorm": LibraryLayer({"weight": 1, "bias": 1}, {"weight": ("affine", "false"), "bias": ("affine", "false")}),
    "Conv1d": LibraryLayer({"weight": 3, "bias": 1}, _CONV_BIAS),
    "Conv2d": LibraryLayer({"weight": 4, "bias": 1}, _CONV_BIAS),
    "Conv3d": LibraryLayer({"weight": 5, "bias": 1}, _CONV_BIAS),
    **{name: LibraryLayer({}) for name in ("ReLU", "GELU", "SiLU", "Tanh", "Sigmoid", "Identity", "Upsample",
                                          "Dropout")},
}
# A quantized Linear/Embedding (affine): packed uint32 weight plus per-group scales and biases (swift.md §5).
QUANTIZED_EXTRA = {"scales": 2, "biases": 2}


# --------------------------------------------------------------------------------------------------
# Reading declarations from the parse tree
# --------------------------------------------------------------------------------------------------


@dataclass
class SwiftProperty:
    name: str
    key: str | None  # parameter-tree key; None for properties reflection ignores
    wrapper: str  # "ModuleInfo", "ParameterInfo" or ""
    type: str  # element type name
    array: bool
    optional: bool
    line: int


@dataclass
class SwiftType:
    name: str
    kind: str  # class / struct / enum / protocol
    file: str
    line: int
    inherits: list[str]
    properties: list[SwiftProperty] = field(default_factory=list)
    init_body: object = None  # tree-sitter node of the init's body
    init_count: int = 0
    init_params: list[str] = field(default_factory=list)
    coding_keys: dict[str, str] = field(default_factory=dict)  # structs: property -> JSON key


def _text(node) -> str:
    return node.text.decode() if node is not None and node.text is not None else ""


def _children(node, type_: str):
    return [c for c in node.children if c.type == type_]


def _type_info(node) -> tuple[str, bool, bool]:
    """(element type, is array, is optional) of a type node."""
    optional = array = False
    while True:
        if node.type == "optional_type":
            optional = True
            node = node.child_by_field_name("wrapped")
        elif node.type == "array_type":
            if array:
                raise SwiftParseError(f"nested arrays are not supported ({_text(node)})")
            array = True
            node = node.child_by_field_name("name")
        elif node.type == "type_annotation":
            node = node.child_by_field_name("name")
        else:
            break
    if node.type != "user_type":
        raise SwiftParseError(f"unsupported property type {_text(node)!r} (line {node.start_point[0] + 1})")
    return _text(node), array, optional


class SwiftSources:
    """Declarations of a set of Swift files (the generated package's sources)."""

    def __init__(self, files: dict[str, bytes | str]):
        self.files = {k: (v.encode() if isinstance(v, str) else v) for k, v in files.items()}
        self.types: dict[str, SwiftType] = {}
        problems = []
        for name, source in sorted(self.files.items()):
            problems += syntax_problems(source, name, limit=0)
            self._collect(parse(source).root_node, name)
        if problems:
            raise SwiftParseError("Swift does not parse:\n  " + "\n  ".join(problems[:20]))

    @classmethod
    def from_paths(cls, paths: Iterable[Path]) -> "SwiftSources":
        return cls({str(p): Path(p).read_bytes() for p in paths})

    # -- collection ---------------------------------------------------------------------------------
    def _collect(self, node, file: str) -> None:
        for child in node.children:
            if child.type in ("class_declaration", "protocol_declaration"):
                self._collect_type(child, file)

    def _collect_type(self, node, file: str) -> None:
        kind = _text(node.child_by_field_name("declaration_kind")) or "protocol"
        if kind == "extension":
            return  # extensions add methods; stored properties and inits of Modules live in the class body
        name = _text(node.child_by_field_name("name"))
        inherits = [_text(s.child_by_field_name("inherits_from")) for s in _children(node, "inheritance_specifier")]
        decl = SwiftType(name, kind, file, node.start_point[0] + 1, inherits)
        if name in self.types:
            other = self.types[name]
            raise SwiftParseError(f"{name} is declared twice ({other.file}:{other.line}, {file}:{decl.line})")
        self.types[name] = decl
        body = node.child_by_field_name("body")
        if body is None:
            return
        for member in body.children:
            if member.type == "property_declaration":
                prop = self._property(member)
                if prop is not None:
                    decl.properties.append(prop)
            elif member.type == "init_declaration":
                self._collect_init(member, decl)
            elif member.type == "class_declaration":
                if _text(member.child_by_field_name("name")) == "CodingKeys":
                    decl.coding_keys = self._coding_keys(member)
                else:
                    self._collect_type(member, file)

    @staticmethod
    def _property(node) -> SwiftProperty | None:
        if node.child_by_field_name("computed_value") is not None:
            return None
        modifiers = _children(node, "modifiers")
        mods = _text(modifiers[0]) if modifiers else ""
        if re.search(r"\b(static|class)\b", mods):
            return None
        name = _text(node.child_by_field_name("name"))
        annotation = _children(node, "type_annotation")
        wrapper, key = "", None
        for attr in (_children(modifiers[0], "attribute") if modifiers else []):
            attr_type = _text(_children(attr, "user_type")[0]) if _children(attr, "user_type") else ""
            if attr_type in ("ModuleInfo", "ParameterInfo"):
                wrapper = attr_type
                labels = [_text(c) for c in attr.children if c.type == "simple_identifier"]
                strings = [c for c in attr.children if c.type == "line_string_literal"]
                if "key" in labels and strings:
                    key = _text(strings[0])[1:-1]
        if not annotation:
            if wrapper:
                raise SwiftParseError(f"@{wrapper} property {name} needs an explicit type "
                                      f"(line {node.start_point[0] + 1})")
            return None
        try:
            type_name, array, optional = _type_info(annotation[0])
        except SwiftParseError:
            if wrapper:
                raise
            return None  # tuples, closures, dictionaries: "other" values for Module reflection
        if name.startswith("_"):
            return None  # Module.parameterIsValid: not part of the parameter tree
        return SwiftProperty(name, key or name, wrapper, type_name, array, optional, node.start_point[0] + 1)

    @staticmethod
    def _collect_init(node, decl: SwiftType) -> None:
        decl.init_count += 1
        decl.init_params += [_text(p.child_by_field_name("name")) for p in _children(node, "parameter")]
        decl.init_body = node.child_by_field_name("body")

    @staticmethod
    def _coding_keys(node) -> dict[str, str]:
        out = {}
        body = node.child_by_field_name("body")
        for entry in _children(body, "enum_entry") if body is not None else []:
            names = [_text(c) for c in entry.children if c.type == "simple_identifier"]
            raw = entry.child_by_field_name("raw_value")
            if raw is not None:
                out[names[0]] = _text(raw)[1:-1]
            else:
                out.update({n: n for n in names})
        return out

    # -- queries ------------------------------------------------------------------------------------
    def module_classes(self) -> dict[str, SwiftType]:
        """Classes that are mlx-swift Modules (directly or through another generated Module class)."""
        out = {}

        def is_module(name: str, seen=()) -> bool:
            t = self.types.get(name)
            if t is None or name in seen:
                return False
            return any(b in ("Module", "UnaryLayer") or is_module(b, seen + (name,)) for b in t.inherits)

        for name, t in self.types.items():
            if t.kind == "class" and is_module(name):
                out[name] = t
        return out

    def declared_parameters(self, root: str, config: dict, config_type: str,
                            quantized: Callable[[str], bool] = lambda path: False) -> dict[str, int]:
        """``{key path: rank}`` that ``root`` (a Module class) declares, for the ``config.json`` section
        ``config`` decoded by ``config_type``. ``quantized(path)`` says whether the Linear/Embedding at
        ``path`` is replaced by its quantized form at load (the generated loader does that where the file
        holds ``path.scales``)."""
        if root not in self.types:
            raise SwiftParseError(f"no class {root} in the generated Swift")
        if config_type not in self.types or not self.types[config_type].coding_keys:
            raise SwiftParseError(f"no configuration struct {config_type} with CodingKeys in the generated Swift")
        env = _Env(self.types[config_type], config)
        out: dict[str, int] = {}
        self._walk_class(root, "", env, quantized, out, trail=())
        return out

    def _walk_class(self, name: str, prefix: str, env: "_Env", quantized, out: dict, trail: tuple) -> None:
        if name in trail:
            raise SwiftParseError(f"recursive module structure through {name}")
        cls = self.module_classes().get(name)
        if cls is None:
            raise SwiftParseError(f"{name} is neither a generated Module class nor a known MLXNN layer")
        if cls.init_count > 1:
            raise SwiftParseError(f"{cls.file}:{cls.line}: {name} has several initialisers; the parameter-tree "
                                  f"check reads exactly one (make the others convenience wrappers in an extension)")
        assigned = _InitInterpreter(cls, env).run()
        for prop in cls.properties:
            if prop.wrapper == "" and prop.type != "MLXArray" and prop.type not in LIBRARY_LAYERS \
                    and prop.type not in self.module_classes():
                continue  # "other" values (Int, Float, structs): not in the parameter tree
            path = prefix + prop.key
            where = f"{cls.file}:{prop.line} ({name}.{prop.name})"
            if prop.name not in assigned:
                raise SwiftParseError(f"{where}: never assigned in init")
            value = assigned[prop.name]
            if value is None:
                if not prop.optional:
                    raise SwiftParseError(f"{where}: assigned nil but not optional")
                continue
            if prop.type == "MLXArray":
                if prop.array or prop.optional or isinstance(value, list):
                    raise SwiftParseError(f"{where}: optional or array parameters are not supported")
                out[path] = _array_rank(value, where)
                continue
            if prop.array != isinstance(value, list):
                what = "an array" if isinstance(value, list) else _text(value)
                raise SwiftParseError(f"{where}: cannot read what init assigns ({what})")
            if prop.array:
                for i, call in enumerate(value):
                    self._walk_module(call, prop.type, f"{path}.{i}.", env, quantized, out, trail + (name,), where)
                continue
            self._walk_module(value, prop.type, path + ".", env, quantized, out, trail + (name,), where)

    def _walk_module(self, call, declared: str, prefix: str, env, quantized, out: dict, trail, where) -> None:
        callee = _callee(call)
        type_name = callee if callee in LIBRARY_LAYERS or callee in self.module_classes() else declared
        if type_name in LIBRARY_LAYERS:
            layer = LIBRARY_LAYERS[type_name]
            args = _call_labels(call)
            params = {k: r for k, r in layer.params.items()
                      if not (k in layer.optional and args.get(layer.optional[k][0]) == layer.optional[k][1])}
            if layer.quantizable and quantized(prefix[:-1]):
                params.update(QUANTIZED_EXTRA)
            for k, r in params.items():
                out[prefix + k] = r
            return
        if type_name not in self.module_classes():
            raise SwiftParseError(f"{where}: {type_name} is neither a generated Module class nor a known MLXNN layer")
        self._walk_class(type_name, prefix, env, quantized, out, trail)


class _Env:
    """Resolves ``config.field`` (ints, bools, ``.count``) against the config.json section."""

    def __init__(self, struct: SwiftType, section: dict):
        self.struct, self.section = struct, section

    def _field(self, prop: str, where: str):
        if prop not in self.struct.coding_keys:
            raise SwiftParseError(f"{where}: {self.struct.name} has no CodingKeys entry for {prop}")
        key = self.struct.coding_keys[prop]
        if key not in self.section:
            raise SwiftParseError(f"{where}: config.json section has no {key!r} (read by {self.struct.name}.{prop})")
        return self.section[key]

    def integer(self, expr: str, where: str) -> int:
        m = re.fullmatch(r"(\d+)|config\.(\w+)(\.count)?", expr.replace(" ", ""))
        if not m:
            raise SwiftParseError(f"{where}: cannot evaluate count {expr!r} (use a literal, config.x or "
                                  f"config.x.count)")
        if m.group(1):
            return int(m.group(1))
        v = self._field(m.group(2), where)
        return len(v) if m.group(3) else int(v)

    def boolean(self, expr: str, where: str) -> bool | None:
        """``config.flag``, ``!config.flag``, ``true``/``false``; None when not of that form."""
        e = expr.replace(" ", "")
        if e in ("true", "false"):
            return e == "true"
        m = re.fullmatch(r"(!?)config\.(\w+)", e)
        if not m:
            return None
        v = self._field(m.group(2), where)
        if not isinstance(v, bool):
            return None
        return (not v) if m.group(1) else v


class _InitInterpreter:
    """Runs the structural statements of an ``init`` to find what each property is assigned.

    Understood: local ``var xs: [Module] = [...]``, ``xs += [...]`` / ``(a ..< b).map { T(...) }``,
    ``xs.append(T(...))``, ``for _ in a ..< b``, ``if config.flag { } else { }``, ternaries on such flags,
    and ``self._p.wrappedValue = <call | array | xs | nil>``. Values are the initialiser call nodes.
    """

    def __init__(self, cls: SwiftType, env: _Env):
        self.cls, self.env = cls, env
        self.locals: dict[str, list] = {}
        self.assigned: dict[str, object] = {}

    def run(self) -> dict[str, object]:
        if self.cls.init_body is not None:
            for stmts in _children(self.cls.init_body, "statements"):
                self._block(stmts)
        return self.assigned

    def _where(self, node) -> str:
        return f"{self.cls.file}:{node.start_point[0] + 1} ({self.cls.name}.init)"

    def _block(self, stmts) -> None:
        for node in stmts.children:
            self._statement(node)

    def _statement(self, node) -> None:
        t = node.type
        if t == "property_declaration":
            value = node.child_by_field_name("value")
            name = _text(node.child_by_field_name("name"))
            if value is not None and (value.type == "array_literal" or _is_map(value)):
                self.locals[name] = self._value(value)
        elif t == "assignment":
            target = _text(node.child_by_field_name("target")).replace(" ", "")
            op = _text(node.child_by_field_name("operator"))
            result = node.child_by_field_name("result")
            m = re.fullmatch(r"self\._(\w+)\.wrappedValue|self\.(\w+)", target)
            if m and op == "=":
                self.assigned[m.group(1) or m.group(2)] = self._value(result)
            elif target in self.locals:
                value = self._value(result)
                if not isinstance(value, list):
                    raise SwiftParseError(f"{self._where(node)}: cannot read {_text(node)!r}")
                self.locals[target] = value if op == "=" else self.locals[target] + value
        elif t == "call_expression":
            head = node.children[0]
            if head.type == "navigation_expression":
                target = _text(head.child_by_field_name("target"))
                method = _text(head.child_by_field_name("suffix")).lstrip(".")
                if target in self.locals and method == "append":
                    args = [a.child_by_field_name("value") for s in _children(node, "call_suffix")
                            for v in _children(s, "value_arguments") for a in _children(v, "value_argument")]
                    self.locals[target] = self.locals[target] + [self._value(a) for a in args]
        elif t == "for_statement":
            collection = node.child_by_field_name("collection")
            count = self._range_count(collection, node)
            body = _children(node, "statements")
            for _ in range(count):
                for stmts in body:
                    self._block(stmts)
        elif t == "if_statement":
            cond = node.child_by_field_name("condition")
            branches = _children(node, "statements")
            value = self.env.boolean(_text(cond), self._where(node))
            if value is None:
                touched = any("wrappedValue" in _text(b) or any(re.search(rf"\b{re.escape(n)}\b", _text(b))
                                                               for n in self.locals) for b in branches)
                if touched:
                    raise SwiftParseError(f"{self._where(node)}: cannot evaluate condition {_text(cond)!r} that "
                                          f"shapes the module tree (use config flags)")
                return
            chosen = branches[0] if value else (branches[1] if len(branches) > 1 else None)
            if chosen is not None:
                self._block(chosen)

    def _range_count(self, node, where_node) -> int:
        if node is None or node.type != "range_expression":
            raise SwiftParseError(f"{self._where(where_node)}: loops that build modules must run over a range a ..< b")
        start = self.env.integer(_text(node.child_by_field_name("start")), self._where(where_node))
        end = self.env.integer(_text(node.child_by_field_name("end")), self._where(where_node))
        return max(0, end - start + (1 if _text(node.child_by_field_name("op")) == "..." else 0))

    def _value(self, node):
        if node is None:
            return None
        t = node.type
        if t in ("nil_literal",) or _text(node) == "nil":
            return None
        if t == "array_literal":
            return [self._value(c) for c in node.children if c.is_named and c.type != "comment"]
        if t == "simple_identifier" and _text(node) in self.locals:
            return list(self.locals[_text(node)])
        if t == "ternary_expression":
            cond = node.child_by_field_name("condition")
            value = self.env.boolean(_text(cond), self._where(node))
            if value is None:
                return node  # e.g. a stride chosen by a flag: not structural, the call is read as a whole
            return self._value(node.child_by_field_name("if_true" if value else "if_false"))
        if t == "tuple_expression" and len([c for c in node.children if c.is_named]) == 1:
            return self._value([c for c in node.children if c.is_named][0])
        if _is_map(node):
            nav = node.children[0]
            target = nav.child_by_field_name("target")
            rng = target if target.type == "range_expression" else \
                next((c for c in target.children if c.type == "range_expression"), None)
            count = self._range_count(rng, node)
            calls = []
            stack = list(_children(node, "call_suffix"))
            while stack and not calls:
                n = stack.pop(0)
                if n.type == "call_expression":
                    calls.append(n)
                    break
                stack.extend(n.children)
            if not calls:
                raise SwiftParseError(f"{self._where(node)}: .map closure builds no module")
            return [calls[0]] * count
        return node


def _is_map(node) -> bool:
    if node.type != "call_expression" or not node.children:
        return False
    nav = node.children[0]
    return nav.type == "navigation_expression" and _text(nav.child_by_field_name("suffix")).lstrip(".") == "map"


def _callee(call) -> str:
    if call is None or call.type != "call_expression":
        return ""
    head = call.children[0]
    if head.type == "simple_identifier":
        return _text(head)
    return ""


def _call_labels(call) -> dict[str, str]:
    out = {}
    if call is None or call.type != "call_expression":
        return out
    for suffix in _children(call, "call_suffix"):
        for args in _children(suffix, "value_arguments"):
            for arg in _children(args, "value_argument"):
                label = arg.child_by_field_name("name")
                value = arg.child_by_field_name("value")
                if label is not None and value is not None:
                    out[_text(label)] = _text(value)
    return out


def _array_rank(value, where: str) -> int:
    """Rank of an MLXArray parameter from the shape literal of its initialiser (``MLXArray.zeros([1, 6, dim])``)."""
    stack = [value]
    while stack:
        n = stack.pop(0)
        if n.type == "array_literal":
            return len([c for c in n.children if c.is_named and c.type != "comment"])
        stack.extend(n.children)
    raise SwiftParseError(f"{where}: cannot read the rank of this parameter (initialise it with a shape literal, "
                          f"e.g. MLXArray.zeros([1, 6, dim]))")


# --------------------------------------------------------------------------------------------------
# Comparing with an exported weight file
# --------------------------------------------------------------------------------------------------


def compare_parameters(declared: dict[str, int], exported: dict[str, tuple], what: str) -> list[str]:
    """Differences between the Swift declaration (key -> rank) and a safetensors header (key -> shape)."""
    missing = sorted(set(declared) - set(exported))
    unexpected = sorted(set(exported) - set(declared))
    ranks = sorted(f"{k}: Swift rank {declared[k]}, file shape {list(exported[k])}"
                   for k in set(declared) & set(exported) if declared[k] != len(exported[k]))
    out = []
    for title, items in (("declared in Swift but not in the file", missing),
                         ("in the file but not declared in Swift", unexpected), ("rank mismatch", ranks)):
        if items:
            shown = ", ".join(items[:12]) + (f", ... ({len(items)} in all)" if len(items) > 12 else "")
            out.append(f"{what}: {title}: {shown}")
    return out


def main(argv: list[str] | None = None) -> int:
    paths = [Path(p) for p in (sys.argv[1:] if argv is None else argv)]
    if not paths:
        print("usage: python -m swift_bridge.swiftcheck FILE.swift ...", file=sys.stderr)
        return 2
    bad = 0
    for path in paths:
        problems = syntax_problems(path.read_bytes(), str(path))
        for p in problems:
            print(p)
        print(f"{path}: OK" if not problems else f"{path}: {len(problems)} problem node(s)")
        bad += bool(problems)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
