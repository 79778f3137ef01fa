"""Mutation testing of the runtime core with mutmut 3 (not CI: minutes to hours on 2 cores).

    python -m benchmarks.mutation run sampling video ops pipeline   # one module after another
    python -m benchmarks.mutation run prune --sample 60 --seed 19  # a fixed random sample of the mutants
    python -m benchmarks.mutation rerun sampling                    # re-test survivors after new tests
    python -m benchmarks.mutation report                            # benchmarks/results/mutation.{md,json}
    python -m benchmarks.mutation planted                           # the issue's product bugs, planted by hand

``--sample N`` checks N mutants drawn uniformly (``random.Random(seed)`` over the sorted mutant names) instead
of all of them: on a shared 2-core machine a module's full set takes hours, and a uniform sample gives an
unbiased score with a stated interval, where a run cut at its time budget measures only the cheap mutants.

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
import math
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
    "sampling": ("mlx_video/sampling.py", ["tests/test_sampling.py", "tests/test_mutation_sampling.py",
                                           G + "test_negative_prompt_is_the_unconditional_branch",
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
                                     G + "test_every_output_format_holds_the_decoded_frames",
                                     "tests/test_mutation_video.py"]),
    "ops": ("mlx_video/ops.py", [G + "test_attention_chunk_size_counts_every_factor_of_the_score_buffer",
                                 G + "test_attention_really_runs_in_chunks_within_the_budget",
                                 G + "test_dit_uses_its_attention_budget_everywhere",
                                 G + "test_cpu_softmax_survives_extreme_scores_and_many_rows",
                                 G + "test_owned_numpy_view_refuses_non_contiguous_buffers",
                                 G + "test_numpy_fallbacks_without_the_native_kernels", "tests/test_wan_dit.py",
                                 "tests/test_mutation_ops.py"] + [
        "tests/test_native.py::" + t for t in (
            "test_flash_attention_matches_float64_and_the_mlx_path", "test_flash_attention_reads_strided_and_broadcast_operands",
            "test_flash_attention_propagates_nan_so_fail_closed_checks_fire", "test_flash_attention_keeps_no_score_matrix",
            "test_modulated_layer_norm_matches_float64", "test_gelu_tanh_matches_torch_float64", "test_rope_matches_the_mlx_path",
            "test_conv3x3_of_a_channel_concatenation_matches_float64", "test_conv3x3_reads_a_tile_crop_in_place",
            "test_upconv_matches_upsample_then_conv_in_float64", "test_a_stale_build_falls_back_with_a_reason",
            "test_a_missing_build_runs_the_mlx_path_and_says_so")]),
    "pipeline": ("mlx_video/pipeline.py", ["tests/test_guards.py", "tests/test_mutation_pipeline.py",
                                           "tests/test_wan_vae.py::test_a_causal_model_streams_its_blocks_through_the_wan_vae",
                                           "tests/test_wan_vae.py::test_a_wan_vae_that_cannot_fit_is_refused_with_every_stage_over_the_limit"] + [
        "tests/test_hostile_cli.py::" + t for t in (
            "test_memory_limit_below_the_plan_is_refused_before_any_work",
            "test_a_job_the_machine_cannot_hold_is_refused_at_the_default_limit", "test_plan_shrinks_attention_chunks_to_fit",
            "test_plan_gives_the_decoder_the_whole_limit_or_refuses_clearly",
            "test_plan_streams_a_resident_text_encoder_that_does_not_fit", "test_a_stage_above_the_limit_warns")]),
    "wan_dit": ("mlx_video/models/wan_dit.py", ["tests/test_wan_dit.py", "tests/test_wan_keys_independent.py",
                                                "tests/test_mutation_models.py"]),
    "taehv": ("mlx_video/models/taehv.py", ["tests/test_taehv.py", "tests/test_mutation_models.py"]),
    "umt5": ("mlx_video/models/umt5.py", ["tests/test_umt5.py", "tests/test_mutation_models.py"]),
    "wan_vae": ("mlx_video/models/wan_vae.py", ["tests/test_wan_vae.py", "tests/test_mutation_models.py"]),
    "segmented": ("mlx_video/models/segmented.py", ["tests/test_wan_vae.py", "tests/test_taehv.py"]),
    "converters_common": ("converters/common.py", ["tests/test_convert_dit.py", "tests/test_wan_keys_independent.py",
                                                   "tests/test_hostile_inputs.py", "tests/test_mutation_common.py",
                                                   G + "test_a_crash_between_the_renames_keeps_the_old_folder"]),
    "prune": ("mlx_video/prune.py", ["tests/test_prune.py", "tests/test_mutation_prune.py"]),
}
# mutmut times only a test's call phase; module fixtures (a model built, a generation run) come on top and
# must not read as a timeout ("caught"): a constant of seconds per mutant covers them (wall limit:
# (tests' time + constant) x multiplier; CPU limit twice that). converters_common's fixtures build the source checkpoints (~10 s CPU).
TIMEOUT_CONSTANT = {"converters_common": 40.0}
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
        # a wall-clock limit of (time + constant) x multiplier: generous, since a niced run on a loaded
        # machine (load 12 on 2 cores here) would otherwise read slow tests as timeouts ("caught")
        "timeout_multiplier = 10.0",
        f"timeout_constant = {TIMEOUT_CONSTANT.get(module, 20.0)}",
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


# The product promises of issue 19, each checked by planting its bug by hand (one line, in a scratch copy)
# and running the test that pins it: (what, file, original text, planted text, tests). mutmut's operators
# do not write these bugs (swapped arguments, dropped list items, a reversed frame order).
PLANTED = [
    ("negative prompt swapped with the prompt under guidance", "mlx_video/pipeline.py",
     "    text = dit.prepare_text(context[:1])\n    uncond = dit.prepare_text(context[1:2]) if",
     "    text = dit.prepare_text(context[1:2] if sampler_cfg.uses_cfg else context[:1])\n"
     "    uncond = dit.prepare_text(context[:1]) if", [G + "test_negative_prompt_is_the_unconditional_branch"]),
    ("every prompt of a --prompt-file given the same seed", "mlx_video/generate.py", "seed=seed + i,", "seed=seed,",
     [G + "test_prompt_file_gives_each_prompt_its_own_seed_and_output"]),
    ("the planned decoder tile ignored by the pipeline", "mlx_video/pipeline.py",
     "n = decode_to_video(models, latents, output, request.fps, plan.decoder_tile,",
     "n = decode_to_video(models, latents, output, request.fps, None,",
     [G + "test_planned_decoder_tile_is_used_and_tiled_video_equals_untiled"]),
    ("decode peak under-predicted by half (measured peak above the plan)", "mlx_video/models/taehv.py",
     "    return int((base + max(seg_peaks)) * itemsize) + _SLACK",
     "    return (int((base + max(seg_peaks)) * itemsize) + _SLACK) // 2", [G + "test_measured_peaks_stay_within_the_plan"]),
    ("denoise peak under-predicted by half (measured peak above the plan)", "mlx_video/pipeline.py",
     "    return int(weight_bytes + text_kv + max(phases))", "    return int(weight_bytes + text_kv + max(phases)) // 2",
     [G + "test_measured_peaks_stay_within_the_plan"]),
    ("--gif writing nothing", "mlx_video/generate.py", "([output.with_suffix(\".gif\")] if args.gif else [])", "[]",
     [G + "test_every_output_format_holds_the_decoded_frames"]),
    ("--save-frames writing nothing", "mlx_video/generate.py", "([Path(args.save_frames)] if args.save_frames\n",
     "([] if args.save_frames\n", [G + "test_every_output_format_holds_the_decoded_frames"]),
    ("GIF frames in reverse order", "mlx_video/video.py", "np.stack(self._gif_frames)", "np.stack(self._gif_frames[::-1])",
     [G + "test_every_output_format_holds_the_decoded_frames"]),
    ("MP4 colour channels swapped", "mlx_video/video.py", "self._proc.stdin.write(np.ascontiguousarray(u8).tobytes())",
     "self._proc.stdin.write(np.ascontiguousarray(u8[..., ::-1]).tobytes())",
     [G + "test_every_output_format_holds_the_decoded_frames"]),
    ("PNG frames numbered from 1 (the manifest names frame_00000.png)", "mlx_video/video.py",
     "start = self.stats.frames - u8.shape[0]", "start = self.stats.frames - u8.shape[0] + 1",
     [G + "test_every_output_format_holds_the_decoded_frames"]),
]


def planted() -> list[dict]:
    """Plant each ``PLANTED`` bug in a scratch copy, run its tests; a bug is caught when they fail."""
    d = WORK / "planted"
    shutil.rmtree(d, ignore_errors=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "results", "*.egg-info")
    for name in COPY:
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy2)(ROOT / name, d / name, **(
            {"ignore": ignore} if (ROOT / name).is_dir() else {}))
    env = _test_env(d, d)
    results = []
    for what, file, old, new, tests in PLANTED:
        path = d / file
        text = path.read_text()
        if text.count(old) != 1:
            results.append({"bug": what, "caught": None, "note": f"{file}: the original line is not there once"})
            continue
        path.write_text(text.replace(old, new))
        start = time.monotonic()
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests], cwd=d, env=env,
                           capture_output=True, text=True)
        path.write_text(text)
        results.append({"bug": what, "file": file, "tests": tests, "caught": r.returncode != 0,
                        "seconds": round(time.monotonic() - start, 1)})
        print(f"{'caught' if r.returncode else 'MISSED'}: {what}", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "mutation_planted.json").write_text(json.dumps(results, indent=1) + "\n")
    return results


def _test_env(d: Path, path: Path) -> dict:
    """The tests' environment in module folder ``d``: ``path`` importable, one thread per library (a forked
    child waiting on an OpenMP pool hangs), and the shared model folder unless the module builds it."""
    env = dict(os.environ, PYTHONPATH=str(path), PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1",
               MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    if d.name not in BUILDS_MODEL:
        env["MLX_VIDEO_TEST_MODEL"] = str(_model_cache())
    return env


def _mutmut(d: Path, *args: str, timeout: float | None = None, log=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mutmut", *args], cwd=d, env=_test_env(d, d), timeout=timeout,
                          text=True, stdout=log or subprocess.PIPE, stderr=subprocess.STDOUT)


def _sample_file(module: str) -> Path:
    return workdir(module) / "sample.json"


def sample_of(module: str) -> dict | None:
    """The sample a ``--sample`` run checked: {"seed", "size", "of", "mutants"}; None for a full run."""
    f = _sample_file(module)
    return json.loads(f.read_text()) if f.exists() else None


def _generate(d: Path, log, tries: int = 3) -> None:
    """Generate the mutants and mutmut's per-test stats (a filter that matches no mutant makes mutmut stop right
    after both). The stats run of the video selection failed now and then under load (mutmut names no test);
    it is tried again before giving up."""
    stats = d / "mutants" / "mutmut-stats.json"
    for _ in range(tries):
        _mutmut(d, "run", "--max-children", "1", "no-such-mutant", log=log)
        if stats.exists():
            return
    raise SystemExit(f"{d}: mutmut could not collect its test stats in {tries} tries (see {d / 'mutmut.log'})")


def _draw_sample(module: str, d: Path, size: int, seed: int, log) -> list[str]:
    """Generate the mutants and the per-test stats (a filter that matches no mutant makes mutmut stop right
    after both), then draw ``size`` of them uniformly with ``random.Random(seed)`` from the sorted names,
    so that the sample is reproducible and not biased towards cheap mutants."""
    import random

    _generate(d, log)
    names = sorted(_exit_codes(_meta(module)))
    chosen = sorted(random.Random(seed).sample(names, min(size, len(names))))
    _sample_file(module).write_text(json.dumps({"seed": seed, "size": len(chosen), "of": len(names),
                                                "mutants": chosen}, indent=1))
    return chosen


def run(modules: list[str], budget_s: float, rerun: bool = False, sample: int = 0, seed: int = 19) -> None:
    deadline = time.monotonic() + budget_s
    for module in modules:
        left = deadline - time.monotonic()
        if left < 60:
            print(f"{module}: skipped (time budget spent)", flush=True)
            continue
        d = prepare(module, fresh=not rerun)
        if not rerun and _sample_file(module).exists():
            _sample_file(module).unlink()
        args = ["run", "--max-children", "1"]
        if sample and not rerun:
            with open(d / "mutmut.log", "a") as log:
                args += _draw_sample(module, d, sample, seed, log)
            left = deadline - time.monotonic()
        if rerun:
            # "not checked" mutants of a sampled run are outside the sample: leave them out. Timeouts are
            # checked again: those of mutmut's forked runner (runs before this session) include hangs.
            skip = {"killed"} | ({"not checked"} if sample_of(module) else set())
            survivors = [n for n, s in statuses(module).items() if s not in skip]
            if not survivors:
                print(f"{module}: no survivors to re-run", flush=True)
                continue
            # mutmut resets every verdict when the test selection changes; keep the earlier ones to merge
            meta = _meta(module)
            shutil.copy2(meta, meta.with_name(meta.name + ".before"))
            _save_merged(module)
            args += survivors
            with open(d / "mutmut.log", "a") as log:  # the stats again: which of the refreshed tests reach what
                _generate(d, log)
        names = args[3:]
        with open(d / "mutmut.log", "a") as log:
            if not names:  # a full run: generate the mutants and the stats (as the sample draw does), run all
                _generate(d, log)
                names = sorted(_exit_codes(_meta(module)))
        print(f"{module}: {len(names)} mutants, each in a fresh process, in {d} (budget {left:.0f} s)", flush=True)
        if not _run_fresh(module, d, names, deadline):
            print(f"{module}: stopped at the time budget (partial results)", flush=True)
        counts: dict[str, int] = {}
        for s in statuses(module).values():
            counts[s] = counts.get(s, 0) + 1
        print(f"{module}: {counts}", flush=True)


def _run_fresh(module: str, d: Path, names: list[str], deadline: float) -> bool:
    """Run each mutant's tests (those mutmut's stats say reach the mutated function) in a fresh pytest
    process and record mutmut's exit code in its ``.meta`` file. False when the deadline stopped it.

    Not mutmut's own runner: it forks every mutant from a server process, and on this machine MLX
    evaluation in such a forked child can block forever (seen in ops: a kill read as a timeout after
    ten minutes; the same mutant in a fresh process fails its test in 3 s). A timeout counts as caught,
    so those hangs inflated the score. Wall limit: 10 x (the tests' clean time + 20 s)."""
    stats = json.loads((d / "mutants" / "mutmut-stats.json").read_text())
    tests_of, durations = stats["tests_by_mangled_function_name"], stats["duration_by_test"]
    env = _test_env(d, d / "mutants")
    meta = _meta(module)
    data = json.loads(meta.read_text())
    for k, name in enumerate(names):
        if time.monotonic() > deadline:
            return False
        tests = tests_of.get(name.rsplit("__mutmut_", 1)[0], [])
        if not tests:
            code = 33  # no selected test reaches the function
        else:
            limit = 10 * (sum(durations.get(t, 1.0) for t in tests) + TIMEOUT_CONSTANT.get(module, 20.0))
            try:
                code = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                                       *tests], cwd=d / "mutants",
                                      env=dict(env, MUTANT_UNDER_TEST=name), capture_output=True,
                                      timeout=min(limit, max(1.0, deadline - time.monotonic()))).returncode
            except subprocess.TimeoutExpired:
                code = 36
        data["exit_code_by_key"][name] = code
        meta.write_text(json.dumps(data))
        print(f"{module} [{k + 1}/{len(names)}] {name}: {code}", flush=True)
    return True


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


