"""Rewrite the README's "Where the codec stands" section from `nicd bench` output, so that every figure
there is one a rerun of the quoted command reproduces.

    nicd bench --images ../shared/data/kodak --out bench-out --update-card
    nicd bench --images ../shared/data/kodak --model ms-ssim --out bench-out-ms-ssim --update-card
    python scripts/readme_results.py bench-out bench-out-ms-ssim
    (or, where the MS-SSIM model was not benched again: ... bench-out msh-96-144-msssim-e1501092)
    cp bench-out/rd.png docs/kodak-rd.png; cp bench-out-ms-ssim/rd.png docs/kodak-rd-ms-ssim.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nicd.bench import REFINED, codec_order  # noqa: E402
from nicd.train.cards import patch_schedule, training_source  # noqa: E402


def pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:+.1f} %"


def codec_table(summary: dict, label: str) -> str:
    rows = []
    for codec, v in sorted(summary["codecs"].items(), key=lambda item: codec_order(item[0])):
        name = {"nicd": label, REFINED: f"{label}, `--refine-steps {summary.get('refine_steps')}`"}.get(codec, codec)
        curve = " ".join(f"{p['bpp']:.2f}:{p['psnr']:.1f}" for p in v["curve"])
        never = v["images_never_reaching_ssim_0.97"]
        reach = "none reaches it" if never == summary["count"] else (
            f"{v['bytes_to_ssim_0.97'] / 1e6:.2f} MB" + (f" ({never} of {summary['count']} never reach it)" if never else ""))
        rows.append(f"| {name} | {curve} | {pct(v['bd_rate_vs_jpeg'])} | {pct(v['bd_rate_vs_avif'])} | "
                    f"{pct(v.get('bd_rate_ms_ssim_vs_jpeg'))} | {reach} | {v['encode_mpix_per_s']:.2f} / {v['decode_mpix_per_s']:.2f} |")
    head = ["| codec | mean bpp:PSNR per setting | BD-rate vs JPEG (PSNR) | vs AVIF | vs JPEG (MS-SSIM) | "
            f"bytes for SSIM ≥ 0.97 (all {summary['count']}) | enc / dec MP/s |", "|---|---|---|---|---|---|---|"]
    return "\n".join(head + rows)


def threads(summary: dict) -> str:
    n = summary.get("torch_threads")
    return "torch threads not recorded" if n is None else f"torch on {n} thread{'s' if n > 1 else ''}"


def where(training: dict) -> str:
    return "the CPU" if training.get("device", "cpu") == "cpu" else f"a lent GPU ({training.get('hardware')})"


def start(training: dict) -> str:
    origin = training.get("init_from")
    return f", starting from {training_source(origin)}" if origin else ""


def card(model_id: str) -> dict:
    return json.loads((ROOT / "models" / f"{model_id}.json").read_text())


def along_the_curve(summary: dict, codec: str = "nicd") -> str:
    """Where the BD-rate comes from: each quality's bits against JPEG's at the same PSNR."""
    ratios = summary["codecs"][codec].get("rate_vs_jpeg")
    if not ratios:
        return ""
    return ", ".join(f"q{q} {pct(r)}" for q, r in enumerate(ratios, start=1))


def refinement(summary: dict, model_card: dict) -> str:
    """The paragraph on `--refine-steps`: this run's figures, or, after a plain rerun, the card's earlier ones."""
    plain = summary["codecs"]["nicd"]
    r = summary["codecs"].get(REFINED)
    if r:
        steps, source = summary["refine_steps"], (f", measured as `nicd-refine` in the\nsame run by "
                                                  f"`nicd bench --refine-steps {summary['refine_steps']}`")
        bits = along_the_curve(summary, REFINED)
        against, price = f" (plain encoder {pct(plain['bd_rate_vs_jpeg'])})", f"instead of {plain['encode_mpix_per_s']:.2f}."
    else:
        r = model_card.get("kodak", {}).get("refined")
        if not r:
            return ""
        steps, source, against = r["refine_steps"], "", ""
        bits = ", ".join(f"q{q} {pct(v)}" for q, v in enumerate(r.get("rate_vs_jpeg") or [], start=1))
        price = (f"in that run.\nThese refined figures come from an earlier run, `{r['command']}`, with that day's "
                 "encoder;\nthis run did not repeat them (40 refinement steps on all 24 images take well over an hour "
                 "on a 2-core CPU).")
    return f"""
