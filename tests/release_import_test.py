"""Importing the authors' DepthG/STEGO Lightning checkpoints: equal outputs, clear refusals.

The checkpoints are built here with torch in the releases' exact layout (a tiny "mu/8" DINO
ViT, random weights). `Segmenter` below is our PyTorch statement of what the releases
evaluate (leonsick/depthg and mhamilton723/STEGO, `src/train_segmentation.py`
LitUnsupervisedSegmenter and `src/modules.py`):

- ``net = DinoFeaturizer``: ``net.model`` is DINO's VisionTransformer; the features are the
  last block's tokens after the final LayerNorm, CLS dropped (``get_intermediate_feat``, n=1,
  dino_feat_type "feat"); ``code = cluster1(f) + cluster2(f)`` with ``cluster1 =
  Sequential(Conv2d(C, K, 1))``, ``cluster2 = Sequential(Conv2d(C, C, 1), ReLU, Conv2d(C, K,
  1))``, Dropout2d inactive in eval mode;
- ``cluster_probe = ClusterLookup(K, n)`` and ``linear_probe = Conv2d(K, n, 1)``, applied by
  ``eval_segmentation.py`` to the flip-averaged code upsampled bilinearly (align_corners False)
  to the image: ``log_softmax(2 * <normalize(code), normalize(clusters)>)`` and the linear
  probe's logits;
- training-only modules the checkpoint also holds: ``train_cluster_probe``, ``decoder``
  (Conv2d(K, C, 1)) and, in DepthG with LHP, ``lhp_module.projection_head``.
"""

import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cli import run_in_process
from omegaconf import OmegaConf
from PIL import Image
from torch import nn

from depthg_jax import segment
from depthg_jax.models import model as model_lib
from depthg_jax.models import pth, release
from depthg_jax.runtime import checkpoint

REPO = Path(__file__).resolve().parents[1]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
WIDTH, HEADS, PATCH, DEPTH = 32, 2, 8, 1  # our "mu/8"
TOL = 1e-5


# ----------------------------------------------------------------------------- torch reference


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(WIDTH, 3 * WIDTH)
        self.proj = nn.Linear(WIDTH, WIDTH)

    def forward(self, x):
        b, t, c = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, HEADS, c // HEADS).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q @ k.transpose(-2, -1)) * (c // HEADS) ** -0.5).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, t, c))


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = (
            nn.Linear(WIDTH, 4 * WIDTH),
            nn.GELU(),
            nn.Linear(4 * WIDTH, WIDTH),
        )

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(WIDTH, eps=1e-6), Attention()
        self.norm2, self.mlp = nn.LayerNorm(WIDTH, eps=1e-6), Mlp()

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(3, WIDTH, PATCH, PATCH)


class VisionTransformer(nn.Module):
    """DINO's VisionTransformer (names, 224 px position grid, bicubic +0.1 resize)."""

    def __init__(self):
        super().__init__()
        self.patch_embed = PatchEmbed()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, WIDTH))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + (224 // PATCH) ** 2, WIDTH))
        self.blocks = nn.ModuleList([Block() for _ in range(DEPTH)])
        self.norm = nn.LayerNorm(WIDTH, eps=1e-6)

    def interpolate_pos_encoding(self, n_tokens, h, w):
        n = self.pos_embed.shape[1] - 1
        if n_tokens == n and h == w:
            return self.pos_embed
        side = int(math.sqrt(n))
        grid = self.pos_embed[:, 1:].reshape(1, side, side, WIDTH).permute(0, 3, 1, 2)
        h0, w0 = h // PATCH + 0.1, w // PATCH + 0.1
        grid = F.interpolate(grid, scale_factor=(h0 / side, w0 / side), mode="bicubic")
        grid = grid.permute(0, 2, 3, 1).reshape(1, -1, WIDTH)
        return torch.cat([self.pos_embed[:, :1], grid], dim=1)

    def get_intermediate_feat(self, img):
        b, _, h, w = img.shape
        x = self.patch_embed.proj(img).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1)
        x = x + self.interpolate_pos_encoding(x.shape[1] - 1, h, w)
        for block in self.blocks:
            x = block(x)
        return [self.norm(x)]


