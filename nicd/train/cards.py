"""Model cards: `models/<id>.json` (machine-readable) and `models/<id>.md` (for people), with the
rate–distortion table as measured by `nicd bench --update-card`."""

from __future__ import annotations

import json
from pathlib import Path

from ..bench import REFINED
from .export import _atomic_write_text


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:+.1f} %"


def _ladder(values: list[float]) -> str:
    return ", ".join(f"{v:g}" for v in values)


def training_source(origin: dict) -> str:
    """'a 12,000-step checkpoint (0.4 h on cuda) of `gpu-mse`, itself fine-tuned from …'."""
    where = f" on {origin['device']}" if origin.get("device", "cpu") != "cpu" else ""
    if "checkpoint" in origin:
        run = origin.get("run") or Path(origin["checkpoint"]).parent.name
        text = f"a {origin['step']:,}-step checkpoint ({origin['wall_seconds'] / 3600:.1f} h{where}) of `{run}`"
    else:
        text = f"model `{origin.get('model')}`"
        if origin.get("steps"):  # cards exported before this was recorded lack it
            text += f" ({origin['steps']:,} steps, {origin.get('wall_seconds', 0) / 3600:.1f} h{where})"
    if origin.get("ladder_from"):
        text += f", its gains moved from the ladder λ = {_ladder(origin['ladder_from'])} (`nicd.train.ladder`)"
    if origin.get("widened_from_m"):
        text += f", widened from {origin['widened_from_m']} latent channels (`nicd.train.widen`)"
    if origin.get("from"):
        text += ", itself fine-tuned from " + training_source(origin["from"])
    return text


def _origin(training: dict) -> list[str]:
    origin = training.get("init_from")
    if not origin:
        return []
    return [f"- **Fine-tuned from** {training_source(origin)}; the step count and wall time below are this run's own."]


def patch_schedule(training: dict) -> str:
    """'24,874 steps of 8×128² patches, then 3,000 of 2×256²' (or the one setting of a run that never changed)."""
    steps = training.get("steps") or 0
    schedule = training.get("patches") or [{"from_step": 0, "patch": training.get("patch"), "batch": training.get("batch")}]
    parts = []
    for i, ph in enumerate(schedule):
        end = schedule[i + 1]["from_step"] if i + 1 < len(schedule) else steps
        if end > ph["from_step"]:
            parts.append(f"{end - ph['from_step']:,}{' steps' if not parts else ''} of {ph['batch']}×{ph['patch']}²"
                         + (" patches" if not parts else "") + (" in bfloat16" if ph.get("bf16") else ""))
    return ", then ".join(parts) if parts else f"{steps:,} steps"


