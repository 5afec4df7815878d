"""Moving a trained model onto another quality ladder (nicd.train.ladder), and training on it."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from nicd.codec import registry
from nicd.codec.api import Codec, pick_device
from nicd.codec.imageio import load_image
from nicd.codec.models import LAMBDAS_MSE, build_model
from nicd.errors import ConfigError
from nicd.train.cards import training_source
from nicd.train.export import export_checkpoint
from nicd.train.ladder import parse_ladder, relabel_gains
from nicd.train.loop import Trainer, rd_loss

from test_train import opts, shipped_architecture

# the ladder the shipped default moves onto: 0.0008 … 0.18, geometric
WIDE = tuple(round(0.0008 * (0.18 / 0.0008) ** (i / 7), 6) for i in range(8))


def test_relabelling_keeps_shared_levels_and_follows_the_line_in_log_lambda():
    torch.manual_seed(0)
    state = build_model({"kind": "mean-scale", "n": 8, "m": 12}).state_dict()
    rows = state["gain.log_gain"].clone()
    # a ladder that shares the top level, halves the bottom and puts one level between two old ones
    mid = math.sqrt(LAMBDAS_MSE[3] * LAMBDAS_MSE[4])
    target = (LAMBDAS_MSE[0] / 2, LAMBDAS_MSE[1], LAMBDAS_MSE[2], LAMBDAS_MSE[3], mid, LAMBDAS_MSE[5], LAMBDAS_MSE[6], LAMBDAS_MSE[7])
    moved = relabel_gains(state, LAMBDAS_MSE, target)
    for i in (1, 2, 3, 5, 6, 7):
        assert torch.equal(moved["gain.log_gain"][i], rows[i])
    w = (math.log(mid) - math.log(LAMBDAS_MSE[3])) / (math.log(LAMBDAS_MSE[4]) - math.log(LAMBDAS_MSE[3]))
    assert torch.allclose(moved["gain.log_gain"][4], (1 - w) * rows[3] + w * rows[4])
    # below the ladder: extrapolated along the first segment
    w0 = (math.log(target[0]) - math.log(LAMBDAS_MSE[0])) / (math.log(LAMBDAS_MSE[1]) - math.log(LAMBDAS_MSE[0]))
    assert w0 < 0 and torch.allclose(moved["gain.log_gain"][0], (1 - w0) * rows[0] + w0 * rows[1])
    assert torch.allclose(moved["gain.log_inv_gain"][0], (1 - w0) * state["gain.log_inv_gain"][0] + w0 * state["gain.log_inv_gain"][1])
    assert all(torch.equal(state[k], moved[k]) for k in state if not k.startswith("gain."))


def test_the_shipped_default_moved_to_a_lower_first_level_spends_fewer_bits_there_and_the_same_at_8():
    """Before any training: the extrapolated gains continue the curve downwards."""
    source = registry.load_float_model("default").eval()
    ladder = source.lambdas or LAMBDAS_MSE
    lower = (ladder[0] / 2, *ladder[1:])
    moved = build_model({**source.config(), "lambdas": list(lower)}).eval()
    moved.load_state_dict(relabel_gains(source.state_dict(), ladder, lower))
    x = torch.nn.functional.avg_pool2d(torch.rand(1, 3, 64, 64), 3, 1, 1)  # any image will do for the order of the rates
    with torch.no_grad():
        def bits(model, q):
            out = model(x, torch.tensor([q]))
            return float(sum(-torch.log2(v).sum() for v in out["likelihoods"].values()))

        assert bits(moved, 0) < 0.95 * bits(source, 0)
        for q in range(1, 8):
            assert bits(moved, q) == pytest.approx(bits(source, q), rel=1e-6)
        rates = [bits(moved, q) for q in range(8)]
    assert rates == sorted(rates)


def test_a_run_trains_its_ladder_and_the_export_carries_it(small_train, tmp_path):
    source = Trainer(opts(tmp_path / "src", small_train, steps=2))
    source.run()
    run = Trainer(opts(tmp_path / "wide", small_train, steps=3, lambdas=WIDE))
    run.init_from(str(tmp_path / "src" / "checkpoint.pt"))
    assert run.model.lambdas == WIDE and run.opts.extra["init_from"]["ladder_from"] == list(LAMBDAS_MSE)
    # the loss weighs each sample by its level's λ on this ladder
    x = torch.rand(2, 3, 64, 64)
    q = torch.tensor([0, 0])
    out = run.model(x, q)
    default = rd_loss(out, x, q, "mse")["loss"].detach()
    wide = rd_loss(out, x, q, "mse", run.model.lambdas)["loss"].detach()
    assert float(wide) < float(default)  # WIDE[0] < LAMBDAS_MSE[0]
    run.run()
    # resumed without --lambdas: the checkpoint's ladder; with another: refused
    again = Trainer(opts(tmp_path / "wide", small_train, steps=4))
    assert again.model.lambdas == WIDE and again.opts.lambdas == WIDE
    again.run()
    with pytest.raises(ConfigError, match="trains the ladder"):
        Trainer(opts(tmp_path / "wide", small_train, steps=5, lambdas=LAMBDAS_MSE))
    info = export_checkpoint(tmp_path / "wide" / "checkpoint.pt", "wide", tmp_path / "models")
    assert info.config["lambdas"] == list(WIDE)
    card = json.loads(info.path.with_suffix(".json").read_text())
    assert card["architecture"]["lambdas"] == list(WIDE)
    # a run started from the export keeps its ladder without being told
    follow = Trainer(opts(tmp_path / "follow", small_train, steps=0))
    follow.init_from(str(info.path))
    assert follow.model.lambdas == WIDE and "ladder_from" not in follow.opts.extra["init_from"]
    assert follow.opts.extra["init_from"]["model"] == info.model_id
    # an alias is recorded as the model it named then: the alias moves on with the next export
    shipped = Trainer(opts(tmp_path / "shipped", small_train, steps=0, **shipped_architecture("default")))
    shipped.init_from("default")
    origin = shipped.opts.extra["init_from"]
    assert origin["model"] == registry.resolve("default").stem != "default"
    # the source's own training stays in the chain after its card leaves models/
    source_card = json.loads(registry.resolve("default").with_suffix(".json").read_text())["training"]
    assert origin["steps"] == source_card["steps"] > 0 and origin["from"] == source_card["init_from"]
    assert f"({source_card['steps']:,} steps, " in training_source(origin)
    # and the export codes real bitstreams
    codec = Codec(*registry.load(str(info.path)), pick_device("cpu"))
    image = load_image(next(small_train.glob("*.png")))
    result = codec.encode(image, quality=1)
    assert codec.decode_rgb(result.data).shape == (image.height, image.width, 3)


def test_bad_ladders_are_refused_in_one_line(small_train, tmp_path):
    for text in ("1,2,3", "0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.7", "a,b", "-1,2,3,4,5,6,7,8", "nan,1,2,3,4,5,6,7"):
        with pytest.raises(ConfigError, match="--lambdas"):
            parse_ladder(text)
    assert parse_ladder(",".join(map(str, WIDE))) == WIDE
    assert parse_ladder("0.0008,0.001734,0.00376,0.00815,0.017668,0.038302,0.083032,0.18") == WIDE  # the CLI's example
    from nicd.cli import app

    r = CliRunner().invoke(app, ["train", "--run-dir", str(tmp_path / "x"), "--data", str(small_train), "--lambdas", "1,2"])
    assert r.exit_code != 0 and "--lambdas" in r.output and not (tmp_path / "x").exists()
