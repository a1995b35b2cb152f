"""Command line: `python -m nsarm_nodes {upscale,upscale-dir,run,queue,check-models,make-test-models,convert,bench} ...`.

One error path (`main`): anything a user can cause -- a bad option (checked against the option
table before any weights load), a missing or unreadable input, an output that cannot be written,
a checkpoint that does not fit, a workflow that cannot run, a server that misbehaves, any OSError
on the files named -- prints one `error: ...` message naming the file or option, what was expected
and the fix, and exits with status 2; no traceback. Ctrl-C exits with 130, SIGTERM with 143 (SIGHUP
129), after the same clean-up as any failure: no partial output file and no staging folder is left.
Internal bugs still show their traceback. Outputs are written atomically and never replace an
existing file unless --overwrite is given. `upscale-dir` exits with 1 when it ran but some images
failed (listed in OUT_DIR/failures.jsonl).
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
import warnings
from pathlib import Path

EXIT_USER_ERROR = 2
EXIT_SIGNAL_BASE = 128  # exit status of a command stopped by signal N: 128 + N (130 Ctrl-C, 143 SIGTERM)
OUTPUT_SUFFIX = "_nsarm"
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


class UserError(Exception):
    """An error caused by the command line or the files it names: printed without a traceback."""


class Stopped(KeyboardInterrupt):
    """Raised in the main thread by SIGINT / SIGTERM / SIGHUP. A KeyboardInterrupt, so that every
    clean-up path written for Ctrl-C (temporary files, staging folders, cancelling a queued prompt)
    runs for the other signals too."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class _StopSignals:
    """While a command runs, SIGINT / SIGTERM / SIGHUP raise `Stopped` in the main thread.

    A signal that arrives while a module is being imported (torch takes seconds to import) is held
    back until the import finished and raised then (an import cut short leaves half-initialised
    modules, and some libraries swallow exceptions raised inside their imports). `checkpoint()`
    raises a pending stop at safe points in case other code swallowed it. After the first signal the
    others are ignored, so that the clean-up it triggers completes; a signal ignored by the parent
    (nohup, background jobs) stays ignored; the old handlers come back at the end."""

    RETRY_SECONDS = 0.05

    def __init__(self):
        self.signum: int | None = None
        self.old: dict = {}

    def __enter__(self) -> _StopSignals:
        try:
            self.old = {s: signal.getsignal(s) for s in STOP_SIGNALS}
            for s, handler in self.old.items():
                if handler is not signal.SIG_IGN:
                    signal.signal(s, self._on_signal)
            if hasattr(signal, "setitimer"):
                self.old[signal.SIGALRM] = signal.signal(signal.SIGALRM, self._retry)
        except ValueError:  # not the main thread: leave signals alone
            self.old = {}
        return self

    def __exit__(self, *exc) -> None:
        if hasattr(signal, "setitimer") and self.old:
            signal.setitimer(signal.ITIMER_REAL, 0)
        for s, handler in self.old.items():
            signal.signal(s, handler)

    @staticmethod
    def _importing(frame) -> bool:
        while frame is not None:
            if frame.f_code.co_filename.startswith("<frozen importlib"):
                return True
            frame = frame.f_back
        return False

    def _on_signal(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum
            for s in STOP_SIGNALS:
                if self.old.get(s) is not signal.SIG_IGN:
                    signal.signal(s, signal.SIG_IGN)  # restored in __exit__, once the clean-up is done
        self._raise_when_safe(frame)

    def _retry(self, signum, frame) -> None:
        if self.signum is not None:  # (an alarm from elsewhere, with no stop pending, is ignored)
            self._raise_when_safe(frame)

    def _raise_when_safe(self, frame) -> None:
        if self._importing(frame) and hasattr(signal, "setitimer"):
            signal.setitimer(signal.ITIMER_REAL, self.RETRY_SECONDS)
            return
        raise Stopped(self.signum)

    def checkpoint(self) -> None:
        """Raise `Stopped` if a stop signal arrived (and was swallowed somewhere)."""
        if self.signum is not None:
            raise Stopped(self.signum)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=file or sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Images in and out


def load_image(path: Path, max_pixels: int):
    """An image file -> IMAGE [1, H, W, 3] float32 in [0, 1] (see nsarm_nodes.images.read_image)."""
    from .images import read_image

    return read_image(path, max_pixels)


def save_image(image, path: Path, overwrite: bool) -> None:
    """IMAGE [H, W, 3] in [0, 1] -> `path`, in the format its extension names; atomic, no clobbering."""
    from .images import save_image as write

    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        write(image, path, overwrite=overwrite)
    except FileExistsError:
        raise UserError(f"{path}: already exists; pass --overwrite to replace it or choose another -o") from None


class ScaleProgress:
    """A one-line progress bar on stderr: one step per scale of each tile batch, per decode and for the
    colour fix."""

    def __init__(self, label: str, stream=sys.stderr, checkpoint=None):
        self.label, self.stream, self.start = label, stream, time.perf_counter()
        self.checkpoint = checkpoint

    def __call__(self, done: int, total: int) -> None:
        if self.checkpoint is not None:
            self.checkpoint()
        width = 30
        filled = int(width * done / total)
        elapsed = time.perf_counter() - self.start
        self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} steps "
                          f"{elapsed:6.1f}s")
        if done == total:
            self.stream.write("\n")
        self.stream.flush()


