"""Named models and their weight files.

A weights file is an `.npz` (no pickle) holding the float transforms in float16, the frozen integer
tables and the integer `h_s`, and a JSON config. Its name ends with the first 8 hex digits of the
SHA-256 of its bytes (as CompressAI names its weights) and every load checks that hash; the full hash
is written into each bitstream so a file is never decoded with other tables.

`models/aliases.json` maps short names ("default", "ms-ssim") to model ids.

A model no longer installed can still be loaded from its file's bytes (`load_bytes`): an archive keeps
the file of every model its bitstreams were written with, so that upgrading the shipped models never
makes a stored image undecodable.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from ..errors import ModelError
from ..fsutil import atomic_write_bytes
from .frozen import FrozenModel
from .intnet import ACT_FRACTION, IntegerConvNet, IntegerHyperSynthesis
from .models import CodecModel, build_model


def models_dir() -> Path:
    """$NICD_MODELS_DIR, else the repository's `models/`, else the installed `share/nicd/models`."""
    env = os.environ.get("NICD_MODELS_DIR")
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[2] / "models"
    if repo.is_dir():
        return repo
    return Path(sys.prefix) / "share" / "nicd" / "models"


@dataclass
class ModelInfo:
    model_id: str
    path: Path | None  # None: loaded from bytes kept elsewhere (an archive), not from an installed file
    sha256: str
    config: dict

    @property
    def card(self) -> dict:
        return read_card(self.path) if self.path is not None else {}


def read_card(model_path: Path) -> dict:
    """The model card (`<id>.json`) beside a model file; {} where there is none."""
    card = model_path.with_suffix(".json")
    return json.loads(card.read_text()) if card.exists() else {}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def aliases(directory: Path | None = None) -> dict[str, str]:
    path = (directory or models_dir()) / "aliases.json"
    return json.loads(path.read_text()) if path.exists() else {}


def list_models(directory: Path | None = None) -> list[str]:
    directory = directory or models_dir()
    return sorted(p.stem for p in directory.glob("*.npz")) if directory.is_dir() else []


def resolve(name: str, directory: Path | None = None) -> Path:
    """A model name, alias or path → its weights file."""
    directory = directory or models_dir()
    candidate = Path(name)
    if candidate.suffix == ".npz" and candidate.exists():
        return candidate
    model_id = aliases(directory).get(name, name)
    path = directory / f"{model_id}.npz"
    if not path.exists():
        known = ", ".join(sorted(set(aliases(directory)) | set(list_models(directory)))) or "none"
        raise ModelError(f"unknown model {name!r} (known: {known})", code="E_MODEL_UNKNOWN")
    return path


