"""Mutation testing of the Swift templates, through the exported package's compiled golden XCTests.

mutmut and cosmic-ray mutate Python only, so the Swift side gets a small mutator of its own with mutmut's
operator kinds, applied to the forward-math lines that the templates (``swift_bridge/templates``) put into
an export of the built-in model:

- arithmetic ``+ - * /`` swapped pairwise; comparisons ``< <= > >= == !=`` moved to their neighbour;
- ``true``/``false`` flipped; integer literals ``n -> n + 1``; float literals doubled;
- a call dropped from a nested call (``f(g(x))`` -> ``f(x)``): a norm, an activation, a cast.

Each mutant is one changed line in a copy of the export, built against the mlx-swift stand-in and tested
(``swift_bridge.swiftbuild.build_and_test``): **killed** when an XCTest fails, **invalid** when it does not
compile (the compiler caught it; not counted in the score), **survived** otherwise. A survivor listed in
``benchmarks/mutation_swift_equivalent.json`` (file and mutated line -> why no behaviour can change) is
**equivalent**. Score = killed / (killed + survived - equivalent). ``--sample N --seed S`` checks N mutants
drawn uniformly. Not mutated: lines a mutation leaves unchanged (``0.0 x 2``), and lines in ``#if`` branches
that this platform does not compile (``#if os(iOS)``, ``#if canImport(Darwin)`` on Linux: no test here can
run them; counted as ``not_compiled_here``).

    python -m benchmarks.mutation_swift --sample 40 --seed 19   # 5-10 s per mutant on 2 cores

Writes ``benchmarks/results/mutation_swift.json`` (``--output`` elsewhere); ``python -m benchmarks.mutation
report`` folds that file into ``mutation.md``. Needs ``swift`` on PATH.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
OUTPUT = RESULTS / "mutation_swift.json"
EQUIVALENT = ROOT / "benchmarks" / "mutation_swift_equivalent.json"
# The templated sources of an export (Sources/LightningVideo/<name>): the forward math, written by hand.
SOURCES = ("WanDiT.swift", "UMT5.swift", "TAEHV.swift", "Sampler.swift", "Pipeline.swift", "Tokenizer.swift")
_SKIP = re.compile(r"^\s*(//|import\b|@|public\s+(let|var)\s+\w+\s*:|(let|var)\s+\w+\s*:\s*[A-Z]\w*\s*$|"
                   r"precondition|fatalError|print\(|throw\b|case\b|\}|\{)")
_OPERATORS = [(" + ", " - "), (" - ", " + "), (" * ", " / "), (" / ", " * "), (" <= ", " < "), (" < ", " <= "),
              (" >= ", " > "), (" > ", " >= "), (" == ", " != "), (" != ", " == "), ("true", "false"),
              ("false", "true")]
_INT = re.compile(r"(?<![\w.])(\d+)(?![\w.])")
_FLOAT = re.compile(r"(?<![\w.])(\d+\.\d+(?:e-?\d+)?|\d+e-?\d+)(?![\w.])")
_NESTED_CALL = re.compile(r"(\w+)\((\w+)\(")  # f(g(...: drop g
_DIRECTIVE = re.compile(r"^\s*#(if|elseif|else|endif)\b\s*(.*)$")
_CONDITION = re.compile(r"^(!?)\s*(os|canImport)\((\w+)\)$")
# What a Linux build compiles (the stand-in builds run on Linux): os(Linux), Glibc and Foundation.
_COMPILED_ON_LINUX = {("os", "Linux"), ("canImport", "Glibc"), ("canImport", "Foundation")}


def _compiled_here(condition: str) -> bool | None:
    """Whether this platform compiles an ``#if`` branch (None: a condition this tool does not evaluate)."""
    m = _CONDITION.match(condition.strip())
    if not m or not sys.platform.startswith("linux"):
        return None
    return ((m.group(2), m.group(3)) in _COMPILED_ON_LINUX) != (m.group(1) == "!")


