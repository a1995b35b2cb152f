"""Folder jobs: `python -m nsarm_nodes upscale-dir IN_DIR OUT_DIR --models DIR [options of upscale]`.

Every image under IN_DIR (recursive; .png .jpg .jpeg .webp .bmp .tif .tiff, any case) is upscaled
exactly as `upscale` does one file (same image reader and atomic writer from nsarm_nodes.images,
same `NSARMPipeline` call) and written to OUT_DIR under the same relative path, as PNG
(`a/b/photo.jpg` -> `OUT_DIR/a/b/photo.png`; when one folder holds several images with the same
name stem, each keeps its extension: `photo.jpg.png`, `photo.png.png`).

Engines (the per-image work is the same `ImageWorker.upscale` in both):
- embedded (default): one process, one model replica, images in order. No Ray needed.
- Ray Data (`--ray [ADDRESS]`): `map_batches` over an actor pool, one model replica per actor
  (`num_gpus=--gpus-per-worker`, 1 by default, where the cluster has GPUs), each actor loading the
  models once. No address: a local Ray instance is started (all local GPUs, else CPUs) and shut down
  at the end; `auto` or `ray://HOST:10001` joins a running cluster, to which this package's code is
  shipped (`runtime_env` py_modules); its dependencies must be installed on every node, and IN_DIR,
  OUT_DIR and --models must be the same paths on every node (a shared file system, or a per-node
  copy of the models folder). Ray is imported only here and only then.

Determinism: the image at POSIX relative path REL (e.g. `2024/photo.jpg`) is upscaled with
    seed(REL) = (SEED + int.from_bytes(sha256(REL as UTF-8 bytes)[:8], "big")) mod 2**63
whatever worker, batch or order handles it, so its output equals
`python -m nsarm_nodes upscale IN_DIR/REL -o X --seed seed(REL)` with the same options on the same
kind of device (on CPUs also with the same number of torch threads, which changes float rounding).
The seed is recorded in each output.

Nothing lost, nothing done twice:
- Outputs are written atomically (hidden temporary file + rename; mode 0666 minus the umask, as
  every output of this package), each with an `nsarm` PNG text chunk
  recording the job key, the source path and the seed. A re-run skips an image whose output carries
  this job's key and is complete (ends with the PNG end chunk).
- `OUT_DIR/nsarm-job.json` records the parameters that determine the pixels (everything but the tile
  batch size, the tile limit, the device and the workers) and the models' fingerprints. A run with
  other parameters into the same OUT_DIR is refused, naming what differs; with --overwrite it takes
  OUT_DIR over and replaces the old outputs as it reaches them. A file at an output path that this
  job did not write is never replaced without --overwrite.
- A bad input (unreadable image, more pixels than --max-pixels, too many tiles, ...) is recorded in
  `OUT_DIR/failures.jsonl` (`{"path", "error"}` per line: the images not done by the last run and
  why) and the job goes on. An input that could not be read is not retried by the next run until
  the file changes (its record has a `source_stamp`: size and modification time, and the
  `max_pixels` it was refused under: a higher --max-pixels retries it), unless --retry-failed.
- A Ray worker that dies (killed, out of memory) is restarted by Ray and its images are retried
  (Ray Data's actor-pool defaults: actor restarts and task retries). An image on which workers died
  `MAX_WORKER_DEATHS` times is recorded as failed instead of being retried for ever.
- Ctrl-C (or SIGTERM) stops the job (Ray workers included): the summary is printed and the
  interruption goes on to the caller (the CLI exits with 130 / 143); the next run of the same
  command resumes.
- One job at a time per OUT_DIR (a lock file; where the OS has `fcntl`).

Exit status (`JobSummary.exit_code`, the CLI's): 0 all images done, 1 the job ran but some images
failed (see failures.jsonl); the CLI adds 2 (the job could not start: bad options, missing models,
other parameters in OUT_DIR; `JobError` here) and 130 / 143 (Ctrl-C / SIGTERM).

Image files are read and written by nsarm_nodes.images, output folders checked by
nsarm_nodes.files; the command line (options, exit statuses) is in nsarm_nodes.__main__.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import socket
import stat
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .options import DEFAULT_MAX_PIXELS

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
JOB_FORMAT = "nsarm-upscale-dir/1"
MANIFEST_NAME = "nsarm-job.json"
FAILURES_NAME = "failures.jsonl"
STATE_DIR_NAME = ".nsarm-job"  # lock file and per-image worker-death counts
METADATA_KEY = "nsarm"  # PNG text chunk of every output
SEED_MODULUS = 2**63  # derived seeds stay within int64 (Ray/Arrow columns, JSON)
# Options that change speed or what is refused; they reach the pixels only through float rounding
# (as another GPU model would). Not part of the job key, so a resumed job may change them.
EXECUTION_ONLY = ("tile_batch_size", "max_tiles")
MAX_WORKER_DEATHS = 3
FINGERPRINT_CHUNK = 1 << 20  # bytes read at the start, middle and end of a weight file
LOCAL_OBJECT_STORE_BYTES = 256 << 20  # only paths and status rows travel through it
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"
# Test hook (tests/test_folder_job.py): a worker that has finished one image exits hard before its
# next image, once per marker file, so the tests can check that Ray retries a dead worker's images.
EXIT_ONCE_ENV = "NSARM_TEST_WORKER_EXIT_ONCE"

# Output states
DONE, MISSING, STALE, FOREIGN = "done", "missing", "stale", "foreign"


class JobError(ValueError):
    """A folder job that cannot start or go on; the message names the file or option and the fix."""


# ---------------------------------------------------------------------------------------------
# Discovery, output names, seeds


def image_seed(base_seed: int, rel: str) -> int:
    """The seed of the image at POSIX relative path `rel` (see the module docstring)."""
    digest = hashlib.sha256(rel.encode("utf-8")).digest()
    return (int(base_seed) + int.from_bytes(digest[:8], "big")) % SEED_MODULUS


@dataclass(frozen=True)
class Item:
    rel: str  # POSIX path below IN_DIR
    out_rel: str  # POSIX path below OUT_DIR
    seed: int


def discover(in_dir: Path, exclude: Iterable[Path] = ()) -> tuple[list[str], list[dict]]:
    """Relative POSIX paths of the images under `in_dir`, depth first, names sorted, and a problem
    record `{"path", "error"}` for each entry that looks like an image but cannot be one (broken
    link, FIFO, device, ...) or folder that cannot be listed. Symbolic links are followed; a folder
    reached twice (a link loop or a second link) is scanned once. Hidden names (leading dot) and the
    folders in `exclude` (OUT_DIR inside IN_DIR) are skipped."""
    excluded = set()
    for path in exclude:
        with contextlib.suppress(OSError):
            st = os.stat(path)
            excluded.add((st.st_dev, st.st_ino))
    seen: set[tuple[int, int]] = set()
    rels: list[str] = []
    problems: list[dict] = []
    stack: list[tuple[Path, tuple[str, ...]]] = [(in_dir, ())]
    while stack:
        folder, parts = stack.pop()
        where = "/".join(parts) or "."
        try:
            st = os.stat(folder)
            ident = (st.st_dev, st.st_ino)
            if ident in seen or ident in excluded:
                continue
            seen.add(ident)
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            problems.append({"path": where, "error": f"folder cannot be read ({e.strerror or e})"})
            continue
        subfolders = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            rel_parts = (*parts, entry.name)
            rel = "/".join(rel_parts)
            try:
                if entry.is_dir():  # follows links
                    subfolders.append((Path(entry.path), rel_parts))
                    continue
            except OSError:
                pass
            if os.path.splitext(entry.name)[1].lower() not in IMAGE_SUFFIXES:
                continue
            try:
                rel.encode("utf-8")
            except UnicodeEncodeError:
                shown = rel.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
                problems.append({"path": shown, "error": "file name is not valid UTF-8; rename it"})
                continue
            try:
                mode = os.stat(entry.path).st_mode
            except FileNotFoundError:
                problems.append({"path": rel, "error": "broken symbolic link"})
                continue
            except OSError as e:
                problems.append({"path": rel, "error": f"cannot be read ({e.strerror or e})"})
                continue
            if not stat.S_ISREG(mode):
                problems.append({"path": rel, "error": "not a regular file (a FIFO, socket or device); skipped"})
                continue
            rels.append(rel)
        stack.extend(subfolders)
    rels.sort(key=lambda r: r.split("/"))  # the order: relative paths sorted folder by folder
    return rels, problems


def output_names(rels: Iterable[str]) -> dict[str, str]:
    """Relative input path -> relative output path: same folder, `.png`; images of one folder that
    share a name stem (compared case-insensitively) each keep their extension (`photo.jpg.png`)."""
    rels = list(rels)
    stems: dict[str, int] = {}
    for rel in rels:
        key = os.path.splitext(rel)[0].casefold()
        stems[key] = stems.get(key, 0) + 1
    out = {}
    for rel in rels:
        stem = os.path.splitext(rel)[0]
        out[rel] = (rel if stems[stem.casefold()] > 1 else stem) + ".png"
    return out


# ---------------------------------------------------------------------------------------------
# Parameters, job key, output records


def fingerprint(path: Path) -> str:
    """A cheap content fingerprint of a weight file: sha256 of its size and of 1 MiB at its start,
    middle and end (different weights differ there; a full hash of 18 GB would take minutes)."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        for offset in sorted({0, max(0, size // 2 - FINGERPRINT_CHUNK // 2), max(0, size - FINGERPRINT_CHUNK)}):
            f.seek(offset)
            h.update(f.read(FINGERPRINT_CHUNK))
    return f"{path.name}:{size}:{h.hexdigest()[:16]}"


