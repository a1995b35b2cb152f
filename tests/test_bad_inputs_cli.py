"""Bad inputs through the command line: options, output paths, input images, checkpoints, the
prompt cache, a full disk and signals. Every user-caused problem must be one `error: ...` message
naming the file or option, exit status 2, no traceback, no partial or clobbered file -- and where
it can be, found before any weights load.

Most cases call `main()` in this process (the function the `nsarm` / `python -m nsarm_nodes`
entry points run); signals, resource limits, FIFOs and dropped privileges need a real subprocess.
"""
from __future__ import annotations

import os
import re
import resource
import shutil
import signal
import stat
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import DEMO_IMAGE, GOLDEN
from nsarm_nodes.__main__ import main, output_paths, save_image
from nsarm_nodes.loading import CheckpointError
from nsarm_nodes.testing import make_tiny_models
from nsarm_nodes.text import PromptCache, PromptEmbeds

ROOT = Path(__file__).resolve().parents[1]


def cli(*args) -> tuple[int, str, str]:
    """Run main() in-process; (exit status, stdout, stderr)."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def assert_user_error(result, *needles: str) -> str:
    code, _, err = result
    assert code == 2, err
    assert "Traceback" not in err, err
    message = err.strip()
    assert message.startswith("error: "), message
    for needle in needles:
        assert needle in message, (needle, message)
    return message


def subprocess_cli(*args, timeout=120, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "nsarm_nodes", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, **kwargs)


def png(path: Path, size=(64, 48), mode="RGB") -> Path:
    rng = np.random.default_rng(0)
    arr = (rng.random((size[1], size[0], len(mode))) * 255).astype(np.uint8)
    Image.fromarray(arr[..., 0] if mode == "L" else arr, mode).save(path)
    return path


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width x height (8-bit RGB) and whose data is a few bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                     + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    make_tiny_models(root, seed=0)
    return root


# --------------------------------------------------------------------------------------------
# Options: checked before anything loads, one line naming the option

@pytest.mark.parametrize("argv, flag", [
    (["--tile-batch-size", "0"], "--tile-batch-size"),
    (["--output-scale", "0"], "--output-scale"),
    (["--output-scale", "-2"], "--output-scale"),
    (["--output-scale", "nan"], "--output-scale"),
    (["--output-scale", "1e9"], "--output-scale"),
    (["--top-p", "5"], "--top-p"),
    (["--tau", "inf"], "--tau"),
    (["--cfg", "-1"], "--cfg"),
    (["--seed", "-1"], "--seed"),
    (["--seed", str(2**64)], "--seed"),
    (["--seed", "1.5"], "--seed"),
    (["--overlap", "129"], "--overlap"),
    (["--max-tiles", "0"], "--max-tiles"),
    (["--max-pixels", "0"], "--max-pixels"),
    (["--device", "banana"], "--device"),
    (["--device", "cuda:99"], "--device"),
    (["--dtype", "fp64"], "--dtype"),
    (["--color-fix", "magic"], "--color-fix"),
    (["--blend", "soft"], "--blend"),
    (["--tiling", "diagonal"], "--tiling"),
])
def test_upscale_options_are_checked_first(argv, flag, tmp_path):
    # the models folder does not exist: an option checked late would report missing weights instead
    message = assert_user_error(cli("upscale", png(tmp_path / "in.png"), "--models", tmp_path / "none", *argv),
                                f"argument {flag}:")
    assert message.count("\n") == 0
    assert list(tmp_path.iterdir()) == [tmp_path / "in.png"]


@pytest.mark.parametrize("argv, flag", [
    (["queue", "wf.json", "--out", "o", "--timeout", "0"], "--timeout"),
    (["queue", "wf.json", "--out", "o", "--timeout", "nan"], "--timeout"),
    (["queue", "wf.json", "--out", "o", "--server", "http://127.0.0.1:99999"], "--server"),
    (["queue", "wf.json", "--out", "o", "--server", "http://127.0.0.1:0"], "--server"),
    (["queue", "wf.json", "--out", "o", "--server", "ftp://example.org"], "--server"),
    (["queue", "wf.json", "--out", "o", "--server", "http://h:8188/?x=1"], "--server"),
    (["make-test-models", "m", "--seed", "-3"], "--seed"),
    (["run", "wf.json", "-o", "o", "--max-pixels", "-1"], "--max-pixels"),
    (["upscale-dir", "in", "out", "--models", "m", "--ray", "--workers", "0"], "--workers"),
    (["upscale-dir", "in", "out", "--models", "m", "--ray", "--gpus-per-worker", "2"], "--gpus-per-worker"),
    (["upscale-dir", "in", "out", "--models", "m", "--ray", "--gpus-per-worker", "0"], "--gpus-per-worker"),
    (["upscale-dir", "in", "out", "--models", "m", "--ray", "--cpus-per-worker", "nan"], "--cpus-per-worker"),
    (["upscale-dir", "in", "out", "--models", "m", "--ray", "4"], "--ray"),  # meant --workers 4
    (["upscale-dir", "in", "out", "--models", "m", "--ray=ray://"], "--ray"),
    (["upscale-dir", "in", "out", "--models", "m", "--tau", "nan"], "--tau"),
    (["upscale-dir", "in", "out", "--models", "m", "--tiling", "Shared"], "--tiling"),
    (["upscale-dir", "in", "out", "--models", "m", "--max-pixels", "0"], "--max-pixels"),
])
def test_other_commands_check_their_options(argv, flag, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_user_error(cli(*argv), f"argument {flag}:")
    assert not any(tmp_path.iterdir())


def test_help_shows_defaults_and_bounds():
    code, out, _ = cli("upscale", "--help")
    assert code == 0
    flat = " ".join(out.split())
    for text in ("--tile-batch-size N tiles per transformer pass (faster, more VRAM) (1..64) (default: 1)",
                 "(default: auto)", "--top-p X", "(0.5..1) (default: 0.97)", "--max-pixels N"):
        assert text in flat, text
    code, out, _ = cli("make-test-models", "--help")
    assert code == 0 and "--seed N seed of the random tiny weights" in " ".join(out.split()) and "(default: 0)" in out


# --------------------------------------------------------------------------------------------
# Output paths: checked before any weights load

def test_output_path_problems_are_found_before_loading(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src = png(tmp_path / "in.png")
    (tmp_path / "afile").write_text("x")
    none = tmp_path / "no-models"
    cases = [
        (["-o", "afile/out.png"], ["afile is a file, not a folder"]),
        (["-o", "afile/sub/out.png"], ["afile is a file, not a folder"]),
        (["-o", "out.xyz"], ["unknown image extension '.xyz'"]),
        (["-o", "in.png"], ["already exists", "--overwrite"]),
    ]
    os.mkfifo(tmp_path / "fifo.png")
    cases.append((["-o", "fifo.png", "--overwrite"], ["not a regular file"]))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "in_nsarm.png").mkdir()
    cases.append((["-o", "taken", "--overwrite"], ["in_nsarm.png: is an existing folder"]))
    for argv, needles in cases:
        assert_user_error(cli("upscale", src, "--models", none, *argv), *needles)
    # an existing folder is a folder: the output check passes and the missing weights are next
    assert_user_error(cli("upscale", src, "--models", none, "-o", tmp_path, "--overwrite"), "NSARM weights missing")
    assert_user_error(cli("upscale", src, "--models", none, "-o", "new.jpg"), "NSARM weights missing")
    assert not (tmp_path / "new.jpg").exists() and not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_several_inputs_onto_one_name_are_refused(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, b = png(tmp_path / "a" / "x.png"), png(tmp_path / "b" / "x.png")
    none = tmp_path / "no-models"
    assert_user_error(cli("upscale", a, b, "-o", tmp_path / "out", "--overwrite", "--models", none),
                      "would both be written to", "x_nsarm.png")
    assert_user_error(cli("upscale", a, a, "-o", tmp_path / "out", "--models", none), "would both be written")
    assert_user_error(cli("upscale", a, b, "-o", tmp_path / "one.png", "--models", none), "need an output folder")
    assert not (tmp_path / "out").exists()
    # distinct names go through (to the missing weights)
    assert output_paths([a, tmp_path / "b" / "y.png"], str(tmp_path / "out"), False) == [
        tmp_path / "out" / "x_nsarm.png", tmp_path / "out" / "y_nsarm.png"]


def test_unwritable_output_folder_is_found_before_loading(tmp_path):
    """Folders where files cannot be created: sysfs (refuses new files even to root) and, unless
    running as root (which ignores permissions), a read-only folder."""
    src = png(tmp_path / "in.png")
    unwritable = [Path("/sys")]
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        unwritable.append(locked)
    try:
        for folder in unwritable:
            message = assert_user_error(cli("upscale", src, "-o", folder / "out.png", "--models", tmp_path / "none"),
                                        f"cannot create files in {folder}", "permission denied")
            assert message.count("\n") == 0
            assert_user_error(cli("queue", ROOT / "workflows/api/nsarm_upscale_api.json", "--out", folder / "dl",
                                  "--server", "http://127.0.0.1:9"), "--out", f"cannot create files in {folder}")
            assert_user_error(cli("make-test-models", folder / "m"), f"cannot create files in {folder}")
    finally:
        if os.geteuid() != 0:
            os.chmod(tmp_path / "locked", 0o755)
    assert not (tmp_path / "locked").exists() or os.listdir(tmp_path / "locked") == []


def test_output_problems_of_the_other_commands(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("x")
    wf = ROOT / "workflows" / "api" / "nsarm_upscale_api.json"
    assert_user_error(cli("queue", wf, "--out", "afile", "--server", "http://127.0.0.1:9"),
                      "--out afile: is a file, not a folder")
    assert_user_error(cli("queue", wf, "--out", "afile/dl", "--server", "http://127.0.0.1:9"), "afile is a file")
    assert_user_error(cli("make-test-models", "afile"), "is a file, not a folder")
    assert_user_error(cli("make-test-models", "afile/models"), "afile is a file")
    assert_user_error(cli("convert", GOLDEN / "weights_transformer.safetensors", "-o", "afile/x.safetensors"),
                      "afile is a file")
    assert_user_error(cli("convert", GOLDEN / "weights_transformer.safetensors", "-o", "afile"),
                      "must be a .safetensors file")
    (tmp_path / "x.safetensors").write_text("mine")
    assert_user_error(cli("convert", GOLDEN / "weights_transformer.safetensors", "-o", "x.safetensors"),
                      "already exists")
    assert (tmp_path / "x.safetensors").read_text() == "mine"
    assert_user_error(cli("run", wf, "-o", "out.jpg"), "run writes PNG files")
    assert_user_error(cli("run", wf, "-o", "afile/out.png"), "afile is a file")
    (tmp_path / "out.png").write_text("mine")
    assert_user_error(cli("run", wf, "-o", "out.png"), "already exists")
    assert (tmp_path / "out.png").read_text() == "mine"


def test_make_test_models_never_replaces_other_files(tmp_path):
    real = tmp_path / "models" / "text_encoders" / "flan-t5-xl"
    real.mkdir(parents=True)
    (real / "model.safetensors").write_text("9 GB of real weights")
    assert_user_error(cli("make-test-models", tmp_path / "models"), "flan-t5-xl: already exists", "--overwrite")
    assert (real / "model.safetensors").read_text() == "9 GB of real weights"
    assert not (tmp_path / "models" / "nsarm").exists()


def test_make_test_models_released_names_are_ours_or_left_alone(tmp_path):
    """The tiny weights under the released .pth names (which the shipped workflows load) hold the same
    tensors as the safetensors; a user's NSARM.pth is never replaced without overwrite; a folder made
    before the .pth names existed is completed without rewriting its other files."""
    from nsarm_nodes.loading import read_checkpoint, unwrap

    root = tmp_path / "m"
    (root / "nsarm").mkdir(parents=True)
    real = root / "nsarm" / "NSARM.pth"
    real.write_bytes(b"35 GB of real weights")
    with pytest.raises(FileExistsError) as exc:
        make_tiny_models(root)
    assert exc.value.filename == str(real) and real.read_bytes() == b"35 GB of real weights"
    assert [p.name for p in root.rglob("*")] == ["nsarm", "NSARM.pth"]
    real.unlink()
    paths = make_tiny_models(root)
    for role in ("transformer", "vae"):
        pth = unwrap(read_checkpoint(paths[f"{role} (released name)"]), (), "pth")
        st = load_file(str(paths[role]))
        assert set(pth) == set(st) and all(torch.equal(pth[k], st[k]) for k in st)
    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    assert make_tiny_models(root) == paths  # the same seed's models are there: nothing is written
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == stamps
    paths["vae (released name)"].unlink()
    make_tiny_models(root)
    assert paths["vae (released name)"].is_file()
    stamps.pop(paths["vae (released name)"])
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file() and p in stamps} == stamps
    with pytest.raises(FileExistsError):
        make_tiny_models(root, seed=1)  # another seed's models are not ours to replace


def test_saved_images_follow_the_extension_and_the_umask(tmp_path):
    img = torch.rand(40, 50, 3)
    old = os.umask(0o027)
    try:
        for name, magic in (("a.png", b"\x89PNG"), ("a.jpg", b"\xff\xd8\xff"), ("a.JPEG", b"\xff\xd8\xff"),
                            ("a.tiff", b"II*\x00"), ("a.bmp", b"BM")):
            save_image(img, tmp_path / name, overwrite=False)
            assert (tmp_path / name).read_bytes()[:len(magic)] == magic, name
            assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o640, name
    finally:
        os.umask(old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.JPEG", "a.bmp", "a.jpg", "a.png", "a.tiff"]


def test_a_failing_write_leaves_nothing_and_names_the_file(tmp_path, monkeypatch):
    import errno

    from nsarm_nodes import images

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(images.os, "fsync", full)
    target = tmp_path / "out.png"
    with pytest.raises(OSError) as exc:
        save_image(torch.rand(8, 8, 3), target, overwrite=True)
    assert exc.value.filename == str(target) and exc.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []
    from nsarm_nodes.__main__ import _message

    assert _message(exc.value) == f"{target}: no space left on the device; free some space or choose another output path"


# --------------------------------------------------------------------------------------------
# Input images

def test_bad_input_images_are_named(tmp_path):
    none = tmp_path / "no-models"
    good = png(tmp_path / "good.png")
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "empty.png").write_bytes(b"")
    data = (tmp_path / "good.png").read_bytes()
    big = png(tmp_path / "big.png", size=(256, 256))
    (tmp_path / "truncated.png").write_bytes(big.read_bytes()[: len(big.read_bytes()) // 2])
    (tmp_path / "folder.png").mkdir()
    png_header_only(tmp_path / "bomb.png", 100_000, 100_000)
    png_header_only(tmp_path / "large.png", 8000, 8000)
    cases = {
        "missing.png": ["missing.png: input image not found"],
        "text.png": ["text.png: not an image file"],
        "empty.png": ["empty.png: not an image file"],
        "truncated.png": ["truncated.png: unreadable image data", "truncated"],
        "folder.png": ["folder.png: a folder, not an image file"],
        "bomb.png": ["bomb.png", "10,000,000,000 pixels", "limit of 50,000,000", "--max-pixels 10000000000"],
        "large.png": ["large.png", "8000x8000 = 64,000,000 pixels", "--max-pixels 64000000"],
    }
    for name, needles in cases.items():
        assert_user_error(cli("upscale", good, tmp_path / name, "-o", tmp_path / "o", "--models", none), *needles)
    assert_user_error(cli("upscale", "/dev/null", "--models", none, "-o", tmp_path / "x.png"), "a character device")
    # raising the limit lets the header pass; the (fake) data then fails to decode, still named
    assert_user_error(cli("upscale", tmp_path / "large.png", "--max-pixels", "64000000", "-o", tmp_path / "x.png",
                          "--models", none), "large.png: unreadable image data")
    assert data == (tmp_path / "good.png").read_bytes() and not (tmp_path / "o").exists()


def test_fifo_input_is_refused_without_hanging(tmp_path):
    os.mkfifo(tmp_path / "pipe.png")
    t0 = time.monotonic()
    r = subprocess_cli("upscale", tmp_path / "pipe.png", "-o", tmp_path / "x.png", "--models", tmp_path, timeout=60)
    assert r.returncode == 2 and "pipe.png: a FIFO (named pipe), not an image file" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and time.monotonic() - t0 < 60


def test_16_bit_exif_and_alpha_are_read_like_comfyui(tmp_path):
    from nsarm_nodes.images import read_image
    from nsarm_nodes.runner import LoadImage, _RunContext

    ramp = np.linspace(0, 65535, 32 * 16).reshape(16, 32).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")  # 16-bit grayscale (mode I;16)
    with Image.open(tmp_path / "deep.png") as im:
        assert im.mode.startswith("I")
    got = read_image(tmp_path / "deep.png", 10**6)
    assert got.shape == (1, 16, 32, 3)
    assert torch.allclose(got[0, ..., 1], torch.from_numpy(ramp / 65535).float(), atol=1e-6)  # not clipped white

    arr = np.zeros((20, 30, 3), np.uint8)
    arr[:4, :4] = (255, 0, 0)  # a red block at the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the camera was turned; display rotated 90 degrees clockwise
    Image.fromarray(arr).save(tmp_path / "turned.jpg", exif=exif.tobytes(), quality=100, subsampling=0)
    rot = read_image(tmp_path / "turned.jpg", 10**6)
    assert rot.shape == (1, 30, 20, 3)  # width and height swapped, as displayed
    assert rot[0, 1, -2, 0] > 0.8 and rot[0, 1, 1, 0] < 0.2  # the red corner moved to the top right

    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 1] = 200
    rgba[..., 3] = np.arange(8, dtype=np.uint8)[None, :] * 30
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    rgb = read_image(tmp_path / "alpha.png", 10**6)
    assert torch.allclose(rgb[0, ..., 1], torch.full((8, 8), 200 / 255))  # alpha dropped, not composited
    ctx = _RunContext(tmp_path, tmp_path, None, {}, None)
    image, mask = LoadImage(ctx).load_image("alpha.png")
    assert torch.equal(image, rgb) and torch.allclose(mask[0], 1 - torch.from_numpy(rgba[..., 3] / 255).float())


# --------------------------------------------------------------------------------------------
# Checkpoints and the prompt cache through the CLI

def _models_with(models: Path, dest: Path, transformer: Path | None = None, vae: Path | None = None) -> Path:
    (dest / "nsarm").mkdir(parents=True)
    shutil.copytree(models / "text_encoders", dest / "text_encoders")
    if transformer is None:
        shutil.copy(models / "nsarm" / "NSARM.safetensors", dest / "nsarm")
    else:
        shutil.copy(transformer, dest / "nsarm" / "NSARM.pth")
    if vae is None:
        shutil.copy(models / "nsarm" / "infinity_vae_d56_f8_14_patchify.safetensors", dest / "nsarm")
    else:
        shutil.copy(vae, dest / "nsarm" / "infinity_vae_d56_f8_14_patchify.pth")
    return dest


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_damaged_checkpoints_are_one_line_errors(models, tmp_path):
    src = png(tmp_path / "in.png", size=(32, 32))
    marker = tmp_path / "PWNED"
    sd = load_file(str(models / "nsarm" / "NSARM.safetensors"))
    files = tmp_path / "files"
    files.mkdir()
    (files / "zero.pth").write_bytes(b"")
    (files / "html.pth").write_text("<!DOCTYPE html><html><body>Google Drive can't scan this file</body></html>")
    (files / "text.pth").write_text("hello\n")
    torch.save({"x": _Evil(marker)}, files / "evil.pth")
    torch.save({k: v for k, v in sd.items() if k != "text_norm.weight"}, files / "nokey.pth")
    torch.save(sd, files / "full.pth")
    full = (files / "full.pth").read_bytes()
    (files / "truncated.pth").write_bytes(full[: len(full) // 3])
    vae = load_file(str(models / "nsarm" / "infinity_vae_d56_f8_14_patchify.safetensors"))
    key = "encoder.conv_in.conv.weight"
    torch.save({**vae, key: torch.zeros(vae[key].shape[0], 4, 3, 3)}, files / "vae_4ch.pth")
    cases = {
        "zero.pth": (dict(transformer=files / "zero.pth"), ["NSARM.pth: the file is empty (0 bytes)"]),
        "html.pth": (dict(transformer=files / "html.pth"), ["this is a web page, not a checkpoint"]),
        "text.pth": (dict(transformer=files / "text.pth"), ["not a PyTorch checkpoint"]),
        "evil.pth": (dict(transformer=files / "evil.pth"), ["refusing to load", "code execution"]),
        "nokey.pth": (dict(transformer=files / "nokey.pth"), ["tensor text_norm.weight is missing"]),
        "truncated.pth": (dict(transformer=files / "truncated.pth"), ["not a readable PyTorch checkpoint"]),
        "vae_4ch.pth": (dict(vae=files / "vae_4ch.pth"),
                        ["infinity_vae_d56_f8_14_patchify.pth", key, "[32, 4, 3, 3], expected [32, 3, 3, 3]"]),
        "swapped": (dict(transformer=models / "nsarm" / "infinity_vae_d56_f8_14_patchify.pth",
                         vae=models / "nsarm" / "NSARM.pth"), ["checkpoint and vae are swapped", "other way round"]),
    }
    for name, (kind, needles) in cases.items():
        folder = _models_with(models, tmp_path / name, **kind)
        assert_user_error(cli("upscale", src, "-o", tmp_path / f"{name}.png", "--models", folder), *needles)
        assert not (tmp_path / f"{name}.png").exists()
    assert not marker.exists()


def test_pickled_text_encoder_weights_are_refused_with_the_fix(models, tmp_path):
    folder = _models_with(models, tmp_path / "m")
    t5 = folder / "text_encoders" / "flan-t5-xl"
    (t5 / "model.safetensors").unlink()
    marker = tmp_path / "PWNED"
    torch.save({"shared.weight": _Evil(marker)}, t5 / "pytorch_model.bin")
    message = assert_user_error(cli("upscale", png(tmp_path / "in.png", (32, 32)), "-o", tmp_path / "o.png",
                                    "--models", folder), "pytorch_model.bin: refusing to load",
                                "use the safetensors weights instead")
    assert message.count("\n") == 0 and not marker.exists()


def test_bad_prompt_cache_entries(models, tmp_path):
    folder = _models_with(models, tmp_path / "m")
    cache = PromptCache(folder / "nsarm_prompt_cache")
    from nsarm_nodes.config import DEFAULT_PROMPT

    cache.put(PromptEmbeds.from_lengths(torch.full((5, 256), float("nan")), [5], [DEFAULT_PROMPT]), "some-encoder")
    code, _, err = cli("upscale", png(tmp_path / "in.png", (32, 32)), "-o", tmp_path / "o.png", "--models", folder,
                       "--cached-prompts-only")
    warning, _, error = err.partition("error: ")
    assert warning.startswith("warning: prompt cache: ignoring") and warning.count("\n") == 1
    assert_user_error((code, "", "error: " + error), "not in the prompt cache", "the cached entry is unusable",
                      "NaN or infinite")
    assert not (tmp_path / "o.png").exists()


# --------------------------------------------------------------------------------------------
# Full disk, signals (real processes)

def _file_size_limit(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_full_disk_while_writing_leaves_no_partial_file(tmp_path):
    r = subprocess_cli("convert", GOLDEN / "weights_transformer.safetensors", "-o", tmp_path / "x.safetensors",
                       preexec_fn=_file_size_limit(1_000_000))
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'x.safetensors'}: File too large"
    assert "Traceback" not in r.stderr and list(tmp_path.iterdir()) == []
    r = subprocess_cli("make-test-models", tmp_path / "m", preexec_fn=_file_size_limit(1_000_000))
    assert r.returncode == 2 and "File too large" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert [p for p in (tmp_path / "m").rglob("*") if p.is_file()] == []


def _wait_for(stream, needle: str, seconds: float) -> str:
    """Read `stream` line by line until a line contains `needle` (in a thread, with a deadline)."""
    seen: list[str] = []
    done = threading.Event()

    def read():
        for line in stream:
            seen.append(line)
            if needle in line:
                done.set()
                return
        done.set()

    threading.Thread(target=read, daemon=True).start()
    assert done.wait(seconds), "".join(seen)
    return "".join(seen)


def test_signals_stop_cleanly(models, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # Ctrl-C while the command starts (torch is being imported): one line, status 130
    p = subprocess.Popen([sys.executable, "-m", "nsarm_nodes", "upscale", DEMO_IMAGE, "-o", tmp_path / "a.png",
                          "--models", models], stderr=subprocess.PIPE, text=True, env=env)
    time.sleep(0.4)
    p.send_signal(signal.SIGINT)
    err = p.communicate(timeout=60)[1]
    assert p.returncode == 130, err
    assert err.strip() == "interrupted (Ctrl-C); nothing was left half-written"
    # SIGTERM in the middle of a workflow run writing one PNG: status 143, no staging folder, no output
    out = tmp_path / "run" / "b.png"
    p = subprocess.Popen([sys.executable, "-m", "nsarm_nodes", "run", ROOT / "workflows" / "nsarm_upscale.json",
                          "--input", DEMO_IMAGE, "-o", out, "--models", models,
                          "--set", "NSARMModelLoader.checkpoint=NSARM.safetensors",
                          "--set", "NSARMModelLoader.vae=infinity_vae_d56_f8_14_patchify.safetensors"],
                         stderr=subprocess.PIPE, text=True, env=env)
    before = _wait_for(p.stderr, "(NSARMUpscale) ...", 120)
    p.send_signal(signal.SIGTERM)
    rest = p.communicate(timeout=60)[1]
    assert p.returncode == 143, before + rest
    assert rest.strip().endswith("interrupted (SIGTERM); nothing was left half-written")
    assert "Traceback" not in before + rest
    assert list(out.parent.iterdir()) == []  # no .nsarm-run-* staging folder, no partial PNG


# --------------------------------------------------------------------------------------------
# Checkpoint contents: unexpected keys, NaN / inf weights, key coverage in check-models


def test_unexpected_keys_warn_and_strict_refuses(models, tmp_path):
    """Upstream loads NSARM.pth with strict=False: training leftovers in a file are ignored with one
    warning naming how many and the first few; --strict refuses; check-models reports it."""
    src = png(tmp_path / "in.png", size=(32, 32))
    sd = load_file(str(models / "nsarm" / "NSARM.safetensors"))
    extras = {f"optimizer.state.{i}.exp_avg": torch.zeros(3) for i in range(12)}
    torch.save({**sd, **extras}, tmp_path / "extra.pth")
    folder = _models_with(models, tmp_path / "m", transformer=tmp_path / "extra.pth")
    code, out, err = cli("check-models", "--models", folder)
    assert code == 0, err
    assert "NSARM.pth" in out and "loads with a warning: 12 unexpected key(s): optimizer.state.0.exp_avg" in out
    assert "(+4 more)" in out and "all keys match" in out  # the VAE line
    code, _, err = cli("upscale", src, "-o", tmp_path / "ok.png", "--models", folder)
    assert code == 0, err
    warning = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert len(warning) == 1 and "NSARM.pth: ignoring tensors the transformer does not use: 12 unexpected" in warning[0]
    assert (tmp_path / "ok.png").is_file()
    assert_user_error(cli("upscale", src, "-o", tmp_path / "strict.png", "--models", folder, "--strict"),
                      "NSARM.pth: does not fit the transformer: 12 unexpected key(s)", "load without strict")
    assert not (tmp_path / "strict.png").exists()
    # convert leaves them out the same way (one warning; --strict refuses, writing nothing)
    code, _, err = cli("convert", tmp_path / "extra.pth", "-o", tmp_path / "clean.safetensors")
    assert code == 0, err
    (note,) = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert "extra.pth: ignoring tensors the transformer does not use: 12 unexpected key(s)" in note
    assert set(load_file(str(tmp_path / "clean.safetensors"))) == set(sd)
    assert_user_error(cli("convert", tmp_path / "extra.pth", "-o", tmp_path / "strict.safetensors", "--strict"),
                      "extra.pth: does not fit the transformer: 12 unexpected key(s)", "load without strict")
    assert not (tmp_path / "strict.safetensors").exists()


def test_check_models_reports_key_coverage_from_the_headers(models, tmp_path, monkeypatch):
    sd = load_file(str(models / "nsarm" / "NSARM.safetensors"))
    torch.save({k: v for k, v in sd.items() if k != "head.bias"}, tmp_path / "nohead.pth")
    folder = _models_with(models, tmp_path / "m", transformer=tmp_path / "nohead.pth")
    def no_reads(*a, **k):
        raise AssertionError("check-models loaded a model")

    for module in ("nsarm_nodes.transformer", "nsarm_nodes.vae"):  # no model is loaded
        monkeypatch.setattr(f"{module}.materialize", no_reads)
    code, out, err = cli("check-models", "--models", folder)
    assert code == 2, (out, err)
    assert "BAD transformer" in out and "1 missing key(s): head.bias" in out
    code, out, _ = cli("check-models", "--models", models)  # every accepted name, the loaded one first
    assert code == 0 and out.count("keys: all keys match") == 4, out
    assert out.count("not used: ") == 2 and "GB, pth; not used: NSARM.safetensors is preferred)" in out


def _with_bad_value(sd: dict, key: str, value: float) -> dict:
    bad = {k: v.clone() for k, v in sd.items()}
    bad[key].view(-1)[bad[key].numel() // 2] = value
    return bad


def test_non_finite_weights_are_refused_naming_file_and_key(models, tmp_path):
    src = png(tmp_path / "in.png", size=(32, 32))
    sd = load_file(str(models / "nsarm" / "NSARM.safetensors"))
    vae = load_file(str(models / "nsarm" / "infinity_vae_d56_f8_14_patchify.safetensors"))
    block = "block_chunks.1.module.0.ffn.fc1.weight"
    torch.save(_with_bad_value(sd, block, float("nan")), tmp_path / "nan.pth")
    torch.save(_with_bad_value(sd, "map_transformer.output_projs.3.0.weight", float("inf")), tmp_path / "inf.pth")
    torch.save(_with_bad_value(sd, block, 1e6), tmp_path / "big.pth")  # finite, beyond fp16
    torch.save(_with_bad_value(vae, "decoder.conv_out.conv.weight", float("-inf")), tmp_path / "vae.pth")
    cases = [
        (dict(transformer=tmp_path / "nan.pth"), [], ["NSARM.pth: tensor " + block, "1 NaN/inf value(s)",
                                                      "download it again"]),
        (dict(transformer=tmp_path / "inf.pth"), [], ["NSARM.pth: tensor map_transformer.output_projs.3.0.weight",
                                                      "NaN/inf"]),
        (dict(vae=tmp_path / "vae.pth"), [], ["infinity_vae_d56_f8_14_patchify.pth: tensor decoder.conv_out",
                                              "BSQ-VAE", "NaN/inf"]),
        (dict(transformer=tmp_path / "big.pth"), ["--dtype", "fp16"], [
            "NSARM.pth: tensor " + block, "overflows float16", "1e+06", "bf16 or fp32"]),
    ]
    for i, (kind, flags, needles) in enumerate(cases):
        folder = _models_with(models, tmp_path / f"m{i}", **kind)
        assert_user_error(cli("upscale", src, "-o", tmp_path / f"{i}.png", "--models", folder, *flags), *needles)
        assert not (tmp_path / f"{i}.png").exists()
    # the finite big value loads in fp32 and bf16 (the check is on the converted tensor)
    from nsarm_nodes import load_transformer

    for dtype in (torch.float32, torch.bfloat16):
        assert load_transformer(tmp_path / "big.pth", dtype=dtype).state_dict()[block].abs().max() == 1e6


def test_every_loaded_tensor_is_checked_once_as_it_is_read(models, monkeypatch):
    """The finiteness check runs in the loading pass itself: once per floating-point tensor of the
    transformer (block-quantised weights before quantisation) and of the VAE, never a second pass."""
    from nsarm_nodes import load_transformer, load_vae, loading

    checked: list[tuple[tuple[int, ...], torch.dtype]] = []
    original = loading._all_finite

    def spy(t):
        checked.append((tuple(t.shape), t.dtype))
        return original(t)

    monkeypatch.setattr(loading, "_all_finite", spy)
    sd = load_file(str(models / "nsarm" / "NSARM.safetensors"))
    for fmt in ("dense", "q8_0"):
        checked.clear()
        model = load_transformer(models / "nsarm" / "NSARM.safetensors", weight_format=fmt)
        names = [n.removesuffix(".packed") + ".weight" if n.endswith(".packed") else n for n in model.state_dict()]
        floats = [n for n in names if n in sd and sd[n].is_floating_point()]
        assert len(checked) == len(floats) + sum(n.endswith("zero_k_bias") for n in names if n not in sd), fmt
        assert all(dtype in (torch.float32, torch.bfloat16) for _, dtype in checked)  # never the packed q8_0 blocks
    checked.clear()
    vae = load_vae(models / "nsarm" / "infinity_vae_d56_f8_14_patchify.safetensors")
    assert len(checked) == sum(t.is_floating_point() for t in vae.state_dict().values())
    monkeypatch.setattr(loading, "_all_finite", original)
    # a NaN anywhere, including a weight the q8_0 format quantises, is named
    groups = ["text_norm.weight", "word_embed.weight", "head.weight", "cfg_uncond",
              "block_chunks.0.module.0.sa.mat_qkv.weight", "block_chunks.1.module.0.ada_gss"]
    for key in groups:
        for fmt in ("dense", "q8_0"):
            with pytest.raises(CheckpointError, match=rf"<state dict>: tensor {re.escape(key)} of the transformer"):
                load_transformer(_with_bad_value(sd, key, float("nan")), weight_format=fmt)
    vsd = load_file(str(models / "nsarm" / "infinity_vae_d56_f8_14_patchify.safetensors"))
    for key in ("encoder.conv_in.conv.weight", "decoder.mid.block_1.norm1.norm.weight"):
        with pytest.raises(CheckpointError, match=rf"tensor {re.escape(key)} of the BSQ-VAE"):
            load_vae(_with_bad_value(vsd, key, float("inf")))


def test_fp16_overflow_while_sampling_stops_before_decoding(models, tmp_path, monkeypatch):
    """Weights that are finite in fp16 but whose activations overflow: exit 2 naming the dtype and
    the fix, after the scale loop and before the decoder runs; no output."""
    import nsarm_nodes.pipeline as pipeline_mod

    sd = load_file(str(models / "nsarm" / "NSARM.safetensors"))
    key = "block_chunks.0.module.0.ffn.fc2.weight"
    sd[key] = sd[key] * (30000 / sd[key].abs().max())  # finite in fp16; the block output is not
    torch.save(sd, tmp_path / "hot.pth")
    folder = _models_with(models, tmp_path / "m", transformer=tmp_path / "hot.pth")
    decoded = []
    monkeypatch.setattr(pipeline_mod, "decode_tiled", lambda *a, **k: decoded.append(1))
    src = png(tmp_path / "in.png", size=(32, 32))
    code, _, err = cli("upscale", src, "-o", tmp_path / "o.png", "--models", folder, "--dtype", "fp16")
    last = err.strip().splitlines()[-1]  # (T5 loads first, with its own progress output)
    assert code == 2 and "Traceback" not in err and last.startswith("error: "), err
    for needle in ("NaN/inf logits from scale 7", "computing in float16", "dtype bf16"):
        assert needle in last, (needle, last)
    assert decoded == [] and not (tmp_path / "o.png").exists()
