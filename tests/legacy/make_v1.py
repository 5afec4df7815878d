"""How the format-version-1 legacy files in `tests/legacy/v1/` were made (run once, on 2026-11-23).

Never rerun it to "fix" a failing test: these files stand for the images users archived with format
version 1, and `tests/test_legacy.py` checks that every later nicd still decodes them to the very
same pixels and side data (as Lepton keeps `gold-legacy.lep`). Two tiny models (seeded, untrained:
what is pinned is the decoding of a model file, not its quality) in the exporter's file format, one
per model kind, and three files that use every part of the format: several tiles, ICC + EXIF + XMP,
an alpha plane, a palette, grayscale.

    .venv/bin/python tests/legacy/make_v1.py
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from nicd.codec import registry
from nicd.codec.api import Codec, pick_device
from nicd.codec.imageio import load_image
from nicd.codec.models import FactorizedPrior, MeanScaleHyperprior

HERE = Path(__file__).parent / "v1"
KODAK = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "kodak"


def tiny_models() -> dict[str, registry.ModelInfo]:
    torch.manual_seed(20261123)
    hyper = MeanScaleHyperprior(n=8, m=12, h=10, lambdas=(0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128))
    fact = FactorizedPrior(n=8, m=12)
    with torch.no_grad():  # untrained latents are all near 0: scale them up so that symbols vary and
        for model in (hyper, fact):  # some leave the tables (escapes)
            model.g_a[-1].weight.mul_(40.0)
            model.g_s[0].weight.div_(40.0)
    return {
        "hyper": registry.export(hyper, "legacy-tiny-hyper", HERE, {"metric": "mse", "name": "legacy-tiny-hyper"}),
        "fact": registry.export(fact, "legacy-tiny-fact", HERE, {"metric": "mse", "name": "legacy-tiny-fact"}),
    }


def images() -> dict[str, tuple[str, Image.Image]]:
    with Image.open(KODAK / "kodim23.png") as im:
        photo = im.convert("RGB")
    # 1100 px wide: two 1024-px tiles across, the second one padded.
    wide = photo.crop((0, 200, 768, 248)).resize((1100, 48))
    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF/></x:xmpmeta>'
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: kept as it was, not applied
    exif[0x010F] = "nicd legacy fixture"
    wide.info["icc_profile"] = b"\0\0\0\x20legacy-icc-profile-bytes\0\0\0\0"
    wide.info["xmp"] = xmp  # saved as the PNG's iTXt chunk XML:com.adobe.xmp
    rgba = photo.crop((300, 300, 340, 333)).convert("RGBA")
    alpha = np.tile(np.arange(40, dtype=np.uint8) * 6, (33, 1))
    rgba.putalpha(Image.fromarray(alpha))
    palette = photo.crop((100, 100, 131, 117)).quantize(16)
    gray = photo.crop((10, 10, 43, 75)).convert("L")
    return {
        "wide-icc-exif-xmp": ("hyper", wide, exif),
        "rgba": ("hyper", rgba, None),
        "palette": ("fact", palette, None),
        "gray": ("fact", gray, None),
    }


def digest(image: Image.Image) -> dict:
    return {
        "mode": image.mode,
        "size": list(image.size),
        "pixels": hashlib.sha256(image.tobytes()).hexdigest(),
        "palette": hashlib.sha256(bytes(image.getpalette() or [])).hexdigest() if image.mode == "P" else None,
        "info": {k: hashlib.sha256(v).hexdigest() for k, v in sorted(image.info.items())
                 if k in ("icc_profile", "exif", "xmp") and isinstance(v, bytes)},
    }


def main() -> None:
    torch.set_num_threads(1)  # the recorded pixels come from float synthesis
    HERE.mkdir(parents=True, exist_ok=True)
    infos = tiny_models()
    record = {"format_version": 1, "models": {k: v.model_id for k, v in infos.items()}, "files": {}}
    for name, (kind, image, exif) in images().items():
        buf = io.BytesIO()
        if exif is not None:
            text = PngImagePlugin.PngInfo()
            text.add_itxt("XML:com.adobe.xmp", image.info["xmp"].decode())
            image.save(buf, "PNG", exif=exif.tobytes(), icc_profile=image.info["icc_profile"], pnginfo=text)
            prepared = load_image(buf.getvalue())
        else:
            prepared = load_image(image)
        info, frozen = registry.load(infos[kind].model_id, HERE)
        codec = Codec(info, frozen, pick_device("cpu"))
        result = codec.encode(prepared, quality=5)
        (HERE / f"{name}.nicd").write_bytes(result.data)
        record["files"][name] = {"model": info.model_id, "quality": 5, "bytes": len(result.data),
                                 "sha256": hashlib.sha256(result.data).hexdigest(),
                                 "decoded": digest(codec.decode(result.data))}
    (HERE / "expected.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
