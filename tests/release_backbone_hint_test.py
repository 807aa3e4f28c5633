"""`models.release` given backbone weights (a DINO .pth) points to `models.convert` instead of
listing the file's tensor names."""

import pytest
import torch

from depthg_jax.models import release


def dino_like_state_dict(blocks=12):
    """The 150 top-level names of DINO ViT-S/8's .pth (tiny shapes)."""
    state = {
        "cls_token": torch.zeros(1, 1, 4),
        "pos_embed": torch.zeros(1, 2, 4),
        "patch_embed.proj.weight": torch.zeros(4, 3, 2, 2),
        "patch_embed.proj.bias": torch.zeros(4),
        "norm.weight": torch.ones(4),
        "norm.bias": torch.zeros(4),
    }
    for i in range(blocks):
        for name in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            state[f"blocks.{i}.{name}.weight"] = torch.zeros(4)
            state[f"blocks.{i}.{name}.bias"] = torch.zeros(4)
    return state


def test_a_backbone_pth_points_to_convert(tmp_path):
    state = dino_like_state_dict()
    assert len(state) == 150
    path = tmp_path / "dino_deitsmall8_300ep_pretrain.pth"
    torch.save(state, path)
    with pytest.raises(release.ReleaseError) as info:
        release.read_checkpoint(path)
    message = str(info.value)
    assert "python -m depthg_jax.models.convert" in message and str(path) in message
    assert "150 tensors" in message
    assert "blocks.11.mlp.fc2.bias" not in message  # no list of 150 names


def test_another_file_without_state_dict_lists_a_few_keys(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({f"k{i:02d}": torch.zeros(1) for i in range(20)}, path)
    with pytest.raises(release.ReleaseError, match=r"not a Lightning checkpoint .*12 more"):
        release.read_checkpoint(path)
