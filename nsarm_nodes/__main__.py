"""Command line: `python -m nsarm_nodes {upscale,run,queue,check-models,make-test-models} ...`.

User errors (missing weights, unreadable files, bad options) print one clear message and exit
with status 2; no traceback. Outputs are written atomically and never overwrite an existing file
unless --overwrite is given.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
DTYPES = {"auto": None, "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class UserError(Exception):
    """An error caused by the command line or the files it names: printed without a traceback."""


def load_image(path: Path):
    """PNG/JPEG/... -> IMAGE [1, H, W, 3] float32 in [0, 1] (grayscale / alpha converted to RGB)."""
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except FileNotFoundError:
        raise UserError(f"{path}: input image not found") from None
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"{path}: not a readable image ({e})") from None
    return torch.from_numpy(arr.copy()).float().div(255).unsqueeze(0)


def save_image(image, path: Path, overwrite: bool) -> None:
    """IMAGE [H, W, 3] in [0, 1] -> PNG at `path`, via a temporary file in the same folder."""
    from PIL import Image

    from .pipeline import to_uint8

    if path.exists() and not overwrite:
        raise UserError(f"{path}: already exists; pass --overwrite to replace it or choose another -o")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            Image.fromarray(to_uint8(image).cpu().numpy()).save(f, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


class ScaleProgress:
    """A one-line progress bar on stderr: one step per scale of each tile batch, per decode and for the
    colour fix."""

    def __init__(self, label: str, stream=sys.stderr):
        self.label, self.stream, self.start = label, stream, time.perf_counter()

    def __call__(self, done: int, total: int) -> None:
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
    from .testing import make_tiny_models

    for role, path in make_tiny_models(args.dir, seed=args.seed).items():
        print(f"{role}: {path}")
    return 0


def output_paths(inputs: list[Path], output: Path | None) -> list[Path]:
    if len(inputs) == 1:
        return [output or inputs[0].with_name(inputs[0].stem + "_nsarm.png")]
    if output is None or output.suffix:
        raise UserError("several inputs need -o to name an output folder (no file extension)")
    return [output / (p.stem + "_nsarm.png") for p in inputs]


def cmd_upscale(args) -> int:
    import torch

    from . import tiling
    from .canvas import plan_grid
    from .pipeline import load_pipeline

    inputs = [Path(p) for p in args.inputs]
    outputs = output_paths(inputs, Path(args.output) if args.output else None)
    for out in outputs:
        if out.exists() and not args.overwrite:
            raise UserError(f"{out}: already exists; pass --overwrite to replace it or choose another -o")
    images = [load_image(p) for p in inputs]
    dtype = DTYPES[args.dtype] and getattr(torch, DTYPES[args.dtype])
    pipe = load_pipeline(args.models, device=args.device, dtype=dtype, text_encoder=not args.cached_prompts_only)
    for src, image, out in zip(inputs, images, outputs):
        _, h, w, _ = image.shape
        t0 = time.perf_counter()
        result = pipe(
            image, prompt=args.prompt, seed=args.seed, tau=args.tau, top_p=args.top_p, cfg=args.cfg,
            next_scale_mode=args.next_scale_mode, negative_prompt=args.negative_prompt,
            color_fix=args.color_fix, tile_overlap=args.overlap, tile_batch_size=args.tile_batch_size,
            blend=args.blend, output_scale=args.output_scale, max_tiles=args.max_tiles,
            progress=ScaleProgress(src.name), tiling=args.tiling,
        )
        save_image(result[0], out, args.overwrite)
        seconds = time.perf_counter() - t0
        print(f"{src} ({w}x{h}) -> {out} ({result.shape[2]}x{result.shape[1]}) in {seconds:.1f}s")
        if args.report:
            grid = plan_grid(h, w, 256, args.overlap, mode=args.tiling)
            score = tiling.seam_score(result[0], grid, args.output_scale) if grid.tiles_per_image > 1 else 1.0
            print(f"  tiles {grid.tiles_per_image} ({grid.rows}x{grid.cols}), seam score {score:.3f} "
                  f"(1.0 = seams as smooth as the interior)")
    return 0


def _run_progress(event: dict) -> None:
    if event["type"] == "executing":
        print(f"[run] node {event['node']} ({event['class_type']}) ...", file=sys.stderr, flush=True)
    elif event["type"] == "executed":
        print(f"[run] node {event['node']} ({event['class_type']}) done in {event['seconds']:.1f}s",
              file=sys.stderr, flush=True)


def _user_exception(exc: BaseException) -> bool:
    """Exceptions a node raises because of its inputs or files (shown without a traceback)."""
    import torch

    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", ())
    return isinstance(exc, (ValueError, LookupError, OSError, UserError)) or (bool(oom) and isinstance(exc, oom))


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

    out = Path(args.output)
    single = out.suffix.lower() == ".png"
    if single and out.exists() and not args.overwrite:
        raise UserError(f"{out}: already exists; pass --overwrite to replace it or choose another --output")
    inputs = runner.parse_input_args(args.input or [])

    def one_save_only(prompt: dict, order: list[str]) -> None:
        saves = [nid for nid in order if prompt[nid]["class_type"] == "SaveImage"]
        if single and len(saves) != 1:
            raise UserError(f"--output {out} names one PNG but the workflow has {len(saves)} SaveImage nodes; "
                            "give an output folder instead")

    if single:
        out.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=".nsarm-run-", dir=out.parent))
    else:
        stage = out
    try:
        try:
            result = runner.run_workflow(args.workflow, inputs=inputs, sets=args.set or [], output_dir=stage,
                                         input_dir=args.input_dir, models_dir=args.models,
                                         progress=_run_progress, before_run=one_save_only)
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
        if single:
            shutil.rmtree(stage, ignore_errors=True)
    for path in saved:
        print(path)
    return 0


def cmd_queue(args) -> int:
    from . import runner
    from .client import ComfyClientError, _base_url, _json, _Timeout, print_progress, queue_workflow

    try:
        workflow = runner.load_workflow(args.workflow)
        is_ui = runner.workflow_format(workflow) == "ui"
        input_types = None
        if is_ui or args.set:  # the server's node definitions map widgets and check --set names
            base = _base_url(args.server)
            status, info = _json(base, "/object_info", timeout=min(args.timeout, 60))
            if status != 200 or not isinstance(info, dict):
                raise UserError(f"ComfyUI at {base}: GET /object_info failed (HTTP {status})")
            input_types = runner.object_info_input_types(info)
        prompt = runner.api_prompt(workflow, input_types)
        prompt = runner.apply_overrides(prompt, args.set or [], input_types)
        inputs = {(runner.find_node(prompt, ref) if ref else ""): path
                  for ref, path in runner.parse_input_args(args.input or []).items()}
        paths = queue_workflow(args.server, prompt, inputs, out_dir=args.out, timeout=args.timeout,
                               on_progress=print_progress, overwrite=args.overwrite)
    except ComfyClientError as e:
        raise UserError(str(e)) from None
    except _Timeout:  # only the /object_info request above can raise it here
        raise UserError(f"ComfyUI at {args.server}: GET /object_info timed out") from None
    for path in paths:
        print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .config import DEFAULT_PROMPT

    p = argparse.ArgumentParser(prog="python -m nsarm_nodes", description="NSARM 4x super-resolution")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("check-models", help="report which weight files are present and what is missing")
    c.add_argument("--models", required=True, help="models folder (ComfyUI layout: nsarm/, text_encoders/)")
    c.set_defaults(func=cmd_check_models)

    m = sub.add_parser("make-test-models", help="write tiny random models in the real layout (for tests)")
    m.add_argument("dir")
    m.add_argument("--seed", type=int, default=0)
    m.set_defaults(func=cmd_make_test_models)

    u = sub.add_parser("upscale", help="upscale image files (any size; tiled at 256 px)")
    u.add_argument("inputs", nargs="+", help="input images")
    u.add_argument("-o", "--output", help="output PNG (one input) or folder (several inputs)")
    u.add_argument("--models", required=True, help="models folder (ComfyUI layout: nsarm/, text_encoders/)")
    u.add_argument("--prompt", default=DEFAULT_PROMPT)
    u.add_argument("--negative-prompt", default=None, help="used only with --cfg != 1")
    u.add_argument("--seed", type=int, default=1)
    u.add_argument("--tau", type=float, default=0.5, help="sampling temperature (NSARM: 0.5)")
    u.add_argument("--top-p", type=float, default=0.97)
    u.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance (NSARM: 1 = off)")
    u.add_argument("--next-scale-mode", choices=("area", "trilinear"), default="area")
    u.add_argument("--color-fix", choices=("adain+wavelet", "adain", "wavelet", "none"), default="adain+wavelet")
    u.add_argument("--overlap", type=int, default=32, help="tile overlap in LR pixels")
    u.add_argument("--blend", choices=("cosine", "linear", "none"), default="cosine",
                   help="overlap blending of --tiling independent")
    u.add_argument("--tiling", choices=("shared", "independent"), default="shared",
                   help="shared: the tiles share one latent canvas and the image is decoded as one (default); "
                        "independent: every tile on its own, blended in pixel space")
    u.add_argument("--tile-batch-size", type=int, default=1)
    u.add_argument("--output-scale", type=float, default=4.0, help="final scale (the model makes 4x; "
                   "other values resample its result)")
    u.add_argument("--max-tiles", type=int, default=64, help="refuse inputs needing more tiles than this")
    u.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    u.add_argument("--dtype", choices=tuple(DTYPES), default="auto", help="transformer block weights")
    u.add_argument("--cached-prompts-only", action="store_true", help="do not load T5; use cached prompts")
    u.add_argument("--report", action="store_true", help="print tile count and seam score")
    u.add_argument("--overwrite", action="store_true")
    u.set_defaults(func=cmd_upscale)

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
    r.add_argument("--overwrite", action="store_true", help="replace an existing --output .png")
    r.set_defaults(func=cmd_run)

    q = sub.add_parser("queue", help="run a workflow on a ComfyUI server and download its images")
    q.add_argument("workflow", help="workflow .json (API format, e.g. workflows/api/nsarm_upscale_api.json; "
                   "UI format is converted with the server's node definitions)")
    q.add_argument("--server", default="http://127.0.0.1:8188", help="ComfyUI URL (default %(default)s)")
    q.add_argument("--input", action="append", metavar="[NODE=]IMAGE",
                   help="image uploaded for the workflow's LoadImage node (NODE=IMAGE when there are several)")
    q.add_argument("--out", required=True, help="folder for the downloaded images")
    q.add_argument("--timeout", type=float, default=3600.0, help="seconds for the whole job (default %(default)g)")
    q.add_argument("--set", action="append", metavar="NODE.INPUT=VALUE", help="override an input (as for run)")
    q.add_argument("--overwrite", action="store_true", help="replace files of the same name in --out "
                   "(default: keep them and add _N to the new name)")
    q.set_defaults(func=cmd_queue)

    from .bench import add_cli_commands  # `bench` (speed / memory) and `convert` (bf16 safetensors)

    add_cli_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .loading import CheckpointError
    from .pipeline import MissingModelsError
    from .text import PromptNotCachedError, TextEncoderError

    try:
        return args.func(args)
    except (UserError, MissingModelsError, CheckpointError, TextEncoderError, PromptNotCachedError,
            ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
