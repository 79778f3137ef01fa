"""Mutation testing of the runtime core with mutmut 3 (not CI: minutes to hours on 2 cores).

    python -m benchmarks.mutation run sampling video ops pipeline   # one module after another
    python -m benchmarks.mutation rerun sampling                    # re-test survivors after new tests
    python -m benchmarks.mutation report                            # benchmarks/results/mutation.{md,json}

Each module runs in its own scratch copy of the repository (``$MUTATION_WORK``, default
``/tmp/mlx-video-mutation/<module>``) so that edits made in the checkout while a run is going do not mix
into it, with a ``[tool.mutmut]`` section that mutates that one file and selects only the test files that
exercise it (``MODULES`` below). mutmut then records which tests reach which function and runs, for each
mutant, only those tests, with a CPU-time limit per mutant (``timeout_multiplier`` x the clean time).

The report counts ``killed`` and ``timeout`` as caught; ``survived`` and ``no tests`` (no selected test
reaches the function) as not caught. ``benchmarks/mutation_equivalent.json`` lists survivors judged
equivalent (no observable behaviour changes), keyed by module, function and the mutated line, each
with the reason; those leave the denominator. The score is caught / (all - equivalent).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = Path(os.environ.get("MUTATION_WORK", "/tmp/mlx-video-mutation"))
RESULTS = ROOT / "benchmarks" / "results"
EQUIVALENT = ROOT / "benchmarks" / "mutation_equivalent.json"

# module -> (file to mutate, tests that exercise it). Ordered by importance. Selections are kept to tests
# that run in seconds (end-to-end generations only where the module's promise needs one), so that one
# mutant costs a few seconds; mutmut narrows further to the tests that reach the mutated function.
G = "tests/test_guards.py::"
MODULES: dict[str, tuple[str, list[str]]] = {
    "sampling": ("mlx_video/sampling.py", ["tests/test_sampling.py", G + "test_negative_prompt_is_the_unconditional_branch",
                                           G + "test_sampler_timesteps_defaults_and_overrides",
                                           G + "test_renoise_list_length_is_checked_and_numpy_draws_work",
                                           G + "test_seeded_renoise_draws_are_full_size_standard_normal",
                                           G + "test_progress_reports_each_step"]),
    "video": ("mlx_video/video.py", ["tests/test_video.py", "tests/test_hostile_outputs.py",
                                     G + "test_failure_report_holds_what_went_wrong",
                                     G + "test_generation_failed_message_and_frame_summary",
                                     G + "test_errors_inside_the_writer_block_propagate_and_leave_nothing",
                                     G + "test_video_info_of_gif_and_png_folder_and_write_video_options",
                                     G + "test_a_single_nan_or_inf_fails_the_finite_check",
                                     G + "test_one_black_frame_does_not_fail_the_video_but_an_all_black_one_does",
                                     G + "test_png_frame_folder_survives_a_crash_while_being_replaced",
                                     G + "test_every_output_format_holds_the_decoded_frames"]),
    "ops": ("mlx_video/ops.py", [G + "test_attention_chunk_size_counts_every_factor_of_the_score_buffer",
                                 G + "test_attention_really_runs_in_chunks_within_the_budget",
                                 G + "test_dit_uses_its_attention_budget_everywhere",
                                 G + "test_cpu_softmax_survives_extreme_scores_and_many_rows",
                                 G + "test_owned_numpy_view_refuses_non_contiguous_buffers",
                                 G + "test_numpy_fallbacks_without_the_native_kernels", "tests/test_wan_dit.py"]),
    "pipeline": ("mlx_video/pipeline.py", ["tests/test_guards.py"]),
    "wan_dit": ("mlx_video/models/wan_dit.py", ["tests/test_wan_dit.py", "tests/test_wan_keys_independent.py"]),
    "taehv": ("mlx_video/models/taehv.py", ["tests/test_taehv.py"]),
    "umt5": ("mlx_video/models/umt5.py", ["tests/test_umt5.py"]),
    "converters_common": ("converters/common.py", ["tests/test_convert_dit.py", "tests/test_wan_keys_independent.py",
                                                   G + "test_a_crash_between_the_renames_keeps_the_old_folder"]),
    "prune": ("mlx_video/prune.py", ["tests/test_prune.py"]),
}
BUILDS_MODEL = {"converters_common"}  # mutants here change how the model folder is built: no cached folder
COPY = ["mlx_video", "converters", "swift_bridge", "benchmarks", "tests", "pyproject.toml"]
CAUGHT = {"killed", "timeout"}
KILLED_CODES = {1, 3}  # mutmut's exit codes for a failing test run


def _mutmut_section(module: str) -> str:
    path, tests = MODULES[module]
    tests = [t for t in tests if (ROOT / t.split("::")[0]).exists()]
    source = path.split("/")[0]
    also = [p for p in ("mlx_video", "converters", "swift_bridge", "benchmarks") if p != source]
    return "\n".join([
        "", "[tool.mutmut]",
        f"source_paths = [{source!r}]",
        f"only_mutate = [{path!r}]",
        f"also_copy = {also!r}",
        f"pytest_add_cli_args_test_selection = {tests!r}",
        "pytest_add_cli_args = ['-p', 'no:cacheprovider', '-q', '-x']",
        # torch and MLX start thread pools: fork each mutant from a clean server, not from a test process
        "process_isolation = 'forkserver'",
        "timeout_multiplier = 3.0",
        "timeout_constant = 2.0",
        "use_git_change_detection = false",
        "",
    ])


def workdir(module: str) -> Path:
    return WORK / module


def prepare(module: str, fresh: bool) -> Path:
    """Copy the checkout (what the module and its tests need) into the module's scratch folder. Not
    ``fresh``: only the tests are refreshed, so the mutants stay those of the first run's source."""
    d = workdir(module)
    if fresh and d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "results", "*.egg-info")
    for name in COPY if fresh else ["tests"]:
        src, dst = ROOT / name, d / name
        if dst.is_dir():
            shutil.rmtree(dst)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=ignore)
        elif src.exists():
            shutil.copy2(src, dst)
    text = (d / "pyproject.toml").read_text()
    text = re.sub(r"\n\[tool\.mutmut\]\n(?:(?!\[).*(?:\n|$))*", "\n", text)  # up to the next table
    (d / "pyproject.toml").write_text(text + _mutmut_section(module))
    return d


