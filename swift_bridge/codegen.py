"""Swift source generation: configuration structs from config dataclasses, parameter declarations from
the Python module tree, and template expansion.

Nothing here knows a layer size or a parameter name. The Swift code of a component is a template
(``templates/*.swift``: the forward math, written once, by hand) with three kinds of marker lines:

- ``// {{header}}``: the generated-file banner (generator version, template and config hashes);
- ``// {{configuration}}``: a ``Codable`` struct generated from the Python config dataclass (every field,
  ``snake_case`` JSON keys through ``CodingKeys``, the dataclass's own field comments);
- ``    // {{properties}}`` inside ``final class X``: the ``@ModuleInfo(key:)`` / ``@ParameterInfo(key:)``
  declarations of ``X``, generated from the Python module that ``X`` mirrors (its keys, in the Python
  attribute order; its children's Swift types). Property names are the camelCase keys.
- ``{{constant:NAME}}`` anywhere: the integer :func:`template_constants` gives ``NAME`` (figures the
  Swift must share with Python are written once, here or in the runtime, and the golden fixtures carry
  the same values for the XCTests to compare).

So a renamed or added Python parameter changes the generated declarations, and the template's
initialiser then no longer assigns them: :func:`expand_template` fails with the list of what to fix.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import re
from dataclasses import dataclass
from pathlib import Path

import mlx_video  # noqa: F401  (fast BLAS before MLX)
import mlx.core as mx
import mlx.nn as nn

GENERATOR_VERSION = 1
TEMPLATES = Path(__file__).parent / "templates"

# The exported pipeline's defaults for an 8 GB iPhone (Pipeline.swift; the generated README states them):
# MLX's memory limit, what stays free when the OS reports the memory available, the lowest limit derived
# from that report, and MLX's buffer cache.
PHONE_MEMORY = {"phone_memory_limit": 4608 << 20, "phone_memory_headroom": 512 << 20,
                "phone_minimum_memory_limit": 1 << 30, "phone_cache_limit": 20 << 20}
_CONSTANT = re.compile(r"\{\{constant:(\w+)\}\}")


def template_constants() -> dict[str, int]:
    """``{{constant:NAME}}`` values: the phone memory settings and the Python runtime's figures that the
    Swift port repeats (the DiT's FFN activation budget, ``mlx_video.ops``)."""
    from mlx_video import ops

    return {**PHONE_MEMORY, "ffn_activation_budget": ops.DEFAULT_ATTENTION_BUDGET}

SWIFT_KEYWORDS = {"as", "break", "case", "catch", "class", "continue", "default", "defer", "do", "else", "enum",
                  "extension", "fallthrough", "false", "for", "func", "guard", "if", "import", "in", "init",
                  "inout", "internal", "is", "let", "nil", "operator", "private", "protocol", "public", "repeat",
                  "return", "self", "static", "struct", "subscript", "super", "switch", "throw", "throws", "true",
                  "try", "var", "where", "while"}


class GenerationError(Exception):
    """The templates and the Python models disagree, or a config cannot be expressed in Swift."""


def camel_case(name: str) -> str:
    """``self_attn`` -> ``selfAttn``, ``linear_1`` -> ``linear1``, ``norm_q`` -> ``normQ``."""
    parts = [p for p in name.split("_") if p]
    if not parts:
        raise GenerationError(f"cannot make a Swift name from {name!r}")
    out = parts[0] + "".join(p[:1].upper() + p[1:] for p in parts[1:])
    if not re.fullmatch(r"[A-Za-z]\w*", out):
        raise GenerationError(f"{name!r} is not a valid Swift identifier once camel-cased ({out!r})")
    return f"`{out}`" if out in SWIFT_KEYWORDS else out


def sha256(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def template_text(name: str) -> str:
    path = TEMPLATES / name
    if not path.exists():
        raise GenerationError(f"missing template {path}")
    return path.read_text()


def header(template: str, sources: list[str], summary: list[str] = ()) -> str:
    """The generated-file banner. Deterministic: hashes, never dates or paths of the machine."""
    lines = [
        "// GENERATED FILE - do not edit. Regenerate with `mlx-video export-swift MODEL_DIR OUT_DIR`.",
        f"// Generator: mlx-video {mlx_video.__version__} swift_bridge v{GENERATOR_VERSION}, template "
        f"{template} (sha256 {sha256(template_text(template))[:16]}).",
    ]
    lines += [f"// From: {s}" for s in sources]
    lines += [f"// {s}" for s in summary]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Configuration structs
# --------------------------------------------------------------------------------------------------


def _field_comments(cls) -> dict[str, str]:
    """Trailing ``# comments`` of a dataclass's field lines (they document units and semantics)."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    out, above = {}, []
    for line in source.splitlines():
        comment = re.match(r"\s+#\s?(.*)$", line)
        if comment:
            above.append(comment.group(1).strip())
            continue
        m = re.match(r"\s+(\w+)\s*:[^#=]*(?:=[^#]*?)?(?:#\s*(.+))?$", line)
        if m and (above or m.group(2)):
            out[m.group(1)] = " ".join(above + ([m.group(2).strip()] if m.group(2) else []))
        above = []
    return out


def _swift_type(annotation: str, value, where: str) -> str:
    optional = "None" in str(annotation)
    if isinstance(value, bool):
        base = "Bool"
    elif isinstance(value, int):
        base = "Double" if "float" in str(annotation) and "int" not in str(annotation) else "Int"
    elif isinstance(value, float):
        base = "Double"
    elif isinstance(value, str):
        base = "String"
    elif isinstance(value, (list, tuple)):
        if value and all(isinstance(v, bool) for v in value) or "list[bool]" in str(annotation):
            base = "[Bool]"
        else:
            if value and not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
                raise GenerationError(f"{where}: only lists of numbers or booleans are supported, got {value!r}")
            inner = "list[float]" in str(annotation) or any(isinstance(v, float) for v in value)
            base = "[Double]" if inner else "[Int]"
    elif value is None:
        a = str(annotation).replace(" ", "")
        kinds = {"int": "Int", "float": "Double", "str": "String", "bool": "Bool"}
        names = [k for k in kinds if re.search(rf"\b{k}\b", a)]
        if len(names) != 1:
            raise GenerationError(f"{where}: cannot type a None default from annotation {annotation!r}")
        return kinds[names[0]] + "?"
    else:
        raise GenerationError(f"{where}: unsupported config value {value!r} ({type(value).__name__})")
    return base + ("?" if optional else "")


def configuration_struct(config, swift_name: str, section: str, dict_fields: dict[str, str] | None = None) -> str:
    """A ``Codable`` mirror of a config dataclass instance, decoded from ``config.json[section]``.

    ``dict_fields`` names the Swift type of fields holding JSON objects (e.g. ``quantization``)."""
    cls = type(config)
    comments = _field_comments(cls)
    module = cls.__module__
    lines = [f"/// `{section}` section of `config.json`: mirrors `{cls.__name__}` ({module}).",
             "/// Generated from the dataclass fields; JSON keys stay snake_case.",
             f"public struct {swift_name}: Codable, Sendable {{"]
    keys = []
    for f in dataclasses.fields(cls):
        name = camel_case(f.name)
        if f.name in (dict_fields or {}):
            swift_type = dict_fields[f.name] + ("?" if "None" in str(f.type) else "")
        else:
            swift_type = _swift_type(f.type, getattr(config, f.name), f"{cls.__name__}.{f.name}")
        if f.name in comments:
            lines.append(f"    /// {comments[f.name]}")
        lines.append(f"    public var {name}: {swift_type}")
        keys.append((name, f.name))
    lines += ["", "    enum CodingKeys: String, CodingKey {"]
    for name, key in keys:
        lines.append(f"        case {name}" if name == key else f'        case {name} = "{key}"')
    lines += ["    }", "}"]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Parameter declarations from the Python module tree
# --------------------------------------------------------------------------------------------------


@dataclass
class Declaration:
    key: str
    kind: str  # "parameter" or "module"
    swift_type: str
    array: bool = False
    optional: bool = False

    def render(self) -> str:
        name = camel_case(self.key)
        if self.kind == "parameter":
            return f'    @ParameterInfo(key: "{self.key}") var {name}: MLXArray'
        t = f"[{self.swift_type}]" if self.array else self.swift_type
        return f'    @ModuleInfo(key: "{self.key}") var {name}: {t}{"?" if self.optional else ""}'


def _swift_name_of(module, classes: dict, library: dict, where: str) -> str:
    for mapping in (classes, library):
        for py, swift in mapping.items():
            if type(module) is py:
                return swift
    raise GenerationError(f"{where}: no Swift class for Python {type(module).__module__}.{type(module).__name__}; "
                          f"add it to the component's class map")


def class_declarations(root: nn.Module, classes: dict[type, str], library: dict[type, str],
                       unary: tuple[str, ...] = ()) -> dict[str, list[Declaration]]:
    """Swift class name -> property declarations, from every instance of its Python class under ``root``.

    Keys present in only some instances become optional properties. Library-mapped modules (e.g.
    ``nn.Linear`` -> ``Linear``) are leaves: their parameters are MLXNN's. A list of mixed module types
    (TAEHV's positional ``decoder.N``) becomes ``[UnaryLayer]`` when every element type is in ``unary``,
    else ``[Module]``; the template dispatches on the element types.
    """
    found: dict[str, list[dict[str, Declaration]]] = {}
    stack = [("", root)]
    while stack:
        path, module = stack.pop(0)
        swift = _swift_name_of(module, classes, library, path or "<root>")
        if type(module) in library:
            continue
        decls: dict[str, Declaration] = {}
        for key, value in module.items():
            if key.startswith("_"):
                continue
            where = f"{path}{key}"
            if isinstance(value, mx.array):
                decls[key] = Declaration(key, "parameter", "MLXArray")
            elif isinstance(value, nn.Module):
                decls[key] = Declaration(key, "module", _swift_name_of(value, classes, library, where))
                stack.append((where + ".", value))
            elif isinstance(value, (list, tuple)) and value and all(isinstance(v, nn.Module) for v in value):
                types = {_swift_name_of(v, classes, library, f"{where}.{i}") for i, v in enumerate(value)}
                element = types.pop() if len(types) == 1 else ("UnaryLayer" if types <= set(unary) else "Module")
                decls[key] = Declaration(key, "module", element, array=True)
                stack.extend((f"{where}.{i}.", v) for i, v in enumerate(value))
            elif isinstance(value, (list, tuple, dict)) and value:
                raise GenerationError(f"{where}: unsupported container in the parameter tree ({type(value).__name__})")
        found.setdefault(swift, []).append(decls)
    out = {}
    for swift, instances in found.items():
        merged: dict[str, Declaration] = {}
        for decls in instances:
            for key, d in decls.items():
                if key in merged and (merged[key].swift_type, merged[key].array) != (d.swift_type, d.array):
                    raise GenerationError(f"{swift}.{key} has different types in different instances")
                merged.setdefault(key, d)
        for key, d in merged.items():
            d.optional = any(key not in decls for decls in instances)
        out[swift] = list(merged.values())
    return out


def check_library_layers(root: nn.Module, library: dict[type, str]) -> None:
    """A Python module mapped to an MLXNN layer must hold exactly that layer's parameters."""
    from .swiftcheck import LIBRARY_LAYERS

    for path, module in root.named_modules():
        if type(module) not in library:
            continue
        swift = library[type(module)]
        have = {k for k, v in module.items() if isinstance(v, mx.array) and not k.startswith("_")}
        layer = LIBRARY_LAYERS[swift]
        allowed = set(layer.params) | ({"scales", "biases"} if layer.quantizable else set())
        if not have <= allowed:
            raise GenerationError(f"{path or '<root>'}: Python {type(module).__name__} has parameters {sorted(have)}; "
                                  f"MLXNN {swift} has {sorted(LIBRARY_LAYERS[swift].params)}")


# --------------------------------------------------------------------------------------------------
# Templates
# --------------------------------------------------------------------------------------------------

_CLASS = re.compile(r"^(?:public )?(?:final )?class (\w+)\s*:", re.M)
_PROPERTIES = "// {{properties}}"


def expand_template(name: str, header_text: str, configuration: str | None,
                    declarations: dict[str, list[Declaration]]) -> str:
    """Fill a template's markers; every declared property must be assigned in its class's init."""
    text = template_text(name)
    if "// {{header}}" not in text:
        raise GenerationError(f"template {name} has no // {{{{header}}}} marker")
    text = text.replace("// {{header}}", header_text, 1)
    constants = template_constants()
    unknown = sorted({m.group(1) for m in _CONSTANT.finditer(text)} - set(constants))
    if unknown:
        raise GenerationError(f"template {name} uses unknown constants {unknown}")
    text = _CONSTANT.sub(lambda m: str(constants[m.group(1)]), text)
    if configuration is not None:
        if "// {{configuration}}" not in text:
            raise GenerationError(f"template {name} has no // {{{{configuration}}}} marker")
        text = text.replace("// {{configuration}}", configuration, 1)
    out, pending, problems = [], {k for k, v in declarations.items() if v}, []
    current = None
    for line in text.splitlines(keepends=True):
        m = _CLASS.match(line)
        if m:
            current = m.group(1)
        if line.strip() == _PROPERTIES:
            if current not in declarations:
                problems.append(f"{name}: class {current} has a properties marker but mirrors no Python module")
                continue
            decls = declarations[current]
            if decls:
                out.append("\n".join(d.render() for d in decls) + "\n")
            pending.discard(current)
            body = _class_body(text, current)
            for d in decls:
                var = camel_case(d.key).strip("`")
                if not re.search(rf"self\._{var}\.wrappedValue\s*=", body):
                    problems.append(f"{name}: {current}.init does not assign {var} (Python key {d.key!r})")
            continue
        out.append(line)
    if pending:
        problems.append(f"{name}: no // {{{{properties}}}} marker for {', '.join(sorted(pending))}")
    for cls in re.findall(r"^(?:public )?(?:final )?class (\w+)\s*:", text, re.M):
        body = _class_body(text, cls)
        for var in re.findall(r"self\._(\w+)\.wrappedValue\s*=", body):
            if cls in declarations and var not in {camel_case(d.key).strip("`") for d in declarations[cls]}:
                problems.append(f"{name}: {cls}.init assigns {var}, which the Python module does not have")
    if problems:
        raise GenerationError("template and Python model disagree:\n  " + "\n  ".join(problems))
    return "".join(out)


def _class_body(text: str, cls: str) -> str:
    m = re.search(rf"^(?:public )?(?:final )?class {cls}\s*:.*?$", text, re.M)
    if not m:
        return ""
    nxt = _CLASS.search(text, m.end())
    return text[m.end(): nxt.start() if nxt else len(text)]