def compiled_lines(lines: list[str]) -> list[bool]:
    """Per line: does this platform's build compile it (False inside an inactive ``#if`` branch)."""
    out, stack = [], []  # stack: [branch active, some branch taken] per open #if
    for line in lines:
        m = _DIRECTIVE.match(line)
        if m:
            kind, condition = m.group(1), m.group(2)
            if kind == "if":
                here = _compiled_here(condition)
                stack.append([here is not False, here is not False])
            elif kind == "elseif" and stack:
                here = _compiled_here(condition)
                stack[-1] = [not stack[-1][1] and here is not False, stack[-1][1] or here is not False]
            elif kind == "else" and stack:
                stack[-1] = [not stack[-1][1], True]
            elif kind == "endif" and stack:
                stack.pop()
            out.append(False)
            continue
        out.append(all(active for active, _ in stack))
    return out


def mutants(package: Path, skipped: dict | None = None) -> list[dict]:
    """Every single-line mutant of the templated sources: {"file", "line", "old", "new", "kind"}.
    ``skipped["not_compiled_here"]`` counts the mutants left out because this platform does not compile them."""
    out = []
    for name in SOURCES:
        path = package / "Sources" / "LightningVideo" / name
        if not path.exists():
            continue
        lines = path.read_text().splitlines()
        for number, (line, compiled) in enumerate(zip(lines, compiled_lines(lines)), 1):
            code = line.split("//")[0]
            if not code.strip() or _SKIP.match(code) or '"' in code:
                continue
            found = set()
            for old, new in _OPERATORS:
                for m in re.finditer(re.escape(old), code):
                    found.add((code[:m.start()] + new + code[m.end():], f"{old.strip()} -> {new.strip()}"))
            for m in _INT.finditer(code):
                found.add((code[:m.start()] + str(int(m.group(1)) + 1) + code[m.end():], "integer + 1"))
            for m in _FLOAT.finditer(code):
                found.add((code[:m.start()] + repr(2 * float(m.group(1))) + code[m.end():], "float x 2"))
            for m in _NESTED_CALL.finditer(code):
                inner = m.group(2)
                start = m.start(2)
                depth, end = 0, None
                for i in range(start + len(inner), len(code)):
                    depth += {"(": 1, ")": -1}.get(code[i], 0)
                    if depth == 0:
                        end = i
                        break
                if end is not None and inner[0].islower():
                    found.add((code[:start] + code[start + len(inner) + 1:end] + code[end + 1:],
                               f"drop the call {inner}()"))
            found = {(new, kind) for new, kind in found if new != code}
            if not compiled:
                if skipped is not None:
                    skipped["not_compiled_here"] = skipped.get("not_compiled_here", 0) + len(found)
                continue
            rest = line[len(code):]
            out += [{"file": name, "line": number, "old": line, "new": new + rest, "kind": kind}
                    for new, kind in sorted(found)]
    return out


def equivalent_key(mutant: dict) -> str:
    """``File.swift:<the mutated line, stripped>``: stable across line-number shifts."""
    return f"{mutant['file']}:{mutant['new'].strip()}"


def load_equivalent() -> dict[str, str]:
    return json.loads(EQUIVALENT.read_text()) if EQUIVALENT.exists() else {}


def export_default(out: Path) -> None:
    from mlx_video import cli

    if cli.main(["export-swift", str(out)]) != 0:
        raise SystemExit("export-swift of the built-in model failed")


def apply(package: Path, mutant: dict, target: Path) -> None:
    shutil.copytree(package, target, symlinks=True)
    path = target / "Sources" / "LightningVideo" / mutant["file"]
    lines = path.read_text().splitlines(keepends=True)
    ending = "\n" if lines[mutant["line"] - 1].endswith("\n") else ""
    assert lines[mutant["line"] - 1].rstrip("\n") == mutant["old"]
    lines[mutant["line"] - 1] = mutant["new"] + ending
    path.write_text("".join(lines))


