"""Model: configs, pipeline (encode / invert / decode), bundles, metrics. Tiny nets, CPU, fixed seeds."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from ldae_bids.errors import ModelError
from ldae_bids.model.config import ModelConfig, preset


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_pipeline(seed: int = 0):
    """A tiny pipeline whose zero-initialised output layers are given small random weights."""
    from ldae_bids.model.pipeline import LdaePipeline

    torch.manual_seed(seed)
    cfg, _ = preset("tiny")
    pipe = LdaePipeline(cfg).eval()
    with torch.no_grad():
        for name, p in pipe.denoiser.named_parameters():
            if "conv_out" in name or "conv2" in name or "out." in name:
                p.normal_(0, 0.02)
    return pipe


def images(n: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, 1, 16, 16, 16), generator=g)


# ---------------------------------------------------------------------------- configs
def test_presets_describe_the_grids():
    compact, _ = preset("compact")
    paper, _ = preset("paper")
    assert compact.image_shape == (80, 96, 80) and compact.latent_shape == (3, 20, 24, 20)
    assert paper.image_shape == (128, 160, 128) and paper.latent_shape == (3, 16, 20, 16)
    assert paper.autoencoder.channels == (64, 128, 128, 128) and paper.semantic_encoder.emb_dim == 768
    assert compact.semantic_encoder.emb_dim == 512


def test_flatten_head_keeps_position_and_checks_its_grid():
    """The flatten head sees where a feature is: two images that differ only by where a blob sits give
    codes that differ; global-average pooling of the same features cannot tell a blob moved between
    positions with identical neighbourhoods. Its grid must be the image shape."""
    import dataclasses

    from ldae_bids.model.semantic import SemanticEncoder

    torch.manual_seed(0)
    # the same blob, shifted by 20 voxels (a multiple of the total stride 4), both farther from the
    # border than the encoder's receptive field (about 31 voxels) so zero padding never meets the blob
    a, b = torch.zeros(1, 1, 96, 96, 96), torch.zeros(1, 1, 96, 96, 96)
    a[..., 36:40, 36:40, 36:40] = 1.0
    b[..., 56:60, 56:60, 56:60] = 1.0
    kwargs = dict(channels=(4, 8), emb_dim=6, norm_num_groups=2)
    mean = SemanticEncoder(**kwargs).eval()
    flat = SemanticEncoder(**kwargs, pooling="flatten", head_channels=2, grid=(96, 96, 96)).eval()
    with torch.no_grad():
        assert torch.allclose(mean(a), mean(b), atol=1e-5)
        assert (flat(a) - flat(b)).abs().max() > 1e-3
    assert SemanticEncoder(**kwargs, pooling="flatten", grid=(17, 20, 15)).final_grid == (5, 5, 4)
    cfg, _ = preset("tiny")
    bad = dataclasses.replace(cfg, semantic_encoder=dataclasses.replace(cfg.semantic_encoder, grid=(8, 8, 8)))
    with pytest.raises(ModelError, match="grid"):
        bad.validate()


def test_standardised_code_is_calibrated_on_a_set_and_fixed_afterwards():
    from ldae_bids.model.semantic import SemanticEncoder

    torch.manual_seed(0)
    enc = SemanticEncoder(channels=(4, 8), emb_dim=6, norm_num_groups=2, pooling="flatten", head_channels=2,
                          grid=(16, 16, 16), standardise=True)
    x = torch.rand(10, 1, 16, 16, 16)
    assert enc.calibrate([x[:4], x[4:]]) == 10
    enc.eval()
    with torch.no_grad():
        y = enc(x)
        assert torch.allclose(y.mean(0), torch.zeros(6), atol=1e-4)
        assert torch.allclose(y.var(0), torch.ones(6), atol=1e-3)
        assert torch.allclose(enc(x[:1]), y[:1], atol=1e-5)  # one image: the stored statistics, not its own
        raw = enc.unnormalised(x)
        assert raw.std(0).mean() < 0.5 * y.std(0).mean()  # the raw code varies little across images
    enc.train()
    assert torch.allclose(enc(x[:1]), y[:1], atol=1e-5)  # a training batch of one cannot be standardised


def test_high_noise_weights_score_x0_error_at_high_noise():
    """weight * eps-error == x0-error wherever 1/SNR lies inside (1, cap); clipped outside; cap 1 = plain loss."""
    from ldae_bids.model.config import SchedulerConfig
    from ldae_bids.model.losses import diffusion_loss, high_noise_weights
    from ldae_bids.model.networks import build_scheduler

    ab = build_scheduler(SchedulerConfig()).alphas_cumprod
    t = torch.arange(0, 1000, 37)
    w = high_noise_weights(ab, t, 20.0)
    assert torch.all(w[1:] >= w[:-1]) and w.min() == 1.0 and w.max() == 20.0
    torch.manual_seed(0)
    x0, noise, x0_hat = torch.randn(3, 2, 4, 4, 4), torch.randn(3, 2, 4, 4, 4), torch.randn(3, 2, 4, 4, 4)
    tt = torch.tensor([430, 470, 520])  # 1/SNR between 1 and 20 there
    a = ab[tt].view(-1, 1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    eps_hat = (x_t - a.sqrt() * x0_hat) / (1 - a).sqrt()  # the eps prediction implied by x0_hat
    weighted = diffusion_loss(eps_hat, noise, high_noise_weights(ab, tt, 20.0))
    assert weighted == pytest.approx(float((x0_hat - x0).square().mean()), rel=1e-4)
    assert torch.equal(high_noise_weights(ab, t, 1.0), torch.ones(len(t)))
    assert diffusion_loss(eps_hat, noise) == pytest.approx(float((eps_hat - noise).square().mean()), rel=1e-6)


def test_config_round_trip_and_unknown_keys():
    cfg, _ = preset("tiny")
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    bad = cfg.to_dict()
    bad["denoiser"]["wings"] = 2
    with pytest.raises(ModelError, match="wings"):
        ModelConfig.from_dict(bad)
    with pytest.raises(ModelError, match="unknown preset"):
        preset("huge")
    # the training latents' channel means (older bundles have none)
    anchored = dataclasses.replace(cfg, latent_mean=(0.5, -0.25))  # the tiny preset: two latent channels
    assert ModelConfig.from_dict(json.loads(json.dumps(anchored.to_dict()))) == anchored
    assert ModelConfig.from_dict({k: v for k, v in cfg.to_dict().items() if k != "latent_mean"}).latent_mean is None
    with pytest.raises(ModelError, match="latent_mean has 3 values for 2"):
        ModelConfig.from_dict({**cfg.to_dict(), "latent_mean": [0.0, 1.0, 2.0]})


# ---------------------------------------------------------------------------- pipeline
def test_encode_decode_shapes():
    pipe = tiny_pipeline()
    x = images(3)
    enc = pipe.encode(x, steps=5)
    assert enc.y_sem.shape == (3, 16)
    assert enc.x_T.shape == enc.latent.shape == (3, *pipe.config.latent_shape)
    assert pipe.encode(x, invert=False).x_T is None
    assert torch.allclose(pipe.encode_semantic(x), enc.y_sem)
    out = pipe.decode(enc.x_T, enc.y_sem, steps=5)
    assert out.shape == x.shape and 0 <= out.min() and out.max() <= 1
    assert pipe.autoencode(x).shape == x.shape
    rec = pipe.reconstruct(x, steps=5)
    assert rec.images.shape == x.shape and rec.x_T.shape == enc.x_T.shape
    with pytest.raises(ValueError, match="expected images"):
        pipe.encode(torch.rand(1, 1, 8, 8, 8))


def test_inversion_then_decoding_reproduces_the_latent():
    pipe = tiny_pipeline()
    x = images(2)
    errors = {}
    for steps in (10, 100):
        enc = pipe.encode(x, steps=steps)
        back = pipe.ddim(enc.x_T, enc.y_sem, steps)
        errors[steps] = float((back - enc.latent).abs().max() / enc.latent.abs().max())
    assert errors[100] < 0.02
    assert errors[100] <= errors[10] + 1e-6


def test_sampling_is_deterministic_under_a_seed():
    pipe = tiny_pipeline()
    y = pipe.encode_semantic(images(2))
    a = pipe.sample(y, torch.Generator().manual_seed(3), steps=4)
    b = pipe.sample(y, torch.Generator().manual_seed(3), steps=4)
    c = pipe.sample(y, torch.Generator().manual_seed(4), steps=4)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_sampling_from_a_random_x_T_anchors_the_latent_channel_means():
    """A random x_T carries random channel means that sampling would keep; ``sample`` anchors the clean-latent
    prediction's channel means to the training latents' at every step. Decoding an inverted x_T (reconstruct,
    manipulate, fill) and inversion itself do not anchor."""
    from ldae_bids.model.pipeline import LdaePipeline

    plain = tiny_pipeline()
    target = (0.5, -0.25)
    pipe = LdaePipeline(dataclasses.replace(plain.config, latent_mean=target),
                        {"autoencoder": plain.autoencoder, "semantic_encoder": plain.semantic_encoder,
                         "denoiser": plain.denoiser}).eval()
    y = pipe.encode_semantic(images(2))
    x_T = pipe.random_x_T(2, torch.Generator().manual_seed(1))
    free = pipe.ddim(x_T, y, 6)
    anchored = pipe.ddim(x_T, y, 6, anchor_mean=True)
    want = torch.tensor(target).expand(2, 2)
    assert torch.allclose(anchored.mean(dim=(2, 3, 4)), want, atol=1e-5)
    assert (free.mean(dim=(2, 3, 4)) - want).abs().max() > 0.05
    assert torch.equal(pipe.sample(y, steps=6, x_T=x_T), pipe.decode_latent(anchored))
    assert torch.equal(pipe.decode(x_T, y, steps=6), pipe.decode_latent(free))  # decode: as given
    latent = pipe.encode_latent(images(2))
    assert torch.equal(pipe.ddim(latent, y, 6, invert=True, anchor_mean=True), pipe.ddim(latent, y, 6, invert=True))
    # without latent_mean (older bundles), sample is plain DDIM
    assert torch.equal(plain.sample(y, steps=6, x_T=x_T), plain.decode_latent(free))


def test_latent_refinement_fits_the_image_better_per_subject_and_leaves_the_networks_alone():
    import torch.nn.functional as F

    from ldae_bids.metrics import ssim_map_tensor

    pipe = tiny_pipeline()
    x = images(2)
    weights = {k: v.clone() for k, v in pipe.state_dict().items()}

    def loss(latent):  # what the refinement minimises, per subject
        out = pipe.decode_latent(latent)
        return [float(F.l1_loss(out[i], x[i]) + 1 - ssim_map_tensor(out[i:i + 1], x[i:i + 1]).mean()) for i in range(2)]

    start = pipe.encode_latent(x)
    assert torch.equal(pipe.refine_latent(x, steps=0), start)
    refined = pipe.refine_latent(x, steps=5)
    assert all(after < before for before, after in zip(loss(start), loss(refined)))
    # a subject in a batch gets what it gets alone (the loss is per subject, summed)
    alone = pipe.refine_latent(x[1:], steps=5)
    assert torch.allclose(refined[1:], alone, atol=1e-4)
    # the networks are untouched and hold no gradients
    assert all(torch.equal(v, weights[k]) for k, v in pipe.state_dict().items())
    assert all(p.grad is None for p in pipe.parameters())
    # encode(refine_steps=N) inverts the refined latent: decoding x_T gives it back
    enc = pipe.encode(x, steps=100, refine_steps=5)
    assert torch.allclose(enc.latent, refined)
    assert float((pipe.ddim(enc.x_T, enc.y_sem, 100) - refined).abs().max() / refined.abs().max()) < 0.02
    assert not torch.allclose(enc.x_T, pipe.encode(x, steps=100).x_T, atol=1e-3)


# ---------------------------------------------------------------------------- bundles
META = {"grid": {"shape": [16, 16, 16], "spacing": 2.0, "affine": np.eye(4).tolist(), "template": "test"},
        "licence": "CC-BY-SA-3.0"}


def test_bundle_round_trip(tmp_path):
    from ldae_bids.model.bundle import load_bundle, save_bundle

    pipe = tiny_pipeline()
    digest = save_bundle(tmp_path / "b", pipe, META, dtype=torch.float32)
    files = {p.name for p in (tmp_path / "b").iterdir()}
    assert {"config.json", "model.safetensors", "metadata.json", "checksums.json", "LICENSE", "README.md"} <= files
    assert "IXI" in (tmp_path / "b" / "LICENSE").read_text()
    mb = load_bundle(tmp_path / "b")
    assert mb.content_hash == digest and mb.name == "b" and mb.config == pipe.config
    assert mb.metadata["grid"]["shape"] == [16, 16, 16]
    x = images(1)
    assert torch.allclose(mb.pipeline.encode_semantic(x), pipe.encode_semantic(x))
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    y = pipe.encode_semantic(x)
    assert torch.allclose(mb.pipeline.sample(y, g(), steps=3), pipe.sample(y, g(), steps=3), atol=1e-6)
    # same content, same hash
    assert save_bundle(tmp_path / "b2", pipe, META, name="b", dtype=torch.float32) == digest


def test_corrupted_bundles_are_refused(tmp_path):
    import shutil

    from ldae_bids.model.bundle import load_bundle, save_bundle, write_checksums

    save_bundle(tmp_path / "ok", tiny_pipeline(), META)

    def copy(name):
        shutil.copytree(tmp_path / "ok", tmp_path / name)
        return tmp_path / name

    flipped = copy("flipped")
    raw = bytearray((flipped / "model.safetensors").read_bytes())
    raw[-10] ^= 0xFF
    (flipped / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(ModelError, match="model.safetensors.*sha256"):
        load_bundle(flipped)

    missing = copy("missing")
    (missing / "metadata.json").unlink()
    with pytest.raises(ModelError, match="metadata.json: missing"):
        load_bundle(missing)

    # a consistent hash but weights that do not fit the config
    shape = copy("shape")
    cfg = json.loads((shape / "config.json").read_text())
    cfg["semantic_encoder"]["channels"] = [4, 12]
    (shape / "config.json").write_text(json.dumps(cfg))
    write_checksums(shape)
    with pytest.raises(ModelError, match="semantic_encoder.*shape"):
        load_bundle(shape)

    unknown = copy("unknown")
    cfg = json.loads((unknown / "config.json").read_text())
    cfg["autoencoder"]["flux_capacitor"] = True
    (unknown / "config.json").write_text(json.dumps(cfg))
    write_checksums(unknown)
    with pytest.raises(ModelError, match="flux_capacitor"):
        load_bundle(unknown)

    with pytest.raises(ModelError, match="not found"):
        load_bundle(tmp_path / "nowhere")


def test_default_bundle_path_points_into_the_package():
    from ldae_bids.model.bundle import default_bundle_path

    path = default_bundle_path()
    assert path.name == "ldae-compact-ixi" and path.parent.name == "models"


# ---------------------------------------------------------------------------- metrics
def test_metrics():
    from ldae_bids.metrics import mse, similarity, ssim

    a = images(1)[0, 0].numpy()
    b = np.clip(a + 0.05, 0, 1)
    mask = np.zeros_like(a)
    mask[4:12, 4:12, 4:12] = 1
    assert ssim(a, a) == pytest.approx(1.0, abs=1e-5) and mse(a, a) == 0
    assert 0 < ssim(a, b) < 1 and mse(a, b) > 0
    s = similarity(a, b, mask)
    assert set(s) == {"ssim", "mse", "ssim_mask", "mse_mask"}
    batched = ssim(images(2), images(2, seed=1))
    assert batched.shape == (2,)
    assert s["ssim_mask"] == pytest.approx(float(ssim(a, b, mask)), abs=1e-6)
    assert s["mse_mask"] == pytest.approx(float(mse(a, b, mask)), abs=1e-9)


def test_ssim_map_matches_a_direct_full_kernel_computation():
    """The separable, grouped SSIM (five moments blurred in one pass) against the textbook formula with a full
    11x11x11 gaussian kernel applied to each moment on its own, border renormalisation included."""
    import torch.nn.functional as F

    from ldae_bids.metrics import ssim_map_tensor

    x, y = images(2), images(2, seed=1)
    g = torch.exp(-(torch.arange(11.0) - 5) ** 2 / (2 * 1.5**2))
    g = g / g.sum()
    k3 = (g[:, None, None] * g[None, :, None] * g[None, None, :])[None, None]

    def blur(v):
        return F.conv3d(v, k3, padding=5) / F.conv3d(torch.ones_like(v), k3, padding=5)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    expected = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    got = ssim_map_tensor(x, y)
    assert got.shape == x.shape and float((got - expected).abs().max()) < 1e-4  # float32 rounding of E[x^2] - mu^2
    with pytest.raises(ValueError, match="B, 1, D, H, W"):
        ssim_map_tensor(x, y[:1])


def test_similarity_of_a_batch_is_that_of_each_pair_and_nan_for_an_empty_mask():
    import torch

    from ldae_bids.metrics import similarity, similarity_batch

    x, y = images(3), images(3, seed=1)
    masks = torch.zeros_like(x, dtype=torch.bool)
    masks[0, :, 2:10, 2:10, 2:10] = True
    masks[1] = x[1] > 0.3
    batch = similarity_batch(x, y, masks)  # item 2: an empty mask
    for i in range(2):
        one = similarity(x[i, 0].numpy(), y[i, 0].numpy(), masks[i, 0].numpy())
        assert batch[i] == pytest.approx(one, abs=1e-6)
    assert np.isnan(batch[2]["ssim_mask"]) and np.isnan(batch[2]["mse_mask"])
    assert batch[2]["ssim"] == pytest.approx(similarity(x[2, 0].numpy(), y[2, 0].numpy())["ssim"], abs=1e-6)


def test_ssim_as_a_loss_is_the_reported_ssim_and_has_gradients():
    from ldae_bids.metrics import ssim, ssim_map_tensor

    a, b = images(1), images(1, seed=1)
    x = b.clone().requires_grad_(True)
    loss = 1.0 - ssim_map_tensor(x, a).mean()
    loss.backward()
    assert loss.item() == pytest.approx(1.0 - ssim(b, a), abs=1e-6)
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    with torch.no_grad():  # a step against the gradient raises the reported SSIM
        stepped = (x - 0.5 * x.grad / x.grad.abs().max()).clamp(0, 1)
    assert ssim(stepped, a) > ssim(b, a)


def test_preprocessing_follows_the_bundles_intensity_spec(tmp_path):
    """The preprocess stage applies the normalisation and bias correction the model was trained with."""
    import json
    from types import SimpleNamespace

    from ldae_bids.model.export import intensity_spec
    from ldae_bids.runtime import Resources

    spec = intensity_spec("minmax", None)
    assert spec["bias_correction"] is None and "not bias-corrected" in spec["description"]
    assert intensity_spec("percentile", "n4")["percentiles"] == [0.5, 99.5]
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "metadata.json").write_text(json.dumps({"intensity": spec}))
    res = Resources(SimpleNamespace(model=bundle))
    assert res.intensity == {"normalisation": "minmax", "bias_correction": None}
    # an older bundle without the key: the app's defaults
    (bundle / "metadata.json").write_text(json.dumps({"intensity": {"normalisation": "percentile"}}))
    assert Resources(SimpleNamespace(model=bundle)).intensity == {"normalisation": "percentile",
                                                                  "bias_correction": "n4"}


def test_onednn_routing_matches_pytorch_and_keeps_gradients():
    """The CPU inference path through oneDNN gives PyTorch's results; training keeps PyTorch's path."""
    import copy

    from torch import nn

    from ldae_bids.model.cpu_conv import route_conv3d_to_onednn

    if not torch.backends.mkldnn.is_available():
        pytest.skip("this PyTorch build has no oneDNN")
    plain = tiny_pipeline()
    routed = [m for m in plain.modules() if getattr(m, "_onednn_routed", False)]
    assert routed and all(type(m) is nn.Conv3d for m in routed)
    reference = copy.deepcopy(plain)
    for m in reference.modules():  # undo the routing on a copy: PyTorch's own path
        if getattr(m, "_onednn_routed", False):
            del m.forward
    x = torch.rand(1, 1, *plain.config.image_shape)
    with torch.no_grad():
        a = plain.denoiser(plain.encode_latent(x), torch.tensor([10]), plain.encode_semantic(x))
        b = reference.denoiser(reference.encode_latent(x), torch.tensor([10]), reference.encode_semantic(x))
    assert a.abs().mean() > 1e-3 and torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    assert route_conv3d_to_onednn(plain) == 0  # idempotent
    # with gradients the routed module falls back to PyTorch's path and trains
    net = plain.denoiser.train()
    z = torch.randn(2, *plain.config.latent_shape)
    loss = net(z, torch.tensor([3, 7]), torch.randn(2, plain.config.semantic_encoder.emb_dim)).square().mean()
    loss.backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


def test_channels_last_weights_give_the_same_results(monkeypatch):
    """set_memory_format lays the 5-D weights out NDHWC; results agree with the NCDHW layout to float32
    rounding and the pipeline's outputs stay NCDHW-contiguous (safetensors and numpy writers rely on it).
    The oneDNN inference path (cpu_conv.py) hands each convolution its input in the weights' layout."""
    pipe = tiny_pipeline()
    x = torch.rand(2, 1, *pipe.config.image_shape)
    ref = pipe.reconstruct(x, steps=3)
    conv_weights = [p for p in pipe.parameters() if p.dim() == 5]
    assert pipe.set_memory_format("channels_last") is pipe and pipe.memory_format == "channels_last"
    assert conv_weights and all(p.is_contiguous(memory_format=torch.channels_last_3d) and not p.is_contiguous()
                                for p in conv_weights if p.shape[1] > 1 and p.shape[2:].numel() > 1)
    calls = []
    onednn = torch.mkldnn_convolution

    def spy(x, w, *args):
        calls.append((x.is_contiguous(memory_format=torch.channels_last_3d), w.is_contiguous()))
        return onednn(x, w, *args)

    if torch.backends.mkldnn.is_available():
        monkeypatch.setattr(torch, "mkldnn_convolution", spy)
    out = pipe.reconstruct(x, steps=3)
    monkeypatch.undo()
    if torch.backends.mkldnn.is_available():  # NDHWC weights (not also NCDHW) get NDHWC inputs
        assert calls and any(not w_plain for _, w_plain in calls)
        assert all(x_last for x_last, w_plain in calls if not w_plain)
    for a, b in ((out.images, ref.images), (out.x_T, ref.x_T), (out.y_sem, ref.y_sem)):
        assert a.is_contiguous() and torch.allclose(a, b, atol=1e-4, rtol=1e-3)
    assert pipe.encode_latent(x).is_contiguous()
    pipe.set_memory_format("contiguous")
    assert all(p.is_contiguous() for p in pipe.parameters())
    with pytest.raises(ValueError, match="memory format"):
        pipe.set_memory_format("nhwc")


def test_mixed_precision_path_under_cpu_bf16_autocast(monkeypatch):
    """On CUDA the networks run in bf16 autocast. CI has no GPU, so CPU bf16 autocast stands in for it:
    every result must come back float32 and stay close to the float32 path (dtype slips fail here)."""
    from ldae_bids.model.pipeline import LdaePipeline

    pipe = tiny_pipeline()
    x = torch.rand(2, 1, *pipe.config.image_shape)
    ref = pipe.reconstruct(x, steps=3)
    monkeypatch.setattr(LdaePipeline, "autocast", lambda self: torch.autocast("cpu", dtype=torch.bfloat16))
    out = pipe.reconstruct(x, steps=3)
    samples = pipe.sample(out.y_sem, torch.Generator().manual_seed(0), steps=2)
    for t in (out.images, out.y_sem, out.x_T, samples):
        assert t.dtype == torch.float32 and torch.isfinite(t).all()
    assert float((out.images - ref.images).abs().mean()) < 0.05
    assert float((out.y_sem - ref.y_sem).norm() / ref.y_sem.norm()) < 0.05
