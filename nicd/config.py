"""nicd's configuration: one TOML file, validated strictly.

Where it is found (first hit wins):

1. the path given with ``--config FILE`` (must exist);
2. ``$NICD_CONFIG`` (must exist);
3. ``$XDG_CONFIG_HOME/nicd/config.toml`` (default ``~/.config/nicd/config.toml``);
4. ``/etc/nicd/config.toml``;
5. otherwise the embedded defaults (SQLite under the user data directory, CPU auto, shipped model).

Every key is documented, with its default, in ``config.example.toml`` at the repository root. An unknown
section or key, a value of the wrong type or out of range raises :class:`nicd.errors.ConfigError` whose
message names the key (``watch.settle_seconds: must be a number >= 0, got 'x'``).
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .errors import ConfigError

try:  # the container module is pure Python (no torch); fall back if it is ever moved
    from .codec.container import MAX_QUALITY, MIN_QUALITY
except Exception:  # pragma: no cover
    MIN_QUALITY, MAX_QUALITY = 1, 8

__all__ = [
    "Config",
    "StorageConfig",
    "WatchConfig",
    "CodecConfig",
    "OriginalsConfig",
    "load_config",
    "find_config_file",
    "parse_config",
    "default_database_url",
    "DEFAULT_INCLUDE",
]

DEFAULT_INCLUDE = ("*.jpg", "*.jpeg", "*.png", "*.webp", "*.tif", "*.tiff", "*.bmp")
DEVICES = ("auto", "cpu", "cuda")
POLICIES = ("keep", "delete")


def data_home(env: Mapping[str, str]) -> Path:
    base = env.get("XDG_DATA_HOME") or ""
    return Path(base) if base and os.path.isabs(base) else Path.home() / ".local" / "share"


def _config_home(env: Mapping[str, str]) -> Path:
    base = env.get("XDG_CONFIG_HOME") or ""
    return Path(base) if base and os.path.isabs(base) else Path.home() / ".config"


def default_database_url(env: Mapping[str, str] | None = None) -> str:
    """SQLite file under the user's data directory: ``$XDG_DATA_HOME/nicd/nicd.db``."""
    env = os.environ if env is None else env
    return "sqlite:///" + str(data_home(env) / "nicd" / "nicd.db")


@dataclass(frozen=True)
class StorageConfig:
    database: str


@dataclass(frozen=True)
class WatchConfig:
    roots: tuple[str, ...] = ()
    include: tuple[str, ...] = DEFAULT_INCLUDE
    exclude: tuple[str, ...] = ()
    settle_seconds: float = 5.0
    rescan_minutes: float = 30.0


@dataclass(frozen=True)
class CodecConfig:
    model: str = "default"
    quality: int | None = 6
    target_ssim: float | None = None
    target_psnr: float | None = None
    device: str = "auto"
    batch_megapixels: float = 32.0
    refine_steps: int = 0

    def encode_kwargs(self) -> dict[str, Any]:
        """What to pass to ``Codec.encode``: exactly one of quality / target_ssim / target_psnr, and
        the refinement steps."""
        if self.target_ssim is not None:
            rate = {"target_ssim": self.target_ssim}
        elif self.target_psnr is not None:
            rate = {"target_psnr": self.target_psnr}
        else:
            rate = {"quality": self.quality}
        return {**rate, "refine_steps": self.refine_steps}


@dataclass(frozen=True)
class OriginalsConfig:
    policy: str = "keep"


@dataclass(frozen=True)
class Config:
    storage: StorageConfig
    watch: WatchConfig = field(default_factory=WatchConfig)
    codec: CodecConfig = field(default_factory=CodecConfig)
    originals: OriginalsConfig = field(default_factory=OriginalsConfig)
    source: str | None = None  # the file it was read from; None for the embedded defaults

    @property
    def sqlite_path(self) -> str | None:
        """The database file when the URL is a SQLite file URL, else None."""
        return sqlite_path_of(self.storage.database)

    def with_roots(self, roots) -> "Config":
        return dataclasses.replace(self, watch=dataclasses.replace(self.watch, roots=tuple(_abs(r) for r in roots)))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["watch"]["roots"] = list(self.watch.roots)
        d["watch"]["include"] = list(self.watch.include)
        d["watch"]["exclude"] = list(self.watch.exclude)
        return d


