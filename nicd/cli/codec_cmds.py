"""Single-file codec commands: encode, decode, info, models, train, export, bench."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List, Optional

import typer

from ..errors import ConfigError, InputError, NicdError
from . import app
from .output import JSON_OPTION, error_line, fail, print_json, stderr, stdout, table

DEVICE_OPTION = typer.Option("auto", "--device", help="auto | cpu | cuda")
MODEL_OPTION = typer.Option("default", "--model", "-m", help="Model name, alias or .npz path (see `nicd models`).")


def _outputs(inputs: List[Path], out: Optional[Path], out_dir: Optional[Path], suffix: str) -> list[Path]:
    if (out is None) == (out_dir is None):
        raise InputError("give exactly one of -o/--output (one input) or --out-dir", code="E_ARGS")
    if out is not None:
        if len(inputs) != 1:
            raise InputError("-o/--output takes one input; use --out-dir for several", code="E_ARGS")
        return [out]
    targets = [out_dir / (p.stem + suffix) for p in inputs]
    if len(set(targets)) != len(targets):
        raise InputError("two inputs share a name and would write the same file in --out-dir", code="E_ARGS")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot use --out-dir: {exc.strerror}", code="E_ARGS", path=str(out_dir)) from None
    return targets


def _report_failures(failures: list[tuple[Exception, str]]) -> None:
    """One line per failed file on stderr, then a non-zero exit."""
    for err, path in failures[:-1]:
        stderr.print(error_line(err, path), markup=False)
    if failures:
        fail(failures[-1][0], path=failures[-1][1])


def _write_atomic(path: Path, data: bytes) -> None:
    from ..fsutil import atomic_write_bytes, write_error

    try:
        atomic_write_bytes(path, data)
    except OSError as err:
        raise write_error(path, err) from None


@app.command()
def encode(
    inputs: List[Path] = typer.Argument(..., help="Images to encode (any format Pillow opens)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Output .nicd file (one input)."),
    out_dir: Optional[Path] = typer.Option(None, "--out-dir", help="Write DIR/<stem>.nicd for every input."),
    quality: Optional[int] = typer.Option(None, "--quality", "-q", min=1, max=8, help="Quality level 1 (smallest) .. 8 (best); default 6."),
    target_ssim: Optional[float] = typer.Option(None, "--target-ssim", help="Smallest bitstream whose SSIM reaches X."),
    target_psnr: Optional[float] = typer.Option(None, "--target-psnr", help="Smallest bitstream whose PSNR reaches X dB."),
    refine_steps: int = typer.Option(0, "--refine-steps", min=0, max=1000,
                                     help="Optimise the latent for this image (40 steps: ~8 % fewer bits at equal PSNR, ~17-20x slower encoding)."),
    model: str = MODEL_OPTION,
    device: str = DEVICE_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Encode images to .nicd files; every file is decoded back and checked before it is written. The
    model's file is kept in ~/.local/share/nicd/models, so the files still decode after an upgrade.

    Example: nicd encode photo.png -o photo.nicd --quality 6 --refine-steps 30
    """
    from ..codec.api import load_codec
    from ..codec.imageio import load_image

    failures: list[tuple[Exception, str]] = []
    try:
        targets = _outputs(inputs, output, out_dir, ".nicd")
        codec = load_codec(model, device)
        # a bad input fails alone: the others are still encoded
        loaded = []
        for src, dst in zip(inputs, targets):
            try:
                loaded.append((src, dst, load_image(src)))
            except NicdError as err:
                failures.append((err, str(src)))
        results = codec.encode_batch([p for _, _, p in loaded], quality=quality, target_ssim=target_ssim,
                                     target_psnr=target_psnr, refine_steps=refine_steps)
    except NicdError as err:
        fail(err, as_json=as_json)
    rows = [{"input": path, "error": err.to_dict() if isinstance(err, NicdError) else str(err)} for err, path in failures]
    if any(not isinstance(res, NicdError) for res in results):
        _keep_model(codec.info)
    for (src, dst, _), res in zip(loaded, results):
        if isinstance(res, NicdError):
            failures.append((res, str(src)))
            rows.append({"input": str(src), "error": res.to_dict()})
            continue
        try:
            _write_atomic(dst, res.data)
        except NicdError as err:
            failures.append((err, str(src)))
            rows.append({"input": str(src), "error": err.to_dict()})
            continue
        rows.append({"input": str(src), "output": str(dst), **res.to_dict()})
    if as_json:
        print_json(rows if len(rows) != 1 else rows[0])
    else:
        ok = [r for r in rows if "error" not in r]
        if ok:
            stdout.print(table(None, ["input", "output", "q", "bytes", "bpp", "PSNR", "SSIM", "MS-SSIM"], [
                (r["input"], r["output"], r["quality"], r["bytes"], f"{r['bpp']:.3f}", f"{r['psnr']:.2f}",
                 f"{r['ssim']:.4f}", "-" if r["ms_ssim"] is None else f"{r['ms_ssim']:.4f}") for r in ok]))
    _report_failures(failures)


