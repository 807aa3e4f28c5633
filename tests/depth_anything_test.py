"""Depth Anything V2 in flax against transformers' DepthAnythingForDepthEstimation.

Random weights throughout (every tensor perturbed, so biases and the unused paths matter);
tiny configs (STACK.md's: width-32 DINOv2, fusion 16, neck 8/16/32/32) so CI stays fast. The
real Small shape is compared by bench/verify_depth_anything_parity.py (bench/RESULTS.md).
"""

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from depthg_jax.models import convert_depth_anything as convert_da
from depthg_jax.models import depth_anything as da

TOLERANCE = 1e-4  # relative (to the prediction's max) bound asked of the predicted depth


def tiny_config(layers=(1, 2, 3, 4), depth=4, factors=(4, 2, 1, 0.5), **extra):
    backbone = transformers.Dinov2Config(
        hidden_size=32,
        num_hidden_layers=depth,
        num_attention_heads=2,
        patch_size=14,
        image_size=28,
        out_indices=list(layers),
        reshape_hidden_states=False,
    )
    n = len(layers)
    return transformers.DepthAnythingConfig(
        backbone_config=backbone,
        reassemble_hidden_size=32,
        reassemble_factors=list(factors),
        neck_hidden_sizes=[8, 16, 32, 32][:n],
        fusion_hidden_size=16,
        head_hidden_size=8,
        patch_size=14,
        **extra,
    )


def small_config():
    """Depth Anything V2 Small's published shape (depth-anything/Depth-Anything-V2-Small-hf)."""
    backbone = transformers.Dinov2Config(
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        patch_size=14,
        image_size=518,
        out_indices=[3, 6, 9, 12],
        reshape_hidden_states=False,
    )
    return transformers.DepthAnythingConfig(
        backbone_config=backbone,
        reassemble_hidden_size=384,
        neck_hidden_sizes=[48, 96, 192, 384],
        fusion_hidden_size=64,
        head_hidden_size=32,
    )


def random_model(config, seed=0):
    torch.manual_seed(seed)
    model = transformers.DepthAnythingForDepthEstimation(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
        model.head.conv3.bias.add_(1.0)  # keep most of the relative depth above its ReLU
    return model


def numpy_state(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def relative_error(got, want) -> float:
    want = np.asarray(want)
    return float(np.abs(np.asarray(got) - want).max() / np.abs(want).max())


@pytest.mark.parametrize("factors", [(4, 2, 1, 0.5), (3, 1, 0.5, 0.25)])
@pytest.mark.parametrize("grid", [(3, 5), (4, 4)])
def test_neck_and_head_match_transformers_on_the_same_hidden_states(factors, grid):
    model = random_model(tiny_config(factors=factors))
    gh, gw = grid
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 3, 14 * gh, 14 * gw)))
    with torch.no_grad():
        hidden = model.backbone(x.float()).feature_maps  # 4 x (B, 1 + gh*gw, 32), normed
        fused = model.neck(list(hidden), gh, gw)
        want = model.head(fused, gh, gw).numpy()
    params = convert_da.convert_neck_and_head(
        {k: v for k, v in numpy_state(model).items() if not k.startswith("backbone.")}, factors
    )
    neck = da.DepthAnythingNeck((8, 16, 32, 32), factors, 16)
    head = da.DepthAnythingHead(16, 8, 14)
    tokens = [h.numpy() for h in hidden]
    maps = neck.apply({"params": params["neck"]}, tokens, (gh, gw))
    for got_map, want_map in zip(maps, fused, strict=True):
        want_map = want_map.permute(0, 2, 3, 1).numpy()
        assert got_map.shape == want_map.shape
        assert relative_error(got_map, want_map) < TOLERANCE
    got = head.apply({"params": params["head"]}, maps[-1], (gh, gw))
    assert got.shape == want.shape == (2, 14 * gh, 14 * gw)
    assert (want > 0).mean() > 0.5  # the ReLU leaves a map to compare
    assert relative_error(got, want) < TOLERANCE


def test_metric_head_is_sigmoid_times_max_depth():
    model = random_model(tiny_config(depth_estimation_type="metric", max_depth=20))
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((1, 3, 42, 56))).float()
    with torch.no_grad():
        hidden = model.backbone(x).feature_maps
        want = model.head(model.neck(list(hidden), 3, 4), 3, 4).numpy()
    state = {k: v for k, v in numpy_state(model).items() if not k.startswith("backbone.")}
    params = convert_da.convert_neck_and_head(state, (4, 2, 1, 0.5))
    maps = da.DepthAnythingNeck((8, 16, 32, 32), (4, 2, 1, 0.5), 16).apply(
        {"params": params["neck"]}, [h.numpy() for h in hidden], (3, 4)
    )
    got = da.DepthAnythingHead(16, 8, 14, "metric", 20.0).apply(
        {"params": params["head"]}, maps[-1], (3, 4)
    )
    assert relative_error(got, want) < TOLERANCE
    assert 0 < float(np.min(got)) and float(np.max(got)) < 20


