"""Run ComfyUI workflow JSON (API or UI format) without ComfyUI: the headless workflow runner.

    from nsarm_nodes.runner import run_workflow
    result = run_workflow("workflows/nsarm_upscale.json", inputs={"": "photo.png"},
                          output_dir="out", models_dir="models")
    result.files   # {"5": [Path("out/NSARM_00001_.png")]}

What it runs: the NSARM nodes of this repository (``nodes.py`` next to the ``nsarm_nodes`` package,
loaded by path exactly as ComfyUI loads it) plus small stand-ins written here for three core nodes:
``LoadImage`` (a file name in the input folder or an absolute path -> IMAGE [B,H,W,3] float32 + MASK),
``SaveImage`` (PNGs ``<prefix>_00001_.png`` in the output folder; never overwrites, the next free
counter is taken) and ``PreviewImage`` (keeps the images; written only when a temp folder is given).

Formats. API format (``{"<id>": {"class_type", "inputs", "_meta"}}``, what ``POST /prompt`` takes)
runs as is. UI format (what the editor saves: ``nodes`` + ``links``) is converted first
(:func:`ui_to_api`): ``widgets_values`` map positionally onto the node's widget inputs in
``INPUT_TYPES`` order (required, then optional), socket-only inputs (custom types such as
NSARM_MODEL/IMAGE, and ``forceInput``) are skipped, and an INT with ``control_after_generate`` (or
named ``seed``/``noise_seed``) is followed by one extra "fixed"/"randomize"/... value that is
skipped. Frontend-only nodes: ``Note``/``MarkdownNote`` are dropped, ``Reroute`` is followed,
``PrimitiveNode`` provides its value. Node modes, as the ComfyUI frontend treats them:

* muted (mode 2, "never"): the node is left out; inputs fed by it count as unconnected (an error if
  they are required), and a muted output node simply does not run;
* bypassed (mode 4): the node is left out and each consumer receives the bypassed node's input of
  the same type instead (the input at the consumed output's slot index first, then the first input
  of that type); with no such input the consumer's input counts as unconnected.

Execution follows ComfyUI: only nodes upstream of output nodes (``OUTPUT_NODE = True``) run, each
once per run, in topological order (cycles are reported), under ``torch.inference_mode()``; the
node's ``FUNCTION`` is called on a fresh instance with keyword arguments (hidden ``UNIQUE_ID`` /
``PROMPT`` / ``EXTRA_PNGINFO`` included) and returns a tuple or ``{"result": ..., "ui": ...}``.
Widget values are validated and coerced as ComfyUI does (combo membership, INT/FLOAT min/max,
``VALIDATE_INPUTS``) and links are type-checked before anything runs; every problem is reported at
once, naming node id and class_type. ``INPUT_IS_LIST``/``OUTPUT_IS_LIST`` nodes and node expansion
are not supported (a clear error). Output files are staged as hidden temporary files and moved into
place only when the whole run succeeded, so a failing run leaves no file behind.
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import inspect
import itertools
import json
import os
import re
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .files import place_new
from .options import DEFAULT_MAX_PIXELS, OptionError, check_number

__all__ = [
    "NodeExecutionError",
    "RunResult",
    "WorkflowError",
    "api_prompt",
    "apply_overrides",
    "execution_order",
    "find_node",
    "load_node_classes",
    "load_workflow",
    "object_info_input_types",
    "parse_set",
    "run_workflow",
    "set_image_inputs",
    "ui_to_api",
    "widget_slots",
    "workflow_format",
]

MODE_MUTED = 2
MODE_BYPASS = 4
CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize", "increment-wrap")
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
SEED_NAMES = ("seed", "noise_seed")
NOTE_TYPES = ("Note", "MarkdownNote")
REROUTE = "Reroute"
PRIMITIVE = "PrimitiveNode"
PACK_MODULE_NAME = "nsarm_comfyui_nodes"

InputTypes = Callable[[str], "Mapping[str, Any] | None"]
Progress = Callable[[dict], None]


class WorkflowError(ValueError):
    """A problem with the workflow or its inputs, explained for a person (no traceback needed)."""


class NodeExecutionError(WorkflowError):
    """A node raised while running. ``original`` is the exception, ``node_id``/``class_type`` the node."""

    def __init__(self, node_id: str, class_type: str, original: BaseException):
        self.node_id, self.class_type, self.original = node_id, class_type, original
        text = str(original).strip() or type(original).__name__
        super().__init__(f"node {node_id} ({class_type}) failed: {type(original).__name__}: {text}")


# --------------------------------------------------------------------------------------------
# Reading workflows
# --------------------------------------------------------------------------------------------

MAX_JSON_DEPTH = 64  # nesting of a workflow file; real ones stay below 10


def _nesting_depth(data: Any, limit: int) -> int:
    """Depth of nested dicts/lists (iteratively: a hostile file cannot exhaust the stack), stopping
    as soon as `limit` is passed."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, Mapping):
            children = value.values()
        elif isinstance(value, (list, tuple)):
            children = value
        else:
            continue
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        stack.extend((child, depth + 1) for child in children)
    return deepest


