"""Hostile outputs and write faults: every command that writes replaces only what mlx-video made, publishes
only finished and checked files, and leaves nothing behind on refusal, failure or SIGTERM/SIGHUP.

Each case checks the exit status (2 usage, 1 runtime, 128+signo interrupted), that stderr names the path
and holds no traceback, that no temporary (``.partial-`` / ``.old-`` / ``.tmp``) is left, and that the
user's files are byte-identical (devices, FIFOs and links included: ``snapshot`` records them with lstat).
Signals, ``ulimit -f`` and read-only folders (root without CAP_DAC_OVERRIDE, via setpriv) run in
subprocesses with bounded timeouts.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from mlx_video import fsio
from mlx_video.cli import main
from mlx_video.demo import build_demo_model
from mlx_video.video import VideoWriter, read_video

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--height", "32", "--width", "32", "--frames", "5", "--quiet", "--no-prompt-cache"]
SUBPROCESS_TIMEOUT = 60


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_demo_model(tmp_path_factory.mktemp("demo") / "model")


# ------------------------------------------------------------------------------------------- helpers


def snapshot(root: Path) -> dict:
    """Everything under ``root`` (and root itself), without following links: kind, mode and content."""
    out = {}
    for path in [root, *sorted(root.rglob("*"))] if root.is_dir() and not root.is_symlink() else [root]:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            value = ("link", os.readlink(path))
        elif stat.S_ISREG(st.st_mode):
            value = ("file", path.read_bytes())
        elif stat.S_ISDIR(st.st_mode):
            value = ("dir",)
        else:
            value = ("special", stat.S_IFMT(st.st_mode), st.st_rdev)
        out[str(path.relative_to(root.parent))] = (*value, stat.S_IMODE(st.st_mode), st.st_ino)
    return out


def debris(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".partial-" in p.name or ".old-" in p.name
                  or p.name.endswith(".tmp"))


def cli(argv, capsys) -> tuple[int, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse's own usage errors
        code = exc.code
    return code, capsys.readouterr().err


def generate(model, out, *extra):
    return ["generate", "--model", model, "--prompt", "a red fox", *SMALL, "--output", out, *extra]


def assert_refused(code, err, path, expect=2, text=None):
    assert code == expect, err
    assert "Traceback" not in err, err
    assert str(path) in err, err
    if text:
        assert text in err, err


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def python(script: str, *args, timeout=SUBPROCESS_TIMEOUT, prefix=(), stdout=subprocess.PIPE, **kw):
    cmd = [*prefix, sys.executable, "-c", textwrap.dedent(script), *map(str, args)]
    return subprocess.run(cmd, cwd=REPO, capture_output=stdout is subprocess.PIPE, text=True, timeout=timeout, **kw)


CLI_SCRIPT = "import sys, mlx_video; from mlx_video.cli import main; sys.exit(main(sys.argv[1:]))"


def _no_dac_override():
    if os.geteuid() != 0:
        return []
    if not shutil.which("setpriv"):
        pytest.skip("needs setpriv to drop CAP_DAC_OVERRIDE as root")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner,-linux_immutable", "--"]


# ----------------------------------------------------------------------------- generate: what it may replace


def test_output_is_an_existing_user_folder(model, tmp_path, capsys):
    docs = tmp_path / "Documents"
    docs.mkdir()
    (docs / "thesis.txt").write_text("years of work")
    (docs / "sub").mkdir()
    (docs / "sub" / "photo.png").write_bytes(b"\x89PNG not really")
    before = snapshot(docs)
    code, err = cli(generate(model, docs), capsys)
    assert_refused(code, err, docs, text="not a PNG-frames folder written by mlx-video")
    assert snapshot(docs) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Documents"]


def test_save_frames_into_an_existing_user_folder(model, tmp_path, capsys):
    pics = tmp_path / "Pictures"
    pics.mkdir()
    (pics / "holiday.jpg").write_bytes(b"\xff\xd8jpeg")
    before = snapshot(pics)
    code, err = cli(generate(model, tmp_path / "out.mp4", "--save-frames", pics), capsys)
    assert_refused(code, err, pics)
    assert snapshot(pics) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Pictures"]  # not even the MP4 was started


def test_output_is_a_character_device(model, tmp_path, capsys):
    dev = tmp_path / "null.mp4"
    try:
        os.mknod(dev, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # a private /dev/null: the real one stays safe
    except PermissionError:
        pytest.skip("mknod needs root")
    before = snapshot(dev)
    code, err = cli(generate(model, dev), capsys)
    assert_refused(code, err, dev, text="character device")
    assert snapshot(dev) == before and stat.S_ISCHR(os.lstat(dev).st_mode)
    assert debris(tmp_path) == []


def test_real_dev_null_is_refused_by_the_check():
    with pytest.raises(fsio.OutputRefused, match="/dev/null exists and is a character device"):
        fsio.check_file_target("/dev/null", "mp4")  # the check only: nothing is written near /dev


def test_output_is_a_fifo_and_nothing_blocks(model, tmp_path, capsys):
    fifo = tmp_path / "pipe.mp4"
    os.mkfifo(fifo)
    start = time.monotonic()
    code, err = cli(generate(model, fifo), capsys)
    assert time.monotonic() - start < 30
    assert_refused(code, err, fifo, text="FIFO")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and debris(tmp_path) == []


def test_output_is_a_symlink_to_a_user_file(model, tmp_path, capsys):
    precious = tmp_path / "precious.mp4"
    precious.write_bytes(b"\x00\x00\x00\x18ftypisom user's own video")
    link = tmp_path / "link.mp4"
    link.symlink_to(precious)
    before = snapshot(tmp_path)
    code, err = cli(generate(model, link), capsys)
    assert_refused(code, err, link, text="symbolic link")
    assert snapshot(tmp_path) == before


def test_frames_folder_is_a_symlink_to_a_user_folder(model, tmp_path, capsys):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("mine")
    (tmp_path / "frames").symlink_to(docs)
    before = snapshot(tmp_path)
    code, err = cli(generate(model, tmp_path / "out.mp4", "--save-frames", tmp_path / "frames"), capsys)
    assert_refused(code, err, tmp_path / "frames", text="symbolic link")
    assert snapshot(tmp_path) == before


def test_mp4_path_holds_a_user_document(model, tmp_path, capsys):
    doc = tmp_path / "notes.mp4"
    doc.write_text("not a video: my notes")
    before = snapshot(doc)
    code, err = cli(generate(model, doc), capsys)
    assert_refused(code, err, doc, text="is not an MP4 video")
    assert snapshot(doc) == before and debris(tmp_path) == []


def test_mp4_path_is_a_folder(model, tmp_path, capsys):
    folder = tmp_path / "clip.mp4"
    folder.mkdir()
    (folder / "x").write_text("x")
    before = snapshot(folder)
    code, err = cli(generate(model, folder), capsys)
    assert_refused(code, err, folder, text="is a folder")
    assert snapshot(folder) == before


def test_gif_path_holds_another_kind_of_file(model, tmp_path, capsys):
    gif = tmp_path / "out.gif"
    gif.write_bytes(b"\x89PNG\r\n\x1a\n a png named .gif")
    before = snapshot(gif)
    code, err = cli(generate(model, tmp_path / "out.mp4", "--gif"), capsys)
    assert_refused(code, err, gif, text="is not a GIF")
    assert snapshot(gif) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.gif"]


def test_metadata_sidecar_path_is_a_user_folder(model, tmp_path, capsys):
    side = tmp_path / "out.mp4.json"
    side.mkdir()
    (side / "keep").write_text("k")
    before = snapshot(side)
    code, err = cli(generate(model, tmp_path / "out.mp4"), capsys)
    assert_refused(code, err, side)
    assert snapshot(side) == before and not (tmp_path / "out.mp4").exists()  # refused before any work


def test_metadata_sidecar_path_is_a_symlink(model, tmp_path, capsys):
    target = tmp_path / "settings.json"
    target.write_text('{"mine": true}')
    (tmp_path / "out.mp4.json").symlink_to(target)
    before = snapshot(tmp_path)
    code, err = cli(generate(model, tmp_path / "out.mp4"), capsys)
    assert_refused(code, err, tmp_path / "out.mp4.json", text="symbolic link")
    assert snapshot(tmp_path) == before


def test_failure_report_path_holds_a_user_file(model, tmp_path, capsys):
    report = tmp_path / "out.mp4.failure.json"
    report.write_text("my own notes, not JSON")
    before = snapshot(report)
    code, err = cli(generate(model, tmp_path / "out.mp4"), capsys)
    assert_refused(code, err, report, text="not a JSON file")
    assert snapshot(report) == before and not (tmp_path / "out.mp4").exists()


def test_own_outputs_are_replaced_and_user_added_files_protect_a_frames_folder(model, tmp_path, capsys):
    out, frames = tmp_path / "out.mp4", tmp_path / "frames"
    assert cli(generate(model, out, "--seed", "1", "--save-frames", frames), capsys)[0] == 0
    manifest = json.loads((frames / fsio.FRAMES_MANIFEST).read_text())
    assert manifest["format"] == fsio.FRAMES_FORMAT and len(manifest["files"]) == 5
    first = read_video(out)
    assert cli(generate(model, out, "--seed", "2", "--save-frames", frames), capsys)[0] == 0  # ours: replaced
    assert not np.array_equal(first, read_video(out)) and read_video(frames).shape[0] == 5
    (frames / "my-edit.png").write_bytes(b"user work")
    before = snapshot(frames)
    code, err = cli(generate(model, out, "--seed", "3", "--save-frames", frames), capsys)
    assert_refused(code, err, frames, text="holds files mlx-video did not write (my-edit.png)")
    assert snapshot(frames) == before and debris(tmp_path) == []


def test_an_empty_folder_is_fine_and_a_missing_parent_is_a_usage_error(model, tmp_path, capsys):
    (tmp_path / "frames").mkdir()  # nothing in it to lose
    assert cli(generate(model, tmp_path / "out.mp4", "--save-frames", tmp_path / "frames"), capsys)[0] == 0
    assert read_video(tmp_path / "frames").shape[0] == 5
    missing = tmp_path / "no" / "such" / "out.mp4"
    code, err = cli(generate(model, missing), capsys)
    assert_refused(code, err, missing.parent, text="does not exist")
    assert not (tmp_path / "no").exists() and debris(tmp_path) == []


def test_video_writer_api_refuses_before_creating_anything(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a").write_text("a")
    before = snapshot(tmp_path)
    with pytest.raises(fsio.OutputRefused, match="docs already exists"):
        VideoWriter(docs)
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------------ model folders and other writers


def test_convert_into_a_user_folder(tmp_path, capsys):
    docs = tmp_path / "Documents"
    docs.mkdir()
    (docs / "cv.pdf").write_bytes(b"%PDF")
    before = snapshot(docs)
    code, err = cli(["convert", "--mlx-path", docs, "--sampler", "fewstep"], capsys)
    assert_refused(code, err, docs, text="not an mlx-video model folder")
    assert snapshot(docs) == before and debris(tmp_path) == []


def test_demo_over_a_symlink_to_a_model_folder(model, tmp_path, capsys):
    link = tmp_path / "model-link"
    link.symlink_to(model)
    before, model_before = snapshot(tmp_path), snapshot(model)
    code, err = cli(["demo", "--mlx-path", link], capsys)
    assert_refused(code, err, link, text="symbolic link")
    assert snapshot(tmp_path) == before and snapshot(model) == model_before


def test_demo_over_a_regular_file(tmp_path, capsys):
    f = tmp_path / "model"
    f.write_text("a file")
    code, err = cli(["demo", "--mlx-path", f], capsys)
    assert_refused(code, err, f, text="is a file, not a model folder")
    assert f.read_text() == "a file" and debris(tmp_path) == []


def test_export_swift_into_a_user_folder(model, tmp_path, capsys):
    out = tmp_path / "MyApp"
    out.mkdir()
    (out / "Package.swift").write_text("// the user's own package")
    before = snapshot(out)
    code, err = cli(["export-swift", model, out], capsys)
    assert_refused(code, err, out, text="not a previous export-swift output")
    assert snapshot(out) == before and debris(tmp_path) == []


def test_prune_torch_out_over_a_user_file(model, tmp_path, capsys):
    user = tmp_path / "weights.safetensors"
    user.write_bytes(b"user bytes")
    code, err = cli(["prune", "--model", model, "--mlx-path", tmp_path / "pruned", "--heads", "1",
                     "--torch-out", user], capsys)
    assert_refused(code, err, user, text="already exists")
    assert user.read_bytes() == b"user bytes" and sorted(p.name for p in tmp_path.iterdir()) == ["weights.safetensors"]


# ---------------------------------------------------------------------------- replacing folders: crashes


def _folder_with(tmp_path, name, files):
    d = tmp_path / name
    d.mkdir()
    for k, v in files.items():
        (d / k).write_text(v)
    return d


def test_crash_between_the_renames_restores_the_old_folder(tmp_path, monkeypatch):
    old = _folder_with(tmp_path, "target", {"a": "old"})
    new = _folder_with(tmp_path, ".target.partial-1-abcdef", {"a": "new"})
    before = snapshot(old)
    real_rename, calls = os.rename, []

    def failing_rename(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # old aside worked; new in fails
            raise OSError(28, "No space left on device")
        return real_rename(src, dst)

    monkeypatch.setattr(fsio.os, "rename", failing_rename)
    with pytest.raises(fsio.OutputError, match="previous version is unchanged"):
        fsio.replace_folder(new, old)
    monkeypatch.undo()
    assert snapshot(old) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [".target.partial-1-abcdef", "target"]


def test_failure_inside_atomic_model_folder_keeps_the_old_one(model, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(model, folder)
    before = snapshot(folder)
    with pytest.raises(RuntimeError, match="boom"):
        with fsio.atomic_model_folder(folder, replace=("dit.safetensors",)) as tmp:
            (tmp / "dit.safetensors").write_bytes(b"half")
            raise RuntimeError("boom")
    assert snapshot(folder) == before and debris(tmp_path) == []


def test_removal_failure_after_the_swap_is_reported_not_hidden(tmp_path, monkeypatch):
    target = _folder_with(tmp_path, "target", {"a": "old"})
    new = _folder_with(tmp_path, ".target.partial-1-abcdef", {"a": "new"})

    def rmtree_fails(path, *a, **k):
        raise OSError(13, "Permission denied", str(path))

    monkeypatch.setattr(fsio.shutil, "rmtree", rmtree_fails)
    with pytest.raises(fsio.OutputError) as exc:
        fsio.replace_folder(new, target)
    monkeypatch.undo()
    left = [p for p in tmp_path.iterdir() if ".old-" in p.name]
    assert len(left) == 1 and str(left[0]) in str(exc.value) and "Permission denied" in str(exc.value)
    assert (target / "a").read_text() == "new"


def test_read_only_folders_are_refused_before_anything_moves(model, tmp_path):
    """As root without CAP_DAC_OVERRIDE: replacing a read-only model folder, and writing into a read-only
    output folder, both exit 2 with nothing touched (previously: exit 0 and an .old-PID left)."""
    prefix = _no_dac_override()
    folder = tmp_path / "m"
    shutil.copytree(model, folder)
    ro_out = tmp_path / "ro"
    ro_out.mkdir()
    try:
        os.chmod(folder, 0o555)
        os.chmod(ro_out, 0o555)
        before = snapshot(tmp_path)
        demo = python(CLI_SCRIPT, "demo", "--mlx-path", folder, prefix=prefix)
        gen = python(CLI_SCRIPT, *generate(model, ro_out / "out.mp4"), prefix=prefix)
        assert snapshot(tmp_path) == before
    finally:
        os.chmod(folder, 0o755)
        os.chmod(ro_out, 0o755)
    assert_refused(demo.returncode, demo.stderr, folder, text="is read-only")
    assert_refused(gen.returncode, gen.stderr, ro_out, text="is not writable")
    assert debris(tmp_path) == []


# --------------------------------------------------------------------------------- failed video writes


def test_file_size_limit_during_encoding_publishes_nothing(model, tmp_path):
    out = tmp_path / "out.mp4"
    r = python(f"import resource; resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024)); {CLI_SCRIPT}",
               *generate(model, out))
    assert_refused(r.returncode, r.stderr, out, expect=1, text="file size limit exceeded")
    assert list(tmp_path.iterdir()) == []  # no MP4, no sidecar, no partial


def test_disk_full_keeps_the_previous_video(model, tmp_path, capsys):
    out = tmp_path / "out.mp4"
    assert cli(generate(model, out, "--seed", "4"), capsys)[0] == 0
    before = snapshot(tmp_path)
    r = subprocess.run(["bash", "-c", 'ulimit -f 1; exec "$@"', "bash", sys.executable, "-c", CLI_SCRIPT,
                        *map(str, generate(model, out, "--seed", "5"))],
                       cwd=REPO, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert_refused(r.returncode, r.stderr, out, expect=1, text="ffmpeg was killed by SIGXFSZ")
    assert snapshot(tmp_path) == before


def _fake_ffmpeg(tmp_path, monkeypatch, body: str):
    exe = tmp_path / "bin" / "ffmpeg"
    exe.parent.mkdir()
    exe.write_text("#!/bin/sh\n" + body + "\n")
    exe.chmod(0o755)
    import imageio_ffmpeg

    monkeypatch.setattr(imageio_ffmpeg, "get_ffmpeg_exe", lambda: str(exe))


def test_ffmpeg_exit_status_is_checked(model, tmp_path, monkeypatch, capsys):
    _fake_ffmpeg(tmp_path, monkeypatch, 'cat > /dev/null; echo "encoder exploded" >&2; exit 3')
    out = tmp_path / "v" / "out.mp4"
    out.parent.mkdir()
    code, err = cli(generate(model, out), capsys)
    assert_refused(code, err, out, expect=1, text="ffmpeg failed with exit status 3: encoder exploded")
    assert list(out.parent.iterdir()) == []


def test_truncated_file_from_a_successful_ffmpeg_is_not_published(model, tmp_path, monkeypatch, capsys):
    # exits 0 but writes only a header: the frame count check catches it
    # (the frame-count probe's output is "-", stdout: the fake writes only real output paths)
    _fake_ffmpeg(tmp_path, monkeypatch, 'cat > /dev/null; for a; do last="$a"; done; [ "$last" = - ] && exit 0; '
                 'printf "\\000\\000\\000\\030ftypisom\\000\\000\\002\\000" > "$last"; exit 0')
    out = tmp_path / "v" / "out.mp4"
    out.parent.mkdir()
    code, err = cli(generate(model, out), capsys)
    assert_refused(code, err, out, expect=1, text="truncated output")
    assert list(out.parent.iterdir()) == []


def test_metadata_write_failure_publishes_nothing_and_leaves_no_tmp(model, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out.mp4"
    real_open = open

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(28, "No space left on device")

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

    def full_open(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        return Full(f) if "w" in mode and str(path).endswith(".json") else f

    monkeypatch.setattr(fsio, "open", full_open, raising=False)
    code, err = cli(generate(model, out), capsys)
    assert_refused(code, err, tmp_path / "out.mp4.json", expect=1, text="No space left on device")
    assert list(tmp_path.iterdir()) == []  # the finished MP4 waited for its sidecar: neither appeared


def test_atomic_write_fault_leaves_the_old_file_and_no_tmp(tmp_path, monkeypatch):
    target = tmp_path / "report.json"
    target.write_text('{"old": 1}')

    def replace_fails(src, dst):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(fsio.os, "replace", replace_fails)
    with pytest.raises(fsio.OutputError, match="report.json.*Input/output error"):
        fsio.write_file(target, '{"new": 2}', "json")
    monkeypatch.undo()
    assert target.read_text() == '{"old": 1}' and debris(tmp_path) == []


# ---------------------------------------------------------------------------------------------- signals

SLOW_SCRIPT = """
import sys, time
import mlx_video
from mlx_video.cli import main
import {module} as m
real = m.{name}