def sqlite_path_of(url: str) -> str | None:
    if not url.startswith("sqlite"):
        return None
    rest = url.split(":///", 1)[1] if ":///" in url else ""
    rest = rest.split("?", 1)[0]
    if rest.startswith("file:"):
        rest = rest[5:]
    if not rest or rest == ":memory:":
        return None
    return rest


def _abs(p: str | os.PathLike, base: Path | None = None) -> str:
    p = os.path.expanduser(os.fspath(p))
    if base is not None and not os.path.isabs(p):
        p = os.path.join(base, p)
    return os.path.normpath(os.path.abspath(p))


# ---------------------------------------------------------------------------------------------- schema
# section -> key -> validator(key_name, value, base_dir) -> normalized value


def _err(key: str, what: str, value: Any) -> ConfigError:
    return ConfigError(f"{key}: {what}, got {value!r}", code="E_CONFIG_VALUE")


def _number(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, integer: bool = False):
    def check(key: str, value: Any, base: Path | None) -> Any:
        ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok_type:
            raise _err(key, "must be an integer" if integer else "must be a number", value)
        if value != value or value in (float("inf"), float("-inf")):
            raise _err(key, "must be a finite number", value)
        if lo is not None and (value <= lo if lo_open else value < lo):
            raise _err(key, f"must be {'>' if lo_open else '>='} {lo}" + (f" and <= {hi}" if hi is not None else ""), value)
        if hi is not None and value > hi:
            raise _err(key, f"must be <= {hi}", value)
        return value if integer else float(value)

    return check


def _choice(choices: tuple[str, ...]):
    def check(key: str, value: Any, base: Path | None) -> str:
        if not isinstance(value, str) or value.lower() not in choices:
            raise _err(key, "must be one of " + " | ".join(choices), value)
        return value.lower()

    return check


def _device(key: str, value: Any, base: Path | None) -> str:
    if isinstance(value, str):
        v = value.lower()
        if v in DEVICES:
            return v
        if v.startswith("cuda:") and v[5:].isdigit():
            return v
    raise _err(key, "must be auto | cpu | cuda (or cuda:N)", value)


def _string(key: str, value: Any, base: Path | None) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _err(key, "must be a non-empty string", value)
    return value


def _string_list(*, nonempty_items: bool = True):
    def check(key: str, value: Any, base: Path | None) -> tuple[str, ...]:
        if not isinstance(value, list) or not all(isinstance(v, str) and (v or not nonempty_items) for v in value):
            raise _err(key, "must be a list of non-empty strings", value)
        return tuple(value)

    return check


def _roots(key: str, value: Any, base: Path | None) -> tuple[str, ...]:
    items = _string_list()(key, value, base)
    out: list[str] = []
    for r in items:
        a = _abs(r, base)
        if a not in out:
            out.append(a)
    return tuple(out)


def _database(key: str, value: Any, base: Path | None) -> str:
    value = _string(key, value, base)
    if "://" not in value:  # a bare path means a SQLite file
        return "sqlite:///" + _abs(value, base)
    scheme = value.split("://", 1)[0]
    if not scheme.replace("+", "").replace("_", "").isalnum():
        raise _err(key, "must be a SQLAlchemy URL (sqlite:///PATH, postgresql+psycopg://...) or a file path", value)
    path = sqlite_path_of(value)
    if scheme.startswith("sqlite") and path is not None and not os.path.isabs(path):
        return f"{scheme}:///" + _abs(path, base)
    return value


SCHEMA: dict[str, dict[str, Any]] = {
    "storage": {"database": _database},
    "watch": {
        "roots": _roots,
        "include": _string_list(),
        "exclude": _string_list(),
        "settle_seconds": _number(0.0, 3600.0),
        "rescan_minutes": _number(0.0, 7 * 24 * 60.0, lo_open=True),
    },
    "codec": {
        "model": _string,
        "quality": _number(MIN_QUALITY, MAX_QUALITY, integer=True),
        "target_ssim": _number(0.0, 1.0, lo_open=True),
        "target_psnr": _number(0.0, 100.0, lo_open=True),
        "device": _device,
        "batch_megapixels": _number(0.0, 4096.0, lo_open=True),
        "refine_steps": _number(0, 1000, integer=True),
    },
    "originals": {"policy": _choice(POLICIES)},
}


