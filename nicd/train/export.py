"""Export a training checkpoint as a shipped model: frozen tables, content-hash name, model card.

The previous export of the same model name is replaced in place (weights files are not accumulated).
"""

from __future__ import annotations

import json
import re
import platform
from pathlib import Path

import torch

from ..codec import registry
from ..fsutil import atomic_write_bytes
from ..codec.models import build_model


def _atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def export_checkpoint(checkpoint: Path, name: str, directory: Path, alias: str | None = None,
                      card_extra: dict | None = None) -> registry.ModelInfo:
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    model = build_model(ckpt["config"])
    averaged = ckpt.get("ema") is not None
    model.load_state_dict(ckpt["ema"] if averaged else ckpt["model"])
    opts = ckpt["options"]
    training = {
        "metric": opts["metric"],
        "steps": ckpt["step"],
        "patch": opts["patch"],
        "batch": opts["batch"],
        "lr": opts["lr"],
        "train_data": Path(opts["train_data"]).name,
        "val_data": Path(opts["val_data"]).name if opts.get("val_data") else None,
        "device": ckpt.get("device", "cpu"),
        "threads": opts.get("threads"),
        "wall_seconds": round(ckpt.get("wall_seconds", 0.0), 1),
        "weights": f"exponential moving average, decay {opts.get('ema_decay')}" if averaged else "last step",
        # Checkpoints name what they ran on; older ones were all made on the exporting machine.
        "hardware": ckpt.get("hardware") or f"{platform.machine()} {platform.processor() or ''}".strip(),
    }
    for key in ("init_from", "patches"):
        if opts.get("extra", {}).get(key):
            training[key] = opts["extra"][key]
    # Only this name's own exports: "<name>-<8 hex>.npz" (a longer name sharing the prefix is another model).
    own = re.compile(rf"^{re.escape(name)}-[0-9a-f]{{8}}\.npz$")
    previous = [p for p in directory.glob("*.npz") if own.match(p.name)]
    info = registry.export(model, name, directory, extra_config={"metric": opts["metric"], "name": name})
    for old in previous:
        if old != info.path:
            old.unlink()
            for side in (old.with_suffix(".json"), old.with_suffix(".md")):
                if side.exists():
                    side.unlink()
    card = {
        "model_id": info.model_id,
        "sha256": info.sha256,
        "architecture": model.config(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "training": training,
        **(card_extra or {}),
    }
    _atomic_write_text(info.path.with_suffix(".json"), json.dumps(card, indent=2) + "\n")
    if alias:
        aliases = registry.aliases(directory)
        aliases[alias] = info.model_id
        _atomic_write_text(directory / "aliases.json", json.dumps(aliases, indent=2, sort_keys=True) + "\n")
    return info