**With latent refinement** (`nicd encode --refine-steps {steps}`{source}): the encoder optimises each image's latent for the
decoder it has (stochastic Gumbel annealing, Yang et al. 2020; `docs/refinement.md`), and the files decode with the
same decoder. BD-rate against JPEG **{pct(r['bd_rate_vs_jpeg'])}**{against}, against
AVIF {pct(r['bd_rate_vs_avif'])}; bits against JPEG's at the same PSNR: {bits}. The price is
encoding time: {r['encode_mpix_per_s']:.3f} MP/s {price}
"""


def section(mse: dict, msssim: dict | None) -> str:
    c = card(mse["model_id"])
    hours = c["training"]["wall_seconds"] / 3600
    bd = mse["codecs"]["nicd"]["bd_rate_vs_jpeg"]
    points = along_the_curve(mse)
    curve_line = f"\nBits against JPEG's at the same PSNR, quality by quality (same run): {points}.\n" if points else ""
    text = f"""## Where the codec stands (measured)

`nicd bench --images ../shared/data/kodak --update-card{f" --refine-steps {mse['refine_steps']}" if mse.get('refine_steps') else ""}` on the {mse['count']} Kodak images, every codec in the
same run on this 2-core CPU machine ({threads(mse)}; PSNR on
8-bit RGB; BD-rate at equal PSNR, or at equal MS-SSIM in dB, negative = fewer bits):

{codec_table(mse, "nicd (default)")}

![rate–distortion on Kodak](docs/kodak-rd.png)

The default model (`models/{mse['model_id']}.md`) has had {patch_schedule(c["training"])} on {where(c["training"])} (about
{hours:.1f} h of training){start(c["training"])}; fully trained models of this family reach −58 % against JPEG, so it is still far from
what its architecture can do: **today it needs {1 + bd:.2f}× JPEG's bits at equal PSNR**, and training
goes on (`docs/training.md`). The baselines reproduce `shared/design/baselines.md`.
{curve_line}{refinement(mse, c)}"""
    if msssim:
        m = msssim["codecs"]["nicd"]
        mc = card(msssim["model_id"])
        origin = mc["training"].get("init_from", {})
        text += f"""
For SSIM targets, `--model ms-ssim` (`models/{msssim['model_id']}.md`) is {training_source(origin) if origin else "a model"}
fine-tuned on `λ·(1 − MS-SSIM) + bpp`: {patch_schedule(mc['training'])} on {where(mc['training'])}.
Measured by `nicd bench --model ms-ssim --update-card --out bench-out-ms-ssim` in one run with the
baselines: BD-rate at equal MS-SSIM {pct(m['bd_rate_ms_ssim_vs_jpeg'])} against JPEG and
{pct(m['bd_rate_ms_ssim_vs_avif'])} against AVIF (the default model: {pct(mse['codecs']['nicd'].get('bd_rate_ms_ssim_vs_jpeg'))} and
{pct(mse['codecs']['nicd'].get('bd_rate_ms_ssim_vs_avif'))}); mean bpp:MS-SSIM per quality
{" ".join(f"{p['bpp']:.2f}:{p['ms_ssim']:.4f}" for p in m['curve_ms_ssim'])}.

![MS-SSIM model on Kodak](docs/kodak-rd-ms-ssim.png)
"""
    return text + "\n"


def measured(source: str) -> dict:
    """A bench folder's summary.json, or, for a model that was not benched again (its weights are
    those its card measured), the card's `kodak` section in the same shape."""
    summary = Path(source) / "summary.json"
    if summary.exists():
        return json.loads(summary.read_text())
    if not (ROOT / "models" / f"{source}.json").exists():
        sys.exit(f"readme_results: {source} is neither a bench folder nor a model in models/")
    return {"model_id": source, "codecs": {"nicd": card(source)["kodak"]}}


def main() -> None:
    mse = measured(sys.argv[1])
    msssim = measured(sys.argv[2]) if len(sys.argv) > 2 else None
    readme = (ROOT / "README.md").read_text()
    start, end = readme.index("## Where the codec stands"), readme.index("## The service")
    (ROOT / "README.md").write_text(readme[:start] + section(mse, msssim) + readme[end:])


if __name__ == "__main__":
    main()
