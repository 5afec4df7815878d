"""Files written by an earlier nicd decode forever: format version 1 files, with their models, made
once by `tests/legacy/make_v1.py` and never regenerated (as Lepton keeps `gold-legacy.lep`).

A failure here means this build would show users different pixels, or none, for images they archived:
fix the decoder, never the expected values. A new format version adds its own folder beside `v1/`."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import nicd_env, run_nicd

V1 = Path(__file__).parent / "legacy" / "v1"
EXPECTED = json.loads((V1 / "expected.json").read_text())
sys.path.insert(0, str(V1.parent))
from make_v1 import digest  # noqa: E402  (the one definition of what is compared)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the recorded pixels come from float synthesis on one thread
    yield
    torch.set_num_threads(threads)


def test_the_legacy_files_are_intact_and_of_format_version_1():
    from nicd.codec import container

    assert EXPECTED["format_version"] == 1 and len(EXPECTED["files"]) == 4
    for name, want in EXPECTED["files"].items():
        data = (V1 / f"{name}.nicd").read_bytes()
        assert hashlib.sha256(data).hexdigest() == want["sha256"], f"{name}.nicd itself was changed"
        container.parse(data)  # checksums and every field
        header = container.peek_header(data)
        assert (header.version, header.quality, header.model_id) == (1, want["quality"], want["model"])
        assert header.model_hash.hex().startswith(want["model"].rsplit("-", 1)[1])
    assert {p.stem for p in V1.glob("*.npz")} == set(EXPECTED["models"].values())


@pytest.mark.parametrize("name", sorted(EXPECTED["files"]))
def test_legacy_file_decodes_to_the_recorded_image(name, one_thread):
    """Found by the full hash in the header among model folders, as `nicd decode` and restore look."""
    from nicd.codec.api import decoder_for

    data = (V1 / f"{name}.nicd").read_bytes()
    codec = decoder_for(data, "cpu", also=[V1])
    assert codec.model_id == EXPECTED["files"][name]["model"]
    assert digest(codec.decode(data)) == EXPECTED["files"][name]["decoded"]


def test_legacy_file_decodes_with_the_model_as_an_archive_keeps_it(one_thread):
    """An archive holds the model file's bytes, not an installed file (`codec_from_bytes`)."""
    from nicd.codec.api import codec_from_bytes

    want = EXPECTED["files"]["wide-icc-exif-xmp"]
    codec = codec_from_bytes(want["model"], (V1 / f"{want['model']}.npz").read_bytes(), "cpu")
    decoded = codec.decode((V1 / "wide-icc-exif-xmp.nicd").read_bytes())
    assert digest(decoded) == want["decoded"]
    assert set(want["decoded"]["info"]) == {"icc_profile", "exif", "xmp"}


def test_nicd_decode_writes_the_recorded_pixels(tmp_path):
    """The user's path: `nicd decode` in a fresh process, with the model installed, to a PNG."""
    models = tmp_path / "models"
    models.mkdir()
    for npz in V1.glob("*.npz"):
        shutil.copy(npz, models)
    out = tmp_path / "out"
    r = run_nicd("decode", *sorted(V1.glob("*.nicd")), "--out-dir", out, "--device", "cpu",
                 env=nicd_env(NICD_MODELS_DIR=models))
    assert r.returncode == 0, r.stderr
    for name, want in EXPECTED["files"].items():
        with Image.open(out / f"{name}.png") as im:
            got = digest(im)
        assert (got["mode"], got["size"], got["pixels"]) == (want["decoded"]["mode"], want["decoded"]["size"],
                                                              want["decoded"]["pixels"])


def test_without_its_model_a_legacy_file_is_refused_with_one_line(tmp_path):
    empty = tmp_path / "models"
    empty.mkdir()
    r = run_nicd("decode", V1 / "rgba.nicd", "-o", tmp_path / "x.png", env=nicd_env(NICD_MODELS_DIR=empty))
    assert r.returncode != 0 and not (tmp_path / "x.png").exists()
    assert "E_MODEL_UNKNOWN" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