def cmd_check_models(args) -> int:
    from .pipeline import check_models

    report, ok = check_models(args.models)
    print(report)
    return 0 if ok else EXIT_USER_ERROR


def cmd_make_test_models(args) -> int:
    from .files import check_output_folder
    from .testing import make_tiny_models

    check_output_folder(args.dir, "make-test-models DIR")
    try:
        paths = make_tiny_models(args.dir, seed=args.model_seed, overwrite=args.overwrite)
    except FileExistsError as exc:
        raise UserError(f"{exc.filename}: already exists and is not this seed's test model; pass --overwrite to "
                        "replace it with the tiny random models, or choose another folder") from None
    for role, path in paths.items():
        print(f"{role}: {path}")
    return 0


def output_paths(inputs: list[Path], output: str | None, overwrite: bool) -> list[Path]:
    """Where each input's result goes, checked before any work: a known image extension, no two
    inputs onto one name, every target writable (files.check_output_file).

    -o names a file for one input, or a folder (an existing folder, or a name without extension,
    created when needed); without -o each result goes beside its input as IN_nsarm.png."""
    from .files import check_output_file
    from .images import output_format
    from .options import OUTPUT_FORMATS

    if output is None:
        outs = [p.with_name(p.stem + OUTPUT_SUFFIX + ".png") for p in inputs]
    else:
        out = Path(output)
        folder = out.is_dir() or not out.suffix or output.endswith(("/", os.sep))
        if not folder and len(inputs) > 1:
            raise UserError(f"-o {out}: {len(inputs)} inputs need an output folder (an existing folder or a name "
                            "without extension), not one file")
        if not folder and out.suffix.lower() not in OUTPUT_FORMATS:
            raise UserError(f"-o {out}: unknown image extension {out.suffix!r} (use {', '.join(OUTPUT_FORMATS)}); "
                            "a folder must exist already or have no extension")
        outs = [out / (p.stem + OUTPUT_SUFFIX + ".png") for p in inputs] if folder else [out]
    seen: dict[str, Path] = {}
    for src, dest in zip(inputs, outs):
        key = os.path.normcase(os.path.abspath(dest))
        if key in seen:
            raise UserError(f"{seen[key]} and {src} would both be written to {dest}; upscale them into different "
                            "folders (or rename one)")
        seen[key] = src
        output_format(dest)
        check_output_file(dest, overwrite, "-o" if output is not None else "output")
    return outs