def _function_source(text: str, fn: str) -> list[str] | None:
    """The lines of ``def <fn>(`` in mutmut's mutated module (up to the next line indented no deeper)."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.lstrip().startswith(f"def {fn}("):
            indent = len(line) - len(line.lstrip())
            end = i + 1
            while end < len(lines) and (not lines[end].strip() or len(lines[end]) - len(lines[end].lstrip()) > indent):
                end += 1
            return [line[indent:] for line in lines[i:end]]
    return None


def _diff(module: str, name: str) -> str:
    """The mutant's changed lines, read from mutmut's mutated copy of the module (``mutmut show`` as fallback:
    one process per mutant, minutes for a report on a loaded machine)."""
    mutated = workdir(module) / "mutants" / MODULES[module][0]
    if mutated.exists():
        import difflib

        text, fn = mutated.read_text(), name.rsplit(".", 1)[-1]
        orig, mutant = _function_source(text, fn.split("__mutmut_")[0] + "__mutmut_orig"), _function_source(text, fn)
        if orig and mutant:
            mutant[0] = orig[0]  # the def line differs by the name only
            return "\n".join(line for line in difflib.unified_diff(orig, mutant, lineterm="", n=0)
                             if line.startswith(("-", "+")) and not line.startswith(("---", "+++")))
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
        sample = sample_of(module)
        data["modules"][module] = {
            "file": path, "tests": tests, "measured": True, "counts": counts, "checked": checked,
            "caught": caught, "equivalent": n_equiv, "complete": counts.get("not checked", 0) == 0,
            "sample": None if sample is None else {k: sample[k] for k in ("seed", "size", "of")},
            "score": round(caught / denominator, 4) if denominator else None,
            "interval95": _wilson(caught, denominator), "survivors": survivors}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "mutation.json").write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    (RESULTS / "mutation.md").write_text(_markdown(data))
    return data


def _wilson(k: int, n: int, z: float = 1.96) -> list[float] | None:
    """95% Wilson interval of a score of k in n (the uncertainty of a sampled module's score)."""
    if not n:
        return None
    p = k / n
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)]


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
             "| module | file | mutants | sampled (seed) | not checked | checked | killed | timeout | survived | "
             "no tests | equivalent | score (of checked) | 95% interval |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for module, m in data["modules"].items():
        if not m["measured"]:
            lines.append(f"| {module} | `{m['file']}` | not run | | | | | | | | | | |")
            continue
        c = m["counts"]
        score = "n/a" if m["score"] is None else f"{100 * m['score']:.1f}%"
        sample = m.get("sample")
        sampled = "all" if sample is None else f"{sample['size']} ({sample['seed']})"
        ci = m.get("interval95")
        ci = "" if not ci else f"{100 * ci[0]:.0f}-{100 * ci[1]:.0f}%"
        lines.append(f"| {module} | `{m['file']}` | {sum(c.values())} | {sampled} | {c.get('not checked', 0)} | "
                     f"{m['checked']} | {c.get('killed', 0)} | {c.get('timeout', 0)} | {c.get('survived', 0)} | "
                     f"{c.get('no tests', 0)} | {m['equivalent']} | {score} | {ci} |")
    notes = RESULTS / "mutation_notes.md"  # hand-written: how the figures were obtained, before/after, timings
    if notes.exists():
        lines += ["", notes.read_text().rstrip()]
    planted_file = RESULTS / "mutation_planted.json"
    if planted_file.exists():
        lines += ["", "## The issue's product bugs, planted by hand (`python -m benchmarks.mutation planted`)", "",
                  "| bug | caught | by |", "| --- | --- | --- |"]
        for r in json.loads(planted_file.read_text()):
            by = ", ".join(f"`{t.split('::')[-1]}`" for t in r.get("tests", []))
            lines.append(f"| {r['bug']} | {'yes' if r['caught'] else 'NO' if r['caught'] is False else '?'} | {by} |")
    swift_file = RESULTS / "mutation_swift.json"  # python -m benchmarks.mutation_swift
    if swift_file.exists():
        sw = json.loads(swift_file.read_text())
        sample = sw.get("sample") or {}
        swift_score = "n/a" if sw["score"] is None else f"{100 * sw['score']:.1f}%"
        equivalent = sw.get("equivalent", 0)
        skipped = sw.get("not_compiled_here", 0)
        lines += ["", "## Swift templates (`python -m benchmarks.mutation_swift`: compiled golden XCTests)", "",
                  f"{sw['mutants']} single-line mutants of the templated sources of an export"
                  + (f" ({skipped} more in `#if` branches this platform does not compile, not mutated)" if skipped
                     else "") + f"; {sample.get('size', 'all')} checked (seed {sample.get('seed', '-')}): killed "
                  f"{sw['killed']}, survived {sw['survived']} (equivalent {equivalent}), did not compile "
                  f"{sw['invalid']} (not counted); score killed / (killed + survived - equivalent) = {swift_score}.",
                  ""]
        for r in sw["results"]:
            by = f" by {', '.join(r['failed'])}" if r.get("failed") else ""
            status = f"equivalent ({r['equivalent']})" if r.get("equivalent") else r["status"]
            lines.append(f"- {status}{by}: `{r['file']}:{r['line']}` ({r['kind']}): `{r['new'].strip()}`")
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
        s.add_argument("--sample", type=int, default=0, help="check only this many mutants per module, drawn "
                       "at random (0: all)")
        s.add_argument("--seed", type=int, default=19, help="seed of the --sample draw")
    sub.add_parser("report")
    sub.add_parser("planted", help="plant the issue's product bugs by hand and check their tests fail")
    args = p.parse_args(argv)
    if args.cmd == "planted":
        return 0 if all(r["caught"] for r in planted()) else 1
    if args.cmd == "report":
        data = report()
        for module, m in data["modules"].items():
            print(module, "not run" if not m["measured"] else f"{m['score']} {m['counts']}")
        return 0
    unknown = set(args.modules) - set(MODULES)
    if unknown:
        p.error(f"unknown module(s) {', '.join(sorted(unknown))}; choose from {', '.join(MODULES)}")
    run(args.modules, args.budget, rerun=args.cmd == "rerun", sample=args.sample, seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