def _model_cache() -> Path:
    """The tests' small model folder, built once by the unmutated code and reused by every mutant's tests
    (``MLX_VIDEO_TEST_MODEL``, see ``tests/test_guards.py``): a mutant then only costs its tests."""
    cache = WORK / "model-cache"
    if not (cache / "model" / "config.json").exists():
        shutil.rmtree(cache, ignore_errors=True)
        code = "import sys; from pathlib import Path; from tests.model_factory import build_model_folder; " \
               "build_model_folder(Path(sys.argv[1]))"
        subprocess.run([sys.executable, "-c", code, str(cache)], cwd=ROOT, check=True, capture_output=True,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    return cache


def _mutmut(d: Path, *args: str, timeout: float | None = None, log=None) -> subprocess.CompletedProcess:
    # One thread per library: mutants are forked from a server that imported torch/MKL/MLX, and OpenMP
    # pools do not survive a fork (a forked child waiting on them hangs until its timeout).
    env = dict(os.environ, PYTHONPATH=str(d), PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               OPENBLAS_NUM_THREADS="1")
    if d.name not in BUILDS_MODEL:
        env["MLX_VIDEO_TEST_MODEL"] = str(_model_cache())
    return subprocess.run([sys.executable, "-m", "mutmut", *args], cwd=d, env=env, timeout=timeout, text=True,
                          stdout=log or subprocess.PIPE, stderr=subprocess.STDOUT)


def run(modules: list[str], budget_s: float, rerun: bool = False) -> None:
    deadline = time.monotonic() + budget_s
    for module in modules:
        left = deadline - time.monotonic()
        if left < 60:
            print(f"{module}: skipped (time budget spent)", flush=True)
            continue
        d = prepare(module, fresh=not rerun)
        args = ["run", "--max-children", "1"]
        if rerun:
            survivors = [n for n, s in statuses(module).items() if s not in CAUGHT]
            if not survivors:
                print(f"{module}: no survivors to re-run", flush=True)
                continue
            # mutmut resets every verdict when the test selection changes; keep the earlier ones to merge
            meta = _meta(module)
            shutil.copy2(meta, meta.with_name(meta.name + ".before"))
            _save_merged(module)
            args += survivors
        print(f"{module}: mutmut {' '.join(args[:3])} ... in {d} (budget {left:.0f} s)", flush=True)
        with open(d / "mutmut.log", "a") as log:
            try:
                _mutmut(d, *args, timeout=left, log=log)
            except subprocess.TimeoutExpired:
                print(f"{module}: stopped at the time budget (partial results)", flush=True)
        counts: dict[str, int] = {}
        for s in statuses(module).values():
            counts[s] = counts.get(s, 0) + 1
        print(f"{module}: {counts}", flush=True)


def _meta(module: str) -> Path:
    return workdir(module) / "mutants" / (MODULES[module][0] + ".meta")


def _exit_codes(path: Path) -> dict:
    return json.loads(path.read_text()).get("exit_code_by_key", {}) if path.exists() else {}


def _save_merged(module: str) -> None:
    """Fold the verdicts of earlier runs into ``.meta.merged`` (a later verdict wins where there is one)."""
    meta = _meta(module)
    merged = _exit_codes(meta.with_name(meta.name + ".merged"))
    merged.update({k: v for k, v in _exit_codes(meta.with_name(meta.name + ".before")).items() if v is not None})
    meta.with_name(meta.name + ".merged").write_text(json.dumps({"exit_code_by_key": merged}))


def statuses(module: str) -> dict[str, str]:
    """mutant name -> mutmut status, from mutmut's ``.meta`` file merged with earlier runs' verdicts."""
    from mutmut.stats import status_by_exit_code  # plain table; importing it reads no config

    meta = _meta(module)
    codes = _exit_codes(meta.with_name(meta.name + ".merged"))
    for k, v in _exit_codes(meta).items():
        if k not in codes or (v is not None and codes[k] not in KILLED_CODES):  # a kill stands: tests only grow
            codes[k] = v
    return {k: status_by_exit_code[v] for k, v in codes.items()}


def _diff(module: str, name: str) -> str:
    out = _mutmut(workdir(module), "show", name, timeout=120).stdout
    return "\n".join(line for line in out.splitlines() if line.startswith(("-", "+")) and
                     not line.startswith(("---", "+++")))


def _function(name: str) -> str:
    # mlx_video.sampling.x_schedule__mutmut_12 / mlx_video.video.xǁVideoWriterǁclose__mutmut_3
    short = name.rsplit(".", 1)[-1].split("__mutmut_")[0]
    return short.removeprefix("x_").removeprefix("x\u01c1").replace("\u01c1", ".")


def _key(module: str, name: str, diff: str) -> str:
    added = [line[1:].strip() for line in diff.splitlines() if line.startswith("+")]
    return f"{module}:{_function(name)}:{' | '.join(added)}"


def report() -> dict:
    equivalent = json.loads(EQUIVALENT.read_text()) if EQUIVALENT.exists() else {}
    data: dict = {"tool": _mutmut_version(), "generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "modules": {}}
    for module, (path, tests) in MODULES.items():
        used = workdir(module) / "pyproject.toml"  # the selection of the latest run, if there was one
        if used.exists() and sys.version_info >= (3, 11):
            import tomllib

            tests = tomllib.loads(used.read_text())["tool"]["mutmut"]["pytest_add_cli_args_test_selection"]
        st = statuses(module)
        if not st:
            data["modules"][module] = {"file": path, "tests": tests, "measured": False}
            continue
        counts: dict[str, int] = {}
        for s in st.values():
            counts[s] = counts.get(s, 0) + 1
        survivors = []
        for name, s in sorted(st.items()):
            if s in CAUGHT or s == "not checked":
                continue
            diff = _diff(module, name)
            key = _key(module, name, diff)
            survivors.append({"mutant": name, "status": s, "diff": diff, "key": key,
                              "equivalent": equivalent.get(key)})
        n_equiv = sum(1 for m in survivors if m["equivalent"])
        caught = sum(n for s, n in counts.items() if s in CAUGHT)
        checked = sum(n for s, n in counts.items() if s != "not checked")
        denominator = checked - n_equiv
        data["modules"][module] = {
            "file": path, "tests": tests, "measured": True, "counts": counts, "checked": checked,
            "caught": caught, "equivalent": n_equiv, "complete": counts.get("not checked", 0) == 0,
            "score": round(caught / denominator, 4) if denominator else None, "survivors": survivors}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "mutation.json").write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    (RESULTS / "mutation.md").write_text(_markdown(data))
    return data


def _mutmut_version() -> str:
    try:
        from importlib.metadata import version

        return f"mutmut {version('mutmut')}"
    except Exception:  # noqa: BLE001
        return "mutmut (version unknown)"


def _markdown(data: dict) -> str:
    lines = ["# Mutation testing of the runtime core", "",
             f"Tool: {data['tool']}; generated {data['generated']} by `python -m benchmarks.mutation report`.",
             "Score = (killed + timeout) / (checked - equivalent). Mutants no selected test reaches count as not "
             "caught. mutmut runs the mutants with the fastest tests first, so a run stopped at its time budget "
             "(`not checked`) has measured the cheap part of the module; the score is of the checked mutants only.",
             "", "Runs are of a snapshot of the checkout taken when each module's run started; tests written after "
             "a module's last run are not reflected in its figures (a survivor they target still shows as NOT "
             "caught until `python -m benchmarks.mutation rerun MODULE`).", "",
             "| module | file | mutants | not checked (time) | checked | killed | timeout | survived | no tests | "
             "equivalent | score (of checked) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for module, m in data["modules"].items():
        if not m["measured"]:
            lines.append(f"| {module} | `{m['file']}` | not run | | | | | | | | |")
            continue
        c = m["counts"]
        score = "n/a" if m["score"] is None else f"{100 * m['score']:.1f}%"
        lines.append(f"| {module} | `{m['file']}` | {sum(c.values())} | {c.get('not checked', 0)} | {m['checked']} | "
                     f"{c.get('killed', 0)} | {c.get('timeout', 0)} | {c.get('survived', 0)} | {c.get('no tests', 0)} | "
                     f"{m['equivalent']} | {score} |")
    lines += ["", "Test selection per module (mutmut then runs, per mutant, only the selected tests that reach the "
              "mutated function):", ""]
    lines += [f"- {module}: " + ", ".join(f"`{t}`" for t in m["tests"]) for module, m in data["modules"].items()]
    for module, m in data["modules"].items():
        if not m.get("survivors"):
            continue
        lines += ["", f"## {module}: surviving mutants", ""]
        for s in m["survivors"]:
            verdict = f"equivalent: {s['equivalent']}" if s["equivalent"] else f"NOT caught ({s['status']})"
            lines.append(f"- `{s['mutant']}` - {verdict}")
            lines += ["  ```diff"] + [f"  {line}" for line in s["diff"].splitlines()] + ["  ```"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for cmd in ("run", "rerun"):
        s = sub.add_parser(cmd)
        s.add_argument("modules", nargs="*", default=list(MODULES), help=f"of: {', '.join(MODULES)}")
        s.add_argument("--budget", type=float, default=3600.0, help="seconds for all modules together")
    sub.add_parser("report")
    args = p.parse_args(argv)
    if args.cmd == "report":
        data = report()
        for module, m in data["modules"].items():
            print(module, "not run" if not m["measured"] else f"{m['score']} {m['counts']}")
        return 0
    unknown = set(args.modules) - set(MODULES)
    if unknown:
        p.error(f"unknown module(s) {', '.join(sorted(unknown))}; choose from {', '.join(MODULES)}")
    run(args.modules, args.budget, rerun=args.cmd == "rerun")
    return 0


if __name__ == "__main__":
    sys.exit(main())