def job_params(pipe_kwargs: dict, seed: int, dtype: str, model_files: dict[str, Path],
               weight_format: str = "dense") -> dict:
    """The parameters that determine the output pixels (the job key is their hash); options left
    out of `pipe_kwargs` count with the pipeline's defaults."""
    import inspect

    from .pipeline import NSARMPipeline
    from .text import negative_or_none

    defaults = {name: p.default for name, p in inspect.signature(NSARMPipeline.__call__).parameters.items()
                if p.default is not inspect.Parameter.empty and name not in ("seed", "progress", "preview")}
    params = {k: float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v  # 4 and 4.0 alike
              for k, v in sorted({**defaults, **pipe_kwargs}.items()) if k not in EXECUTION_ONLY}
    if params.get("cfg", 1.0) == 1.0 or negative_or_none(params.get("negative_prompt")) is None:
        params["negative_prompt"] = None  # unused without guidance; blank = none (the same pixels)
    from .weights import weight_format as format_named

    params.update(seed=int(seed), seed_rule="sha256-path/1", dtype=dtype,
                  models={role: fingerprint(path) for role, path in sorted(model_files.items())})
    fmt = format_named(weight_format).name  # "fp8" and "q8_0" alike
    if fmt != "dense":  # dense stays out, so jobs started before weight formats existed keep their key
        params["weight_format"] = fmt
    return params