def _keep_model(info) -> None:
    """Before a file names a model: keep that model's file where decode finds it after an upgrade."""
    from .. import user_models

    try:
        user_models.keep(info)
    except (NicdError, OSError) as exc:
        stderr.print(f"warning: model {info.model_id} could not be kept in {user_models.kept_dir()} ({exc}); "
                     "the files written with it decode only while it stays installed", markup=False, highlight=False)


@app.command()
def decode(
    inputs: List[Path] = typer.Argument(..., help=".nicd files to decode."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Output image (one input); format from the extension."),
    out_dir: Optional[Path] = typer.Option(None, "--out-dir", help="Write DIR/<stem>.png for every input."),
    device: str = DEVICE_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Decode .nicd files to images in their original size and mode (ICC/EXIF restored). A model no
    longer installed is taken from those `nicd encode` kept (~/.local/share/nicd/models).

    Example: nicd decode photo.nicd -o photo.png
    """
    from .. import user_models
    from ..codec.api import decoder_for
    from ..codec.imageio import save_image

    try:
        targets = _outputs(inputs, output, out_dir, ".png")
    except NicdError as err:
        fail(err, as_json=as_json)
    rows, failures = [], []
    for src, dst in zip(inputs, targets):
        try:
            data = _read_input(src)
            image = decoder_for(data, device, also=[user_models.kept_dir()]).decode(data)
            save_image(image, dst)
        except NicdError as err:
            failures.append((err, str(src)))
            rows.append({"input": str(src), "error": err.to_dict()})
            continue
        rows.append({"input": str(src), "output": str(dst), "width": image.width, "height": image.height, "mode": image.mode})
    if as_json:
        print_json(rows if len(rows) != 1 else rows[0])
    else:
        stdout.print(table(None, ["input", "output", "size", "mode"],
                           [(r["input"], r["output"], f"{r['width']}×{r['height']}", r["mode"]) for r in rows if "error" not in r]))
    _report_failures(failures)


def _read_input(path: Path) -> bytes:
    import stat

    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO or device would block or never end
            raise InputError("not a regular file", code="E_NOT_REGULAR_FILE", path=str(path))
        return path.read_bytes()
    except FileNotFoundError:
        raise InputError("no such file", code="E_NOT_FOUND", path=str(path)) from None
    except PermissionError:
        raise InputError("permission denied", code="E_PERMISSION", path=str(path)) from None
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror}", code="E_READ", path=str(path)) from None


@app.command()
def info(file: Path = typer.Argument(..., help="A .nicd file."), as_json: bool = JSON_OPTION) -> None:
    """Show what a .nicd header says: model, quality, size, bpp, whether the checksums hold, and where
    the model file it needs is (null: not installed nor kept, the file cannot be decoded here).

    Example: nicd info photo.nicd --json
    """
    from .. import user_models
    from ..codec import container, registry

    try:
        data = _read_input(file)
        header = container.peek_header(data)  # the header has its own CRC: readable even if the body is damaged
    except NicdError as err:
        fail(err, path=str(file), as_json=as_json)
    problem = None
    try:
        parsed = container.parse(data)
    except NicdError as err:
        problem, parsed = err, None
    # where the model it needs is: installed, kept by `nicd encode`, or nowhere (it could not be decoded)
    model_file = registry.locate(header.model_hash, also=[user_models.kept_dir()])
    payload = {
        "file": str(file),
        "format_version": header.version,
        "model_id": header.model_id,
        "model_hash": header.model_hash.hex(),
        "quality": header.quality,
        "width": header.width,
        "height": header.height,
        "mode": header.mode,
        "bytes": len(data),
        "bpp": 8 * len(data) / (header.width * header.height),
        "tiles": header.tile_count,
        "tile_size": header.tile_size,
        "metadata": {name: len(value) for name, value in parsed.metadata} if parsed else None,
        "checksum_ok": problem is None,
        "model_file": None if model_file is None else str(model_file),
    }
    if problem is not None:
        payload["error"] = problem.to_dict()
    if as_json:
        print_json(payload)
    else:
        stdout.print(table(str(file), ["field", "value"], [(k, v) for k, v in payload.items() if k not in ("file", "error")]))
    if problem is not None:
        fail(problem, path=str(file))


@app.command()
def models(as_json: bool = JSON_OPTION) -> None:
    """List the shipped models with their measured rate–distortion figures.

    Example: nicd models --json
    """
    from ..codec import registry

    names = registry.aliases()
    rows = []
    for model_id in registry.list_models():
        card_path = registry.models_dir() / f"{model_id}.json"
        card = json.loads(card_path.read_text()) if card_path.exists() else {}
        rows.append({
            "model_id": model_id,
            "aliases": sorted(a for a, m in names.items() if m == model_id),
            "architecture": card.get("architecture"),
            "training": card.get("training"),
            "kodak": card.get("kodak"),
        })
    if as_json:
        print_json(rows)
        return
    def bd(kodak: dict) -> str:
        """BD-rate against JPEG as measured, and with `--refine-steps` where the bench measured that."""
        plain = kodak.get("bd_rate_vs_jpeg")
        refined = kodak.get("refined") or {}
        text = "" if plain is None else f"{100 * plain:+.1f} %"
        if refined.get("bd_rate_vs_jpeg") is not None:
            text += f" ({100 * refined['bd_rate_vs_jpeg']:+.1f} % with --refine-steps {refined.get('refine_steps')})"
        return text

    stdout.print(table("shipped models", ["model", "aliases", "arch", "steps", "Kodak bpp:PSNR per quality", "BD-rate vs JPEG"], [
        (r["model_id"], ",".join(r["aliases"]),
         (r["architecture"] or {}).get("kind", "?") + f" {(r['architecture'] or {}).get('n')}/{(r['architecture'] or {}).get('m')}",
         (r["training"] or {}).get("steps"),
         " ".join(f"{p['bpp']:.2f}:{p['psnr']:.1f}" for p in (r["kodak"] or {}).get("curve", [])),
         bd(r["kodak"] or {}))
        for r in rows]))


@app.command()
def train(
    run_dir: Path = typer.Option(Path("runs/msh-96-144-mse"), "--run-dir", help="Run folder: checkpoint.pt and curve.csv live here; an existing run is resumed."),
    data: Path = typer.Option(Path("../shared/data/train"), "--data", help="Training images: a folder or a pack (.npz)."),
    val: Optional[Path] = typer.Option(Path("../shared/data/val"), "--val", help="Validation images (folder or pack)."),
    kind: str = typer.Option("mean-scale", "--kind", help="mean-scale | mean-scale-cc (with the channel context of Minnen & Singh 2020; --init-from a mean-scale model adds it) | factorized"),
    n: int = typer.Option(96, "--n", help="Channels of the transforms (N)."),
    m: int = typer.Option(144, "--m", help="Latent channels (M)."),
    hyper_width: Optional[int] = typer.Option(None, "--hyper-width", help="Width of h_s's hidden layers (default: M); a widened model keeps its source's."),
    metric: str = typer.Option("mse", "--metric", help="mse | ms-ssim"),
    lambdas: Optional[str] = typer.Option(None, "--lambdas", help="The quality ladder: 8 increasing λ, comma-separated (default: the source's, else the metric's); with --init-from, the source's gains are moved onto it (e.g. --lambdas 0.0008,0.001734,0.00376,0.00815,0.017668,0.038302,0.083032,0.18)."),
    patch: int = typer.Option(256, "--patch", help="Patch side; 256 or more (the hyperprior must see interiors, docs/training.md)."),
    batch: int = typer.Option(2, "--batch"),
    steps: int = typer.Option(1_000_000, "--steps"),
    lr: float = typer.Option(1e-4, "--lr"),
    lr_decay_step: Optional[int] = typer.Option(None, "--lr-decay-step", help="From this step on, train at lr/10 (the final annealing phase)."),
    threads: int = typer.Option(1, "--threads", help="CPU threads (keep one core for other work)."),
    device: str = typer.Option("cpu", "--device"),
    max_minutes: Optional[float] = typer.Option(None, "--max-minutes"),
    checkpoint_minutes: float = typer.Option(5.0, "--checkpoint-minutes"),
    validate_every: int = typer.Option(500, "--validate-every"),
    init_from: Optional[str] = typer.Option(None, "--init-from", help="Start a new run from a shipped model's weights or another run's checkpoint.pt (e.g. an MS-SSIM fine-tune of an MSE run)."),
    widen: bool = typer.Option(False, "--widen", help="With --init-from: grow the source's latent channels to --m first; it decodes the same pixels (e.g. --init-from default --m 256 --hyper-width 144 --widen)."),
    seed: int = typer.Option(0, "--seed"),
    ema_decay: float = typer.Option(0.999, "--ema-decay", min=0.0, max=0.99999, help="Decay of the weight average that validation measures and export ships; 0: ship the last step's weights."),
    bf16: bool = typer.Option(False, "--bf16", help="bfloat16 autocast for g_a and g_s: 1.8× the steps on a CPU with AVX512-BF16, the same progress per step (docs/training.md); refused on a CPU without native bfloat16; entropy model, weights and loss stay float32."),
    fixed_quality: Optional[int] = typer.Option(None, "--fixed-quality", help="Train at this one quality level only (a fixed-rate control run); default: all levels."),
    pack: Optional[Path] = typer.Option(None, "--pack", help="Instead of training, write a compact (≤40 MB, lossless) pack of --data to this .npz: one crop of every image."),
    pack_count: Optional[int] = typer.Option(None, "--pack-count", min=1, help="Pack only the first N images by name."),
    pack_side: int = typer.Option(320, "--pack-side", min=64, help="Side of the crops in a pack."),
    pack_centre: bool = typer.Option(False, "--pack-centre", help="Pack centre crops (a validation pack: --pack-side 256 --pack-count 12 holds what validation measures)."),
    pack_max_mb: float = typer.Option(40.0, "--pack-max-mb", min=0.1, help="Size budget of a pack in MB (10^6 bytes); crops over it are dropped at random."),
    slim_copy: Optional[Path] = typer.Option(None, "--slim-copy", help="At every checkpoint also write the float16 weights that would ship here (~8 MB; for bringing a GPU run back)."),
) -> None:
    """Train (or resume) a model; checkpoints every few minutes and on SIGTERM; CSV learning curve.

    Example: nicd train --run-dir runs/msh-96-144-mse --threads 1
    """
    from ..train.data import pack_folder
    from ..train.loop import Trainer, TrainOptions

    try:
        if pack is not None:
            print_json(pack_folder(data, pack, max_bytes=int(pack_max_mb * 1e6), side=pack_side, centre=pack_centre,
                                   count=pack_count))
            return
        from ..train.ladder import parse_ladder

        ladder = parse_ladder(lambdas) if lambdas is not None else None
        opts = TrainOptions(run_dir=run_dir, train_data=data, val_data=val, kind=kind, n=n, m=m, h=hyper_width, metric=metric,
                            lambdas=ladder,
                            patch=patch, batch=batch, steps=steps, lr=lr, threads=threads, device=device, seed=seed,
                            max_seconds=max_minutes * 60 if max_minutes else None,
                            checkpoint_minutes=checkpoint_minutes, validate_every=validate_every,
                            fixed_quality=fixed_quality, lr_decay_step=lr_decay_step, bf16=bf16,
                            ema_decay=ema_decay, slim_copy=slim_copy)
        trainer = Trainer(opts)
        if init_from and trainer.step == 0:
            trainer.init_from(init_from, widen=widen)
    except NicdError as err:
        fail(err)
    if not stderr.is_terminal:
        def progress(p: dict) -> None:
            if p.get("validation"):
                stderr.print(json.dumps(p["validation"]), markup=False)

        summary = trainer.run(on_progress=progress)
    else:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        columns = (TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[stats]}"), TimeRemainingColumn())
        with Progress(*columns, console=stderr) as bar:
            task = bar.add_task("train", total=opts.steps, completed=trainer.step, stats="")

            def progress(p: dict) -> None:
                bar.update(task, completed=p["step"], stats=f"loss {p['loss']:.3f} bpp {p['bpp']:.3f}")
                if p.get("validation"):
                    v = p["validation"]
                    bar.console.print(f"step {v['step']}: " + "  ".join(
                        f"q{q} {v[f'q{q}_bpp']:.3f} bpp {v[f'q{q}_psnr']:.2f} dB" for q in (1, 4, 8)), markup=False)

            summary = trainer.run(on_progress=progress)
    print_json(summary)


@app.command("export")
def export_cmd(
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="Training run to export (its checkpoint.pt)."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Or a checkpoint file, e.g. a slim copy brought back from a GPU."),
    name: str = typer.Option(..., "--name", help="Model name; the file becomes models/<name>-<sha8>.npz."),
    alias: Optional[str] = typer.Option(None, "--alias", help="Point this alias (e.g. default) at the export."),
    models_dir: Optional[Path] = typer.Option(None, "--models-dir"),
) -> None:
    """Freeze a checkpoint into a shipped model (float16 weights, integer tables, card).

    Example: nicd export --run-dir runs/msh-96-144-mse --name msh-96-144-mse --alias default
    (or --checkpoint gpu/mse-slim.pt)
    """
    from ..codec import registry
    from ..train.export import export_checkpoint

    if (run_dir is None) == (checkpoint is None):
        fail(ConfigError("give one of --run-dir and --checkpoint"))
    if checkpoint is None:
        checkpoint = run_dir / "checkpoint.pt"
        if not checkpoint.is_file():
            fail(InputError("no checkpoint.pt in this run folder", code="E_NOT_FOUND", path=str(run_dir)))
    elif not checkpoint.is_file():
        fail(InputError("no such checkpoint file", code="E_NOT_FOUND", path=str(checkpoint)))
    try:
        info = export_checkpoint(checkpoint, name, models_dir or registry.models_dir(), alias=alias)
    except (NicdError, OSError, RuntimeError, KeyError) as err:
        fail(err, path=str(checkpoint))
    print_json({"model_id": info.model_id, "path": str(info.path), "sha256": info.sha256})


@app.command()
def bench(
    images: Path = typer.Option(Path("../shared/data/kodak"), "--images", help="Folder of test images (Kodak by default)."),
    qualities: str = typer.Option("1,2,3,4,5,6,7,8", "--qualities", help="nicd quality levels, comma separated."),
    codecs: str = typer.Option("jpeg,webp,avif", "--codecs", help="Baselines measured in the same run."),
    model: str = MODEL_OPTION,
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N images."),
    out: Path = typer.Option(Path("bench-out"), "--out", help="Folder for bench.csv, summary.json and rd.png."),
    update_card: bool = typer.Option(False, "--update-card", help="Write the measured figures into the model's card (models/<id>.json/.md)."),
    refine_steps: int = typer.Option(0, "--refine-steps", help="Also measure nicd with N steps of latent refinement (codec nicd-refine)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Rate–distortion benchmark against JPEG, WebP and AVIF, with BD-rates, bytes to SSIM 0.97, speed.

    Example: nicd bench --images ../shared/data/kodak --out bench-out --refine-steps 30
    """
    import numpy as np
    from PIL import Image
    from rich.progress import Progress

    from .. import bench as bench_lib
    from ..codec.api import check_refine_steps, load_codec
    from ..train.data import image_files

    try:
        files = image_files(images)[:limit]
        codec = load_codec(model, "cpu")
        qs = [int(q) for q in qualities.split(",") if q]
        baseline = [c for c in codecs.split(",") if c]
        if not qs or any(not 1 <= q <= 8 for q in qs):
            raise InputError(f"--qualities must list levels 1..8, not {qualities!r}", code="E_ARGS")
        check_refine_steps(refine_steps)
        unknown = [c for c in baseline if c not in bench_lib.BASELINE_QUALITIES]
        if unknown:
            raise InputError(f"unknown baseline codec(s) {', '.join(unknown)}: use jpeg, webp, avif", code="E_ARGS")
    except ValueError:
        fail(InputError(f"--qualities must be comma-separated integers, not {qualities!r}", code="E_ARGS"))
    except NicdError as err:
        fail(err)
    loaded = []
    for f in files:
        with Image.open(f) as im:
            loaded.append((f.name, np.asarray(im.convert("RGB"))))
    out.mkdir(parents=True, exist_ok=True)
    with Progress(console=stderr, transient=True) as progress:
        per_image = len(qs) * (2 if refine_steps else 1) + sum(len(bench_lib.BASELINE_QUALITIES[c]) for c in baseline)
        task = progress.add_task("bench", total=len(loaded) * per_image)
        rows = bench_lib.run(loaded, codec, qs, baseline, on_row=lambda r: progress.advance(task), refine_steps=refine_steps)
    bench_lib.write_csv(rows, out / "bench.csv")
    summary = bench_lib.summary(rows)
    import torch

    # speeds depend on it: say how the run was made
    summary.update({"model_id": codec.model_id, "images": str(images), "count": len(loaded),
                    "torch_threads": torch.get_num_threads(), "refine_steps": refine_steps})
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    bench_lib.plot(rows, out / "rd.png", title=images.name)
    if update_card:
        from ..train.cards import write_card

        write_card(codec.info.path, summary, command=f"nicd bench --images {images}" + (f" --model {model}" if model != "default" else "")
                   + f" --qualities {qualities} --codecs {codecs}" + (f" --refine-steps {refine_steps}" if refine_steps else ""))
    if as_json:
        print_json(summary)
        return
    def pct(v):
        return "-" if v is None else f"{100 * v:+.1f} %"
    stdout.print(table(f"{images.name}: {len(loaded)} images, model {codec.model_id}",
                       ["codec", "bpp:PSNR curve", "BD-rate vs JPEG", "vs AVIF", "MS-SSIM BD vs JPEG", "vs AVIF",
                        "bytes to SSIM≥0.97", "enc MP/s", "dec MP/s"],
                       [(c, " ".join(f"{p['bpp']:.2f}:{p['psnr']:.1f}" for p in s["curve"]), pct(s["bd_rate_vs_jpeg"]),
                         pct(s["bd_rate_vs_avif"]), pct(s["bd_rate_ms_ssim_vs_jpeg"]), pct(s["bd_rate_ms_ssim_vs_avif"]),
                         f"{s['bytes_to_ssim_0.97']:,}" + (f" ({s['images_never_reaching_ssim_0.97']} never)" if s["images_never_reaching_ssim_0.97"] else ""),
                         f"{s['encode_mpix_per_s']:.2f}", f"{s['decode_mpix_per_s']:.2f}")
                        for c, s in summary["codecs"].items()]))
    stdout.print(f"wrote {out / 'bench.csv'}, {out / 'summary.json'}, {out / 'rd.png'}")