class DinoFeaturizer(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.model = VisionTransformer()
        self.dropout = nn.Dropout2d(p=0.1)
        self.cluster1 = nn.Sequential(nn.Conv2d(WIDTH, dim, (1, 1)))
        self.cluster2 = nn.Sequential(
            nn.Conv2d(WIDTH, WIDTH, (1, 1)), nn.ReLU(), nn.Conv2d(WIDTH, dim, (1, 1))
        )

    def forward(self, img):
        feat = self.model.get_intermediate_feat(img)[0]
        h, w = img.shape[2] // PATCH, img.shape[3] // PATCH
        image_feat = feat[:, 1:, :].reshape(feat.shape[0], h, w, -1).permute(0, 3, 1, 2)
        code = self.cluster1(self.dropout(image_feat))
        code = code + self.cluster2(self.dropout(image_feat))
        return image_feat, code


class ClusterLookup(nn.Module):
    def __init__(self, dim, n_classes):
        super().__init__()
        self.clusters = nn.Parameter(torch.randn(n_classes, dim))

    def forward(self, x, alpha):
        inner = torch.einsum(
            "bchw,nc->bnhw", F.normalize(x, dim=1), F.normalize(self.clusters, dim=1)
        )
        return F.log_softmax(inner * alpha, dim=1)


class Segmenter(nn.Module):
    """LitUnsupervisedSegmenter's modules (state_dict names) and its evaluation forward."""

    def __init__(self, dim, n_classes, lhp=False):
        super().__init__()
        self.net = DinoFeaturizer(dim)
        self.train_cluster_probe = ClusterLookup(dim, n_classes)
        self.cluster_probe = ClusterLookup(dim, n_classes)
        self.linear_probe = nn.Conv2d(dim, n_classes, (1, 1))
        self.decoder = nn.Conv2d(dim, WIDTH, (1, 1))
        if lhp:
            self.lhp_module = nn.Module()
            self.lhp_module.projection_head = nn.Sequential(
                nn.Conv2d(dim, dim, (1, 1)), nn.ReLU(), nn.Conv2d(dim, dim, (1, 1))
            )

    @torch.no_grad()
    def evaluate(self, images_uint8, flip):
        img = torch.from_numpy(images_uint8).permute(0, 3, 1, 2).float() / 255
        img = (img - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
        code = self.net(img)[1]
        if flip:
            code = (code + self.net(img.flip(dims=[3]))[1].flip(dims=[3])) / 2
        up = F.interpolate(code, img.shape[-2:], mode="bilinear", align_corners=False)
        return {
            "code": code.permute(0, 2, 3, 1).numpy(),
            "cluster_log_probs": self.cluster_probe(up, 2).permute(0, 2, 3, 1).numpy(),
            "linear_logits": self.linear_probe(up).permute(0, 2, 3, 1).numpy(),
        }


# ----------------------------------------------------------------------------- checkpoints


def make_segmenter(dim, n_classes, seed, lhp=False):
    torch.manual_seed(seed)
    model = Segmenter(dim, n_classes, lhp=lhp).eval()
    with torch.no_grad():  # random weights everywhere (LayerNorm scales too)
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


def optimizer_states(model):
    """Three Adam states, as Lightning stores the release's (head, linear, cluster) optimisers."""
    groups = [model.net.parameters(), model.linear_probe.parameters()]
    groups.append(model.cluster_probe.parameters())
    states = []
    for params, lr in zip(groups, (5e-4, 5e-3, 5e-3), strict=True):
        params = list(params)
        opt = torch.optim.Adam(params, lr=lr)
        sum(p.square().sum() for p in params).backward()
        opt.step()
        states.append(opt.state_dict())
    model.zero_grad(set_to_none=True)
    return states


def depthg_cfg(dim, dataset="directory"):
    """The flat Hydra config of DepthG's train_config.yml (the fields that matter here)."""
    return OmegaConf.create(
        {
            "output_root": "../", "experiment_name": "directory_vitmu", "arch": "dino",
            "dino_patch_size": PATCH, "dino_feat_type": "feat", "projection_type": "nonlinear",
            "pretrained_weights": None, "dim": dim, "continuous": True, "extra_clusters": 0,
            "dataset_name": dataset, "res": 224, "lr": 5e-4, "use_depth": True,
            "depth_feat_weight": 0.09, "depth_sampling": "fps", "lhp": True,
            "feature_samples": 11, "neg_samples": 5, "crop_ratio": "${res}",
        }
    )  # fmt: skip


def lightning_checkpoint(model, hparams, callbacks, version):
    optimizers = optimizer_states(model)  # steps the weights: before reading them
    return {
        "epoch": 4,
        "global_step": 7000,
        "pytorch-lightning_version": version,
        "state_dict": model.state_dict(),
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 5}}}},
        "callbacks": callbacks,
        "optimizer_states": optimizers,
        "lr_schedulers": [],
        "hparams_name": "kwargs",
        "hyper_parameters": hparams,
    }