def job_key(params: dict) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:32]


def read_record(path: Path) -> tuple[dict | None, bool]:
    """The `nsarm` record of an output PNG (None if there is none or it is unreadable) and whether
    the file is complete (ends with the PNG end chunk)."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - len(PNG_END)))
            complete = f.read() == PNG_END
        with Image.open(path) as im:
            if im.format != "PNG":
                return None, complete
            record = json.loads(im.info.get(METADATA_KEY, "null"))
    except (OSError, ValueError, SyntaxError):
        return None, False
    return (record if isinstance(record, dict) and record.get("format") == JOB_FORMAT else None), complete


def output_state(path: Path, key: str, rel: str) -> str:
    """DONE (this job's complete output for `rel`), MISSING, STALE (written by upscale-dir with other
    parameters, or incomplete) or FOREIGN (a file this command did not write)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return MISSING
    except OSError:
        return FOREIGN
    if not stat.S_ISREG(st.st_mode):
        return FOREIGN
    record, complete = read_record(path)
    if record is None:
        return FOREIGN
    return DONE if record.get("job") == key and record.get("source") == rel and complete else STALE


# ---------------------------------------------------------------------------------------------
# The per-image work (both engines)


@dataclass(frozen=True)
class JobSpec:
    """Everything a worker needs, as plain data (it is pickled to Ray actors)."""

    in_dir: str
    out_dir: str
    models: str
    pipe_kwargs: dict
    params: dict
    key: str
    device: str | None = None
    dtype: str = "auto"
    weight_format: str = "dense"
    strict: bool = False  # refuse checkpoints with unused tensors (they never change the output)
    cached_prompts_only: bool = False
    overwrite: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS  # input images above this are refused before decoding
    threads: int | None = None  # torch CPU threads of a worker (None: torch's default)
    count_deaths: bool = False  # keep per-image worker-death counts (Ray)


# A result row. `source_stamp` is set when the input itself cannot be read: such an image is not
# retried by the next run while the file is unchanged (same size and modification time).
ROW_KEYS = ("rel", "status", "error", "seconds", "worker", "size", "out_size", "source_stamp")


def source_stamp(path: Path) -> str:
    try:
        st = path.stat()
    except OSError:
        return ""
    return f"{st.st_size}:{st.st_mtime_ns}"