def test_bilinear_align_corners_matches_torch():
    x = np.random.default_rng(0).standard_normal((2, 5, 7, 3)).astype(np.float32)
    for size in [(10, 14), (9, 13), (5, 7), (1, 3), (3, 20)]:
        want = torch.nn.functional.interpolate(
            torch.from_numpy(x).permute(0, 3, 1, 2), size=size, mode="bilinear", align_corners=True
        )
        got = da.resize_bilinear_aligned(x, size)
        np.testing.assert_allclose(got, want.permute(0, 2, 3, 1).numpy(), atol=2e-6)


@pytest.mark.parametrize("size", [(480, 640), (37, 50), (1000, 70)])
def test_upsample_depth_matches_the_processors_post_processing(size):
    pred = np.random.default_rng(0).random((1, 518, 686)).astype(np.float32)
    proc = transformers.DPTImageProcessorPil()
    out = transformers.modeling_outputs.DepthEstimatorOutput(predicted_depth=torch.from_numpy(pred))
    want = proc.post_process_depth_estimation(out, target_sizes=[size])[0]["predicted_depth"]
    got = da.upsample_depth(pred[0], size)
    assert got.shape == size and got.dtype == np.float32
    np.testing.assert_allclose(got, want.numpy(), atol=2e-6)


@pytest.mark.parametrize(
    "hw", [(480, 640), (640, 480), (427, 640), (375, 500), (33, 33), (40, 70), (7, 300)]
)
def test_preprocessing_is_the_processors_bit_for_bit(hw):
    proc = transformers.DPTImageProcessorPil(
        size={"height": 518, "width": 518},
        keep_aspect_ratio=True,
        ensure_multiple_of=14,
        resample=3,
        image_mean=list(da.IMAGENET_MEAN),
        image_std=list(da.IMAGENET_STD),
    )
    rng = np.random.default_rng(hw[0])
    image = rng.integers(0, 256, (*hw, 3), dtype=np.uint8)
    want = proc(images=image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    size = da.preprocessed_size(*hw, (518, 518), 14, True)
    assert size == want.shape[:2]
    resized = da.resize_image(image, size, 3)
    got = np.asarray(da.normalise(resized[None], da.normalisation_table())[0])
    np.testing.assert_array_equal(got, want)


def test_preprocessed_size_by_hand():
    # 640x480 COCO: height scale 518/480 is nearer 1 than width's 518/640 -> 518 x 690.7 -> 686.
    assert da.preprocessed_size(480, 640) == (518, 686)
    assert da.preprocessed_size(427, 640) == (350, 518)  # width's scale is nearer 1 here


def full_parity(model, config, x, official: bool, layers=None):
    """(relative error, share of the reference above its ReLU) of DepthAnything against
    transformers on NHWC images x, from the HF or the official layout."""
    import jax

    state = numpy_state(model)
    if official:
        state = official_state(state)
        spec = convert_da.infer_spec(state, layers=layers)
        assert spec == convert_da.spec_from_hf_config(config.to_dict())
    else:
        spec = convert_da.spec_from_hf_config(config.to_dict())
    params = convert_da.convert_state_dict(state, spec)
    got = jax.jit(da.DepthAnything(spec).apply)({"params": params}, x)
    with torch.no_grad():
        want = model(torch.from_numpy(x).permute(0, 3, 1, 2)).predicted_depth.numpy()
    assert got.shape == want.shape == x.shape[:3]
    return relative_error(got, want), float((want > 0).mean())


@pytest.mark.parametrize("official", [False, True])
@pytest.mark.parametrize("hw", [(42, 70), (28, 28), (56, 42)])
def test_tiny_model_matches_transformers(hw, official):
    """v2-mu/14 encoder (2 blocks, width 32; stored grid 2x2, so other sizes resize the
    position embeddings as transformers does), a 2-stage neck."""
    config = tiny_config(layers=(1, 2), depth=2, factors=(2, 1))
    x = np.random.default_rng(hw[0]).standard_normal((2, *hw, 3)).astype(np.float32)
    err, positive = full_parity(random_model(config), config, x, official, layers=(1, 2))
    assert positive > 0.5 and err < TOLERANCE, err


@pytest.mark.slow
def test_small_shape_matches_transformers_from_official_names():
    """Depth Anything V2 Small's shape (v2-S/14, layers 3/6/9/12 by default for width 384,
    neck 48/96/192/384, fusion 64) at a small input, official names; the full 518x686 input is
    bench/verify_depth_anything_parity.py's."""
    config = small_config()
    torch.manual_seed(0)
    model = transformers.DepthAnythingForDepthEstimation(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
        model.head.conv3.bias.add_(1.0)
    x = np.random.default_rng(0).standard_normal((1, 70, 98, 3)).astype(np.float32)
    err, positive = full_parity(model, config, x, official=True)
    assert positive > 0.5 and err < TOLERANCE, err


def test_official_names_map_to_the_hf_ones():
    model = random_model(tiny_config())
    hf = {k: v for k, v in numpy_state(model).items() if not k.startswith("backbone.")}
    official = {}
    for key, value in hf.items():
        new = key.replace("neck.reassemble_stage.layers.", "depth_head.projects.")
        if ".resize." in key:
            new = key.replace("neck.reassemble_stage.layers.", "depth_head.resize_layers.")
            new = new.replace(".resize.", ".")
        else:
            new = new.replace(".projection.", ".")
        if key.startswith("neck.convs."):
            i = int(key.split(".")[2])
            new = f"depth_head.scratch.layer{i + 1}_rn.weight"
        if key.startswith("neck.fusion_stage.layers."):
            j = int(key.split(".")[3])
            rest = ".".join(key.split(".")[4:])
            rest = rest.replace("projection", "out_conv").replace("residual_layer", "resConfUnit")
            rest = rest.replace("convolution", "conv")
            new = f"depth_head.scratch.refinenet{4 - j}.{rest}"
        for hf_name, off in [("head.conv1", "depth_head.scratch.output_conv1"),
                             ("head.conv2", "depth_head.scratch.output_conv2.0"),
                             ("head.conv3", "depth_head.scratch.output_conv2.2")]:  # fmt: skip
            if key.startswith(hf_name + "."):
                new = key.replace(hf_name, off)
        official[new] = value
    assert convert_da.official_to_hf(official).keys() == hf.keys()
    for key, value in convert_da.official_to_hf(official).items():
        np.testing.assert_array_equal(value, hf[key])


def test_resize_image_is_pil_bicubic():
    image = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    want = np.asarray(Image.fromarray(image).resize((28, 14), Image.BICUBIC))
    np.testing.assert_array_equal(da.resize_image(image, (14, 28)), want)


def official_state(hf: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """transformers' Depth Anything names -> DepthAnything/Depth-Anything-V2's, spelt out."""
    out = {}
    n_fusion = 1 + max(int(k.split(".")[3]) for k in hf if k.startswith("neck.fusion_stage."))
    for key, value in hf.items():
        parts = key.split(".")
        if key.startswith("backbone.embeddings."):
            name = {
                "cls_token": "cls_token",
                "mask_token": "mask_token",
                "position_embeddings": "pos_embed",
            }.get(parts[2], "patch_embed.proj." + parts[-1])
            out["pretrained." + name] = value
        elif key.startswith("backbone.encoder.layer."):
            i, rest = parts[3], ".".join(parts[4:])
            for hf_name, name in [
                ("attention.output.dense", "attn.proj"), ("attention.o_proj", "attn.proj"),
                ("layer_scale1.lambda1", "ls1.gamma"), ("layer_scale2.lambda1", "ls2.gamma"),
            ]:  # fmt: skip
                rest = rest.replace(hf_name, name)
            if any(f"{x}_proj" in rest or f".{y}." in f".{rest}" for x, y in
                   [("q", "query"), ("k", "key"), ("v", "value")]):  # fmt: skip
                continue  # merged below
            out[f"pretrained.blocks.{i}.{rest}"] = value
        elif key.startswith("backbone.layernorm."):
            out["pretrained.norm." + parts[-1]] = value
        elif key.startswith("neck.reassemble_stage.layers."):
            kind = "projects" if parts[4] == "projection" else "resize_layers"
            out[f"depth_head.{kind}.{parts[3]}.{parts[-1]}"] = value
        elif key.startswith("neck.convs."):
            out[f"depth_head.scratch.layer{int(parts[2]) + 1}_rn.weight"] = value
        elif key.startswith("neck.fusion_stage.layers."):
            unit = {"projection": "out_conv", "residual_layer1": "resConfUnit1",
                    "residual_layer2": "resConfUnit2"}[parts[4]]  # fmt: skip
            conv = {"convolution1": "conv1.", "convolution2": "conv2."}.get(parts[5], "")
            j = n_fusion - int(parts[3])
            out[f"depth_head.scratch.refinenet{j}.{unit}.{conv}{parts[-1]}"] = value
        elif key.startswith("head.conv"):
            name = {"1": "output_conv1", "2": "output_conv2.0", "3": "output_conv2.2"}[key[9]]
            out[f"depth_head.scratch.{name}.{parts[-1]}"] = value
        else:
            raise AssertionError(key)
    layers = {k.split(".")[3] for k in hf if k.startswith("backbone.encoder.layer.")}
    for i in layers:
        for kind in ("weight", "bias"):
            qkv = []
            for long, short in (("query", "q"), ("key", "k"), ("value", "v")):
                base = f"backbone.encoder.layer.{i}.attention."
                qkv.append(
                    hf.get(f"{base}attention.{long}.{kind}", hf.get(f"{base}{short}_proj.{kind}"))
                )
            out[f"pretrained.blocks.{i}.attn.qkv.{kind}"] = np.concatenate(qkv)
    return out