def _read(source: Path | io.BytesIO, name: str | None = None) -> tuple[dict, dict]:
    name = name or str(source)
    try:
        with np.load(source, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
        config = json.loads(bytes(arrays.pop("config.json")).decode())
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise ModelError(f"cannot read model file {name}: {exc}", code="E_MODEL_FILE") from exc
    return config, arrays


def model_from_arrays(config: dict, arrays: dict) -> CodecModel:
    model = build_model(config)
    state = {k[len("float.") :]: torch.from_numpy(v.astype(np.float32)) for k, v in arrays.items() if k.startswith("float.")}
    if "int_h_s.0.meta" in arrays:
        state.update(IntegerHyperSynthesis.from_state(arrays).float_state())
    s = 0
    while f"int_ctx{s}.0.meta" in arrays:  # a channel-context model's context networks
        net = IntegerConvNet(IntegerConvNet.layers_from_state(arrays, f"int_ctx{s}"), ACT_FRACTION)
        state.update(net.float_state(f"ctx.{s}", (0, 2, 4)))  # conv, ReLU, conv, ReLU, conv
        s += 1
    model.load_state_dict(state)
    return model.eval()


def load_float_model(name: str, directory: Path | None = None) -> CodecModel:
    """A shipped model's float transforms (to train further from them)."""
    return model_from_arrays(*_read(resolve(name, directory)))


def _frozen(model_id: str, config: dict, arrays: dict) -> FrozenModel:
    try:
        return FrozenModel(model_from_arrays(config, arrays), arrays)
    except (KeyError, ValueError, RuntimeError) as exc:
        raise ModelError(f"model file {model_id}.npz is not a usable nicd model: {exc}", code="E_MODEL_FILE") from None


def _check_hash(model_id: str, sha: str) -> None:
    if not model_id.endswith(sha[:8]):
        raise ModelError(f"model file {model_id}.npz does not match its content hash ({sha[:8]})", code="E_MODEL_HASH")


def installed_bytes(model_id: str, directory: Path | None = None) -> tuple[bytes, str]:
    """An installed model file's bytes and SHA-256, checked against its name's hash (without
    building the model, which takes seconds)."""
    path = resolve(model_id, directory)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelError(f"cannot read model file {path}: {exc.strerror or exc}", code="E_MODEL_FILE") from None
    sha = hashlib.sha256(data).hexdigest()
    _check_hash(path.stem, sha)
    return data, sha


@lru_cache(maxsize=8)
def _load_cached(path: str, sha: str) -> tuple[ModelInfo, FrozenModel]:
    model_id = Path(path).stem
    config, arrays = _read(Path(path))
    return ModelInfo(model_id, Path(path), sha, config), _frozen(model_id, config, arrays)


def load(name: str = "default", directory: Path | None = None) -> tuple[ModelInfo, FrozenModel]:
    path = resolve(name, directory)
    sha = _sha256(path)
    _check_hash(path.stem, sha)
    return _load_cached(str(path), sha)


_from_bytes: dict[str, tuple[ModelInfo, FrozenModel]] = {}


def load_bytes(model_id: str, data: bytes) -> tuple[ModelInfo, FrozenModel]:
    """A model from the bytes of its `.npz` file (one an archive kept), checked against its name's hash."""
    sha = hashlib.sha256(data).hexdigest()
    _check_hash(model_id, sha)
    if sha not in _from_bytes:
        config, arrays = _read(io.BytesIO(data), f"{model_id}.npz")
        _from_bytes[sha] = (ModelInfo(model_id, None, sha, config), _frozen(model_id, config, arrays))
    return _from_bytes[sha]


def file_bytes(info: ModelInfo) -> bytes:
    """The bytes of a loaded model's installed file, checked to be the very file that was loaded."""
    if info.path is None:
        raise ModelError(f"model {info.model_id} was not loaded from a file", code="E_MODEL_FILE")
    try:
        data = info.path.read_bytes()
    except OSError as exc:
        raise ModelError(f"cannot read model file {info.path}: {exc.strerror}", code="E_MODEL_FILE") from None
    if hashlib.sha256(data).hexdigest() != info.sha256:
        raise ModelError(f"model file {info.path.name} changed since it was loaded", code="E_MODEL_HASH")
    return data


def locate(model_hash: bytes, directory: Path | None = None, also: Iterable[Path] = ()) -> Path | None:
    """The file of the model with this full SHA-256: in `directory` (the installed models), else in the
    folders `also` (models kept from earlier installations); None when there is none."""
    prefix = model_hash.hex()[:8]
    for folder in (directory or models_dir(), *also):
        for model_id in list_models(folder):
            path = folder / f"{model_id}.npz"
            if model_id.endswith(prefix) and _sha256(path) == model_hash.hex():
                return path
    return None


def find_by_hash(model_hash: bytes, directory: Path | None = None, also: Iterable[Path] = ()) -> tuple[ModelInfo, FrozenModel]:
    """The model a bitstream was written with, by the full SHA-256 in its header (see `locate`)."""
    path = locate(model_hash, directory, also)
    if path is None:
        raise ModelError(f"this file needs model {model_hash.hex()[:8]}…, which is not installed", code="E_MODEL_UNKNOWN")
    return _load_cached(str(path), model_hash.hex())  # `locate` has hashed the file already


def export(model: CodecModel, name: str, directory: Path, extra_config: dict | None = None) -> ModelInfo:
    """Freeze a trained model into `directory/<name>-<sha8>.npz` (float16 weights + integer tables).

    The float weights are rounded to float16 *before* the tables and the integer h_s are built, so
    the shipped file is self-consistent."""
    state = {k: v.detach().cpu().to(torch.float16) for k, v in model.state_dict().items()}
    rounded = build_model(model.config())
    rounded.load_state_dict({k: v.float() for k, v in state.items()})
    rounded.eval()
    # h_s (and a channel-context model's context networks) are stored only as integer networks:
    # more precise than float16, and what coding uses.
    arrays = {f"float.{k}": v.numpy() for k, v in state.items() if not k.startswith(("h_s.", "ctx."))}
    arrays.update(FrozenModel.build_arrays(rounded))
    config = {**model.config(), **(extra_config or {})}
    arrays["config.json"] = np.frombuffer(json.dumps(config, sort_keys=True).encode(), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    data = buf.getvalue()
    sha = hashlib.sha256(data).hexdigest()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}-{sha[:8]}.npz"
    atomic_write_bytes(path, data)
    return ModelInfo(path.stem, path, sha, config)