def pipeline_kwargs(args) -> dict:
    """The pipeline options of `add_upscale_options` as NSARMPipeline keywords (seed and progress
    aside). One mapping for `upscale` and `upscale-dir`, so that an option added here reaches both
    commands and the folder job's key."""
    return dict(
        prompt=args.prompt, negative_prompt=args.negative_prompt, tau=args.tau, top_p=args.top_p, cfg=args.cfg,
        next_scale_mode=args.mode, color_fix=args.color_fix, tile_overlap=args.tile_overlap,
        tile_batch_size=args.tile_batch_size, blend=args.blend, output_scale=args.output_scale,
        max_tiles=args.max_tiles, tiling=args.tiling,
    )


def cmd_upscale(args) -> int:
    inputs = [Path(p) for p in args.inputs]
    outputs = output_paths(inputs, args.output, args.overwrite)  # before anything slow
    images = [load_image(p, args.max_pixels) for p in inputs]

    from . import tiling
    from .canvas import plan_grid
    from .pipeline import load_pipeline

    pipe = load_pipeline(args.models, device=args.device, dtype=args.dtype,
                         text_encoder=not args.cached_prompts_only, strict=args.strict,
                         weight_format=args.weight_format)
    for src, image, out in zip(inputs, images, outputs):
        _, h, w, _ = image.shape
        t0 = time.perf_counter()
        result = pipe(image, seed=args.seed, progress=ScaleProgress(src.name, checkpoint=args.checkpoint),
                      **pipeline_kwargs(args))
        save_image(result[0], out, args.overwrite)
        seconds = time.perf_counter() - t0
        print(f"{src} ({w}x{h}) -> {out} ({result.shape[2]}x{result.shape[1]}) in {seconds:.1f}s")
        if args.report:
            grid = plan_grid(h, w, 256, args.tile_overlap, mode=args.tiling)
            score = tiling.seam_score(result[0], grid, args.output_scale) if grid.tiles_per_image > 1 else 1.0
            print(f"  tiles {grid.tiles_per_image} ({grid.rows}x{grid.cols}), seam score {score:.3f} "
                  f"(1.0 = seams as smooth as the interior)")
    return 0


def cmd_upscale_dir(args) -> int:
    """Every image of a folder (see nsarm_nodes.folder_job); 0 all done, 1 some images failed."""
    from .folder_job import Embedded, JobError, RayEngine, run_folder_job
    from .options import check, option

    ray_options = ("workers", "gpus_per_worker", "cpus_per_worker")
    if args.ray is None:
        given = [option(name).flag for name in ray_options if getattr(args, name) is not None]
        if given:
            raise JobError(f"{', '.join(given)}: Ray options, which need --ray (the in-process job runs one model "
                           "replica); add --ray or leave them out")
        device = check("device", args.device) if args.device is not None else None  # this machine's devices
        engine = Embedded()
    else:
        # The Ray workers' devices are on the cluster's nodes, not necessarily here: only the form is checked.
        device = args.device and args.device.strip()
        if device not in (None, "cpu", "cuda"):
            raise JobError(f"--device {args.device}: with --ray use cuda or cpu, or leave it unset (cuda where the "
                           "cluster has GPUs); each worker gets its GPU from Ray, so cuda:N is not allowed")
        engine = RayEngine(address=None if args.ray == "local" else args.ray, workers=args.workers,
                           gpus_per_worker=args.gpus_per_worker, cpus_per_worker=args.cpus_per_worker)
    summary = run_folder_job(
        args.in_dir, args.out_dir, args.models, pipe_kwargs=pipeline_kwargs(args), seed=args.seed, device=device,
        dtype=args.dtype, weight_format=args.weight_format, strict=args.strict,
        cached_prompts_only=args.cached_prompts_only, max_pixels=args.max_pixels, overwrite=args.overwrite, retry_failed=args.retry_failed, engine=engine, dry_run=args.dry_run,
        verbose=args.verbose)
    return summary.exit_code