def slow(*a, **k):
    out = real(*a, **k)
    print("WRITING", flush=True)
    time.sleep(60)
    return out

m.{name} = slow
sys.exit(main(sys.argv[1:]))
"""


def _default_termination_signals():
    # Ignored signals stay ignored across exec, and mlx-video leaves an ignored SIGHUP alone (it respects
    # `nohup`). So a suite started under nohup would hand the child an ignored SIGHUP: start it with the
    # defaults, as a user's shell does.
    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, signal.SIG_DFL)


def _signal_mid_write(argv, module, name, signo):
    script = SLOW_SCRIPT.format(module=module, name=name)
    p = subprocess.Popen([sys.executable, "-c", script, *map(str, argv)], cwd=REPO, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, preexec_fn=_default_termination_signals)
    try:
        ready, _, _ = select.select([p.stdout], [], [], SUBPROCESS_TIMEOUT)
        assert ready and p.stdout.readline().strip() == "WRITING", p.stderr.read() if not ready else ""
        p.send_signal(signo)
        _, err = p.communicate(timeout=SUBPROCESS_TIMEOUT)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return p.returncode, err


@pytest.mark.parametrize("signo", [signal.SIGTERM, signal.SIGHUP])
def test_signal_while_writing_frames_cleans_up(model, tmp_path, signo):
    out, frames = tmp_path / "out.mp4", tmp_path / "frames"
    code, err = _signal_mid_write(generate(model, out, "--save-frames", frames, "--gif"),
                                  "mlx_video.video", "VideoWriter.write", signo)
    assert code == 128 + signo, err
    assert f"interrupted by {signal.Signals(signo).name}" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_sigterm_in_the_python_api_removes_the_partial_video(tmp_path):
    """No CLI: the writer itself turns SIGTERM into an interrupt while it holds a temporary file."""
    out = tmp_path / "api.mp4"
    script = f"""