class ImageWorker:
    """One model replica: loads the pipeline once, then upscales items. Used in-process by the
    embedded engine and as the Ray Data actor (`__call__` takes and returns a batch of rows)."""

    def __init__(self, spec: JobSpec):
        import torch

        from .pipeline import load_pipeline

        if spec.threads:
            torch.set_num_threads(spec.threads)
        self.spec = spec
        self.pipe = load_pipeline(spec.models, device=spec.device, dtype=spec.dtype,
                                  text_encoder=not spec.cached_prompts_only, strict=spec.strict,
                                  weight_format=spec.weight_format)
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.finished = 0

    def upscale(self, item: Item) -> dict:
        """Upscale one image unless its output is already done; never raises for a bad image."""
        from .images import read_image, save_image

        spec = self.spec
        src, out = Path(spec.in_dir, item.rel), Path(spec.out_dir, item.out_rel)
        row = dict.fromkeys(ROW_KEYS, "")
        row.update(rel=item.rel, worker=self.name, seconds=0.0)
        state = output_state(out, spec.key, item.rel)
        if state == DONE:  # e.g. a retried task of a worker that died after writing it
            return {**row, "status": "skipped"}
        if state == FOREIGN and not spec.overwrite:
            return {**row, "status": "failed", "error": f"{out}: already exists and was not written by "
                    "upscale-dir; move it away or pass --overwrite"}
        deaths = _DeathCounter(Path(spec.out_dir), item.rel) if spec.count_deaths else None
        if deaths is not None and deaths.start() > MAX_WORKER_DEATHS:
            deaths.clear()
            return {**row, "status": "failed", "error": f"a worker died {MAX_WORKER_DEATHS} times while "
                    "upscaling this image (killed, or out of memory?); it was skipped"}
        _exit_once_for_test(self.finished)
        t0 = time.perf_counter()
        try:
            try:
                image = read_image(src, spec.max_pixels)
            except Exception as e:
                return {**row, "status": "failed", "error": _one_line(e), "source_stamp": source_stamp(src)}
            result = self.pipe(image, seed=item.seed, **spec.pipe_kwargs)
            record = {"format": JOB_FORMAT, "job": spec.key, "source": item.rel, "seed": item.seed,
                      "device": str(self.pipe.device), "params": spec.params}
            out.parent.mkdir(parents=True, exist_ok=True)
            # A missing output is placed without replacing a file that appeared meanwhile; a stale
            # one (or, with --overwrite, a foreign one: checked above) is replaced.
            save_image(result[0], out, overwrite=state != MISSING,
                       metadata={METADATA_KEY: json.dumps(record, sort_keys=True)})
        except Exception as e:  # a bad image must not stop the job; the error goes to failures.jsonl
            return {**row, "status": "failed", "error": _one_line(e), "seconds": time.perf_counter() - t0}
        finally:
            if deaths is not None:
                deaths.clear()
        self.finished += 1
        return {**row, "status": "done", "seconds": time.perf_counter() - t0,
                "size": f"{image.shape[2]}x{image.shape[1]}", "out_size": f"{result.shape[2]}x{result.shape[1]}"}

    def __call__(self, batch: dict) -> dict:
        """Ray Data entry: a batch of items (columns rel, out_rel, seed) -> a batch of result rows."""
        import numpy as np

        rows = [self.upscale(Item(str(r), str(o), int(s)))
                for r, o, s in zip(batch["rel"], batch["out_rel"], batch["seed"])]
        return {k: np.array([row[k] for row in rows]) for k in ROW_KEYS}