def run(sample: int, seed: int, workspace: Path | None, output: Path = OUTPUT,
        files: tuple[str, ...] = (), match: str | None = None) -> dict:
    import mlx_video  # noqa: F401  (fast BLAS before mlx)
    from swift_bridge.swiftbuild import build_and_test, claim_workspace

    began = time.perf_counter()
    scratch = Path(tempfile.mkdtemp(prefix="mlx-video-swift-mutation-"))
    workspace = claim_workspace(workspace or scratch / "workspace")
    package = scratch / "LightningVideo"
    export_default(package)
    clean = build_and_test(package, workspace=workspace)
    if not clean.ok:
        raise SystemExit(f"the unmutated export fails its tests: {clean.problems[:3]}")
    skipped: dict = {}
    # A mutant that loops forever is stopped at 10x the clean build-and-test time (and killed).
    timeout = max(120.0, 10 * (clean.build_seconds + clean.test_seconds))
    every = [m for m in mutants(package, skipped)
             if (not files or m["file"] in files) and (match is None or match in m["old"])]
    equivalent = load_equivalent()
    chosen = sorted(random.Random(seed).sample(range(len(every)), min(sample, len(every)))) if sample else \
        list(range(len(every)))
    results = []
    for k, index in enumerate(chosen):
        m = dict(every[index], index=index)
        target = scratch / f"mutant-{index}"
        apply(package, m, target)
        start = time.perf_counter()
        r = build_and_test(target, workspace=workspace, timeout=timeout)
        built = not any(p.startswith("swift build") for p in r.problems)
        hung = built and ": timed out after " in r.log  # an endless loop in a test, stopped by the timeout
        failed = sorted(t.split(".")[-1] for t in r.failed) + (["(timed out)"] if hung else [])
        if built and not r.ok and not failed:
            failed = ["(crashed)"]  # a trap (index out of range, stand-in precondition) ended the test run
        m.update(status="killed" if built and not r.ok else "survived" if r.ok else "invalid", failed=failed,
                 seconds=round(time.perf_counter() - start, 1))
        if m["status"] == "survived" and equivalent_key(m) in equivalent:
            m["equivalent"] = equivalent[equivalent_key(m)]
        results.append(m)
        shutil.rmtree(target, ignore_errors=True)
        print(f"[{k + 1}/{len(chosen)}] {m['status']:8s} {m['file']}:{m['line']} {m['kind']}", flush=True)
    build_and_test(package, workspace=workspace)  # leave the workspace built from the unmutated export
    shutil.rmtree(scratch, ignore_errors=True)
    killed = sum(r["status"] == "killed" for r in results)
    survived = sum(r["status"] == "survived" for r in results)
    same = sum("equivalent" in r for r in results)
    counted = killed + survived - same
    data = {"generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "mutants": len(every),
            "not_compiled_here": skipped.get("not_compiled_here", 0), "files": list(files) or None, "match": match,
            "sample": {"size": len(chosen), "seed": seed} if sample else None, "killed": killed,
            "survived": survived, "equivalent": same, "invalid": sum(r["status"] == "invalid" for r in results),
            "score": round(killed / counted, 4) if counted else None,
            "clean_build_seconds": round(clean.build_seconds + clean.test_seconds, 1),
            "seconds": round(time.perf_counter() - began, 1), "results": results}
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(data, indent=1) + "\n")
    return data


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sample", type=int, default=20, help="mutants to check, drawn at random (0: all)")
    p.add_argument("--seed", type=int, default=19, help="seed of the --sample draw")
    p.add_argument("--workspace", type=Path, default=None, help="Swift build workspace (default: a scratch one)")
    p.add_argument("--output", type=Path, default=OUTPUT, help=f"result JSON (default {OUTPUT.relative_to(ROOT)})")
    p.add_argument("--files", nargs="+", default=(), choices=SOURCES, metavar="FILE",
                   help=f"mutate only these sources (of {', '.join(SOURCES)}); the draw is then among theirs")
    p.add_argument("--match", default=None, metavar="TEXT",
                   help="mutate only lines containing TEXT (re-check the mutants of one line after a fix)")
    args = p.parse_args(argv)
    data = run(args.sample, args.seed, args.workspace, args.output, tuple(args.files), args.match)
    print(f"score {data['score']} (killed {data['killed']}, survived {data['survived']} of which equivalent "
          f"{data['equivalent']}, invalid {data['invalid']}; {data['seconds']:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