import time, numpy as np
import mlx_video
from mlx_video.video import VideoWriter
with VideoWriter({str(out)!r}) as w:
    w.write(np.random.default_rng(0).random((3, 32, 32, 3), dtype=np.float32))
    print("WRITING", flush=True)
    time.sleep(60)
"""
    p = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    try:
        ready, _, _ = select.select([p.stdout], [], [], SUBPROCESS_TIMEOUT)
        assert ready and p.stdout.readline().strip() == "WRITING"
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=SUBPROCESS_TIMEOUT)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode != 0 and "Interrupted: interrupted by SIGTERM" in err, err
    assert list(tmp_path.iterdir()) == []


def test_sigterm_while_building_a_model_folder_keeps_the_previous_one(model, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(model, folder)
    before = snapshot(folder)
    code, err = _signal_mid_write(["demo", "--mlx-path", folder], "mlx_video.utils", "save_weights",
                                  signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, err
    assert "interrupted by SIGTERM" in err and "Traceback" not in err
    assert snapshot(folder) == before and debris(tmp_path) == []


# ------------------------------------------------------------------------------------------ stale debris


def test_stale_partials_of_dead_processes_are_cleaned_on_the_next_run(model, tmp_path, capsys):
    pid = dead_pid()
    stale_file = tmp_path / f".out.mp4.partial-{pid}-abcdef.mp4"
    stale_file.write_bytes(b"half a video")
    stale_dir = tmp_path / f".frames.partial-{pid}-123abc"
    stale_dir.mkdir()
    (stale_dir / "frame_00000.png").write_bytes(b"png")
    legacy = tmp_path / f".model.partial-{pid}"  # the old atomic_model_folder name
    legacy.mkdir()
    (tmp_path / "kept").write_text("k")
    stale_old = tmp_path / f".kept.old-{pid}-0a0b0c"  # its target exists: the swap had finished
    stale_old.mkdir()
    assert cli(generate(model, tmp_path / "out.mp4"), capsys)[0] == 0
    assert debris(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept", "out.mp4", "out.mp4.json"]


def test_live_or_foreign_partials_are_left_alone(model, tmp_path, capsys):
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        live = tmp_path / f".out.mp4.partial-{sleeper.pid}-abcdef.mp4"
        live.write_bytes(b"another run is writing this")
        pid = dead_pid()
        unrelated = tmp_path / f".notes.partial-{pid}.txt.bak"  # not our pattern
        unrelated.write_text("user")
        tokenless = tmp_path / f".report.partial-{pid}"  # a file without our token: could be anyone's
        tokenless.write_text("user")
        link = tmp_path / f".x.partial-{pid}-abcdef"  # ours by name, but a link: never touched
        link.symlink_to(tmp_path / "elsewhere")
        foreign = tmp_path / f".y.partial-{pid}-abcdef"
        foreign.write_text("another user's")
        if os.geteuid() == 0:
            os.chown(foreign, 65534, 65534)
        before = snapshot(tmp_path)
        assert cli(generate(model, tmp_path / "out.mp4"), capsys)[0] == 0
        after = snapshot(tmp_path)
    finally:
        sleeper.kill()
        sleeper.wait()
    for name in (live, unrelated, tokenless, link, foreign):
        key = str(name.relative_to(tmp_path.parent))
        assert after[key] == before[key]


def test_interrupted_replace_is_rolled_back_on_the_next_run(model, tmp_path, capsys):
    """A SIGKILL between 'old aside' and 'new in' left only ``.frames.old-PID``: the next run puts it back."""
    pid = dead_pid()
    old = tmp_path / f".frames.old-{pid}-abcdef"
    old.mkdir()
    (old / "frame_00000.png").write_bytes(b"the user's previous frames")
    assert cli(generate(model, tmp_path / "out.mp4"), capsys)[0] == 0
    assert (tmp_path / "frames" / "frame_00000.png").read_bytes() == b"the user's previous frames"
    assert debris(tmp_path) == []