def _run_progress(event: dict) -> None:
    if event["type"] == "executing":
        print(f"[run] node {event['node']} ({event['class_type']}) ...", file=sys.stderr, flush=True)
    elif event["type"] == "executed":
        print(f"[run] node {event['node']} ({event['class_type']}) done in {event['seconds']:.1f}s",
              file=sys.stderr, flush=True)


def _user_exception(exc: BaseException) -> bool:
    """Exceptions a node raises because of its inputs or files (shown without a traceback)."""
    oom = _out_of_memory_type()
    return isinstance(exc, (ValueError, LookupError, OSError, UserError)) or (oom is not None and isinstance(exc, oom))


def _out_of_memory_type():
    torch = sys.modules.get("torch")  # only when torch was imported: then OOM can happen
    if torch is None:
        return None
    return getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)


def _place(src: Path, dest: Path, overwrite: bool) -> None:
    """Move a finished file into place in one step; never replaces ``dest`` unless ``overwrite``."""
    from .files import place_new

    if overwrite:
        os.replace(src, dest)
    elif place_new(src, [dest]) is None:
        raise UserError(f"{dest}: already exists; pass --overwrite to replace it or choose another --output")


def cmd_run(args) -> int:
    import shutil
    import traceback

    from . import runner
    from .files import check_output_file, check_output_folder

    out = Path(args.output)
    single = not out.is_dir() and bool(out.suffix)
    if single:
        if out.suffix.lower() != ".png":
            raise UserError(f"--output {out}: run writes PNG files (with the workflow in their metadata); name a "
                            ".png file, or a folder (an existing one, or a name without extension)")
        check_output_file(out, args.overwrite, "--output")
    else:
        check_output_folder(out, "--output")
    inputs = runner.parse_input_args(args.input or [])

    def one_save_only(prompt: dict, order: list[str]) -> None:
        saves = [nid for nid in order if prompt[nid]["class_type"] == "SaveImage"]
        if single and len(saves) != 1:
            raise UserError(f"--output {out} names one PNG but the workflow has {len(saves)} SaveImage nodes; "
                            "give an output folder instead")

    stage = None
    try:
        if single:
            out.parent.mkdir(parents=True, exist_ok=True)
            stage = Path(tempfile.mkdtemp(prefix=".nsarm-run-", dir=out.parent))
        try:
            result = runner.run_workflow(args.workflow, inputs=inputs, sets=args.set or [],
                                         output_dir=stage or out, input_dir=args.input_dir, models_dir=args.models,
                                         progress=_run_progress, before_run=one_save_only,
                                         max_pixels=args.max_pixels)
        except runner.NodeExecutionError as e:
            if _user_exception(e.original):
                raise UserError(str(e)) from None
            traceback.print_exception(type(e.original), e.original, e.original.__traceback__)
            print(f"error: {e}", file=sys.stderr)
            return 1
        saved = result.saved
        if single:
            if len(saved) != 1:
                raise UserError(f"the workflow saved {len(saved)} images (a batch); --output {out} names one "
                                "file: give an output folder instead")
            _place(saved[0], out, args.overwrite)
            saved = [out]
    finally:
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)
    for path in saved:
        print(path)
    return 0