class _DeathCounter:
    """How often a worker started an image without finishing it (a file per image in the job's
    state folder; it exists only while the image is being worked on)."""

    def __init__(self, out_dir: Path, rel: str):
        self.path = out_dir / STATE_DIR_NAME / "attempts" / hashlib.sha256(rel.encode()).hexdigest()[:32]

    def start(self) -> int:
        """Count this start; returns how many starts there have been (1 = the first)."""
        try:
            n = int(self.path.read_text() or 0)
        except (OSError, ValueError):
            n = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.path, str(n + 1))
        return n + 1

    def clear(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def _exit_once_for_test(finished: int) -> None:
    marker = os.environ.get(EXIT_ONCE_ENV)
    if not marker or finished < 1:
        return
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    os._exit(1)


def _one_line(e: BaseException) -> str:
    """An image's error for failures.jsonl, on one line: our messages as they are (they name the
    file and the fix), OSErrors with their file and fix (as the CLI prints them), others by type."""
    from .files import os_problem

    if isinstance(e, OSError) and e.strerror and not type(e).__module__.startswith("nsarm_nodes"):
        names = " -> ".join(str(n) for n in (e.filename, e.filename2) if n is not None)
        text = f"{names + ': ' if names else ''}{os_problem(e)}"
    else:
        text = str(e)
    text = " ".join(text.split()) or "(no message)"
    return text if isinstance(e, (ValueError, LookupError, OSError)) else f"{type(e).__name__}: {text}"


def _write_atomic(path: Path, text: str) -> None:
    """A small text file (manifest, failures, counts), replaced atomically as the outputs are."""
    from .images import write_new_file

    write_new_file(path, lambda fh: fh.write(text.encode("utf-8")), overwrite=True)


# ---------------------------------------------------------------------------------------------
# Engines


OnRow = Callable[[dict], None]


@dataclass(frozen=True)
class Embedded:
    """In-process: one model replica, images in order."""

    def describe(self) -> str:
        return "in-process"

    def run(self, spec: JobSpec, items: list[Item], on_row: OnRow, log: Callable[[str], None]) -> None:
        worker = ImageWorker(spec)
        for item in items:
            on_row(worker.upscale(item))


@dataclass
class RayEngine:
    """Ray Data: an actor pool of `workers` model replicas (see the module docstring)."""

    address: str | None = None  # None: start a local Ray instance
    workers: int | None = None  # default: one per GPU of the cluster (GPUs) or 1 (CPUs)
    gpus_per_worker: float | None = None  # default 1 where the cluster has GPUs
    cpus_per_worker: float | None = None  # default 1 with GPUs, else the cluster's CPUs / workers
    summary: str = field(default="Ray", init=False)

    def describe(self) -> str:
        return self.summary

    def plan(self, resources: dict, device: str | None, n_items: int) -> tuple[int, float, float, str]:
        """(workers, GPUs per worker, CPUs per worker, a warning or "") for this cluster. JobError if
        they cannot fit a local instance (a cluster may still scale up: then only the warning)."""
        total_gpus, total_cpus = float(resources.get("GPU", 0)), float(resources.get("CPU", 0))
        if device is not None and device.startswith("cuda:"):
            raise JobError(f"--device {device}: with --ray each worker gets its GPU from Ray; use --device cuda "
                           "or leave it unset")
        if device is not None and device.startswith("cuda") and total_gpus == 0:
            raise JobError(f"--device {device}: the Ray cluster has no GPUs; leave --device unset or use cpu")
        if total_gpus > 0 and (device is None or device.startswith("cuda")):
            gpus = self.gpus_per_worker or 1.0
            workers = self.workers or max(1, int(total_gpus // gpus + 1e-9))
            cpus = self.cpus_per_worker or 1.0
        else:
            if self.gpus_per_worker:
                raise JobError("--gpus-per-worker: the Ray cluster has no GPUs (or --device cpu was given)")
            gpus = 0.0
            workers = self.workers or 1
            cpus = self.cpus_per_worker or max(1.0, float(int(total_cpus // workers)))
        workers = max(1, min(workers, n_items))  # no idle replicas
        warning = ""
        if workers * gpus > total_gpus + 1e-9 or workers * cpus > total_cpus + 1e-9:
            warning = (f"{workers} worker(s) x ({gpus:g} GPU, {cpus:g} CPU) do not fit the Ray cluster "
                       f"({total_gpus:g} GPUs, {total_cpus:g} CPUs); lower --workers, --gpus-per-worker or "
                       "--cpus-per-worker")
            if self.address is None:
                raise JobError(warning)
        return workers, gpus, cpus, warning

    def run(self, spec: JobSpec, items: list[Item], on_row: OnRow, log: Callable[[str], None]) -> None:
        try:
            import ray
            import ray.data
        except ImportError:
            raise JobError("--ray needs Ray Data, which is not installed: pip install 'nsarm-comfyui[ray]' "
                           "(or pip install 'ray[data]')") from None
        started = not ray.is_initialized()
        if started:
            self._init(ray)
        try:
            workers, gpus, cpus, warning = self.plan(ray.cluster_resources(), spec.device, len(items))
            if warning:
                log(f"[upscale-dir] warning: {warning} (waiting for the cluster to scale up)")
            device = spec.device or ("cuda" if gpus else "cpu")
            spec = JobSpec(**{**asdict(spec), "device": device, "count_deaths": True,
                              "threads": None if gpus else max(1, int(cpus))})
            where = "local Ray instance" if self.address is None else f"Ray cluster {self.address}"
            self.summary = f"{workers} Ray worker(s) ({gpus:g} GPU, {cpus:g} CPU each) on the {where}"
            log(f"[upscale-dir] {self.summary}")
            # Our progress line instead of Ray Data's (which knows no total here, so no ETA)
            ray.data.DataContext.get_current().enable_progress_bars = False
            logging.getLogger("ray.data").setLevel(logging.WARNING)
            logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "bars disabled"
            # One image per block and per batch: a dead worker costs at most the images it holds,
            # and every finished image reaches the driver (progress, failures) at once.
            ds = ray.data.from_items([asdict(item) for item in items], override_num_blocks=len(items))
            ds = ds.map_batches(
                ImageWorker, fn_constructor_kwargs={"spec": spec}, batch_size=1,
                compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=cpus, num_gpus=gpus or None,
            )
            rows = ds.iter_rows()
            try:
                for row in rows:
                    on_row({k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()})
            finally:
                close = getattr(rows, "close", None)
                if close is not None:
                    close()
        except ray.exceptions.RayError as e:
            # Ray's message is the remote traceback (already shown in the worker's log lines); its
            # last line names the original error.
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            cause = lines[-1] if lines else type(e).__name__
            if getattr(e, "actor_init_failed", False):
                raise JobError(f"a Ray worker could not start (it loads the models from --models on its own node): "
                               f"{cause}") from None
            raise JobError(f"the Ray job failed: {cause}") from None
        finally:
            if started:
                ray.shutdown()

    def _init(self, ray) -> None:
        runtime_env: dict = {}
        if EXIT_ONCE_ENV in os.environ:
            runtime_env["env_vars"] = {EXIT_ONCE_ENV: os.environ[EXIT_ONCE_ENV]}
        kwargs: dict = {"logging_level": logging.WARNING}
        if self.address is None:
            kwargs.update(include_dashboard=False, object_store_memory=LOCAL_OBJECT_STORE_BYTES)
        else:
            kwargs["address"] = self.address
            runtime_env["py_modules"] = [str(Path(__file__).resolve().parent)]  # this code, on every node
        try:
            ray.init(runtime_env=runtime_env or None, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as e:
            where = f"the Ray cluster at {self.address}" if self.address else "a local Ray instance"
            hint = ("start one with `ray start --head` (then --ray auto) or check the address"
                    if self.address else "check that Ray works here: python -c 'import ray; ray.init()'")
            raise JobError(f"--ray: could not start or join {where} ({_one_line(e)[:500]}); {hint}") from None


# ---------------------------------------------------------------------------------------------
# The job


@dataclass
class JobSummary:
    total: int = 0  # images found
    already_done: int = 0  # outputs complete before this run
    done: int = 0  # upscaled by this run
    failures: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    interrupted: bool = False  # stopped by Ctrl-C / SIGTERM (run_folder_job then re-raises it)

    @property
    def exit_code(self) -> int:
        """0 every image done, 1 some failed (failures.jsonl); the CLI's status for a job that ran."""
        return 1 if self.failures else 0


class Progress:
    """Images done / total, images/s and ETA on one line (rewritten in place on a terminal, a line
    every `every` seconds otherwise)."""

    def __init__(self, total: int, stream=sys.stderr, every: float = 10.0):
        self.total, self.stream, self.every = total, stream, every
        self.start = self.last = time.perf_counter()
        self.done = self.failed = self.width = 0
        self.tty = getattr(stream, "isatty", lambda: False)()

    def update(self, failed: bool) -> None:
        self.done += 1
        self.failed += failed
        now = time.perf_counter()
        if self.tty or now - self.last >= self.every or self.done == self.total:
            self.last = now
            self._print(now)

    def _print(self, now: float) -> None:
        elapsed = now - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else math.inf
        eta_s = time.strftime("%H:%M:%S", time.gmtime(eta)) if math.isfinite(eta) else "?"
        line = (f"[upscale-dir] {self.done}/{self.total} images ({self.failed} failed), {rate:.2f} images/s, "
                f"ETA {eta_s}")
        if self.tty:  # rewrite the line in place, blanking what a longer previous line left
            self.width = max(self.width, len(line))
            self.stream.write("\r" + line.ljust(self.width) + ("\n" if self.done == self.total else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


@contextlib.contextmanager
def _job_lock(out_dir: Path):
    """Hold `OUT_DIR/.nsarm-job/lock` for the job, so two jobs never write into one OUT_DIR."""
    state = out_dir / STATE_DIR_NAME
    state.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # no advisory locks on this OS
        yield
        return
    with open(state / "lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise JobError(f"{out_dir}: another upscale-dir job ({holder}) is writing into this folder; "
                           "wait for it or choose another OUT_DIR") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _param_diff(old: dict, new: dict) -> str:
    keys = sorted(set(old) | set(new))
    diffs = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]
    return "; ".join(diffs[:6]) + (f"; ... ({len(diffs)} in all)" if len(diffs) > 6 else "")


def _clean_debris(out_dir: Path, outputs: Iterable[Path]) -> None:
    """Remove temporary files that killed workers left next to this job's outputs (as
    images.write_new_file names them) and the per-image death counts."""
    from .images import partial_files

    by_folder: dict[Path, set[str]] = {out_dir: {MANIFEST_NAME, FAILURES_NAME}}
    for out in outputs:
        by_folder.setdefault(out.parent, set()).add(out.name)
    for folder, names in by_folder.items():
        for path in partial_files(folder, names):
            with contextlib.suppress(OSError):
                path.unlink()
    attempts = out_dir / STATE_DIR_NAME / "attempts"
    if attempts.is_dir():
        for p in attempts.iterdir():
            with contextlib.suppress(OSError):
                p.unlink()


def run_folder_job(in_dir, out_dir, models, *, pipe_kwargs: dict, seed: int = 1, device: str | None = None,
                   dtype: str = "auto", weight_format: str = "dense", strict: bool = False,
                   cached_prompts_only: bool = False,
                   max_pixels: int = DEFAULT_MAX_PIXELS,
                   overwrite: bool = False, retry_failed: bool = False, engine: Embedded | RayEngine | None = None,
                   dry_run: bool = False, verbose: bool = False, stdout=None, stderr=None) -> JobSummary:
    """Upscale every image under `in_dir` into `out_dir` (see the module docstring). `pipe_kwargs`:
    NSARMPipeline keywords except seed/progress (`__main__.pipeline_kwargs`). Returns the summary
    (also printed); raises JobError, OutputError or MissingModelsError when the job cannot start, and
    re-raises KeyboardInterrupt after the summary when it is interrupted."""
    from .files import check_output_folder
    from .pipeline import WEIGHTS, MissingModelsError, find_weight, missing_models_message

    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
    engine = engine or Embedded()
    in_dir, out_dir, models = Path(in_dir), Path(out_dir), Path(models)
    if not in_dir.is_dir():
        raise JobError(f"{in_dir}: input folder not found (IN_DIR must be a folder of images)")
    if dry_run:  # writes nothing: only the kind of OUT_DIR is checked
        if out_dir.exists() and not out_dir.is_dir():
            raise JobError(f"{out_dir}: exists and is not a folder (OUT_DIR must be a folder)")
    else:  # a folder (or to be made) where files can be created, before any weights load
        check_output_folder(out_dir, "OUT_DIR")
    in_real, out_real = in_dir.resolve(), out_dir.resolve()
    if in_real == out_real or in_real.is_relative_to(out_real):
        raise JobError(f"{out_dir}: OUT_DIR must not be IN_DIR or contain it (outputs could replace inputs); "
                       "choose another OUT_DIR")

    found = {spec.role: find_weight(models, spec, weight_format) for spec in WEIGHTS}
    needed = ["transformer", "vae"] + ([] if cached_prompts_only else ["text encoder"])
    missing = [role for role in needed if found[role] is None]
    if missing:
        raise MissingModelsError(missing_models_message(models, missing))
    if cached_prompts_only:
        _check_cached_prompts(models, pipe_kwargs)

    rels, problems = discover(in_dir, exclude=[out_dir])
    names = output_names(rels)
    items = [Item(rel, names[rel], image_seed(seed, rel)) for rel in rels]
    params = job_params(pipe_kwargs, seed, dtype, {"transformer": found["transformer"], "vae": found["vae"]},
                        weight_format)
    key = job_key(params)
    summary = JobSummary(total=len(items))
    if dry_run:
        for item in items:
            state = output_state(out_dir / item.out_rel, key, item.rel)
            print(f"{item.rel}\t{item.out_rel}\t{item.seed}\t{state}", file=stdout)
        for p in problems:
            print(f"{p['path']}: {p['error']}", file=stderr)
        return summary

    out_dir.mkdir(parents=True, exist_ok=True)
    with _job_lock(out_dir):
        manifest_path = out_dir / MANIFEST_NAME
        manifest = _read_manifest(manifest_path)
        if manifest is not None and manifest.get("key") != key and not overwrite:
            raise JobError(f"{manifest_path}: {out_dir} holds outputs made with other parameters "
                           f"({_param_diff(manifest.get('params', {}), params)}); choose another OUT_DIR, or pass "
                           "--overwrite to replace them with outputs of these parameters")
        states = {item: output_state(out_dir / item.out_rel, key, item.rel) for item in items}
        stale = [item for item, s in states.items() if s == STALE]
        if manifest is None and stale and not overwrite:
            raise JobError(f"{out_dir}: {len(stale)} output(s) (e.g. {stale[0].out_rel}) were made by upscale-dir "
                           "with other parameters and the folder has no job manifest; choose another OUT_DIR, "
                           "or pass --overwrite to replace them")
        _write_atomic(manifest_path, json.dumps({
            "format": JOB_FORMAT, "key": key, "params": params, "in_dir": str(in_real),
            "seed_rule": "seed(REL) = (seed + int.from_bytes(sha256(REL.encode('utf-8'))[:8], 'big')) % 2**63",
        }, indent=2, sort_keys=True) + "\n")
        _clean_debris(out_dir, [out_dir / item.out_rel for item in items])

        summary.failures = list(problems)
        known_bad = {} if retry_failed else _unreadable_before(out_dir / FAILURES_NAME)
        pending = []
        for item in items:
            if states[item] == DONE:
                summary.already_done += 1
            elif states[item] == FOREIGN and not overwrite:
                summary.failures.append({"path": item.rel, "error": f"{out_dir / item.out_rel}: already exists and "
                                         "was not written by upscale-dir; move it away or pass --overwrite"})
            elif item.rel in known_bad and _still_unreadable(known_bad[item.rel], in_dir / item.rel, max_pixels):
                summary.failures.append(known_bad[item.rel])
            else:
                pending.append(item)
        head = (f"[upscale-dir] {len(items)} images under {in_dir}: {summary.already_done} already done, "
                f"{len(pending)} to upscale")
        if not items:
            head += f" (no {', '.join(s.lstrip('.') for s in IMAGE_SUFFIXES)} files there)"
        print(head + (f", {len(summary.failures)} cannot be (see {FAILURES_NAME})" if summary.failures else ""),
              file=stderr, flush=True)
        t0 = time.perf_counter()
        spec = JobSpec(str(in_dir), str(out_dir), str(models), dict(pipe_kwargs), params, key, device=device,
                       dtype=dtype, weight_format=weight_format, strict=strict,
                       cached_prompts_only=cached_prompts_only, overwrite=overwrite,
                       max_pixels=max_pixels)
        stop: KeyboardInterrupt | None = None
        try:
            if pending:
                _run_engine(engine, spec, pending, summary, verbose, stdout, stderr)
        except KeyboardInterrupt as exc:  # Ctrl-C, or the CLI's SIGTERM / SIGHUP (a KeyboardInterrupt too)
            stop = exc
            summary.interrupted = True
        finally:
            summary.seconds = time.perf_counter() - t0
            _write_failures(out_dir / FAILURES_NAME, summary.failures)
        _print_summary(summary, engine, out_dir, stdout)
        if stop is not None:
            raise stop  # the caller decides what an interruption means (the CLI: exit 128 + signal)
        return summary


def _run_engine(engine, spec: JobSpec, pending: list[Item], summary: JobSummary, verbose: bool, stdout, stderr):
    progress = Progress(len(pending), stderr)
    outs = {item.rel: item.out_rel for item in pending}

    def on_row(row: dict) -> None:
        status = row["status"]
        if status == "failed":
            record = {"path": row["rel"], "error": row["error"]}
            if row["source_stamp"]:  # the input itself could not be read (under this pixel limit)
                record.update(source_stamp=row["source_stamp"], max_pixels=spec.max_pixels)
            summary.failures.append(record)
            print(f"\n[upscale-dir] failed: {row['rel']}: {row['error']}" if progress.tty else
                  f"[upscale-dir] failed: {row['rel']}: {row['error']}", file=stderr, flush=True)
        elif status == "done":
            summary.done += 1
            if verbose:
                print(f"{row['rel']} ({row['size']}) -> {outs[row['rel']]} ({row['out_size']}) in "
                      f"{row['seconds']:.1f}s [{row['worker']}]", file=stdout, flush=True)
        else:  # skipped: finished by a worker that died before reporting it
            summary.already_done += 1
        progress.update(status == "failed")

    engine.run(spec, pending, on_row, lambda line: print(line, file=stderr, flush=True))


def _check_cached_prompts(models: Path, pipe_kwargs: dict) -> None:
    from .text import PromptCache, PromptNotCachedError, encode_prompts, negative_or_none

    prompts = [pipe_kwargs.get("prompt")]
    if pipe_kwargs.get("cfg", 1.0) != 1.0 and negative_or_none(pipe_kwargs.get("negative_prompt")) is not None:
        prompts.append(pipe_kwargs["negative_prompt"])
    try:
        encode_prompts([p for p in prompts if p is not None], None, PromptCache(models / "nsarm_prompt_cache"))
    except PromptNotCachedError as e:
        raise JobError(" ".join(str(e).split())) from None


def _still_unreadable(record: dict, src: Path, max_pixels: int) -> bool:
    """Whether an input the last run could not read would fail again: the file is unchanged and the
    pixel limit is not higher than the one it was refused under."""
    limit = record.get("max_pixels")
    return record["source_stamp"] == source_stamp(src) and (not isinstance(limit, int) or limit >= max_pixels)


def _unreadable_before(path: Path) -> dict[str, dict]:
    """The inputs the last run could not read (failures.jsonl records with a source stamp)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return {}
    known = {}
    for line in lines:
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict) and record.get("source_stamp") and isinstance(record.get("path"), str):
                known[record["path"]] = record
    return known


def _read_manifest(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise JobError(f"{path}: unreadable job manifest ({e}); remove it to start this OUT_DIR afresh") from None
    if not isinstance(data, dict) or data.get("format") != JOB_FORMAT:
        raise JobError(f"{path}: not an upscale-dir job manifest ({JOB_FORMAT}); choose another OUT_DIR")
    return data


def _write_failures(path: Path, failures: list[dict]) -> None:
    if failures:
        _write_atomic(path, "".join(json.dumps(f, ensure_ascii=False) + "\n" for f in failures))
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _print_summary(summary: JobSummary, engine, out_dir: Path, stdout) -> None:
    rate = summary.done / summary.seconds if summary.seconds > 0 else 0.0
    parts = [f"{summary.done} upscaled", f"{summary.already_done} already done"]
    if summary.failures:
        parts.append(f"{len(summary.failures)} failed (see {out_dir / FAILURES_NAME})")
    line = (f"[upscale-dir] {', '.join(parts)} of {summary.total} images in {summary.seconds:.1f}s "
            f"({rate:.3f} images/s, {engine.describe()})")
    if summary.interrupted:
        line += "; interrupted: run the same command again to resume"
    print(line, file=stdout, flush=True)
