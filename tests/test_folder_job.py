"""`upscale-dir`: folder jobs, embedded and on a local Ray instance (tiny models, CPU).

Every good output must equal, pixel for pixel, what `upscale` makes of the same file with the
derived seed. CPU kernels round differently with other thread counts, so the references, the
in-process job and the Ray workers all run with one torch thread.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nsarm_nodes import folder_job
from nsarm_nodes.__main__ import main
from nsarm_nodes.folder_job import (
    EXIT_ONCE_ENV, FAILURES_NAME, MANIFEST_NAME, JobError, RayEngine, discover, image_seed, job_key, job_params,
    output_names,
)
from nsarm_nodes.testing import make_tiny_models

ROOT = Path(__file__).resolve().parents[1]
GOOD = {  # relative path -> (width, height, PIL mode); all one tile but sub/wide.png (two)
    "a.png": (64, 48, "RGB"),
    "b.jpg": (100, 80, "RGB"),
    "rgba.webp": (40, 70, "RGBA"),
    "sub/wide.png": (300, 40, "RGB"),
    "sub/deep/gray.bmp": (32, 32, "L"),
}
UNREADABLE = {"sub/deep/corrupt.png", "sub/pipe.png", "dead.jpg"}  # truncated, FIFO, broken link
SEED = 7


def out_rel(rel: str) -> str:
    return os.path.splitext(rel)[0] + ".png"


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def make_image(path: Path, w: int, h: int, mode: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    base = rng.random((max(h // 8, 2), max(w // 8, 2), 4))
    img = Image.fromarray((base * 255).astype(np.uint8), "RGBA").resize((w, h), Image.BILINEAR).convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def cli(*args, env_extra=None, timeout=600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "nsarm_nodes", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=timeout)


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    make_tiny_models(root, seed=0)
    return root


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Five good images of mixed sizes, formats and modes in nested folders, a truncated PNG, a FIFO
    and a broken link named like images, a text file, a hidden image and a symbolic-link loop."""
    root = tmp_path_factory.mktemp("photos")
    for i, (rel, (w, h, mode)) in enumerate(GOOD.items()):
        make_image(root / rel, w, h, mode, seed=i)
    make_image(root / "sub/deep/corrupt.png", 64, 64, "RGB", seed=99)
    data = (root / "sub/deep/corrupt.png").read_bytes()
    (root / "sub/deep/corrupt.png").write_bytes(data[: len(data) // 2])
    os.mkfifo(root / "sub/pipe.png")
    os.symlink(root / "missing.jpg", root / "dead.jpg")
    (root / "notes.txt").write_text("not an image")
    make_image(root / ".hidden.png", 16, 16, "RGB", seed=5)
    os.symlink("../..", root / "sub/deep/up")  # a loop back to the root
    return root


@pytest.fixture(scope="module")
def reference(photos, models_dir, tmp_path_factory) -> dict[str, np.ndarray]:
    """`upscale` of each good image with its derived seed (one torch thread)."""
    out = tmp_path_factory.mktemp("reference")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        refs = {}
        for i, rel in enumerate(GOOD):
            dest = out / f"{i}.png"
            assert main(["upscale", str(photos / rel), "-o", str(dest), "--models", str(models_dir),
                         "--seed", str(image_seed(SEED, rel))]) == 0
            refs[rel] = pixels(dest)
    finally:
        torch.set_num_threads(before)
    return refs


def check_outputs(out: Path, reference: dict[str, np.ndarray]) -> None:
    for rel, ref in reference.items():
        got = pixels(out / out_rel(rel))
        assert got.shape == ref.shape and np.array_equal(got, ref), f"{rel}: differs from `upscale`"
    failures = [json.loads(line) for line in (out / FAILURES_NAME).read_text().splitlines()]
    assert {f["path"] for f in failures} == UNREADABLE
    errors = {f["path"]: f["error"] for f in failures}
    assert "truncated or damaged" in errors["sub/deep/corrupt.png"]  # (nsarm_nodes.images' message)
    assert "not a regular file" in errors["sub/pipe.png"] and "broken symbolic link" in errors["dead.jpg"]
    assert not (out / ".hidden.png").exists() and not (out / "notes.png").exists()
    made = sorted(str(p.relative_to(out)) for p in out.rglob("*.png"))
    assert made == sorted(out_rel(rel) for rel in GOOD)  # nothing else, no temporary files left
    assert not [p for p in out.rglob(".*") if p.is_file() and p.suffix in (".part", ".tmp")]


def mtimes(out: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in out.rglob("*.png")}


# ---------------------------------------------------------------------------------------------
# Discovery, names, seeds (no models)


def test_discovery_order_loops_and_special_files(photos):
    rels, problems = discover(photos)
    assert rels == sorted(list(GOOD) + ["sub/deep/corrupt.png"], key=lambda r: r.split("/"))
    assert {p["path"] for p in problems} == {"sub/pipe.png", "dead.jpg"}
    assert discover(photos, exclude=[photos / "sub"])[0] == ["a.png", "b.jpg", "rgba.webp"]


def test_output_names_mirror_folders_and_keep_colliding_extensions():
    names = output_names(["x/photo.jpg", "x/Photo.PNG", "x/other.tif", "y/photo.jpg"])
    assert names == {"x/photo.jpg": "x/photo.jpg.png", "x/Photo.PNG": "x/Photo.PNG.png",
                     "x/other.tif": "x/other.png", "y/photo.jpg": "y/photo.png"}


def test_image_seed_follows_the_documented_formula():
    rel = "2024/holiday/IMG_0001.jpg"
    digest = hashlib.sha256(rel.encode("utf-8")).hexdigest()
    assert image_seed(1, rel) == (1 + int(digest[:16], 16)) % 2**63
    assert image_seed(1, rel) != image_seed(2, rel) != image_seed(2, "2024/holiday/IMG_0002.jpg")
    assert all(0 <= image_seed(2**64 + s, rel) < 2**63 for s in range(3))


def test_job_key_counts_what_changes_pixels_only():
    from nsarm_nodes.__main__ import build_parser, pipeline_kwargs

    def key(*cli, seed=1, dtype="auto"):
        args = build_parser().parse_args(["upscale-dir", "in", "out", "--models", "m", *cli])
        return job_key(job_params(pipeline_kwargs(args), seed, dtype, {}))

    base = key()
    assert job_key(job_params({}, 1, "auto", {})) == base  # the pipeline's defaults = the CLI's
    assert key("--tile-batch-size", "4", "--max-tiles", "9", "--device", "cpu") == base
    assert key("--negative-prompt", "blur") == base  # unused without guidance
    changed = [key("--prompt", "x"), key("--tau", "0.6"), key("--top-p", "0.9"), key("--cfg", "2"),
               key("--next-scale-mode", "trilinear"), key("--color-fix", "none"), key("--overlap", "16"),
               key("--blend", "linear"), key("--output-scale", "2"), key("--tiling", "independent"), key(seed=2),
               key(dtype="bf16")]
    assert len({base, *changed}) == len(changed) + 1


def test_ray_missing_gives_install_hint(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(JobError, match=r"pip install 'nsarm-comfyui\[ray\]'"):
        RayEngine().run(None, [], lambda row: None, print)


def test_ray_worker_plan():
    plan = RayEngine().plan
    assert plan({"CPU": 16, "GPU": 4}, None, 100)[:3] == (4, 1.0, 1.0)
    assert plan({"CPU": 16, "GPU": 4}, None, 3)[:3] == (3, 1.0, 1.0)  # no idle replicas
    assert RayEngine(gpus_per_worker=0.5).plan({"CPU": 16, "GPU": 2}, None, 100)[:3] == (4, 0.5, 1.0)
    assert plan({"CPU": 8}, None, 100)[:3] == (1, 0.0, 8.0)
    assert RayEngine(workers=2).plan({"CPU": 2, "GPU": 1}, "cpu", 100)[:3] == (2, 0.0, 1.0)
    with pytest.raises(JobError, match="do not fit"):
        RayEngine(workers=3).plan({"CPU": 2}, None, 100)
    assert "do not fit" in RayEngine(address="auto", workers=8).plan({"CPU": 16, "GPU": 4}, None, 100)[3]
    with pytest.raises(JobError, match="no GPUs"):
        plan({"CPU": 2}, "cuda", 100)
    with pytest.raises(JobError, match="gets its GPU from Ray"):
        plan({"CPU": 2, "GPU": 2}, "cuda:1", 100)


def test_cli_refuses_bad_folders_and_options(tmp_path, models_dir, capsys):
    """Refused before anything loads: an `error:` message, status 2, nothing written."""
    (tmp_path / "in").mkdir()
    (tmp_path / "file").write_text("x")

    def refused(in_dir, out_dir, *argv, models=models_dir) -> str:
        assert main(["upscale-dir", str(in_dir), str(out_dir), "--models", str(models), *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "Traceback" not in err, err
        return err

    assert "input folder not found" in refused(tmp_path / "nope", tmp_path / "o")
    assert "must not be IN_DIR or contain it" in refused(tmp_path / "in", tmp_path)
    assert "OUT_DIR" in refused(tmp_path / "in", tmp_path / "file") and (tmp_path / "file").read_text() == "x"
    assert "need --ray" in refused(tmp_path / "in", tmp_path / "o", "--workers", "2")
    assert "not a device" in refused(tmp_path / "in", tmp_path / "o", "--device", "banana")
    assert "cuda:N is not allowed" in refused(tmp_path / "in", tmp_path / "o", "--device", "cuda:1", "--ray")
    assert "NSARM weights missing" in refused(tmp_path / "in", tmp_path / "o", models=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "in"]


# ---------------------------------------------------------------------------------------------
# Embedded engine


def test_embedded_job_equals_upscale_isolates_failures_and_resumes(photos, models_dir, reference, tmp_path,
                                                                   capsys, one_thread):
    out = tmp_path / "out"
    args = ["upscale-dir", str(photos), str(out), "--models", str(models_dir), "--seed", str(SEED)]
    assert main(args) == 1  # ran, some images failed
    check_outputs(out, reference)
    printed = capsys.readouterr().out
    assert "5 upscaled, 0 already done, 3 failed" in printed
    record = json.loads(Image.open(out / "b.png").info["nsarm"])
    assert record["seed"] == image_seed(SEED, "b.jpg") and record["source"] == "b.jpg"
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["params"]["seed"] == SEED and manifest["key"] == record["job"]

    assert main(args + ["--dry-run"]) == 0
    plan = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert [row[0] for row in plan] == sorted(list(GOOD) + ["sub/deep/corrupt.png"], key=lambda r: r.split("/"))
    assert all(row[3] == "done" for row in plan if row[0] in GOOD)
    assert {row[0]: int(row[2]) for row in plan}["b.jpg"] == image_seed(SEED, "b.jpg")

    before = mtimes(out)
    assert main(args + ["--tile-batch-size", "2"]) == 1  # execution-only options may change on resume
    assert "0 upscaled, 5 already done, 3 failed" in capsys.readouterr().out
    assert mtimes(out) == before
    check_outputs(out, reference)


def test_parameters_never_mix_and_user_files_are_kept(models_dir, tmp_path, capsys):
    src = tmp_path / "in"
    make_image(src / "x.png", 32, 32, "RGB", seed=1)
    make_image(src / "y.png", 24, 40, "RGB", seed=2)
    out = tmp_path / "out"
    (out / "y.png").parent.mkdir(parents=True)
    Image.new("RGB", (8, 8), "red").save(out / "y.png")  # the user's own file at an output path
    users = (out / "y.png").read_bytes()
    base = ["upscale-dir", str(src), str(out), "--models", str(models_dir)]
    assert main(base + ["--seed", "1"]) == 1
    assert "not written by upscale-dir" in (out / FAILURES_NAME).read_text()
    assert (out / "y.png").read_bytes() == users
    first = (out / "x.png").read_bytes()

    assert main(base + ["--seed", "2", "--tau", "0.6"]) == 2
    err = capsys.readouterr().err
    assert "other parameters" in err and "seed: 1 -> 2" in err and "tau: 0.5 -> 0.6" in err and "--overwrite" in err
    assert (out / "x.png").read_bytes() == first and (out / "y.png").read_bytes() == users

    (src / "y.png").unlink()  # (keeps this test to two pipeline runs)
    assert main(base + ["--seed", "2", "--tau", "0.6", "--overwrite"]) == 0
    assert json.loads(Image.open(out / "x.png").info["nsarm"])["seed"] == image_seed(2, "x.png")
    assert not np.array_equal(pixels(out / "x.png"), np.asarray(Image.open(io.BytesIO(first))))
    assert (out / "y.png").read_bytes() == users and not (out / FAILURES_NAME).exists()
    assert main(base + ["--seed", "2", "--tau", "0.6"]) == 0
    assert "0 upscaled, 1 already done" in capsys.readouterr().out


@pytest.mark.parametrize("signum, status, name", [(signal.SIGINT, 130, "Ctrl-C"), (signal.SIGTERM, 143, "SIGTERM")])
def test_a_stop_signal_stops_cleanly_and_the_next_run_resumes(models_dir, tmp_path, signum, status, name):
    src, out = tmp_path / "in", tmp_path / "out"
    for i in range(2):
        make_image(src / f"p{i}.png", 32, 32, "RGB", seed=10 + i)
    args = [sys.executable, "-m", "nsarm_nodes", "upscale-dir", src, out, "--models", models_dir]
    proc = subprocess.Popen(list(map(str, args)), cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (out / "p0.png").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == status, stderr
    assert "interrupted: run the same command again to resume" in stdout and "Traceback" not in stderr
    assert stderr.strip().endswith(f"interrupted ({name}); nothing was left half-written"), stderr
    assert sorted(p.name for p in out.glob("*.png")) == ["p0.png"] and not list(out.glob(".*.part"))
    if signum == signal.SIGTERM:  # (resuming is the same after either signal; checked once)
        return
    r = cli("upscale-dir", src, out, "--models", models_dir)
    assert r.returncode == 0, r.stderr
    assert "1 upscaled, 1 already done" in r.stdout
    assert sorted(p.name for p in out.glob("*.png")) == ["p0.png", "p1.png"]


def test_a_too_large_image_is_retried_once_the_limit_is_raised(models_dir, tmp_path, capsys):
    make_image(tmp_path / "in" / "x.png", 16, 16, "RGB", seed=4)
    base = ["upscale-dir", str(tmp_path / "in"), str(tmp_path / "out"), "--models", str(models_dir)]
    assert main(base + ["--max-pixels", "100"]) == 1
    (failure,) = [json.loads(line) for line in (tmp_path / "out" / FAILURES_NAME).read_text().splitlines()]
    assert "--max-pixels" in failure["error"] and failure["max_pixels"] == 100
    capsys.readouterr()
    assert main(base + ["--max-pixels", "100"]) == 1  # same file, same limit: not tried again
    assert "0 upscaled, 0 already done, 1 failed" in capsys.readouterr().out
    assert main(base + ["--max-pixels", "256"]) == 0
    assert "1 upscaled, 0 already done" in capsys.readouterr().out
    assert not (tmp_path / "out" / FAILURES_NAME).exists()


def test_outputs_carry_metadata_and_leftover_partial_files_are_found(tmp_path):
    """The job's record goes through the one image writer; the temporary files that writer makes
    are what the job removes when a killed worker left them."""
    from nsarm_nodes.images import partial_files, save_image, write_new_file

    save_image(torch.rand(8, 8, 3), tmp_path / "m.png", metadata={"nsarm": '{"a": 1}'})
    assert Image.open(tmp_path / "m.png").info["nsarm"] == '{"a": 1}'
    with pytest.raises(ValueError, match="only be stored in PNG"):
        save_image(torch.rand(8, 8, 3), tmp_path / "m.jpg", metadata={"nsarm": "x"})
    assert not (tmp_path / "m.jpg").exists()

    long = "L" * 150 + ".png"
    seen = []
    for name in ("x.png", long, "y.png"):  # what write_new_file's temporary files are called, while writing
        write_new_file(tmp_path / name, lambda fh: seen.extend(partial_files(tmp_path, ["x.png", long])),
                       overwrite=False)
    assert len(seen) == 2 and not partial_files(tmp_path, ["x.png", long, "y.png"])
    for path in seen:  # as a killed writer leaves them
        path.write_bytes(b"")
    (tmp_path / ".x.png.not-a-token.part").write_bytes(b"")
    assert sorted(partial_files(tmp_path, ["x.png", long])) == sorted(seen)
    assert partial_files(tmp_path, ["y.png"]) == []


def test_an_image_that_keeps_killing_workers_is_given_up(models_dir, tmp_path):
    """Ray retries a dead worker's image on a restarted worker; the death count stops an image that
    kills every worker (e.g. out of host memory) from being retried for ever."""
    make_image(tmp_path / "in" / "x.png", 16, 16, "RGB", seed=3)
    spec = folder_job.JobSpec(str(tmp_path / "in"), str(tmp_path / "out"), str(models_dir), {}, {}, "key",
                              device="cpu", count_deaths=True)
    worker = folder_job.ImageWorker(spec)
    counter = folder_job._DeathCounter(tmp_path / "out", "x.png")
    counter.start()
    for _ in range(folder_job.MAX_WORKER_DEATHS - 1):  # started by workers that then died
        counter.start()
    row = worker.upscale(folder_job.Item("x.png", "x.png", 1))
    assert row["status"] == "failed" and "died 3 times" in row["error"], row
    assert not counter.path.exists() and not (tmp_path / "out" / "x.png").exists()


# ---------------------------------------------------------------------------------------------
# Ray Data engine (a local Ray instance started and shut down by the command)


def ray_processes(wait: float = 0.0) -> list[str]:
    """Ray's processes on this machine, after waiting up to `wait` s for them to end (a worker
    process takes a moment to exit after ray.shutdown())."""
    deadline = time.monotonic() + wait
    while True:
        ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout.splitlines()
        found = [line for line in ps if "raylet" in line or "gcs_server" in line or "ray::" in line]
        if not found or time.monotonic() >= deadline:
            return found
        time.sleep(0.5)


def test_ray_job_survives_a_dead_worker_and_equals_upscale(photos, models_dir, reference, tmp_path):
    assert not ray_processes(), "a Ray instance is already running"
    out, marker = tmp_path / "out", tmp_path / "worker-exited"
    args = ["upscale-dir", photos, out, "--models", models_dir, "--seed", SEED, "--ray", "--workers", 2,
            "--cpus-per-worker", 1]  # one torch thread per worker, as the references
    r = cli(*args, env_extra={EXIT_ONCE_ENV: str(marker)})
    assert r.returncode == 1, r.stderr
    assert marker.exists(), "the test hook did not kill a worker"
    assert "2 Ray worker(s)" in r.stderr and "5 upscaled, 0 already done, 3 failed" in r.stdout, r.stdout
    check_outputs(out, reference)
    assert not ray_processes(wait=30), "Ray processes left behind"

    before = mtimes(out)
    r = cli(*args)  # nothing left to do: Ray is not even started
    assert r.returncode == 1, r.stderr
    assert "0 upscaled, 5 already done, 3 failed" in r.stdout and "Ray worker" not in r.stderr
    assert mtimes(out) == before
    r = cli(*args[:6], SEED + 1, *args[7:])
    assert r.returncode == 2 and "seed: 7 -> 8" in r.stderr and "Traceback" not in r.stderr
    assert mtimes(out) == before


def test_ray_module_is_not_imported_by_the_embedded_engine():
    code = ("import sys; from nsarm_nodes.__main__ import build_parser; build_parser(); "
            "import nsarm_nodes.folder_job; print('ray' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert r.stdout.strip() == "False", r.stderr
