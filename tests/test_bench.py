"""The benchmark library: BD-rate arithmetic and a tiny real run."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from nicd import bench
from nicd.codec.api import load_codec
from nicd.codec.imageio import load_image
from pathlib import Path

KODAK = Path(__file__).resolve().parents[2] / "shared" / "data" / "kodak"


def kodak(n: int) -> np.ndarray:
    with Image.open(KODAK / f"kodim{n:02d}.png") as im:
        return np.asarray(im.convert("RGB"))


def test_bd_rate_of_a_scaled_curve():
    anchor = [(0.25, 28.0), (0.5, 31.0), (1.0, 34.5), (2.0, 38.0)]
    half = [(r * 0.5, q) for r, q in anchor]
    assert abs(bench.bd_rate(anchor, half) - (-0.5)) < 1e-9
    assert abs(bench.bd_rate(anchor, anchor)) < 1e-12
    assert bench.bd_rate(anchor, [(1.0, 50.0), (2.0, 51.0)]) is None  # no overlap


def test_bd_rate_over_a_chosen_range(tmp_path, capsys):
    anchor = [(0.25, 28.0), (0.5, 31.0), (1.0, 34.5), (2.0, 38.0)]
    half = [(r * 0.5, q) for r, q in anchor]
    assert bench.bd_rate(anchor, half, (29.0, 33.0)) == pytest.approx(-0.5)
    # half the bits at low quality, the same at high: the range decides what the average covers
    top = anchor + [(4.0, 41.0)]
    mixed = [(0.125, 28.0), (0.25, 31.0), (1.0, 34.5), (2.0, 38.0), (4.0, 41.0)]
    assert bench.bd_rate(top, mixed, (28.0, 31.0)) == pytest.approx(-0.5, abs=0.03)
    assert bench.bd_rate(top, mixed, (38.0, 41.0)) == pytest.approx(0.0, abs=1e-9)
    assert -0.4 < bench.bd_rate(top, mixed) < -0.1
    assert bench.bd_rate(anchor, half, (40.0, 50.0)) is None
    # the script reads a bench CSV and prints the same figure
    import importlib.util

    spec = importlib.util.spec_from_file_location("bd_rate_range", Path(__file__).resolve().parents[1] / "benchmarks" / "bd_rate_range.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    rows = [bench.Row(codec, i, "x", 1, 1, 1, r, q, 0.9, None, 0.0, 0.0)
            for codec, curve in (("jpeg", anchor), ("nicd", half)) for i, (r, q) in enumerate(curve)]
    bench.write_csv(rows, tmp_path / "b.csv")
    script.main([str(tmp_path / "b.csv"), "--psnr", "29", "33"])
    assert "nicd         BD-rate vs jpeg over 29–33 dB: -50.0 %" in capsys.readouterr().out


def test_rate_ratios_say_where_along_the_curve_a_codec_gains():
    anchor = [(0.25, 28.0), (0.5, 31.0), (1.0, 34.5), (2.0, 38.0)]
    test = [(0.125, 28.0), (0.5, 31.0), (1.5, 34.5), (1.0, 40.0)]  # half, same, 1.5×, beyond the anchor
    ratios = bench.rate_ratios(anchor, test)
    assert ratios[0] == pytest.approx(-0.5) and ratios[1] == pytest.approx(0.0, abs=1e-12)
    assert ratios[2] == pytest.approx(0.5) and ratios[3] is None
    # between the anchor's points its log rate is interpolated: against a half-rate anchor, twice the ratio
    mid = bench.rate_ratios(anchor, [(1.0, 32.0)])[0] + 1  # the anchor needs 1/mid bpp at 32 dB
    assert 0.5 < 1 / mid < 1.0
    assert bench.rate_ratios([(r * 0.5, q) for r, q in anchor], [(1.0, 32.0)])[0] + 1 == pytest.approx(2 * mid)


def test_small_run_writes_rows_summary_and_plot(tmp_path):
    images = [("k1", np.ascontiguousarray(kodak(1)[:128, :192])), ("k2", np.ascontiguousarray(kodak(2)[:128, :192]))]
    codec = load_codec("default", "cpu")
    rows = bench.run(images, codec, [2, 6], ["jpeg"])
    nicd_rows = [r for r in rows if r.codec == "nicd"]
    assert len(nicd_rows) == 4 and len([r for r in rows if r.codec == "jpeg"]) == 2 * len(bench.BASELINE_QUALITIES["jpeg"])
    # sizes are the real file lengths, and bpp follows from them
    for r in rows:
        assert abs(r.bpp - 8 * r.bytes / (r.width * r.height)) < 1e-9
    same = codec.encode(load_image(Image.fromarray(images[0][1])), quality=6)
    assert same.data and len(same.data) == [r.bytes for r in nicd_rows if r.image == "k1" and r.setting == 6][0]
    summary = bench.summary(rows)
    assert set(summary["codecs"]) == {"nicd", "jpeg"} and summary["codecs"]["jpeg"]["bd_rate_vs_jpeg"] == 0
    assert all(abs(v) < 1e-9 for v in summary["codecs"]["jpeg"]["rate_vs_jpeg"])
    assert len(summary["codecs"]["nicd"]["rate_vs_jpeg"]) == 2
    bench.write_csv(rows, tmp_path / "b.csv")
    assert len((tmp_path / "b.csv").read_text().splitlines()) == len(rows) + 1
    bench.plot(rows, tmp_path / "rd.png")
    with Image.open(tmp_path / "rd.png") as im:
        assert im.size[0] > 500


def test_ms_ssim_bd_rate_is_taken_on_the_decibel_scale():
    from nicd.bench import Row

    def rows(codec, points):
        return [Row(codec, i, "img", 10, 10, 1, bpp, 30.0, 0.9, ms, 0.0, 0.0) for i, (bpp, ms) in enumerate(points)]

    jpeg = [(0.25, 0.90), (0.5, 0.95), (1.0, 0.98), (2.0, 0.99)]
    half = [(b / 2, m) for b, m in jpeg]
    s = bench.summary(rows("jpeg", jpeg) + rows("nicd", half))
    assert abs(s["codecs"]["nicd"]["bd_rate_ms_ssim_vs_jpeg"] - (-0.5)) < 1e-9
    assert abs(bench.ms_ssim_db(0.99) - 20.0) < 1e-9


def test_the_bench_command_writes_its_summary_with_the_thread_count(tmp_path):
    import json

    import torch
    from typer.testing import CliRunner

    from nicd.cli import app

    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(kodak(1)[:128, :192]).save(images / "a.png")
    r = CliRunner().invoke(app, ["bench", "--images", str(images), "--qualities", "1,8", "--codecs", "jpeg",
                                 "--out", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["count"] == 1 and summary["torch_threads"] == torch.get_num_threads()
    assert len(summary["codecs"]["nicd"]["curve"]) == 2
    assert (tmp_path / "out" / "rd.png").stat().st_size > 0


def test_jpeg_at_equal_ssim_is_the_smallest_jpeg_reaching_it():
    """The figure `nicd report` compares against: checked against every quality setting of libjpeg."""
    from nicd import baselines
    from nicd.codec import metrics

    rgb = np.ascontiguousarray(kodak(5)[:128, :192])
    every = []  # (size, SSIM) at every quality setting
    for q in range(1, 101):
        data = baselines.encode(rgb, "jpeg", q)
        every.append((len(data), metrics.quality(rgb, baselines.decode(data))["ssim"]))
    for target in (0.9, 0.97):
        assert baselines.jpeg_bytes_at_ssim(rgb, target) == min(n for n, s in every if s >= target)
    assert baselines.jpeg_bytes_at_ssim(rgb, 1.0) is None  # JPEG never reaches a perfect SSIM here


def test_ms_ssim_is_skipped_only_when_not_asked_for():
    from nicd.codec import metrics

    a = np.ascontiguousarray(kodak(5)[:200, :240])
    b = np.clip(a.astype(int) + 9, 0, 255).astype(np.uint8)
    full, lean = metrics.quality(a, b), metrics.quality(a, b, with_ms_ssim=False)
    assert lean["ms_ssim"] is None and 0 < full["ms_ssim"] < 1
    assert (lean["psnr"], lean["ssim"]) == (full["psnr"], full["ssim"])