def cmd_queue(args) -> int:
    from . import runner
    from .client import ComfyClientError, _json, _Timeout, print_progress, queue_workflow
    from .files import check_output_folder

    check_output_folder(args.out, "--out")
    try:
        workflow = runner.load_workflow(args.workflow)
        is_ui = runner.workflow_format(workflow) == "ui"
        inputs_by_ref = runner.parse_input_args(args.input or [])
        input_types = None
        if is_ui or args.set:  # the server's node definitions map widgets and check --set names
            status, info = _json(args.server, "/object_info", timeout=min(args.timeout, 60))
            if status != 200 or not isinstance(info, dict):
                raise UserError(f"ComfyUI at {args.server}: GET /object_info failed (HTTP {status})")
            input_types = runner.object_info_input_types(info)
        prompt = runner.api_prompt(workflow, input_types)
        prompt = runner.apply_overrides(prompt, args.set or [], input_types)
        inputs = {(runner.find_node(prompt, ref) if ref else ""): path for ref, path in inputs_by_ref.items()}
        paths = queue_workflow(args.server, prompt, inputs, out_dir=args.out, timeout=args.timeout,
                               on_progress=print_progress, overwrite=args.overwrite)
    except ComfyClientError as e:
        raise UserError(str(e)) from None
    except _Timeout:  # only the /object_info request above can raise it here
        raise UserError(f"ComfyUI at {args.server}: GET /object_info timed out after {min(args.timeout, 60):g} s; "
                        "is the server busy? allow more time with --timeout") from None
    for path in paths:
        print(path)
    return 0


UPSCALE_DIR_DESCRIPTION = """\
Upscale every image under IN_DIR (recursive; png, jpg, jpeg, webp, bmp, tif, tiff) into OUT_DIR,
mirroring the folders, as PNG. The pipeline options are those of `upscale`.

Seeds: the image at relative path REL (POSIX, e.g. 2024/photo.jpg) gets
  seed(REL) = (SEED + int.from_bytes(sha256(REL)[:8], 'big')) mod 2**63
so its output equals `upscale IN_DIR/REL --seed seed(REL)`, whichever worker makes it.
--dry-run prints one tab-separated line per image: REL, output path, seed, state (done, missing,
stale, foreign).

Re-running the same command skips finished images (each output records its job); other parameters
into the same OUT_DIR are refused unless --overwrite. Bad images go to OUT_DIR/failures.jsonl and the
job goes on (unreadable ones are retried once the file changes or --max-pixels is raised, or with
--retry-failed). Exit status: 0 all done, 1 some images failed, 2 the job could not start (one
`error:` line), 130 Ctrl-C, 143 SIGTERM (run the same command again to resume).
"""