def model_checkpoint_state():
    return {
        "monitor": "test/cluster/mIoU",
        "best_model_score": torch.tensor(22.4),
        "best_model_path": "../checkpoints/epoch=4.ckpt",
        "current_score": torch.tensor(22.4),
        "best_k_models": {"../checkpoints/epoch=4.ckpt": torch.tensor(22.4)},
        "kth_value": torch.tensor(math.inf),
        "last_model_path": "",
    }


def fake_module(monkeypatch, dotted, **attrs):
    """Registers a stand-in module so that pickle can name its classes (never imported back)."""
    parts = dotted.split(".")
    for i in range(1, len(parts) + 1):
        name = ".".join(parts[:i])
        if name not in sys.modules:
            monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    for key, value in attrs.items():
        value.__module__, value.__qualname__ = dotted, key
        setattr(sys.modules[dotted], key, value)


DEPTHG = {"dim": 16, "n_classes": 6}  # the synthetic set's classes, for the evaluate test
STEGO = {"dim": 24, "n_classes": 3}  # Potsdam-3


@pytest.fixture(scope="module")
def depthg(tmp_path_factory):
    """DepthG layout: PL 2.0 (string callback keys), an LHP module, depth fields in cfg."""
    model = make_segmenter(DEPTHG["dim"], DEPTHG["n_classes"], seed=0, lhp=True)
    hparams = {"n_classes": DEPTHG["n_classes"], "cfg": depthg_cfg(DEPTHG["dim"])}
    key = "ModelCheckpoint{'monitor': 'test/cluster/mIoU', 'mode': 'max'}"
    ckpt = lightning_checkpoint(model, hparams, {key: model_checkpoint_state()}, "2.0.1.post0")
    path = tmp_path_factory.mktemp("depthg") / "cityscapes_vitb.ckpt"
    torch.save(ckpt, path)
    return model, path


@pytest.fixture(scope="module")
def stego(tmp_path_factory):
    """STEGO layout: PL 1.4 keys callback states by the callback class itself; no LHP."""
    mp = pytest.MonkeyPatch()
    try:
        model_checkpoint = type("ModelCheckpoint", (), {})
        fake_module(
            mp, "pytorch_lightning.callbacks.model_checkpoint", ModelCheckpoint=model_checkpoint
        )
        model = make_segmenter(STEGO["dim"], STEGO["n_classes"], seed=1)
        cfg = OmegaConf.create(
            {"arch": "dino", "model_type": "vit_mu", "dino_patch_size": PATCH,
             "dino_feat_type": "feat", "projection_type": "nonlinear", "dim": STEGO["dim"],
             "continuous": True, "extra_clusters": 0, "dataset_name": "potsdam",
             "crf_samples": 1000, "pointwise": True}
        )  # fmt: skip
        hparams = {"n_classes": STEGO["n_classes"], "cfg": cfg}
        callbacks = {model_checkpoint: model_checkpoint_state()}
        ckpt = lightning_checkpoint(model, hparams, callbacks, "1.4.9")
        path = tmp_path_factory.mktemp("stego") / "potsdam_test.ckpt"
        torch.save(ckpt, path)
    finally:
        mp.undo()
    return model, path


