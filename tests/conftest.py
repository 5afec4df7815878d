"""Shared, generic fixtures: small generated images, configs written as real TOML files, a real SQLite
store, a test NOTIFY_SOCKET, and a helper to run the real `python -m nicd` as a subprocess."""

from __future__ import annotations

import hashlib
import io
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="session")
def _user_data_home(tmp_path_factory):
    """What nicd keeps in the user's data directory (the default database, the models `nicd encode`
    keeps) goes to the tests' own, never the user's; subprocesses inherit it."""
    old = os.environ.get("XDG_DATA_HOME")
    os.environ["XDG_DATA_HOME"] = str(tmp_path_factory.mktemp("xdg-data"))
    yield
    if old is None:
        os.environ.pop("XDG_DATA_HOME", None)
    else:
        os.environ["XDG_DATA_HOME"] = old


def image_bytes(seed: int, size: tuple[int, int] = (64, 64), fmt: str = "PNG") -> bytes:
    """A small, smooth-plus-noise RGB image, distinct per seed."""
    from PIL import Image

    w, h = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * (1 + seed % 5) + yy) % 256, (yy * 2 + seed * 7) % 256, (xx + yy * 3 + seed) % 256], -1)
    arr = np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt)
    return buf.getvalue()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_config(path: Path, *, database: Path, roots=(), policy: str = "keep", settle: float = 0.2,
                 rescan_minutes: float = 30, extra: str = "") -> Path:
    roots_toml = ", ".join(f'"{r}"' for r in roots)
    path.write_text(
        f'[storage]\ndatabase = "{database}"\n'
        f"[watch]\nroots = [{roots_toml}]\nsettle_seconds = {settle}\nrescan_minutes = {rescan_minutes}\n"
        f'[codec]\ndevice = "cpu"\n'
        f'[originals]\npolicy = "{policy}"\n' + extra
    )
    return path


@pytest.fixture
def make_config(tmp_path):
    from nicd.config import load_config

    def make(roots=(), policy="keep", settle=0.2, rescan_minutes=30, database=None, extra=""):
        db = database or (tmp_path / "state" / "nicd.db")
        p = write_config(tmp_path / f"config-{len(list(tmp_path.glob('config-*.toml')))}.toml",
                         database=db, roots=roots, policy=policy, settle=settle, rescan_minutes=rescan_minutes, extra=extra)
        return load_config(p)

    return make


@pytest.fixture
def store(tmp_path):
    from nicd.store import migrate
    from nicd.store.engine import Store

    s = Store(f"sqlite:///{tmp_path / 'db' / 'nicd.db'}")
    migrate.ensure_schema(s)
    yield s
    s.close()


@pytest.fixture(scope="session")
def codec():
    from nicd.codec.api import load_codec

    return load_codec("default", "cpu")


class NotifySocket:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET; a thread collects every message, as
    systemd does (the kernel queues only net.unix.max_dgram_qlen datagrams for a reader that sleeps)."""

    def __init__(self, path: Path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.05)
        self.messages: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while not self._stop.is_set():
            try:
                self.messages.append(self.sock.recv(65536).decode())
            except (socket.timeout, BlockingIOError):
                pass
            except OSError:
                return

    def poll(self, seconds: float = 0.0) -> list[str]:
        time.sleep(seconds)
        return list(self.messages)

    def wait_for(self, needle: str, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if any(needle in m for m in self.poll(0.05)):
                return True
        return any(needle in m for m in self.messages)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(1)
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path):
    ns = NotifySocket(tmp_path / "notify.sock")
    yield ns
    ns.close()


def nicd_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "JOURNAL_STREAM", "WATCHDOG_USEC")}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)})
    env.update({k: str(v) for k, v in extra.items()})
    return env


def spawn_nicd(*args, env=None, stderr=None, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "nicd", *map(str, args)], cwd=str(REPO), env=env or nicd_env(),
                            stdout=subprocess.DEVNULL, stderr=stderr if stderr is not None else subprocess.DEVNULL, **kw)


def run_nicd(*args, env=None, timeout=120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nicd", *map(str, args)], cwd=str(REPO), env=env or nicd_env(),
                          capture_output=True, text=True, timeout=timeout, **kw)


@pytest.fixture(scope="module")
def small_train(tmp_path_factory) -> Path:
    """Eight real training photographs (shared/data/train), downscaled to 160×128, as a folder."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("train")
    for path in sorted((Path(__file__).resolve().parents[2] / "shared" / "data" / "train").glob("*.png"))[:8]:
        with Image.open(path) as im:
            im.convert("RGB").resize((160, 128)).save(folder / path.name)
    return folder