def parse_config(data: Mapping[str, Any], *, source: str | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Validate a parsed TOML document and build a :class:`Config` (relative paths resolve against the file's folder)."""
    env = os.environ if env is None else env
    base = Path(source).resolve().parent if source else None
    values: dict[str, dict[str, Any]] = {s: {} for s in SCHEMA}
    for section, body in data.items():
        if section not in SCHEMA:
            raise ConfigError(f"{section}: unknown section (known: {', '.join(SCHEMA)})", code="E_CONFIG_KEY")
        if not isinstance(body, Mapping):
            raise ConfigError(f"{section}: must be a table ([{section}])", code="E_CONFIG_VALUE")
        for key, value in body.items():
            name = f"{section}.{key}"
            if key not in SCHEMA[section]:
                raise ConfigError(
                    f"{name}: unknown key (known in [{section}]: {', '.join(SCHEMA[section])})", code="E_CONFIG_KEY"
                )
            values[section][key] = SCHEMA[section][key](name, value, base)

    codec = dict(values["codec"])
    rate_keys = [k for k in ("quality", "target_ssim", "target_psnr") if k in codec]
    if len(rate_keys) > 1:
        raise ConfigError(
            f"codec.{rate_keys[1]}: set only one of codec.quality, codec.target_ssim, codec.target_psnr "
            f"(found {', '.join('codec.' + k for k in rate_keys)})",
            code="E_CONFIG_VALUE",
        )
    if "target_ssim" in codec or "target_psnr" in codec:
        codec["quality"] = None

    storage = StorageConfig(database=values["storage"].get("database") or default_database_url(env))
    cfg = Config(
        storage=storage,
        watch=WatchConfig(**values["watch"]),
        codec=CodecConfig(**codec),
        originals=OriginalsConfig(**values["originals"]),
        source=source,
    )
    _check_no_feedback_loop(cfg)
    return cfg


def _check_no_feedback_loop(cfg: Config) -> None:
    """The database must not live inside a watched root (its files would be 'discovered')."""
    db = cfg.sqlite_path
    if not db:
        return
    db = os.path.normpath(os.path.abspath(db))
    for root in cfg.watch.roots:
        if db == root or db.startswith(root.rstrip(os.sep) + os.sep):
            raise ConfigError(
                f"storage.database: the database {db} lies inside the watched root {root}; move it out",
                code="E_CONFIG_VALUE",
            )


def find_config_file(explicit: str | os.PathLike | None = None, env: Mapping[str, str] | None = None) -> Path | None:
    """The config file to use, following the search order in this module's docstring; None for defaults."""
    env = os.environ if env is None else env
    if explicit:
        p = Path(os.path.expanduser(os.fspath(explicit)))
        if not p.is_file():
            raise ConfigError(f"--config: no such file: {p}", code="E_CONFIG_MISSING", path=str(p))
        return p
    if env.get("NICD_CONFIG"):
        p = Path(os.path.expanduser(env["NICD_CONFIG"]))
        if not p.is_file():
            raise ConfigError(f"NICD_CONFIG: no such file: {p}", code="E_CONFIG_MISSING", path=str(p))
        return p
    for p in (_config_home(env) / "nicd" / "config.toml", Path("/etc/nicd/config.toml")):
        if p.is_file():
            return p
    return None


def load_config(explicit: str | os.PathLike | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Find, read and validate the configuration (see the module docstring)."""
    env = os.environ if env is None else env
    path = find_config_file(explicit, env)
    if path is None:
        return parse_config({}, source=None, env=env)
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}", code="E_CONFIG_SYNTAX", path=str(path)) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}", code="E_CONFIG_MISSING", path=str(path)) from None
    return parse_config(data, source=str(path), env=env)
