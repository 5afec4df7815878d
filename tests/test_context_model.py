"""The channel-context model (`mean-scale-cc`, Minnen & Singh 2020): it starts where its mean-scale
source stands, its integer context networks make encoder and decoder agree exactly, and they change
what is coded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nicd.codec import container, registry
from nicd.codec.api import Codec
from nicd.codec.frozen import latent_shape
from nicd.codec.imageio import load_image
from nicd.codec.models import ChannelContextHyperprior, build_model
from nicd.errors import ModelError
from nicd.train.loop import Trainer, TrainOptions

KODAK = Path(__file__).resolve().parents[2] / "shared" / "data" / "kodak"


def photo_crop(h: int, w: int, n: int) -> np.ndarray:
    with Image.open(KODAK / f"kodim{n:02d}.png") as im:
        return np.ascontiguousarray(np.asarray(im.convert("RGB"))[:h, :w])


def _cc_model(seed: int = 0, context: float = 0.5) -> ChannelContextHyperprior:
    """A small cc model whose context networks' last layers are not zero (so the context matters)."""
    torch.manual_seed(seed)
    model = build_model({"kind": "mean-scale-cc", "n": 32, "m": 48})
    with torch.no_grad():
        for net in model.ctx:
            net[-1].weight.normal_(0, context)
            net[-1].bias.normal_(0, context)
    return model.eval()


@pytest.fixture(scope="module")
def cc_codec(tmp_path_factory) -> Codec:
    directory = tmp_path_factory.mktemp("cc-models")
    info = registry.export(_cc_model(), "cc-test", directory)
    return Codec(*registry.load(info.model_id, directory), torch.device("cpu"))


def test_a_context_model_fine_tuned_from_a_mean_scale_run_starts_where_it_stood(small_train, tmp_path):
    base = dict(train_data=small_train, val_data=None, n=16, m=24, patch=64, batch=2, lr=1e-3,
                checkpoint_minutes=60, threads=1, seed=3)
    source = Trainer(TrainOptions(run_dir=tmp_path / "plain", steps=3, **base))
    source.run()
    cc = Trainer(TrainOptions(run_dir=tmp_path / "cc", kind="mean-scale-cc", steps=0, **base))
    cc.init_from(str(tmp_path / "plain" / "checkpoint.pt"))
    assert cc.opts.extra["init_from"]["context_added"] is True
    x = torch.rand(2, 3, 64, 64)
    q = torch.tensor([0, 5])
    source.ema.eval(), cc.model.eval()
    with torch.no_grad():
        a, b = source.ema(x, q), cc.model(x, q)
    assert torch.equal(a["x_hat"], b["x_hat"])
    assert torch.equal(a["likelihoods"]["y"], b["likelihoods"]["y"])
    # and it trains: the context networks' last layers leave zero
    cc.opts.steps = 3
    cc.run()
    assert any(bool(net[-1].weight.detach().abs().max() > 0) for net in cc.model.ctx)
    # at their own, higher learning rate
    transforms, context = cc.optimizer.param_groups
    assert context["params"][0] is cc.model.ctx[0][0].weight and context["lr"] == 10 * transforms["lr"] == 1e-2


def test_roundtrip_is_exact_and_the_rate_is_what_the_model_estimates(cc_codec):
    frozen = cc_codec.frozen
    assert frozen.kind == "mean-scale-cc" and len(frozen.int_ctx) == ChannelContextHyperprior.SLICES - 1
    rgb = photo_crop(128, 192, 5)
    res = cc_codec.encode(load_image(Image.fromarray(rgb)), quality=6)
    c = container.parse(res.data)
    payload = sum(len(s) for tile in c.tiles for s in tile.streams)
    assert abs(payload - res.estimated_bits / 8) < 0.01 * res.estimated_bits / 8 + 8  # + the coder's final words
    assert cc_codec.decode_rgb(res.data).shape == rgb.shape
    # the decoder rebuilds exactly the latent the encoder quantized, slice by slice
    y = frozen.analyse(torch.from_numpy(rgb).permute(2, 0, 1)[None].double() / 255)[0]
    coded = frozen.code(y, 6)
    hw = latent_shape(128, 192, frozen.stride)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        decoded = frozen.decode(coded.streams, hw, 6, coded.symbol_crc)
        assert np.array_equal(decoded, coded.y_hat)
    torch.set_num_threads(1)


def test_the_context_changes_what_is_coded(cc_codec, tmp_path):
    """The same transforms without context (its last layers zero) code other symbols under other
    tables: the context networks are used, not carried."""
    plain = _cc_model(context=0.0)
    info = registry.export(plain, "cc-zero", tmp_path)
    zero = Codec(*registry.load(info.model_id, tmp_path), torch.device("cpu"))
    image = load_image(Image.fromarray(photo_crop(128, 128, 9)))
    a, b = cc_codec.encode(image, quality=4), zero.encode(image, quality=4)
    assert a.estimated_bits != b.estimated_bits
    assert container.parse(a.data).tiles[0].streams != container.parse(b.data).tiles[0].streams


def test_integer_context_networks_do_not_depend_on_layout_or_batch(cc_codec):
    net = cc_codec.frozen.int_ctx[1]
    in_channels = int(net.layers[0].weight.shape[1])
    x = torch.from_numpy(np.random.default_rng(1).integers(-5000, 5000, size=(2, in_channels, 6, 7)).astype(np.float64))
    alone = net.run(x[:1].clone())
    batch = net.run(x)
    last = net.run(x.contiguous(memory_format=torch.channels_last))
    assert torch.equal(alone[0], batch[0]) and torch.equal(batch, last)
    assert torch.equal(alone, torch.round(alone))


def test_a_model_file_without_or_with_unsafe_context_networks_is_refused(cc_codec):
    config, arrays = registry._read(cc_codec.info.path)
    missing = {k: v for k, v in arrays.items() if not k.startswith("int_ctx2.")}
    with pytest.raises(ModelError) as err:
        registry._frozen("x", config, missing)
    assert err.value.code == "E_MODEL_FILE"
    # a bias at the edge of float64's exact range: the bound check refuses it before any coding
    unsafe = {**arrays, "int_ctx0.0.bias": np.full_like(arrays["int_ctx0.0.bias"], 1 << 53)}
    with pytest.raises(ModelError) as err:
        registry._frozen("x", config, unsafe)
    assert err.value.code == "E_MODEL_FILE"
