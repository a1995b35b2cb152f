"""Text conditioning: the Flan-T5-XL encoder and an on-disk cache of prompt embeddings.

NSARM (like Infinity) conditions on the last hidden state of the Flan-T5-XL *encoder*: each
prompt is tokenised (at most 512 tokens, EOS ``</s>`` appended), encoded, and only its valid
tokens -- EOS included, padding dropped -- are kept. The valid tokens of all prompts of a batch
are stored back to back in ``kv_compact [sum L, C_t5]`` with ``cu_seqlens [B+1]`` (int32, the
flash-attn varlen layout), see `PromptEmbeds`. An empty prompt gives a single token (EOS).

Pieces:

- `PromptEmbeds`: the immutable packed features (what the sampler consumes).
- `T5TextEncoder`: a *lazy* wrapper around ``transformers.T5EncoderModel`` + ``AutoTokenizer``
  reading a local Hugging Face folder (``google/flan-t5-xl`` layout). Construction only checks the
  folder and computes a cheap `identity`; the 2.4 GB model is loaded on the first `encode` (or an
  explicit `load`). fp16 on CUDA as upstream, fp32 on CPU (CPU fp16 is slow and partly unsupported).
- `PromptCache`: one safetensors file per (encoder identity, prompt), written atomically.
- `encode_prompts`: cache first, the encoder (loaded only then) for the misses; with no encoder
  ("cached prompts only") a miss is a `PromptNotCachedError` naming the prompts.

Each prompt is encoded on its own, without padding. In exact arithmetic this equals upstream's
``padding='max_length'`` batch (padded keys get a zero attention weight and T5's position bias
is relative), and it makes a prompt's features independent of the other prompts in the batch,
so a cached entry and a fresh encoding agree. Duplicate prompts (e.g. one prompt for all tiles)
are encoded once.

``transformers`` is imported lazily (about 6 s), so importing this module is cheap. There is no
global state: every cache and encoder is an explicit object.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

T5_SOURCE = "google/flan-t5-xl"
T5_URL = "https://huggingface.co/google/flan-t5-xl"
MAX_TEXT_TOKENS = 512  # tokenizer max_length upstream (= rows of the transformer's cfg_uncond)
CACHE_FORMAT = "nsarm-prompt-embeds/1"

# Weight files `from_pretrained` understands (single file or index + shards).
_WEIGHT_SINGLE = ("model.safetensors", "pytorch_model.bin")
_WEIGHT_INDEX = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "spiece.model")  # either one suffices
_TOKENIZER_AUX = ("tokenizer_config.json", "special_tokens_map.json")


class TextEncoderError(ValueError):
    """A text-encoder folder that cannot be used, or an encoder that produced unusable output."""


class PromptNotCachedError(LookupError):
    """"Cached prompts only" mode met a prompt that is not in the prompt cache."""


def _short(prompt: str, n: int = 60) -> str:
    s = prompt if len(prompt) <= n else prompt[:n] + "..."
    return repr(s)


# ------------------------------------------------------------------------------------------------
# Packed prompt features
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class PromptEmbeds:
    """T5 features of a batch of prompts, packed without padding.

    ``kv_compact`` [sum L, C_t5] float (float32 from the encoder): the valid tokens of prompt 0,
    then prompt 1, ...; ``cu_seqlens`` [B+1] int32, ``[0, L0, L0+L1, ...]``, on the same device;
    ``prompts``: the B prompt strings (informational; "" for raw features).

    Immutable: every method returns a new object and no tensor is modified in place (ComfyUI
    caches node outputs). The tensors are not copied on construction; do not modify them.
    """

    kv_compact: torch.Tensor
    cu_seqlens: torch.Tensor
    prompts: tuple[str, ...]
    _lengths: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        kv, cu = self.kv_compact, self.cu_seqlens
        if not isinstance(kv, torch.Tensor) or kv.ndim != 2 or not kv.is_floating_point():
            raise ValueError(f"kv_compact must be a 2-D float tensor [sum L, C], got {_describe(kv)}")
        if not isinstance(cu, torch.Tensor) or cu.ndim != 1 or cu.dtype != torch.int32 or cu.numel() < 2:
            raise ValueError(f"cu_seqlens must be a 1-D int32 tensor [B+1] with B >= 1, got {_describe(cu)}")
        if cu.device != kv.device:
            raise ValueError(f"cu_seqlens is on {cu.device} but kv_compact on {kv.device}")
        bounds = cu.tolist()
        lengths = tuple(b - a for a, b in zip(bounds[:-1], bounds[1:]))
        if bounds[0] != 0 or min(lengths) < 1 or bounds[-1] != kv.shape[0]:
            raise ValueError(
                f"cu_seqlens {bounds[:8]}{'...' if len(bounds) > 8 else ''} must start at 0, grow by >= 1 "
                f"token per prompt and end at kv_compact's {kv.shape[0]} rows"
            )
        prompts = tuple(self.prompts)
        if len(prompts) != len(lengths) or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"need {len(lengths)} prompt strings, got {len(prompts)}")
        object.__setattr__(self, "prompts", prompts)
        object.__setattr__(self, "_lengths", lengths)

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_features(cls, kv_compact: torch.Tensor, cu_seqlens, prompts: Sequence[str] | None = None) -> PromptEmbeds:
        """Wrap raw packed features (e.g. golden vectors or upstream's ``(kv_compact, cu_seqlens_k)``).
        ``cu_seqlens`` may be any integer tensor or a list; it is converted to int32 on kv's device."""
        cu = torch.as_tensor(cu_seqlens).to(device=kv_compact.device, dtype=torch.int32)
        if prompts is None:
            prompts = ("",) * max(cu.numel() - 1, 0)
        return cls(kv_compact, cu, tuple(prompts))

    @classmethod
    def from_lengths(cls, kv_compact: torch.Tensor, lengths: Sequence[int], prompts: Sequence[str] | None = None) -> PromptEmbeds:
        bounds = [0]
        for n in lengths:
            bounds.append(bounds[-1] + int(n))
        return cls.from_features(kv_compact, bounds, prompts)

    @classmethod
    def cat(cls, items: Sequence[PromptEmbeds]) -> PromptEmbeds:
        """Concatenate batches (prompt order kept). All items must share channels, device, dtype."""
        items = list(items)
        if not items:
            raise ValueError("PromptEmbeds.cat needs at least one item")
        if len(items) == 1:
            return items[0]
        first = items[0].kv_compact
        for it in items[1:]:
            k = it.kv_compact
            if k.shape[1] != first.shape[1] or k.device != first.device or k.dtype != first.dtype:
                raise ValueError(
                    f"cannot concatenate prompt features of {tuple(first.shape[1:])}/{first.dtype}/{first.device} "
                    f"and {tuple(k.shape[1:])}/{k.dtype}/{k.device}"
                )
        kv = torch.cat([it.kv_compact for it in items], dim=0)
        lengths = [n for it in items for n in it.lengths]
        prompts = [p for it in items for p in it.prompts]
        return cls.from_lengths(kv, lengths, prompts)

    # -- properties ---------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return len(self._lengths)

    @property
    def lengths(self) -> tuple[int, ...]:
        """Valid tokens per prompt (EOS included)."""
        return self._lengths

    @property
    def max_seqlen(self) -> int:
        return max(self._lengths)

    @property
    def channels(self) -> int:
        return self.kv_compact.shape[1]

    @property
    def device(self) -> torch.device:
        return self.kv_compact.device

    # -- transforms (all return new objects) --------------------------------------------------
    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> PromptEmbeds:
        """Move both tensors (cu_seqlens stays int32). Returns self when nothing changes."""
        kv = self.kv_compact.to(device=device, dtype=dtype)
        cu = self.cu_seqlens.to(device=kv.device)
        if kv is self.kv_compact and cu is self.cu_seqlens:
            return self
        return PromptEmbeds(kv, cu, self.prompts)

    def prompt_features(self, i: int) -> torch.Tensor:
        """[L_i, C] view of prompt i's tokens."""
        bounds = self._bounds()
        return self.kv_compact[bounds[i] : bounds[i + 1]]

    def select(self, indices: Iterable[int]) -> PromptEmbeds:
        """The prompts at `indices` (any order, repeats allowed), e.g. a chunk of a tile batch."""
        idx = [int(i) for i in indices]
        if not idx:
            raise ValueError("select needs at least one index")
        b = self.batch_size
        for i in idx:
            if not -b <= i < b:
                raise IndexError(f"prompt index {i} out of range for a batch of {b}")
        idx = [i % b for i in idx]
        kv = torch.cat([self.prompt_features(i) for i in idx], dim=0)
        return PromptEmbeds.from_lengths(kv, [self._lengths[i] for i in idx], [self.prompts[i] for i in idx])

    def repeat(self, n: int) -> PromptEmbeds:
        """Each prompt repeated n times consecutively: [p0, p1] -> [p0]*n + [p1]*n (tiles of image i
        follow each other)."""
        if int(n) != n or n < 1:
            raise ValueError(f"repeat count must be a positive integer, got {n!r}")
        n = int(n)
        if n == 1:
            return self
        return self.select([i for i in range(self.batch_size) for _ in range(n)])

    def unbind(self) -> list[PromptEmbeds]:
        """One single-prompt PromptEmbeds per prompt."""
        return [self.select([i]) for i in range(self.batch_size)]

    def _bounds(self) -> list[int]:
        bounds = [0]
        for n in self._lengths:
            bounds.append(bounds[-1] + n)
        return bounds


def negative_or_none(negative: str | PromptEmbeds | None) -> str | PromptEmbeds | None:
    """None for a negative prompt that is empty or whitespace only (a string, or PromptEmbeds
    encoded from such strings): with cfg != 1 the unconditional branch then uses the model's
    learned unconditional rows (`cfg_uncond`, what it was trained with), not T5 features of "".
    Every entry point (NSARMPipeline, the nodes, the command line, folder jobs) passes negatives
    through this."""
    if negative is None:
        return None
    prompts = (negative,) if isinstance(negative, str) else negative.prompts
    return negative if any(p.strip() for p in prompts) else None


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor {tuple(x.shape)} {x.dtype}"
    return type(x).__name__


# ------------------------------------------------------------------------------------------------
# Flan-T5 encoder
# ------------------------------------------------------------------------------------------------
@runtime_checkable
class TextEncoderLike(Protocol):
    """What `encode_prompts` needs from an encoder (T5TextEncoder, or a test double)."""

    identity: str

    def encode(self, prompts: Sequence[str]) -> PromptEmbeds: ...


def _missing_error(folder: Path, what: str) -> TextEncoderError:
    return TextEncoderError(
        f"{folder}: not a usable Flan-T5 text-encoder folder: {what}. Download the Hugging Face "
        f"repository {T5_SOURCE} ({T5_URL}) into this folder: config.json, the tokenizer "
        f"(tokenizer.json or spiece.model, with tokenizer_config.json and special_tokens_map.json) and "
        f"the weights (model.safetensors, or model.safetensors.index.json with its model-*.safetensors "
        f"shards; pytorch_model*.bin also works), e.g. `huggingface-cli download {T5_SOURCE} "
        f"--local-dir <folder>`."
    )


def find_weight_files(folder: Path) -> list[Path]:
    """The weight files `from_pretrained` would use (safetensors preferred), or [] when none.
    Raises `TextEncoderError` when an index lists shards that are missing."""
    for single, index in zip(_WEIGHT_SINGLE, _WEIGHT_INDEX):
        if (folder / single).is_file():
            return [folder / single]
        if (folder / index).is_file():
            try:
                weight_map = json.loads((folder / index).read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise _missing_error(folder, f"{index} is unreadable ({e})") from None
            shards = sorted(set(weight_map.values()))
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise _missing_error(folder, f"{index} lists shard(s) that are missing: {', '.join(missing)}")
            return [folder / index] + [folder / s for s in shards]
    return []


def _check_pickled_weights(path: Path, folder: Path) -> None:
    """A pytorch_model*.bin is a pickle: read it the way checkpoints are read (weights only, memory
    mapped: cheap, nothing executed) before transformers sees it, and refuse it with the fix
    when it needs code execution or is damaged."""
    from .loading import CheckpointError, read_checkpoint

    try:
        read_checkpoint(path)
    except CheckpointError as e:
        raise TextEncoderError(
            f"{str(e).rstrip('.')}. Fix: use the safetensors weights instead: put model.safetensors (or "
            f"model.safetensors.index.json with its model-*.safetensors shards) from {T5_SOURCE} ({T5_URL}) into "
            f"{folder} and remove {path.name}"
        ) from None


def _stat_sig(path: Path) -> list:
    st = path.stat()
    return [path.name, st.st_size, st.st_mtime_ns]


class T5TextEncoder:
    """Flan-T5 encoder from a local Hugging Face folder, loaded lazily.

    ``T5TextEncoder(folder, device=None, dtype=None)``: checks that the folder holds config.json,
    a tokenizer and weights (raising `TextEncoderError` naming what is missing and the source
    ``google/flan-t5-xl``) and computes `identity`; nothing heavy happens until `encode`/`load`.
    device defaults to CUDA when available, else CPU; dtype defaults to float16 on CUDA (as the
    reference) and float32 on CPU. Files are read with ``local_files_only=True``: never a download.

    `identity` = folder name + hash of config.json + hash of (name, size, mtime) of the weight and
    tokenizer files: cheap, and it changes when the files are replaced. It is the prompt-cache key
    prefix. The compute dtype is not part of it (fp16 and fp32 features of the same model share
    cache entries).
    """

    def __init__(self, folder: str | os.PathLike, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        self.folder = Path(folder).expanduser()
        folder = self.folder
        if not folder.is_dir():
            raise _missing_error(folder, "the folder does not exist")
        config_path = folder / "config.json"
        if not config_path.is_file():
            raise _missing_error(folder, "config.json is missing")
        config_bytes = config_path.read_bytes()
        try:
            config = json.loads(config_bytes)
        except ValueError as e:
            raise _missing_error(folder, f"config.json is not valid JSON ({e})") from None
        if not isinstance(config, dict):
            raise _missing_error(folder, "config.json is not a JSON object")
        if config.get("model_type") != "t5":
            raise TextEncoderError(
                f"{folder}: config.json has model_type {config.get('model_type')!r}, expected 't5' "
                f"(NSARM uses {T5_SOURCE}, {T5_URL})"
            )
        tokenizer_files = [folder / n for n in _TOKENIZER_FILES if (folder / n).is_file()]
        if not tokenizer_files:
            raise _missing_error(folder, "the tokenizer is missing (neither tokenizer.json nor spiece.model)")
        weights = find_weight_files(folder)
        if not weights:
            present = sorted(p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".pth", ".pt"))
            found = f" (found {', '.join(present)}: single-file conversions are not a Hugging Face folder)" if present else ""
            raise _missing_error(folder, f"the model weights are missing{found}")
        for path in weights:
            if path.suffix == ".bin":
                _check_pickled_weights(path, folder)
        try:
            self.d_model: int = int(config.get("d_model", 0))  # 2048 for Flan-T5-XL = transformer text channels
        except (TypeError, ValueError):
            raise _missing_error(folder, f"config.json has d_model {config.get('d_model')!r}, not a number") from None

        aux = [folder / n for n in _TOKENIZER_AUX if (folder / n).is_file()]
        files_sig = json.dumps([_stat_sig(p) for p in weights + tokenizer_files + aux])
        self.identity: str = (
            f"{folder.name}:config={hashlib.sha256(config_bytes).hexdigest()[:16]}"
            f":files={hashlib.sha256(files_sig.encode()).hexdigest()[:16]}"
        )

        self.device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = dtype if dtype is not None else (torch.float16 if self.device.type == "cuda" else torch.float32)
        self._model = None
        self._tokenizer = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        state = "loaded" if self.loaded else "not loaded"
        return f"T5TextEncoder({str(self.folder)!r}, device={self.device}, dtype={self.dtype}, {state})"

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def load(self) -> None:
        """Load tokenizer and encoder now (idempotent)."""
        with self._lock:
            if self._model is not None:
                return
            import transformers
            from transformers import AutoTokenizer, T5EncoderModel

            version = tuple(int(p) for p in transformers.__version__.split(".")[:2] if p.isdigit())
            dtype_kw = "dtype" if version >= (4, 56) else "torch_dtype"
            try:
                tokenizer = AutoTokenizer.from_pretrained(str(self.folder), legacy=True, local_files_only=True)
                model = T5EncoderModel.from_pretrained(str(self.folder), local_files_only=True, **{dtype_kw: self.dtype})
            except Exception as e:  # noqa: BLE001 - transformers reading damaged / foreign files of the user's
                raise TextEncoderError(
                    f"{self.folder}: loading the Flan-T5 encoder failed ({type(e).__name__}: {e}). "
                    f"Expected a copy of {T5_SOURCE} ({T5_URL})."
                ) from e
            # Device only: a dtype cast here would undo T5's `_keep_in_fp32_modules = ["wo"]` (the FFN
            # output projections stay fp32 under fp16 loading, exactly as in the reference).
            model = model.to(device=self.device).eval().requires_grad_(False)
            self._tokenizer, self._model = tokenizer, model

    def unload(self) -> None:
        """Drop the model (frees its memory); the next `encode` loads it again."""
        with self._lock:
            self._model = None
            self._tokenizer = None

    def tokenize(self, prompt: str) -> list[int]:
        """Token ids as the encoder sees them: at most 512, ending with EOS. Warns on truncation."""
        self.load()
        tok = self._tokenizer
        full = tok(prompt, truncation=False, verbose=False)["input_ids"]
        ids = full
        if len(full) > MAX_TEXT_TOKENS:
            ids = tok(prompt, max_length=MAX_TEXT_TOKENS, truncation=True)["input_ids"]
            warnings.warn(
                f"prompt {_short(prompt)} has {len(full)} tokens; Flan-T5 conditioning uses at most "
                f"{MAX_TEXT_TOKENS} (EOS included), the rest is ignored",
                stacklevel=3,
            )
        if not ids or ids[-1] != tok.eos_token_id:
            raise TextEncoderError(
                f"{self.folder}: the tokenizer did not append EOS ({tok.eos_token!r}) to {_short(prompt)}; "
                f"the tokenizer files do not match {T5_SOURCE}"
            )
        return list(ids)

    def encode(self, prompts: Sequence[str] | str) -> PromptEmbeds:
        """Encode prompts -> PromptEmbeds (float32, on CPU). Each distinct prompt runs once, alone."""
        prompts = _as_prompt_list(prompts)
        self.load()
        feats: dict[str, torch.Tensor] = {}
        for p in prompts:
            if p in feats:
                continue
            ids = self.tokenize(p)
            input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
            mask = torch.ones_like(input_ids)
            n_valid = int(mask.sum())  # attention-mask sum = tokens up to and including EOS
            with torch.no_grad():
                hidden = self._model(input_ids=input_ids, attention_mask=mask).last_hidden_state
            kv = hidden[0, :n_valid].float().cpu().contiguous()
            if not torch.isfinite(kv).all():
                raise TextEncoderError(
                    f"the Flan-T5 encoder produced non-finite features for {_short(p)} in {self.dtype}; "
                    f"try dtype=torch.float32 (or bfloat16)"
                )
            feats[p] = kv
        return PromptEmbeds.from_lengths(torch.cat([feats[p] for p in prompts]), [feats[p].shape[0] for p in prompts], prompts)


def _as_prompt_list(prompts: Sequence[str] | str) -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts given")
    bad = [type(p).__name__ for p in prompts if not isinstance(p, str)]
    if bad:
        raise TypeError(f"prompts must be strings, got {', '.join(sorted(set(bad)))}")
    return prompts


# ------------------------------------------------------------------------------------------------
# On-disk prompt cache
# ------------------------------------------------------------------------------------------------
def cache_key(encoder_identity: str, prompt: str) -> str:
    return hashlib.sha256(f"{encoder_identity}\n{prompt}".encode("utf-8")).hexdigest()


def _prompt_hash(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:16]


class PromptCache:
    """Prompt embeddings on disk, one safetensors file per (encoder identity, prompt).

    File ``<directory>/<sha256(prompt)[:16]>-<key>.safetensors`` with
    ``key = sha256(identity + "\\n" + prompt)``; tensor ``kv`` [L, C] float32, metadata ``format``,
    ``prompt``, ``encoder_identity`` (checked on read, so a foreign or damaged file is a miss).
    The prompt-hash prefix lets "cached prompts only" mode find a prompt without knowing the
    encoder identity. Writes go to a temporary file in the same directory that is fsynced and then
    `os.replace`d, so a reader never sees a partial file and a failed write leaves nothing behind.
    The directory is created on the first `put`.
    """

    SUFFIX = ".safetensors"
    TMP_PREFIX = ".tmp-"

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory).expanduser()

    def __repr__(self) -> str:
        return f"PromptCache({str(self.directory)!r})"

    def path(self, prompt: str, encoder_identity: str) -> Path:
        return self.directory / f"{_prompt_hash(prompt)}-{cache_key(encoder_identity, prompt)}{self.SUFFIX}"

    def get(self, prompts: Sequence[str] | str, encoder_identity: str | None, *, channels: int | None = None,
            problems: dict[str, str] | None = None) -> list[PromptEmbeds | None]:
        """One single-prompt PromptEmbeds (float32, CPU) or None per prompt. With
        ``encoder_identity=None`` any encoder's entry matches (newest file wins, with a warning
        when several encoders cached the prompt). An entry that is not usable (unreadable, wrong
        prompt or encoder, not [L >= 1, ``channels``] float32, NaN/inf) is a miss with a warning;
        ``problems`` (if given) receives prompt -> what was wrong."""
        out: list[PromptEmbeds | None] = []
        for p in _as_prompt_list(prompts):
            if encoder_identity is not None:
                out.append(self._read(self.path(p, encoder_identity), p, encoder_identity, channels, problems))
            else:
                out.append(self._find_any(p, channels, problems))
        return out

    def put(self, embeds: PromptEmbeds, encoder_identity: str) -> list[Path]:
        """Store every prompt of `embeds` (duplicates once). Returns the written paths."""
        if not isinstance(encoder_identity, str) or not encoder_identity:
            raise ValueError("put needs the encoder identity (a non-empty string)")
        self.directory.mkdir(parents=True, exist_ok=True)
        written: dict[str, Path] = {}
        for i, p in enumerate(embeds.prompts):
            if p in written:
                continue
            kv = embeds.prompt_features(i).detach().to(device="cpu", dtype=torch.float32).contiguous()
            meta = {"format": CACHE_FORMAT, "prompt": p, "encoder_identity": encoder_identity}
            written[p] = self._write_atomic(self.path(p, encoder_identity), {"kv": kv}, meta)
        return list(written.values())

    def _write_atomic(self, path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
        fd, tmp = tempfile.mkstemp(prefix=self.TMP_PREFIX, suffix=".part", dir=self.directory)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=metadata)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        return path

    def _read(self, path: Path, prompt: str, encoder_identity: str | None, channels: int | None = None,
              problems: dict[str, str] | None = None) -> PromptEmbeds | None:
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                kv = f.get_tensor("kv")
        except (OSError, SafetensorError, ValueError, RuntimeError, KeyError) as e:
            problem = f"unreadable ({type(e).__name__}: {e})"
        else:
            problem = self._entry_problem(meta, kv, prompt, encoder_identity, channels)
        if problem is not None:
            warnings.warn(f"prompt cache: ignoring {path} for prompt {_short(prompt)}: {problem}; delete the file "
                          "(it is re-encoded when the text encoder is loaded)", stacklevel=3)
            if problems is not None:
                problems[prompt] = f"{path}: {problem}"
            return None
        return PromptEmbeds.from_lengths(kv, [kv.shape[0]], [prompt])

    @staticmethod
    def _entry_problem(meta: dict, kv: torch.Tensor, prompt: str, encoder_identity: str | None,
                       channels: int | None) -> str | None:
        """What is wrong with a cache entry (None when it is usable)."""
        if meta.get("format") != CACHE_FORMAT:
            return f"format {meta.get('format')!r} is not {CACHE_FORMAT!r}"
        if meta.get("prompt") != prompt:
            return "it holds another prompt"
        if encoder_identity is not None and meta.get("encoder_identity") != encoder_identity:
            return "it was made by another text encoder"
        if kv.dtype != torch.float32 or kv.ndim != 2 or not 1 <= kv.shape[0] <= MAX_TEXT_TOKENS:
            return f"features {tuple(kv.shape)} {kv.dtype}, expected [1..{MAX_TEXT_TOKENS} tokens, C] float32"
        if channels is not None and kv.shape[1] != channels:
            return f"features have {kv.shape[1]} channels, the model takes {channels}"
        if not torch.isfinite(kv).all():
            return "features contain NaN or infinite values"
        return None

    def _find_any(self, prompt: str, channels: int | None = None,
                  problems: dict[str, str] | None = None) -> PromptEmbeds | None:
        if not self.directory.is_dir():
            return None
        candidates = []
        for path in self.directory.glob(f"{_prompt_hash(prompt)}-*{self.SUFFIX}"):
            try:
                candidates.append((path.stat().st_mtime_ns, path.name, path))
            except FileNotFoundError:
                continue
        hits = []
        for _, _, path in sorted(candidates, reverse=True):
            found = self._read(path, prompt, None, channels, problems)
            if found is not None:
                hits.append(found)
        if len(hits) > 1:
            warnings.warn(
                f"prompt cache: {_short(prompt)} is cached for {len(hits)} text encoders; using the newest entry",
                stacklevel=3,
            )
        return hits[0] if hits else None


# ------------------------------------------------------------------------------------------------
# Cache-first encoding
# ------------------------------------------------------------------------------------------------
def encode_prompts(
    prompts: Sequence[str] | str,
    encoder: TextEncoderLike | None = None,
    cache: PromptCache | None = None,
    encoder_identity: str | None = None,
    *,
    channels: int | None = None,
) -> PromptEmbeds:
    """Prompt features for `prompts`, from `cache` where possible, otherwise from `encoder`.

    - `encoder`: a `T5TextEncoder` (lazy: it is only loaded when some prompt misses the cache)
      or any object with ``identity`` and ``encode(prompts) -> PromptEmbeds``. New encodings are
      written to the cache (a failing cache write only warns).
    - `encoder=None` is "cached prompts only": every prompt must be in `cache`, else
      `PromptNotCachedError` lists the missing prompts. `encoder_identity` then restricts the
      lookup to one encoder; None accepts any encoder's entry.
    - `encoder_identity` defaults to ``encoder.identity``; passing a different one with an
      encoder is an error.
    - `channels`: the feature width the model takes (its text channels). Cache entries of another
      width (or damaged ones) are misses; an encoder of another width is a `TextEncoderError`.
    Returns float32 features on CPU (move them with ``.to(device)``).
    """
    prompts = _as_prompt_list(prompts)
    if encoder is not None:
        if encoder_identity is not None and encoder_identity != encoder.identity:
            raise ValueError(f"encoder_identity {encoder_identity!r} differs from the encoder's {encoder.identity!r}")
        encoder_identity = encoder.identity
    if encoder is None and cache is None:
        raise ValueError("encode_prompts needs a text encoder or a prompt cache (got neither)")
    width = getattr(encoder, "d_model", None)
    if channels is not None and isinstance(width, int) and width and width != channels:
        raise TextEncoderError(
            f"{getattr(encoder, 'folder', 'the text encoder')}: makes {width}-channel features but the model takes "
            f"{channels}; NSARM needs {T5_SOURCE} ({T5_URL})"
        )

    unique = list(dict.fromkeys(prompts))
    found: dict[str, PromptEmbeds] = {}
    problems: dict[str, str] = {}
    if cache is not None:
        for p, hit in zip(unique, cache.get(unique, encoder_identity, channels=channels, problems=problems)):
            if hit is not None:
                found[p] = hit
    misses = [p for p in unique if p not in found]
    if misses:
        if encoder is None:
            where = f" at {cache.directory}" if cache is not None else ""
            listed = "\n".join(f"  - {_short(p, 100)}" + (f" (the cached entry is unusable: {problems[p]})"
                                                           if p in problems else "") for p in misses)
            raise PromptNotCachedError(
                f"{len(misses)} prompt(s) not in the prompt cache{where}"
                f"{' for encoder ' + encoder_identity if encoder_identity else ''}:\n{listed}\n"
                f"Text encoder is set to 'cached prompts only'. To fill the cache, run these prompts once with "
                f"the Flan-T5-XL text encoder selected ({T5_SOURCE} folder in models/text_encoders) and the "
                f"same prompt cache directory, or use a cached prompt."
            )
        fresh = encoder.encode(misses)
        if cache is not None:
            try:
                cache.put(fresh, encoder_identity)
            except OSError as e:
                warnings.warn(f"prompt cache: could not write to {cache.directory} ({e}); continuing uncached", stacklevel=2)
        for emb in fresh.unbind():
            found[emb.prompts[0]] = emb
    return PromptEmbeds.cat([found[p] for p in prompts])