def random_images(n, h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def assert_same_outputs(export_dir, model, images, flip):
    config, params = checkpoint.load_export(str(export_dir))
    ours = model_lib.predict(params, images, model_lib.ModelSpec.from_config(config), flip)
    want = model.evaluate(images, flip=flip)
    for key in ("code", "cluster_log_probs", "linear_logits"):
        np.testing.assert_allclose(np.asarray(ours[key]), want[key], atol=TOL, rtol=0, err_msg=key)


# ----------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def depthg_export(depthg, tmp_path_factory):
    _, path = depthg
    out = tmp_path_factory.mktemp("imports") / "depthg_export"
    release.import_checkpoint(path, out)
    return out


@pytest.mark.slow
def test_depthg_import_equals_the_release_forward(depthg, depthg_export):
    model, path = depthg
    config = checkpoint.load_export(str(depthg_export))[0]
    assert (config.model.variant, config.model.dim, config.data.n_classes) == ("mu/8", 16, 6)
    assert config.data.name == "directory"
    assert_same_outputs(depthg_export, model, random_images(2, 32, 48, seed=0), flip=True)

    source = release.read_source(depthg_export)
    assert source["sha256"] == release.file_sha256(path) and len(source["sha256"]) == 64
    assert source["source"] == str(path) and source["layout"] == "depthg"
    assert source["epoch"] == 4 and source["global_step"] == 7000
    skipped = set(source["skipped_state_dict"])
    assert skipped == {
        "train_cluster_probe.clusters", "decoder.weight", "decoder.bias",
        "lhp_module.projection_head.0.weight", "lhp_module.projection_head.0.bias",
        "lhp_module.projection_head.2.weight", "lhp_module.projection_head.2.bias",
    }  # fmt: skip
    assert {"optimizer_states", "callbacks", "loops", "hyper_parameters"} <= set(
        source["skipped_entries"]
    )
    cfg = source["hyper_parameters"]["cfg"]
    assert cfg["dataset_name"] == "directory" and cfg["crop_ratio"] == 224  # ${res} resolved


@pytest.mark.slow
def test_stego_import_equals_the_release_forward(stego, tmp_path):
    model, path = stego
    # The command line, as a user runs it (model_type "vit_mu" is no DINO name: shapes decide).
    out = tmp_path / "stego_export"
    run = subprocess.run(
        [sys.executable, "-m", "depthg_jax.models.release", f"--checkpoint={path}", f"--out={out}"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "mu/8 backbone, code dim 24, 3 classes, dataset potsdam3" in run.stdout
    assert_same_outputs(out, model, random_images(3, 40, 32, seed=1), flip=False)
    source = release.read_source(out)
    assert source["layout"] == "stego" and source["dataset"] == "potsdam3"
    assert source["pytorch_lightning_version"] == "1.4.9"


def state_checkpoint(tmp_path, model, edit, name):
    state = model.state_dict()
    edit(state)
    path = tmp_path / name
    torch.save({"state_dict": state, "epoch": 0}, path)
    return path


@pytest.mark.slow
def test_unknown_state_dict_entries_are_listed(depthg, tmp_path):
    model, _ = depthg

    def add_depth_branch(state):
        state["net.depth_downscaling.0.weight"] = torch.zeros(64, 1, 2, 2)
        state["net.no_depth_embed.weight"] = torch.zeros(1, WIDTH)

    path = state_checkpoint(tmp_path, model, add_depth_branch, "unknown.ckpt")
    with pytest.raises(release.ReleaseError) as err:
        release.import_checkpoint(path, tmp_path / "out")
    assert "['net.depth_downscaling.0.weight', 'net.no_depth_embed.weight']" in str(err.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_mismatched_shapes_name_both(depthg, tmp_path):
    model, _ = depthg

    def narrow_linear_probe(state):
        state["linear_probe.weight"] = torch.zeros(6, 12, 1, 1)

    path = state_checkpoint(tmp_path, model, narrow_linear_probe, "shapes.ckpt")
    with pytest.raises(release.ReleaseError) as err:
        release.import_checkpoint(path, tmp_path / "out")
    message = str(err.value)
    assert "linear_probe.weight has shape (6, 12, 1, 1), expected (6, 16, 1, 1)" in message
    assert "net.cluster1.0.weight (16, 32, 1, 1)" in message

    def wide_backbone_block(state):
        state["net.model.blocks.0.mlp.fc1.weight"] = torch.zeros(64, WIDTH)

    path = state_checkpoint(tmp_path, model, wide_backbone_block, "backbone.ckpt")
    with pytest.raises(ValueError, match=r"fc1.weight: expected shape \(128, 32\).*\(64, 32\)"):
        release.import_checkpoint(path, tmp_path / "out")


@pytest.mark.slow
def test_hyper_parameters_that_contradict_the_weights(depthg, tmp_path):
    model, _ = depthg
    cfg = depthg_cfg(DEPTHG["dim"])
    cfg.model_type = "vit_base"  # DINO ViT-B/8: width 768, not the weights' 32
    ckpt = {"state_dict": model.state_dict(), "hyper_parameters": {"n_classes": 6, "cfg": cfg}}
    torch.save(ckpt, tmp_path / "hp.ckpt")
    with pytest.raises(release.ReleaseError, match=r"variant B/8.*width 32"):
        release.import_checkpoint(tmp_path / "hp.ckpt", tmp_path / "out")


class Payload:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


@pytest.mark.slow
def test_code_in_the_pickle_is_refused_and_never_runs(depthg, tmp_path):
    model, _ = depthg
    target = tmp_path / "payload-ran"
    ckpt = {"state_dict": model.state_dict(), "callbacks": {"x": Payload(target)}}
    path = tmp_path / "evil.ckpt"
    torch.save(ckpt, path)
    with pytest.raises(pth.UnsafePickleError, match=r"refusing to load global (posix|nt)\.system"):
        release.import_checkpoint(path, tmp_path / "out")
    assert not target.exists() and not (tmp_path / "out").exists()
    # The payload is live: an unrestricted load runs it.
    torch.load(path, weights_only=False)
    assert target.exists()


@pytest.mark.slow
def test_placeholders_load_without_importing_omegaconf_or_lightning(monkeypatch, tmp_path):
    attribute_dict = type("AttributeDict", (dict,), {})
    fake_module(monkeypatch, "pytorch_lightning.utilities.parsing", AttributeDict=attribute_dict)
    early_stopping = type("EarlyStopping", (), {})
    fake_module(
        monkeypatch, "pytorch_lightning.callbacks.early_stopping", EarlyStopping=early_stopping
    )
    hp = attribute_dict(n_classes=3, cfg=OmegaConf.create({"a": {"b": [1, "${a.c}"], "c": 2.5}}))
    path = tmp_path / "hp.ckpt"
    torch.save({"hyper_parameters": hp, "callbacks": {early_stopping: {"wait_count": 2}}}, path)
    probe = (
        "import sys, json; from depthg_jax.models import pth; "
        f"ck = pth.load_pth({str(path)!r}, lightning=True); "
        "mods = [m for m in sys.modules if m.split('.')[0] in "
        "('omegaconf', 'pytorch_lightning', 'lightning', 'torch')]; "
        "print(json.dumps([pth.to_plain(ck['hyper_parameters']), "
        "[k.pickled_name for k in ck['callbacks']], mods]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    hparams, callback_names, imported = json.loads(out.stdout)
    assert hparams == {"n_classes": 3, "cfg": {"a": {"b": [1, 2.5], "c": 2.5}}}
    assert callback_names == ["pytorch_lightning.callbacks.early_stopping.EarlyStopping"]
    assert imported == []
    # The strict reader (weight files) still refuses them.
    with pytest.raises(pth.UnsafePickleError, match="AttributeDict"):
        pth.load_pth(path)


@pytest.mark.slow
def test_segment_and_evaluate_take_the_import(depthg, depthg_export, tmp_path):
    from configs import demo
    from depthg_jax import evaluate
    from depthg_jax.data import synthetic

    model, _ = depthg
    images = random_images(2, 32, 32, seed=2)
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i}.png")
    out = tmp_path / "seg"
    args = ["--checkpoint", str(depthg_export), "--images", str(folder), "--out", str(out)]
    assert (
        run_in_process(segment.define_flags, segment.run, args + ["--res=32", "--batch_size=2"])
        == 0
    )
    want = model.evaluate(images, flip=True)["cluster_log_probs"].argmax(-1)
    for i in range(2):
        with Image.open(out / "labels" / f"{i}.png") as im:
            np.testing.assert_array_equal(np.asarray(im), want[i])
        assert (out / "color" / f"{i}.png").is_file() and (out / "overlay" / f"{i}.png").is_file()

    # evaluate on a generated labelled split with the import's model (6 classes, K=16).
    config = demo.get_config()
    config.model.dim = DEPTHG["dim"]
    config.data.root = str(tmp_path / "data")
    config.data.synthetic_val, config.data.eval_res = 3, 32
    config.eval.batch_size, config.eval.crf = 8, False
    synthetic.generate_dataset(config.data.root, num_train=1, num_val=3, size=32, seed=0)
    results, names, _, _ = evaluate.run(str(depthg_export), config, str(tmp_path / "report"))
    assert results["num_images"] == 3 and len(names) == DEPTHG["n_classes"]
    assert 0 <= results["cluster"]["accuracy"] <= 1


@pytest.mark.slow
def test_export_extra_files_are_plain_names(depthg_export, tmp_path):
    config, params = checkpoint.load_export(str(depthg_export))
    for name in ("config.json", "params", "../x.json", ""):
        with pytest.raises(ValueError, match="plain file name"):
            checkpoint.save_export(str(tmp_path / "e"), config, params, extra_files={name: {}})
    assert not (tmp_path / "e").exists()


@pytest.mark.slow
def test_a_wrong_variant_is_named_with_the_weights_shapes(depthg, tmp_path):
    _, path = depthg
    with pytest.raises(release.ReleaseError, match=r"do not match variant 'S/8'.*dim 32"):
        release.import_checkpoint(path, tmp_path / "out", variant="S/8")