def write_card(model_path: Path, summary: dict, command: str) -> None:
    card_path = model_path.with_suffix(".json")
    card = json.loads(card_path.read_text()) if card_path.exists() else {}
    earlier = card.get("kodak", {})
    nicd = summary["codecs"]["nicd"]
    card["kodak"] = {
        "images": summary.get("count"),
        "command": command,
        "curve": nicd["curve"],
        "curve_ms_ssim": nicd["curve_ms_ssim"],
        "bd_rate_vs_jpeg": nicd["bd_rate_vs_jpeg"],
        "bd_rate_vs_avif": nicd["bd_rate_vs_avif"],
        "rate_vs_jpeg": nicd.get("rate_vs_jpeg"),
        "bd_rate_ms_ssim_vs_jpeg": nicd.get("bd_rate_ms_ssim_vs_jpeg"),
        "bd_rate_ms_ssim_vs_avif": nicd.get("bd_rate_ms_ssim_vs_avif"),
        "bytes_to_ssim_0.97": nicd["bytes_to_ssim_0.97"],
        "encode_mpix_per_s": nicd["encode_mpix_per_s"],
        "decode_mpix_per_s": nicd["decode_mpix_per_s"],
        "baselines": {c: {"bd_rate_vs_jpeg": s["bd_rate_vs_jpeg"], "bd_rate_ms_ssim_vs_jpeg": s.get("bd_rate_ms_ssim_vs_jpeg"),
                          "curve": s["curve"]}
                      for c, s in summary["codecs"].items() if c not in ("nicd", REFINED)},
    }
    refined = summary["codecs"].get(REFINED)
    if refined:
        card["kodak"]["refined"] = {"refine_steps": summary.get("refine_steps"), "command": command, **{k: refined.get(k) for k in (
            "curve", "bd_rate_vs_jpeg", "bd_rate_vs_avif", "rate_vs_jpeg", "bd_rate_ms_ssim_vs_jpeg",
            "bd_rate_ms_ssim_vs_avif", "encode_mpix_per_s", "decode_mpix_per_s")}}
    elif earlier.get("refined"):
        # A 40-step refinement bench takes hours on a CPU: a plain rerun keeps the last refined figures,
        # marked as another run's, rather than dropping what was measured.
        refined = {**earlier["refined"], "command": earlier["refined"].get("command", earlier.get("command"))}
        card["kodak"]["refined"] = {**refined, "earlier_run": True}
    _atomic_write_text(card_path, json.dumps(card, indent=2) + "\n")
    arch, training = card.get("architecture", {}), card.get("training", {})
    lines = [
        f"# Model card: `{card.get('model_id', model_path.stem)}`",
        "",
        f"- **Architecture**: {arch.get('kind')} (N={arch.get('n')}, M={arch.get('m')}"
        + (f", h_s hidden width {arch['h']}" if arch.get("h") else "") + "), "
        f"{card.get('parameters', 0):,} parameters; variable rate (gain units), quality 1–8"
        + (f" (λ = {_ladder(arch['lambdas'])})." if arch.get("lambdas") else "."),
        *_origin(training),
        f"- **Trained** on `shared/data/train` ({training.get('metric')} loss), {patch_schedule(training)}, {training.get('device')} "
        f"({training.get('threads')} thread(s), {training.get('hardware')}), {training.get('wall_seconds', 0) / 3600:.1f} h of training wall time"
        + (f"; shipped weights: {training['weights']}." if training.get("weights") else "."),
        f"- **SHA-256**: `{card.get('sha256')}`",
        "",
        f"## Kodak ({card['kodak']['images']} images), measured by `{command}`",
        "",
        "| quality | bpp | PSNR (dB) | MS-SSIM | bits vs JPEG at this PSNR |",
        "|---:|---:|---:|---:|---:|",
    ]
    ms = {round(p["bpp"], 6): p["ms_ssim"] for p in nicd["curve_ms_ssim"]}
    ratios = nicd.get("rate_vs_jpeg") or [None] * len(nicd["curve"])
    for q, (p, ratio) in enumerate(zip(nicd["curve"], ratios), start=1):
        m = ms.get(round(p["bpp"], 6))
        lines.append(f"| {q} | {p['bpp']:.3f} | {p['psnr']:.2f} | {'' if m is None else f'{m:.4f}'} | {_pct(ratio)} |")
    lines += [
        "",
        f"BD-rate against JPEG: **{_pct(nicd['bd_rate_vs_jpeg'])}**; against AVIF: {_pct(nicd['bd_rate_vs_avif'])} "
        "(negative = fewer bits at equal PSNR). Baselines measured in the same run: "
        + ", ".join(f"{c} {_pct(s['bd_rate_vs_jpeg'])}" for c, s in summary["codecs"].items() if c not in ("nicd", REFINED, "jpeg"))
        + " against JPEG.",
        "",
        f"BD-rate at equal MS-SSIM (on −10·log10(1 − MS-SSIM)): against JPEG **{_pct(nicd.get('bd_rate_ms_ssim_vs_jpeg'))}**, "
        f"against AVIF {_pct(nicd.get('bd_rate_ms_ssim_vs_avif'))}; baselines: "
        + ", ".join(f"{c} {_pct(s.get('bd_rate_ms_ssim_vs_jpeg'))}" for c, s in summary["codecs"].items() if c not in ("nicd", REFINED, "jpeg"))
        + " against JPEG.",
        "",
        f"Speed on the measuring machine: encode {nicd['encode_mpix_per_s']:.2f} MP/s (analysis + entropy coding, one image at a time), "
        f"decode {nicd['decode_mpix_per_s']:.2f} MP/s.",
        "",
    ]
    if refined:
        steps = card["kodak"]["refined"]["refine_steps"]
        lines += [
            f"### With latent refinement (`nicd encode --refine-steps {steps}`), "
            + (f"measured by an earlier run (`{refined['command']}`), not by this one" if card["kodak"]["refined"].get("earlier_run")
               else "same run"),
            "",
            "The encoder optimises each image's latent (stochastic Gumbel annealing, Yang et al. 2020); "
            "the files decode with the same decoder.",
            "",
            "| quality | bpp | PSNR (dB) | bits vs JPEG at this PSNR |",
            "|---:|---:|---:|---:|",
            *(f"| {q} | {p['bpp']:.3f} | {p['psnr']:.2f} | {_pct(r)} |" for q, (p, r) in enumerate(
                zip(refined["curve"], refined.get("rate_vs_jpeg") or [None] * len(refined["curve"])), start=1)),
            "",
            f"BD-rate against JPEG: **{_pct(refined['bd_rate_vs_jpeg'])}**; against AVIF: {_pct(refined['bd_rate_vs_avif'])}; "
            f"at equal MS-SSIM against JPEG {_pct(refined.get('bd_rate_ms_ssim_vs_jpeg'))}. "
            f"Encode {refined['encode_mpix_per_s']:.3f} MP/s, decode {refined['decode_mpix_per_s']:.2f} MP/s.",
            "",
        ]
    _atomic_write_text(model_path.with_suffix(".md"), "\n".join(lines))