def add_upscale_options(p: argparse.ArgumentParser, local_device: bool = True) -> None:
    """The models and pipeline options of `upscale`, shared by `upscale-dir` (see `pipeline_kwargs`).
    `local_device=False`: --device is kept as text, to be checked by the command (a Ray job's devices
    are on the cluster's nodes, not necessarily on this machine)."""
    from .config import DEFAULT_PROMPT
    from .options import add_argument

    p.add_argument("--models", required=True, help="models folder (ComfyUI layout: nsarm/, text_encoders/)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="description of the image")
    p.add_argument("--negative-prompt", default=None, help="used only with --cfg != 1; empty = none (the model's "
                   "learned unconditional rows)")
    add_argument(p, "seed")
    add_argument(p, "tau")
    add_argument(p, "top_p")
    add_argument(p, "cfg")
    add_argument(p, "mode", "--next-scale-mode")
    add_argument(p, "color_fix")
    add_argument(p, "tile_overlap", "--overlap")
    add_argument(p, "tiling")
    add_argument(p, "blend", help="tile overlap blending of --tiling independent; none = hard cut")
    add_argument(p, "tile_batch_size")
    add_argument(p, "output_scale")
    add_argument(p, "max_tiles")
    add_argument(p, "max_pixels")
    if local_device:
        add_argument(p, "device")
    else:
        add_argument(p, "device", type=str, help="cpu, cuda, cuda:N or mps (default: cuda if available, else cpu); "
                     "with --ray: cuda or cpu (Ray gives each worker its GPU)")
    add_argument(p, "dtype")
    add_argument(p, "weight_format")
    add_argument(p, "strict")
    p.add_argument("--cached-prompts-only", action="store_true", help="do not load T5; use cached prompts")


def build_parser() -> argparse.ArgumentParser:
    from . import options
    from .options import add_argument

    p = options.parser(prog="python -m nsarm_nodes", description="NSARM 4x super-resolution")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("check-models", help="report which weight files are present and what is missing")
    c.add_argument("--models", required=True, help="models folder (ComfyUI layout: nsarm/, text_encoders/)")
    c.set_defaults(func=cmd_check_models)

    m = sub.add_parser("make-test-models", help="write tiny random models in the real layout (for tests and demos)")
    m.add_argument("dir", help="models folder to write (nsarm/, text_encoders/ inside it)")
    add_argument(m, "model_seed", "--seed")
    m.add_argument("--overwrite", action="store_true", help="replace model files that already exist in DIR")
    m.set_defaults(func=cmd_make_test_models)

    u = sub.add_parser("upscale", help="upscale image files (any size; tiled at 256 px)")
    u.add_argument("inputs", nargs="+", help="input images")
    u.add_argument("-o", "--output", help="output image (one input; the extension picks the format: "
                   f"{', '.join(options.OUTPUT_FORMATS)}) or folder (an existing one, or a name without extension); "
                   "default: IN_nsarm.png beside each input")
    add_upscale_options(u)
    u.add_argument("--report", action="store_true", help="print tile count and seam score")
    u.add_argument("--overwrite", action="store_true", help="replace existing output files")
    u.set_defaults(func=cmd_upscale)

    d = sub.add_parser("upscale-dir", help="upscale every image of a folder (in-process, or on Ray with --ray)",
                       description=UPSCALE_DIR_DESCRIPTION, formatter_class=options.RawDescriptionHelpFormatter)
    d.add_argument("in_dir", help="folder of input images (searched recursively)")
    d.add_argument("out_dir", help="output folder (created; the folder layout of IN_DIR is mirrored)")
    add_upscale_options(d, local_device=False)
    d.add_argument("--overwrite", action="store_true", help="take over an OUT_DIR made with other parameters "
                   "and replace files at output paths (finished outputs of these parameters are still kept)")
    add_argument(d, "ray", nargs="?", const="local", metavar="ADDRESS")
    add_argument(d, "workers")
    add_argument(d, "gpus_per_worker")
    add_argument(d, "cpus_per_worker")
    d.add_argument("--retry-failed", action="store_true", help="also retry inputs the last run could not read "
                   "(by default they are retried only once the file changes)")
    d.add_argument("--dry-run", action="store_true", help="print REL, output, seed and state per image "
                   "(tab-separated); upscale nothing, write nothing")
    d.add_argument("-v", "--verbose", action="store_true", help="print a line per finished image")
    d.set_defaults(func=cmd_upscale_dir)

    r = sub.add_parser("run", help="run a workflow JSON (UI or API format) without ComfyUI")
    r.add_argument("workflow", help="workflow .json (e.g. workflows/nsarm_upscale.json)")
    r.add_argument("--input", action="append", metavar="[NODE=]IMAGE",
                   help="image for the workflow's LoadImage node (NODE=IMAGE when there are several)")
    r.add_argument("-o", "--output", required=True, help="output folder (SaveImage names: <prefix>_00001_.png, "
                   "never overwritten), or a .png path when the workflow saves one image")
    r.add_argument("--models", default=None, help="models folder (ComfyUI layout: nsarm/, text_encoders/); "
                   "default $NSARM_MODELS_DIR or ./models")
    r.add_argument("--set", action="append", metavar="NODE.INPUT=VALUE",
                   help="override an input; NODE = node id, class type used once, or title; VALUE is JSON or text")
    r.add_argument("--input-dir", default=".", help="folder for LoadImage file names that are not absolute")
    add_argument(r, "max_pixels")
    r.add_argument("--overwrite", action="store_true", help="replace an existing --output .png")
    r.set_defaults(func=cmd_run)

    q = sub.add_parser("queue", help="run a workflow on a ComfyUI server and download its images")
    q.add_argument("workflow", help="workflow .json (API format, e.g. workflows/api/nsarm_upscale_api.json; "
                   "UI format is converted with the server's node definitions)")
    add_argument(q, "server")
    q.add_argument("--input", action="append", metavar="[NODE=]IMAGE",
                   help="image uploaded for the workflow's LoadImage node (NODE=IMAGE when there are several)")
    q.add_argument("--out", required=True, help="folder for the downloaded images")
    add_argument(q, "timeout")
    q.add_argument("--set", action="append", metavar="NODE.INPUT=VALUE", help="override an input (as for run)")
    q.add_argument("--overwrite", action="store_true", help="replace files of the same name in --out "
                   "(default: keep them and add _N to the new name)")
    q.set_defaults(func=cmd_queue)

    from .bench import add_cli_commands  # `bench` (speed / memory) and `convert` (bf16 safetensors)

    add_cli_commands(sub)
    return p


def _is_user_error(exc: BaseException) -> bool:
    """Whether `exc` is the user's to fix (printed as one message, exit status 2). Checked against the
    modules already imported only, so that reporting an early error never waits for torch."""
    if isinstance(exc, (UserError, ValueError, OSError)):  # options, files, checkpoints, workflows
        return True
    text, client = sys.modules.get("nsarm_nodes.text"), sys.modules.get("nsarm_nodes.client")
    if text is not None and isinstance(exc, text.PromptNotCachedError):
        return True
    if client is not None and isinstance(exc, client.ComfyClientError):
        return True
    oom = _out_of_memory_type()
    return oom is not None and isinstance(exc, oom)


def _message(exc: BaseException) -> str:
    """The one message for a user error: OSErrors name their file, what went wrong and the fix."""
    from .files import os_problem

    oom = _out_of_memory_type()
    if oom is not None and isinstance(exc, oom):
        return ("out of GPU memory; lower --tile-batch-size (1 is the least), use --dtype bf16, or run on a "
                "larger GPU (see the README's VRAM guide)")
    if isinstance(exc, OSError) and not type(exc).__module__.startswith("nsarm_nodes") and exc.strerror:
        names = " -> ".join(str(n) for n in (exc.filename, exc.filename2) if n is not None)
        return f"{names + ': ' if names else ''}{os_problem(exc)}"
    return str(exc).strip() or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status (0 ok, 2 user error, 128 + N after signal N)."""
    stop = _StopSignals()
    try:
        with stop, warnings.catch_warnings():
            warnings.showwarning = _show_warning
            try:
                args = build_parser().parse_args(argv)
            except SystemExit as exc:  # --help, or a bad option (already printed as one line)
                return exc.code if isinstance(exc.code, int) else EXIT_USER_ERROR
            args.checkpoint = stop.checkpoint  # for progress callbacks: raise a pending stop there
            try:
                code = args.func(args)
                stop.checkpoint()
                return code
            except Exception as exc:
                stop.checkpoint()  # a failure caused by an interruption is reported as the interruption
                if not _is_user_error(exc):
                    raise  # a bug of ours: its traceback is the report
                print(f"error: {_message(exc)}", file=sys.stderr)
                return EXIT_USER_ERROR
    except KeyboardInterrupt as exc:  # Stopped, or Ctrl-C where no handler could be installed
        signum = exc.signum if isinstance(exc, Stopped) else signal.SIGINT
        name = signal.Signals(signum).name
        print(f"\ninterrupted ({'Ctrl-C' if name == 'SIGINT' else name}); nothing was left half-written",
              file=sys.stderr)
        return EXIT_SIGNAL_BASE + signum


def run() -> None:
    """Console entry point (`nsarm`, `python -m nsarm_nodes`): exit with main()'s status. Stop signals
    that arrive while the interpreter shuts down are ignored (no traceback at any moment)."""
    code = main()
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    sys.exit(code)


if __name__ == "__main__":
    run()