def load_workflow(src: str | os.PathLike | Mapping) -> dict:
    """A workflow dict from a path (JSON file) or a dict (deep-copied). Raises WorkflowError."""
    if isinstance(src, Mapping):
        if _nesting_depth(src, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
            raise WorkflowError(f"the workflow is nested more than {MAX_JSON_DEPTH} levels deep; not a ComfyUI workflow")
        return copy.deepcopy(dict(src))
    path = Path(src)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise WorkflowError(f"{path}: workflow file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise WorkflowError(f"{path}: cannot read the workflow ({exc})") from None
    try:
        data = json.loads(text)
    except RecursionError:
        raise WorkflowError(f"{path}: the JSON is nested too deeply to be a ComfyUI workflow") from None
    except ValueError as exc:
        raise WorkflowError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise WorkflowError(f"{path}: a workflow is a JSON object, got {type(data).__name__}")
    if _nesting_depth(data, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise WorkflowError(f"{path}: the JSON is nested more than {MAX_JSON_DEPTH} levels deep; not a ComfyUI workflow")
    return data


def workflow_format(workflow: Mapping) -> str:
    """``"ui"`` (editor format: nodes + links), ``"api"`` (``{id: {class_type, inputs}}``), else WorkflowError."""
    if not isinstance(workflow, Mapping):
        raise WorkflowError(f"a workflow is a JSON object, got {type(workflow).__name__}")
    if "nodes" in workflow and "links" in workflow:
        return "ui"
    if workflow and any(isinstance(v, Mapping) and "class_type" in v for v in workflow.values()):
        return "api"
    if isinstance(workflow.get("prompt"), Mapping) and workflow_format(workflow["prompt"]) == "api":
        return "api"  # a {"prompt": {...}} request body
    raise WorkflowError("not a ComfyUI workflow: expected the UI format (\"nodes\" and \"links\") or the API "
                        "format ({\"<id>\": {\"class_type\": ..., \"inputs\": {...}}})")


def _is_id(value: Any) -> bool:
    return isinstance(value, (int, str)) and not isinstance(value, bool)


def _short(value: Any, n: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= n else text[:n] + "..."


def _check_ui_structure(workflow: Mapping) -> None:
    """The fields of a UI-format workflow that the conversion reads have the types it needs;
    WorkflowError naming the node (or link) and the field otherwise."""
    nodes, links = workflow.get("nodes"), workflow.get("links")
    if not isinstance(nodes, list):
        raise WorkflowError(f'the workflow\'s "nodes" must be a list, got {type(nodes).__name__}')
    if not isinstance(links, list):
        raise WorkflowError(f'the workflow\'s "links" must be a list, got {type(links).__name__}')
    definitions = workflow.get("definitions")
    if definitions is not None and not isinstance(definitions, Mapping):
        raise WorkflowError(f'the workflow\'s "definitions" must be an object, got {type(definitions).__name__}')
    seen: set[str] = set()
    for i, node in enumerate(nodes):
        if not isinstance(node, Mapping):
            raise WorkflowError(f"nodes[{i}] must be an object, got {_short(node)}")
        if not _is_id(node.get("id")):
            raise WorkflowError(f"nodes[{i}]: \"id\" must be a number or a string, got {_short(node.get('id'))}")
        label = f"node {node['id']}"
        if str(node["id"]) in seen:
            raise WorkflowError(f"{label}: the id is used by two nodes")
        seen.add(str(node["id"]))
        if not isinstance(node.get("type"), str) or not node["type"]:
            raise WorkflowError(f"{label}: \"type\" must be a node class name, got {_short(node.get('type'))}")
        label = f"node {node['id']} ({node['type']})"
        mode = node.get("mode", 0)
        if isinstance(mode, bool) or not isinstance(mode, int):
            raise WorkflowError(f"{label}: \"mode\" must be an integer, got {_short(mode)}")
        for key, kinds, what in (("inputs", list, "a list"), ("outputs", list, "a list"),
                                 ("widgets_values", (list, Mapping), "a list"), ("properties", Mapping, "an object"),
                                 ("title", str, "text")):
            if node.get(key) is not None and not isinstance(node[key], kinds):
                raise WorkflowError(f"{label}: \"{key}\" must be {what}, got {_short(node[key])}")
        for j, item in enumerate(node.get("inputs") or []):
            if not isinstance(item, Mapping):
                raise WorkflowError(f"{label}: inputs[{j}] must be an object, got {_short(item)}")
            if not isinstance(item.get("name"), str):
                raise WorkflowError(f"{label}: inputs[{j}].name must be text, got {_short(item.get('name'))}")
            link = item.get("link")
            if link is not None and not _is_id(link):
                raise WorkflowError(f"{label}: input {item['name']!r}: \"link\" must be a link id or null, "
                                    f"got {_short(link)}")
    link_ids: set = set()
    for i, link in enumerate(links):
        if isinstance(link, Mapping):
            lid, origin, slot = link.get("id"), link.get("origin_id"), link.get("origin_slot")
        elif isinstance(link, list) and len(link) >= 5:
            lid, origin, slot = link[0], link[1], link[2]
        else:
            raise WorkflowError(f"links[{i}] must be [id, origin, slot, target, target_slot, type] or an object, "
                                f"got {_short(link)}")
        if not _is_id(lid) or not _is_id(origin) or isinstance(slot, bool) or not isinstance(slot, int) or slot < 0:
            raise WorkflowError(f"links[{i}]: id and origin must be ids and the origin slot an integer >= 0, "
                                f"got {_short(link)}")
        if lid in link_ids:
            raise WorkflowError(f"links[{i}]: link id {lid} is used twice")
        link_ids.add(lid)


def _check_api_structure(prompt: Mapping) -> None:
    """Every node of an API prompt is {"class_type": str, "inputs": {...}} whose list values are
    links [node id, output index]; WorkflowError naming the node and the field otherwise."""
    if not prompt:
        raise WorkflowError("the workflow has no nodes")
    for nid, node in prompt.items():
        if not isinstance(node, Mapping):
            raise WorkflowError(f"node {nid}: must be an object with \"class_type\" and \"inputs\", got {_short(node)}")
        kind = node.get("class_type")
        if not isinstance(kind, str) or not kind:
            raise WorkflowError(f"node {nid}: \"class_type\" must be a node class name, got {_short(kind)}")
        label = f"node {nid} ({kind})"
        inputs = node.get("inputs", {})
        if inputs is not None and not isinstance(inputs, Mapping):
            raise WorkflowError(f"{label}: \"inputs\" must be an object, got {_short(inputs)}")
        meta = node.get("_meta")
        if meta is not None and not isinstance(meta, Mapping):
            raise WorkflowError(f"{label}: \"_meta\" must be an object, got {_short(meta)}")
        for name, value in (inputs or {}).items():
            if isinstance(value, list) and not (len(value) == 2 and _is_id(value[0]) and _is_link(value)):
                raise WorkflowError(f"{label}: input {name!r} is the list {_short(value)}, but a list is a link "
                                    "[\"<node id>\", <output index>]")
            if isinstance(value, list) and value[1] < 0:
                raise WorkflowError(f"{label}: input {name!r} links to output {value[1]}; indexes start at 0")


# --------------------------------------------------------------------------------------------
# Node classes: this pack's nodes.py + stand-ins for the core nodes the shipped workflows use
# --------------------------------------------------------------------------------------------

def pack_nodes_path() -> Path:
    """``nodes.py`` of the node pack: the repository root next to the ``nsarm_nodes`` package."""
    return Path(__file__).resolve().parent.parent / "nodes.py"


_pack_cache: dict[Path, dict[str, type]] = {}


def _load_pack(path: Path) -> dict[str, type]:
    path = path.resolve()
    if path in _pack_cache:
        return _pack_cache[path]
    if not path.is_file():
        raise WorkflowError(f"{path}: the node pack's nodes.py was not found (is nsarm_nodes installed from a "
                            "checkout of the repository?)")
    name = PACK_MODULE_NAME if path == pack_nodes_path() else f"{PACK_MODULE_NAME}_{abs(hash(str(path)))}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # as ComfyUI does; dataclasses need the module registered
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    mappings = getattr(module, "NODE_CLASS_MAPPINGS", None)
    if not isinstance(mappings, Mapping):
        raise WorkflowError(f"{path} has no NODE_CLASS_MAPPINGS")
    _pack_cache[path] = dict(mappings)
    return _pack_cache[path]


def load_node_classes(nodes_py: str | os.PathLike | None = None) -> dict[str, type]:
    """Every class the runner can run: the stand-ins for core nodes, then the pack's NODE_CLASS_MAPPINGS."""
    classes: dict[str, type] = dict(STAND_INS)
    classes.update(_load_pack(Path(nodes_py) if nodes_py else pack_nodes_path()))
    return classes


class _ClassInputTypes:
    """``input_types`` provider over node classes; ``names`` lists what it knows (for error messages)."""

    def __init__(self, classes: Mapping[str, type]):
        self.classes = classes
        self.names = sorted(classes)

    def __call__(self, class_type: str):
        cls = self.classes.get(class_type)
        return None if cls is None else cls.INPUT_TYPES()


def _class_input_types(classes: Mapping[str, type]) -> InputTypes:
    return _ClassInputTypes(classes)


class _ObjectInfoInputTypes:
    def __init__(self, object_info: Mapping[str, Any]):
        self.object_info = object_info
        self.names = sorted(object_info)

    def __call__(self, class_type: str):
        """INPUT_TYPES as the server describes them; malformed parts of the answer are ignored."""
        info = self.object_info.get(class_type)
        if not isinstance(info, Mapping):
            return None
        declared = info.get("input") if isinstance(info.get("input"), Mapping) else {}
        spec = {k: dict(v) for k, v in declared.items() if isinstance(v, Mapping)}
        order = info.get("input_order") if isinstance(info.get("input_order"), Mapping) else {}
        for section, names in order.items():  # current ComfyUI states the order
            if section in spec and isinstance(names, list):
                spec[section] = {n: spec[section][n] for n in names if isinstance(n, str) and n in spec[section]}
        return spec


def object_info_input_types(object_info: Mapping[str, Any]) -> InputTypes:
    """An ``input_types`` provider for :func:`ui_to_api` from a server's ``GET /object_info`` answer."""
    return _ObjectInfoInputTypes(object_info)


# --------------------------------------------------------------------------------------------
# Input specs
# --------------------------------------------------------------------------------------------

def _spec(entry: Any) -> tuple[Any, dict]:
    """(type, options) of one INPUT_TYPES entry: ("INT", {...}), ["INT"], (["a", "b"],) ..."""
    if isinstance(entry, (tuple, list)) and entry:
        kind = entry[0]
        opts = entry[1] if len(entry) > 1 and isinstance(entry[1], Mapping) else {}
        if isinstance(kind, tuple):
            kind = list(kind)
        return kind, dict(opts)
    return entry, {}


def _combo_options(kind: Any, opts: Mapping) -> list | None:
    if isinstance(kind, list):
        return kind
    if kind == "COMBO":
        options = opts.get("options")
        return list(options) if isinstance(options, (list, tuple)) else []
    return None


def _is_widget(kind: Any, opts: Mapping) -> bool:
    if opts.get("forceInput"):
        return False
    return isinstance(kind, list) or kind in WIDGET_TYPES


def _input_specs(input_types: Mapping[str, Any]) -> list[tuple[str, Any, dict, bool]]:
    """(name, type, options, required) for every required and optional input, in order."""
    out = []
    for section, required in (("required", True), ("optional", False)):
        for name, entry in (input_types.get(section) or {}).items():
            kind, opts = _spec(entry)
            out.append((name, kind, opts, required))
    return out


def widget_slots(input_types: Mapping[str, Any]) -> list[tuple[str, bool]]:
    """Widget inputs in ``widgets_values`` order: (name, followed by a control_after_generate value)."""
    slots = []
    for name, kind, opts, _ in _input_specs(input_types):
        if _is_widget(kind, opts):
            control = bool(opts.get("control_after_generate")) or (kind == "INT" and name in SEED_NAMES)
            slots.append((name, control))
    return slots


# --------------------------------------------------------------------------------------------
# UI format -> API format
# --------------------------------------------------------------------------------------------

def _node_label(node: Mapping) -> str:
    return f"node {node.get('id')} ({node.get('type')})"


def ui_to_api(workflow: Mapping, input_types: InputTypes | None = None) -> dict:
    """Convert an editor (UI format) workflow into an API prompt, as the ComfyUI frontend does.

    ``input_types(class_type)`` gives a node's INPUT_TYPES (default: the classes this runner knows;
    :func:`object_info_input_types` adapts a server's /object_info). Muted and bypassed nodes are
    handled as described in the module docstring.
    """
    _check_ui_structure(workflow)
    if input_types is None:
        input_types = _class_input_types(load_node_classes())
    nodes: dict[str, dict] = {str(node["id"]): dict(node) for node in workflow["nodes"]}
    if (workflow.get("definitions") or {}).get("subgraphs"):
        raise WorkflowError("this workflow uses subgraphs, which the headless runner does not support; "
                            "unpack them in the editor (or export the API format) first")

    links: dict[Any, tuple[str, int, Any]] = {}
    for link in workflow["links"]:
        if isinstance(link, Mapping):
            lid, origin, slot, kind = link["id"], link["origin_id"], link["origin_slot"], link.get("type")
        else:
            lid, origin, slot = link[0], link[1], link[2]
            kind = link[5] if len(link) > 5 else None
        links[lid] = (str(origin), slot, kind)

    def input_link(node: Mapping, slot: int) -> Any:
        ins = node.get("inputs") or []
        return ins[slot].get("link") if 0 <= slot < len(ins) else None

    def resolve(link_id: Any, consumer: Mapping, input_name: str, want: Any) -> tuple[str, Any] | None:
        """('link', [src, slot]) / ('value', v) for a link id, or None when nothing usable feeds it.
        ``want`` is the consumer input's type (what a bypassed node must pass through)."""
        seen = set()
        while True:
            if link_id in seen:
                raise WorkflowError(f"{_node_label(consumer)}: input {input_name!r} is fed by a loop of "
                                    "Reroute/bypassed nodes")
            seen.add(link_id)
            if link_id not in links:
                raise WorkflowError(f"{_node_label(consumer)}: input {input_name!r} uses link {link_id}, "
                                    "which is not in the workflow's links")
            origin, slot, kind = links[link_id]
            src = nodes.get(origin)
            if src is None:
                raise WorkflowError(f"{_node_label(consumer)}: input {input_name!r} is linked to node {origin}, "
                                    "which does not exist")
            if src["type"] == REROUTE:
                link_id = input_link(src, 0)
                if link_id is None:
                    return None
                continue
            if src["type"] == PRIMITIVE:
                values = src.get("widgets_values")
                return ("value", values[0]) if isinstance(values, list) and values else None
            mode = src.get("mode", 0)
            if mode == MODE_MUTED:
                return None
            if mode == MODE_BYPASS:
                ins = src.get("inputs") or []
                order = ([slot] if 0 <= slot < len(ins) else []) + [i for i in range(len(ins)) if i != slot]
                wanted = kind if want in (None, "*") else want
                match = [i for i in order if ins[i].get("type") == wanted and ins[i].get("link") is not None]
                if not match:
                    return None
                link_id = ins[match[0]]["link"]
                continue
            return "link", [origin, slot]

    prompt: dict[str, dict] = {}
    for nid, node in nodes.items():
        kind = node["type"]
        if kind in NOTE_TYPES or kind in (REROUTE, PRIMITIVE) or node.get("mode", 0) in (MODE_MUTED, MODE_BYPASS):
            continue
        spec = input_types(kind)
        if spec is None:
            names = getattr(input_types, "names", None)
            hint = ""
            if names:
                hint = f"; known node types: {', '.join(names)}" if len(names) <= 40 else f" ({len(names)} known types)"
            raise WorkflowError(f"{_node_label(node)}: unknown node type {kind!r}, so its widget values cannot be "
                                f"mapped{hint}")
        inputs: dict[str, Any] = {}
        values = node.get("widgets_values")
        if isinstance(values, Mapping):  # some nodes with frontend code store a dict
            widget_values = {name: values[name] for name, _ in widget_slots(spec) if name in values}
        else:
            values = list(values or [])
            widget_values, i = {}, 0
            for name, control in widget_slots(spec):
                if i >= len(values):
                    break
                widget_values[name] = values[i]
                i += 1
                if control and i < len(values) and isinstance(values[i], str) and values[i] in CONTROL_VALUES:
                    i += 1
        inputs.update(widget_values)
        socket_names = {name for name, *_ in _input_specs(spec)}
        for ui_input in node.get("inputs") or []:
            name = ui_input.get("name")
            if name not in socket_names or ui_input.get("link") is None:
                continue
            resolved = resolve(ui_input["link"], node, name, ui_input.get("type"))
            if resolved is None:
                if name not in widget_values:
                    inputs.pop(name, None)
                continue
            inputs[name] = resolved[1]
        title = node.get("title") or (node.get("properties") or {}).get("Node name for S&R") or kind
        prompt[nid] = {"inputs": inputs, "class_type": kind, "_meta": {"title": title}}
    return prompt


def api_prompt(workflow: Mapping, input_types: InputTypes | None = None) -> dict:
    """An API prompt (a new dict) from a workflow in either format; its structure is checked."""
    fmt = workflow_format(workflow)
    if fmt == "ui":
        prompt = ui_to_api(workflow, input_types)
    else:
        body = workflow.get("prompt")
        direct = any(isinstance(v, Mapping) and "class_type" in v for v in workflow.values())
        prompt = copy.deepcopy({str(k): v for k, v in (workflow if direct else body).items()})
    _check_api_structure(prompt)
    for node in prompt.values():
        node["inputs"] = dict(node.get("inputs") or {})
    return prompt


# --------------------------------------------------------------------------------------------
# Editing API prompts: find nodes, --set overrides, input images
# --------------------------------------------------------------------------------------------

def _describe(prompt: Mapping, nid: str) -> str:
    node = prompt[nid]
    title = (node.get("_meta") or {}).get("title")
    extra = f", {title!r}" if title and title != node.get("class_type") else ""
    return f"{nid} ({node.get('class_type')}{extra})"


def find_node(prompt: Mapping[str, Any], ref: str | int, class_types: Iterable[str] | None = None) -> str:
    """The id of the node ``ref`` names: a node id, else a class_type used by one node only, else a
    unique title (``_meta.title``). ``class_types`` restricts the candidates. Raises WorkflowError."""
    ref = str(ref)
    wanted = set(class_types) if class_types is not None else None
    ids = [nid for nid, node in prompt.items() if wanted is None or node.get("class_type") in wanted]
    if ref in ids:
        return ref
    keys = ((lambda n: n.get("class_type"), "type"), (lambda n: (n.get("_meta") or {}).get("title"), "title"))
    for key, what in keys:
        hits = [nid for nid in ids if key(prompt[nid]) == ref]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            several = ", ".join(_describe(prompt, h) for h in hits)
            raise WorkflowError(f"{ref!r} names several nodes by {what} ({several}); use the node id")
    listing = ", ".join(_describe(prompt, nid) for nid in ids) or "none"
    raise WorkflowError(f"no node {ref!r} in the workflow (use a node id, a class type used once, or a title; "
                        f"nodes: {listing})")


def parse_set(spec: str) -> tuple[str, str, Any]:
    """``NODE.INPUT=VALUE`` -> (NODE, INPUT, value); VALUE is parsed as JSON when it is valid JSON, else
    kept as a string (``--set 4.prompt="a cat"`` and ``--set 4.prompt=a cat`` are the same)."""
    target, sep, raw = spec.partition("=")
    node, dot, name = target.strip().rpartition(".")
    if not sep or not dot or not node or not name:
        raise WorkflowError(f"--set {spec!r}: expected NODE.INPUT=VALUE (NODE = id, class type or title), "
                            "e.g. --set 3.seed=42 or --set NSARMModelLoader.checkpoint=NSARM.safetensors")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    if isinstance(value, list):
        raise WorkflowError(f"--set {spec!r}: a list value would be read as a link between nodes; "
                            "lists cannot be set from the command line")
    return node, name.strip(), value


def apply_overrides(prompt: Mapping[str, Any], sets: Iterable[str | tuple[str, str, Any]],
                    input_types: InputTypes | None = None) -> dict:
    """A copy of ``prompt`` with ``--set`` overrides applied. The input must be one the node declares
    (per ``input_types``) or, without that information, one it already has."""
    prompt = copy.deepcopy(dict(prompt))
    for item in sets:
        ref, name, value = parse_set(item) if isinstance(item, str) else item
        nid = find_node(prompt, ref)
        node = prompt[nid]
        spec = input_types(node.get("class_type")) if input_types else None
        names = [n for n, *_ in _input_specs(spec)] if spec is not None else list(node.get("inputs") or {})
        if name not in names:
            raise WorkflowError(f"--set: node {_describe(prompt, nid)} has no input {name!r} "
                                f"(inputs: {', '.join(names) or 'none'})")
        node.setdefault("inputs", {})[name] = value
    return prompt


def _image_nodes(prompt: Mapping[str, Any], inputs: Mapping[str, str | os.PathLike]) -> dict[str, Path]:
    """{node id: image file} for ``inputs`` (keys as in :func:`set_image_inputs`)."""
    out: dict[str, Path] = {}
    for ref, path in inputs.items():
        if ref in ("", None):
            ids = [nid for nid, n in prompt.items() if n.get("class_type") == "LoadImage"]
            if len(ids) != 1:
                what = "no LoadImage node" if not ids else f"{len(ids)} LoadImage nodes ({', '.join(ids)})"
                raise WorkflowError(f"--input: the workflow has {what}; name the node: --input NODE=IMAGE")
            nid = ids[0]
        else:
            nid = find_node(prompt, ref)
        out[nid] = Path(path).expanduser().resolve()
    return out


def set_image_inputs(prompt: Mapping[str, Any], inputs: Mapping[str, str | os.PathLike]) -> dict:
    """A copy of ``prompt`` whose LoadImage nodes read the given files (absolute paths). Key ``""``
    (or None) = the workflow's only LoadImage node; other keys name nodes as :func:`find_node` does."""
    prompt = copy.deepcopy(dict(prompt))
    for nid, path in _image_nodes(prompt, inputs).items():
        prompt[nid].setdefault("inputs", {})["image"] = str(path)
    return prompt


def _file_name(value: Any) -> Any:
    """What ComfyUI stores for a LoadImage input: the file's name, never a local folder."""
    return Path(value.replace("\\", "/")).name if isinstance(value, str) else value


def _public_prompt(prompt: Mapping[str, Any]) -> dict:
    """``prompt`` as written into PNG metadata: LoadImage inputs reduced to file names."""
    public = copy.deepcopy(dict(prompt))
    for node in public.values():
        if node.get("class_type") == "LoadImage" and "image" in (node.get("inputs") or {}):
            node["inputs"]["image"] = _file_name(node["inputs"]["image"])
    return public


def _public_ui_workflow(workflow: Mapping[str, Any], files: Mapping[str, Path]) -> dict:
    """The UI workflow as written into PNG metadata: LoadImage widgets show the file actually read
    (``files``: node id -> path), by name only."""
    public = copy.deepcopy(dict(workflow))
    for node in public.get("nodes") or []:
        if node.get("type") != "LoadImage" or not isinstance(node.get("widgets_values"), list):
            continue
        values = node["widgets_values"]
        if values:
            values[0] = files[str(node["id"])].name if str(node["id"]) in files else _file_name(values[0])
    return public


# --------------------------------------------------------------------------------------------
# Validation and order
# --------------------------------------------------------------------------------------------

def _is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[1], int) and not isinstance(value[1], bool)


def _types_match(out_type: Any, in_type: Any) -> bool:
    if isinstance(in_type, list) or in_type == "COMBO":
        return isinstance(out_type, list) or out_type in ("COMBO", "*", "STRING")
    if not isinstance(out_type, str) or not isinstance(in_type, str):
        return False
    if "*" in (out_type, in_type):
        return True
    return bool(set(out_type.split(",")) & set(in_type.split(",")))


def _natural(nid: str) -> tuple:
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", nid) if p)


def execution_order(prompt: Mapping[str, Any], classes: Mapping[str, type]) -> list[str]:
    """Ids of the nodes that must run (output nodes and everything upstream), dependencies first.

    Raises WorkflowError for unknown node types, links to missing nodes, no output node, or a cycle.
    """
    unknown = [nid for nid, n in prompt.items() if n.get("class_type") not in classes]
    if unknown:
        lines = [f"node {_describe(prompt, nid)}: unknown node type {prompt[nid].get('class_type')!r}"
                 for nid in unknown]
        raise WorkflowError("\n".join(lines + [f"the headless runner can run: {', '.join(sorted(classes))}"]))
    outputs = sorted((nid for nid, n in prompt.items() if getattr(classes[n["class_type"]], "OUTPUT_NODE", False)),
                     key=_natural)
    if not outputs:
        raise WorkflowError("the workflow has no output node (SaveImage, PreviewImage, ...): nothing would run")
    order: list[str] = []
    state: dict[str, int] = {}  # 1 = on the path being explored, 2 = done

    def sources(nid: str) -> list[str]:
        found = []
        for name, value in (prompt[nid].get("inputs") or {}).items():
            if _is_link(value):
                src = str(value[0])
                if src not in prompt:
                    raise WorkflowError(f"node {_describe(prompt, nid)}: input {name!r} is linked to node {src}, "
                                        "which does not exist")
                found.append(src)
        return found

    # Depth-first, with an explicit stack: a long chain of nodes cannot exhaust Python's recursion.
    for root in outputs:
        if state.get(root) == 2:
            continue
        state[root] = 1
        path, stack = [root], [iter(sources(root))]
        while stack:
            for src in stack[-1]:
                if state.get(src) == 2:
                    continue
                if state.get(src) == 1:
                    cycle = (path[path.index(src):] + [src])[::-1]  # data-flow direction: each feeds the next
                    raise WorkflowError("the workflow has a cycle (each node feeds the next): "
                                        + " -> ".join(_describe(prompt, c) for c in cycle))
                state[src] = 1
                path.append(src)
                stack.append(iter(sources(src)))
                break
            else:
                stack.pop()
                done = path.pop()
                state[done] = 2
                order.append(done)
    return order


def _coerce(nid_label: str, name: str, kind: Any, opts: Mapping, value: Any) -> tuple[Any, str | None]:
    """(coerced value, error or None) for a literal widget value, as ComfyUI validates them."""
    if isinstance(value, Mapping) and "__value__" in value:
        value = value["__value__"]
    options = _combo_options(kind, opts)
    if options is not None:
        if not options:
            return value, f"{nid_label}: {name} = {value!r}, but there is nothing to choose from (no files found?)"
        if value not in options:
            shown = ", ".join(map(repr, options[:20])) + (" ..." if len(options) > 20 else "")
            return value, f"{nid_label}: {name} = {value!r} is not one of the choices [{shown}]"
        return value, None
    try:
        if kind in ("INT", "FLOAT") and isinstance(value, str):  # "3", as ComfyUI accepts
            value = int(value) if kind == "INT" else float(value)
        elif kind in ("INT", "FLOAT"):
            pass  # numbers are checked below (type, finite, bounds)
        elif kind == "STRING":
            if not isinstance(value, str):
                raise ValueError
        elif kind == "BOOLEAN":
            if isinstance(value, str) and value.lower() in ("true", "false"):
                value = value.lower() == "true"
            elif not isinstance(value, bool):
                raise ValueError
        else:
            return value, (f"{nid_label}: input {name!r} takes {kind} from another node's output; "
                           f"it cannot be given the literal value {str(value)[:80]!r}")
    except (TypeError, ValueError, OverflowError):
        return value, f"{nid_label}: {name} = {str(value)[:80]!r} is not a valid {kind}"
    if kind in ("INT", "FLOAT"):  # finite and within the node's bounds (nsarm_nodes/options.py)
        try:
            value = check_number(value, kind, opts.get("min"), opts.get("max"), f"{nid_label}: input {name!r}")
        except OptionError as exc:
            return value, str(exc)
    return value, None


def _validate(prompt: Mapping[str, Any], order: Sequence[str], classes: Mapping[str, type]) -> dict[str, dict]:
    """Check every node that will run; returns {id: {input: coerced literal}}. Raises WorkflowError
    listing every problem."""
    errors: list[str] = []
    literals: dict[str, dict] = {}
    for nid in order:
        node = prompt[nid]
        cls = classes[node["class_type"]]
        label = f"node {_describe(prompt, nid)}"
        if getattr(cls, "INPUT_IS_LIST", False) or any(getattr(cls, "OUTPUT_IS_LIST", None) or ()):
            errors.append(f"{label}: list inputs/outputs (INPUT_IS_LIST/OUTPUT_IS_LIST) are not supported by the "
                          "headless runner; run this workflow in ComfyUI")
            continue
        try:
            spec = cls.INPUT_TYPES()
        except Exception as exc:  # noqa: BLE001 - a broken node is reported, not crashed on
            errors.append(f"{label}: INPUT_TYPES() failed: {type(exc).__name__}: {exc}")
            continue
        inputs = node.get("inputs") or {}
        validate_fn = getattr(cls, "VALIDATE_INPUTS", None)
        custom = set()
        if validate_fn is not None:
            params = inspect.signature(validate_fn).parameters
            takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
            custom = {n for n, *_ in _input_specs(spec)} if takes_all else set(params)
        values: dict[str, Any] = {}
        for name, kind, opts, required in _input_specs(spec):
            if name not in inputs or inputs[name] is None:
                if required:
                    how = "connect it" if not _is_widget(kind, opts) else "give it a value"
                    errors.append(f"{label}: required input {name!r} ({kind if isinstance(kind, str) else 'COMBO'}) "
                                  f"is missing ({how})")
                continue
            value = inputs[name]
            if _is_link(value):
                src = str(value[0])
                src_cls = classes[prompt[src]["class_type"]]
                outs = tuple(getattr(src_cls, "RETURN_TYPES", ()))
                slot = value[1]
                if not 0 <= slot < len(outs):
                    errors.append(f"{label}: input {name!r} is linked to output {slot} of node "
                                  f"{_describe(prompt, src)}, which has {len(outs)} output(s)")
                elif not _types_match(outs[slot], kind):
                    expects = kind if isinstance(kind, str) else "COMBO"
                    errors.append(f"{label}: input {name!r} expects {expects} but is linked to output {slot} "
                                  f"({outs[slot]}) of node {_describe(prompt, src)}")
                continue
            if name in custom:
                values[name] = value.get("__value__", value) if isinstance(value, Mapping) else value
                continue
            coerced, err = _coerce(label, name, kind, opts, value)
            if err:
                errors.append(err)
            else:
                values[name] = coerced
        if validate_fn is not None:
            params = inspect.signature(validate_fn).parameters
            takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
            args = {k: v for k, v in values.items() if takes_all or k in params}
            try:
                ok = validate_fn(**args)
            except Exception as exc:  # noqa: BLE001
                ok = f"{type(exc).__name__}: {exc}"
            if ok is not True:
                errors.append(f"{label}: {ok}")
        literals[nid] = values
    if any("NSARMModelLoader" in e and ("choices" in e or "nothing to choose" in e) for e in errors):
        root = Path(os.environ.get("NSARM_MODELS_DIR", "models")).resolve()
        errors.append(f"(model files are looked up in {root / 'nsarm'} and {root / 'text_encoders'}: pass "
                      "--models DIR for another folder, and --set NSARMModelLoader.checkpoint=FILE for other names)")
    if errors:
        raise WorkflowError("the workflow cannot run:\n  " + "\n  ".join(errors))
    return literals


# --------------------------------------------------------------------------------------------
# Stand-ins for core ComfyUI nodes (own code; same data conventions)
# --------------------------------------------------------------------------------------------

@dataclass
class _Staged:
    tmp: Path
    folder: Path
    prefix: str
    node_id: str
    kind: str  # "output" | "temp"
    subfolder: str
    final: Path | None = None


@dataclass
class _RunContext:
    input_dir: Path
    output_dir: Path
    temp_dir: Path | None
    prompt: dict  # as written into PNG metadata (file names only)
    extra_pnginfo: dict | None
    image_files: dict[str, Path] = field(default_factory=dict)  # LoadImage node id -> file given with --input
    max_pixels: int = DEFAULT_MAX_PIXELS
    node_id: str = ""
    staged: list[_Staged] = field(default_factory=list)
    images: dict[str, Any] = field(default_factory=dict)


class LoadImage:
    """Stand-in for ComfyUI's LoadImage: ``image`` is a file in the input folder or an absolute path."""

    CATEGORY = "image"
    RETURN_TYPES = ("IMAGE", "MASK")
    FUNCTION = "load_image"

    def __init__(self, ctx: _RunContext):
        self.ctx = ctx

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("STRING", {"image_upload": True})}}

    def load_image(self, image: str):
        import torch
        from PIL import ImageSequence

        from .images import ImageFileError, frame_arrays, open_image

        path = self.ctx.image_files.get(self.ctx.node_id)
        if path is None:
            if "\0" in image or not image.strip():
                raise WorkflowError(f"LoadImage: {image!r} is not a file name")
            path = Path(image).expanduser()
            if not path.is_absolute():
                path = self.ctx.input_dir / path
        if not path.exists():
            raise WorkflowError(f"input image {path} not found (pass --input IMAGE, or put it in the input "
                                f"folder {self.ctx.input_dir})")
        images, masks = [], []
        try:
            with open_image(path, self.ctx.max_pixels) as img:
                for frame in ImageSequence.Iterator(img):
                    rgb, alpha = frame_arrays(frame, path)
                    if images and rgb.shape != tuple(images[0].shape[1:]):
                        break  # frames of another size cannot share a batch
                    images.append(torch.from_numpy(rgb)[None])
                    if alpha is not None:  # ComfyUI's MASK: 1 where transparent
                        masks.append((1.0 - torch.from_numpy(alpha))[None])
                    else:
                        masks.append(torch.zeros((1, 64, 64), dtype=torch.float32))
        except ImageFileError as exc:
            raise WorkflowError(str(exc)) from None
        mask = torch.cat(masks) if len({tuple(m.shape) for m in masks}) == 1 else masks[0]
        return torch.cat(images), mask


class SaveImage:
    """Stand-in for ComfyUI's SaveImage: ``<prefix>_00001_.png`` in the output folder (next free counter;
    the prefix may hold subfolders). PNGs carry the prompt (and UI workflow) as text chunks."""

    CATEGORY = "image"
    RETURN_TYPES = ()
    FUNCTION = "save_images"
    OUTPUT_NODE = True
    KIND = "output"
    COMPRESS_LEVEL = 4

    def __init__(self, ctx: _RunContext):
        self.ctx = ctx

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",), "filename_prefix": ("STRING", {"default": "ComfyUI"})},
                "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

    def _folder(self) -> Path | None:
        return self.ctx.output_dir

    def save_images(self, images, filename_prefix="ComfyUI", prompt=None, extra_pnginfo=None):
        self.ctx.images[self.ctx.node_id] = images
        root = self._folder()
        if root is None:
            return {"ui": {"images": []}}
        root = root.resolve()
        h, w = int(images.shape[1]), int(images.shape[2])
        prefix = filename_prefix.replace("%width%", str(w)).replace("%height%", str(h))
        target = (root / prefix).resolve()
        if os.path.commonpath([root, target]) != str(root) or target == root:
            raise WorkflowError(f"filename_prefix {filename_prefix!r} points outside the output folder {root}")
        folder, stem = target.parent, target.name
        folder.mkdir(parents=True, exist_ok=True)
        for batch_number, image in enumerate(images):
            tmp = folder / f".nsarm-{uuid.uuid4().hex[:12]}.png.part"
            self.ctx.staged.append(_Staged(tmp, folder, stem.replace("%batch_num%", str(batch_number)),
                                           self.ctx.node_id, self.KIND, folder.relative_to(root).as_posix()
                                           if folder != root else ""))
            _write_png(image, tmp, prompt, extra_pnginfo, self.COMPRESS_LEVEL)
        return {"ui": {"images": []}}  # names are given when the run succeeded (see _commit)


class PreviewImage(SaveImage):
    """Stand-in for ComfyUI's PreviewImage: keeps the images (RunResult.images); writes PNGs only when the
    run has a temp folder."""

    KIND = "temp"
    COMPRESS_LEVEL = 1

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",)}, "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

    def _folder(self) -> Path | None:
        return self.ctx.temp_dir

    def save_images(self, images, filename_prefix="NSARM_preview", prompt=None, extra_pnginfo=None):
        return super().save_images(images, filename_prefix, prompt, extra_pnginfo)


STAND_INS: dict[str, type] = {"LoadImage": LoadImage, "SaveImage": SaveImage, "PreviewImage": PreviewImage}


def _write_png(image, path: Path, prompt, extra_pnginfo, compress_level: int) -> None:
    import numpy as np
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    arr = 255.0 * image.detach().float().cpu().numpy()
    pil = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    meta = PngInfo()
    if prompt is not None:
        meta.add_text("prompt", json.dumps(prompt))
    for key, value in (extra_pnginfo or {}).items():
        meta.add_text(key, json.dumps(value))
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as fh:
            pil.save(fh, format="PNG", pnginfo=meta, compress_level=compress_level)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:  # name the output folder, not the hidden temporary file
        raise OSError(exc.errno, exc.strerror, str(path.parent)) from None


_COUNTER = re.compile(r"_(\d{5,})_\.png$")


def _next_counter(folder: Path, stem: str) -> int:
    best = 0
    for name in os.listdir(folder):
        if name.startswith(stem + "_"):
            m = _COUNTER.search(name)
            if m and name[: m.start()] == stem:
                best = max(best, int(m.group(1)))
    return best + 1


def _commit(staged: list[_Staged]) -> None:
    """Move every staged PNG to its final name (never replacing a file); all or nothing."""
    done: list[_Staged] = []
    try:
        for item in staged:
            names = (item.folder / f"{item.prefix}_{n:05}_.png"
                     for n in itertools.count(_next_counter(item.folder, item.prefix)))
            item.final = place_new(item.tmp, names)
            done.append(item)
    except BaseException:
        for item in done:
            with contextlib.suppress(OSError):
                item.final.unlink()
            item.final = None
        raise


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------

@dataclass
class RunResult:
    prompt: dict                      # the API prompt that ran (after conversion, overrides and inputs)
    order: list[str]                  # node ids in execution order
    files: dict[str, list[Path]]      # node id -> files written (SaveImage; PreviewImage with a temp folder)
    images: dict[str, Any]            # node id -> IMAGE batch each SaveImage/PreviewImage received
    outputs: dict[str, tuple]         # node id -> the node's result tuple
    ui: dict[str, dict]               # node id -> ui dict, as ComfyUI's /history shows it
    seconds: dict[str, float]         # node id -> run time

    @property
    def saved(self) -> list[Path]:
        """Every written file, in execution order."""
        return [p for nid in self.order for p in self.files.get(nid, [])]


@contextlib.contextmanager
def _models_env(models_dir: str | os.PathLike | None):
    if models_dir is None:
        yield
        return
    old = os.environ.get("NSARM_MODELS_DIR")
    os.environ["NSARM_MODELS_DIR"] = str(Path(models_dir).expanduser().resolve())
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("NSARM_MODELS_DIR", None)
        else:
            os.environ["NSARM_MODELS_DIR"] = old


def _hidden_value(kind: str, nid: str, ctx: _RunContext) -> Any:
    return {"UNIQUE_ID": nid, "PROMPT": ctx.prompt, "EXTRA_PNGINFO": ctx.extra_pnginfo}.get(kind)


def run_workflow(workflow: str | os.PathLike | Mapping, *, inputs: Mapping[str, str | os.PathLike] | None = None,
                 sets: Iterable[str | tuple[str, str, Any]] = (), output_dir: str | os.PathLike = "output",
                 input_dir: str | os.PathLike = ".", temp_dir: str | os.PathLike | None = None,
                 models_dir: str | os.PathLike | None = None, classes: Mapping[str, type] | None = None,
                 progress: Progress | None = None,
                 before_run: Callable[[dict, list[str]], None] | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> RunResult:
    """Run a workflow (path or dict; API or UI format) and return what it produced.

    ``inputs`` sets LoadImage files (key ``""`` = the only LoadImage node, else a node id/type/title),
    ``sets`` are ``NODE.INPUT=VALUE`` overrides, ``models_dir`` is the models folder in ComfyUI's
    layout (nsarm/, text_encoders/; default $NSARM_MODELS_DIR or ./models). ``progress`` receives
    ``{"type": "executing", "node", "class_type"}`` and ``{"type": "executed", "node", "class_type",
    "seconds"}`` events. ``before_run(prompt, order)`` is called once the workflow is validated, before
    any node runs (it may raise to refuse the run). LoadImage refuses images of more than
    ``max_pixels`` pixels before decoding them. Raises WorkflowError (NodeExecutionError when a node
    raised); a failed run writes no file. PNG metadata holds the workflow with image file names,
    never local folders.
    """
    import torch

    emit = progress or (lambda event: None)
    classes = dict(classes) if classes is not None else load_node_classes()
    source = load_workflow(workflow)
    with _models_env(models_dir):
        input_types = _class_input_types(classes)
        prompt = api_prompt(source, input_types)
        files = _image_nodes(prompt, inputs or {})
        for nid, path in files.items():  # the node reads `path`; the prompt (and metadata) name the file
            prompt[nid]["inputs"]["image"] = path.name
        prompt = apply_overrides(prompt, sets, input_types)
        files = {nid: path for nid, path in files.items() if prompt[nid]["inputs"].get("image") == path.name}
        order = execution_order(prompt, classes)
        literals = _validate(prompt, order, classes)
        if before_run is not None:
            before_run(prompt, order)

        is_ui = workflow_format(source) == "ui"
        ctx = _RunContext(Path(input_dir).expanduser(), Path(output_dir).expanduser(),
                          Path(temp_dir).expanduser() if temp_dir is not None else None, _public_prompt(prompt),
                          {"workflow": _public_ui_workflow(source, files)} if is_ui else None,
                          image_files=files, max_pixels=max_pixels)
        outputs: dict[str, tuple] = {}
        ui: dict[str, dict] = {}
        seconds: dict[str, float] = {}
        try:
            with torch.inference_mode():
                for nid in order:
                    node = prompt[nid]
                    class_type = node["class_type"]
                    cls = classes[class_type]
                    emit({"type": "executing", "node": nid, "class_type": class_type})
                    kwargs = dict(literals[nid])
                    for name, value in (node.get("inputs") or {}).items():
                        if _is_link(value):
                            kwargs[name] = outputs[str(value[0])][value[1]]
                    for name, kind in (cls.INPUT_TYPES().get("hidden") or {}).items():
                        kwargs[name] = _hidden_value(kind, nid, ctx)
                    ctx.node_id = nid
                    t0 = time.perf_counter()
                    try:
                        obj = cls(ctx) if class_type in STAND_INS and cls is STAND_INS[class_type] else cls()
                        result = getattr(obj, cls.FUNCTION)(**kwargs)
                    except (WorkflowError, KeyboardInterrupt):
                        raise
                    except Exception as exc:  # noqa: BLE001 - reported with node id and type
                        raise NodeExecutionError(nid, class_type, exc) from exc
                    seconds[nid] = time.perf_counter() - t0
                    outputs[nid], ui_out = _normalise_result(nid, class_type, cls, result)
                    if ui_out is not None:
                        ui[nid] = ui_out
                    emit({"type": "executed", "node": nid, "class_type": class_type, "seconds": seconds[nid]})
            _commit(ctx.staged)
        finally:
            for item in ctx.staged:
                if item.final is None:
                    with contextlib.suppress(OSError):
                        item.tmp.unlink()
    files: dict[str, list[Path]] = {}
    for item in ctx.staged:
        files.setdefault(item.node_id, []).append(item.final)
        ui.setdefault(item.node_id, {"images": []}).setdefault("images", []).append(
            {"filename": item.final.name, "subfolder": item.subfolder, "type": item.kind})
    return RunResult(prompt, order, files, ctx.images, outputs, ui, seconds)


def _normalise_result(nid: str, class_type: str, cls: type, result: Any) -> tuple[tuple, dict | None]:
    returns = tuple(getattr(cls, "RETURN_TYPES", ()))
    ui_out = None
    if isinstance(result, Mapping):
        if "expand" in result:
            raise WorkflowError(f"node {nid} ({class_type}) expanded into a subgraph, which the headless runner "
                                "does not support")
        ui_out = result.get("ui")
        result = result.get("result", ())
    if result is None:
        result = ()
    if not isinstance(result, (tuple, list)):
        raise WorkflowError(f"node {nid} ({class_type}) returned {type(result).__name__}, not a tuple")
    result = tuple(result)
    if len(result) != len(returns):
        raise WorkflowError(f"node {nid} ({class_type}) returned {len(result)} value(s) for {len(returns)} "
                            f"declared output(s) {returns}")
    return result, ui_out


# --------------------------------------------------------------------------------------------
# Command-line helpers (used by `python -m nsarm_nodes run|queue`)
# --------------------------------------------------------------------------------------------

def parse_input_args(values: Iterable[str]) -> dict[str, Path]:
    """``--input IMG`` / ``--input NODE=IMG`` values -> {node ref ("" = the only LoadImage): path}.

    A value is read as NODE=IMG only when it is not itself an existing file."""
    out: dict[str, Path] = {}
    for value in values:
        ref, sep, path = value.partition("=")
        if not sep or Path(value).expanduser().exists() or not ref:
            ref, path = "", value
        if ref in out:
            what = "the workflow's LoadImage node" if not ref else f"node {ref!r}"
            raise WorkflowError(f"--input: two images for {what}; give NODE=IMAGE for each LoadImage node")
        image = Path(path).expanduser()
        if not image.exists():
            raise WorkflowError(f"--input {value!r}: input image {image} not found")
        if not image.is_file():
            raise WorkflowError(f"--input {value!r}: {image} is not a regular file; give an image file")
        out[ref] = image
    return out

