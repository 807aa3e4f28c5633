"""The ViT variants table: one row per backbone, the layout flags the one ViT module reads.

No JAX here: the config, the converters and the sweep's memory estimates read shapes off
this table without building a model. ``vit.ViT(variant)`` builds any row; the converters
(``convert.py``, ``convert_v2v3.py``) derive the expected checkpoint keys from the same row.

A row states what differs between variants of one family (patch, width, depth, heads,
registers, feed-forward, qkv bias); what a whole family shares is derived from ``family``
by the properties below, so a row cannot contradict its family's checkpoint layout:

========================  ==============  ================  ================
                          DINO ("v1")     DINOv2 ("v2")     DINOv3 ("v3")
========================  ==============  ================  ================
positions                 learned, 224 px  learned, 518 px  RoPE (base 100)
pos resize                DINO bicubic    bicubic (+ AA)    none needed
layer scale               no              ls1/ls2.gamma     ls1/ls2.gamma
LayerNorm eps             1e-6            1e-6              1e-5
mask token                no              yes               yes
register tokens           none            register_tokens   storage_tokens
SwiGLU weights            --              fused w12, w3     w1, w2, w3
========================  ==============  ================  ================
"""

from __future__ import annotations

from typing import NamedTuple

# Official DINO weights are trained at 224 px; the stored position grid is 224 / patch.
PRETRAIN_IMAGE_SIZE = 224
# The DINOv2 hub models are trained at 518 px: a 37 x 37 stored position grid.
DINOV2_PRETRAIN_GRID = 37
MLP_RATIO = 4
FAMILIES = ("v1", "v2", "v3")


class VariantSpec(NamedTuple):
    """Shape and layout of one ViT variant (DINO v1, DINOv2 or DINOv3)."""

    patch: int
    dim: int
    depth: int
    heads: int
    family: str = "v1"  # "v1" (DINO), "v2" (DINOv2) or "v3" (DINOv3); see the module table
    registers: int = 0  # register tokens after CLS (DINOv3 calls them storage tokens)
    hidden: int = 0  # feed-forward hidden width; 0 means 4 * dim
    swiglu: bool = False  # SwiGLU feed-forward instead of fc1 -> GELU -> fc2
    qkv_bias: bool = True  # a bias on the fused qkv projection (DINOv3 7B has none)

    @property
    def mlp_hidden(self) -> int:
        return self.hidden or MLP_RATIO * self.dim

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def rope(self) -> bool:
        """Rotary position embeddings on the patch tokens instead of learned positions."""
        return self.family == "v3"

    @property
    def layer_scale(self) -> bool:
        return self.family != "v1"

    @property
    def layernorm_eps(self) -> float:
        return 1e-5 if self.family == "v3" else 1e-6

    @property
    def mask_token(self) -> bool:
        """The checkpoints' (unused at inference) mask token, kept so params mirror them."""
        return self.family != "v1"

    @property
    def register_name(self) -> str:
        return "storage_tokens" if self.family == "v3" else "register_tokens"

    @property
    def fused_swiglu(self) -> bool:
        """DINOv2's SwiGLUFFNFused stacks w1 and w2 in one ``w12``; DINOv3 keeps them apart."""
        return self.family == "v2"

    @property
    def pretrain_grid(self) -> int:
        """Side of the stored learned-position grid at init (0 with RoPE)."""
        if self.family == "v1":
            return PRETRAIN_IMAGE_SIZE // self.patch
        return DINOV2_PRETRAIN_GRID if self.family == "v2" else 0


VARIANTS: dict[str, VariantSpec] = {
    "S/8": VariantSpec(8, 384, 12, 6),
    "S/16": VariantSpec(16, 384, 12, 6),
    "B/8": VariantSpec(8, 768, 12, 12),
    "B/16": VariantSpec(16, 768, 12, 12),
    "Ti/8": VariantSpec(8, 192, 12, 3),
    "Ti/16": VariantSpec(16, 192, 12, 3),
    # One-block, width-32 variants for tests and the CPU demo.
    "mu/8": VariantSpec(8, 32, 1, 2),
    "mu/16": VariantSpec(16, 32, 1, 2),
    # DINOv2 (facebookresearch/dinov2 hub models), with and without 4 registers. SwiGLU
    # widths follow the reference: (int(4 * dim * 2 / 3) + 7) // 8 * 8.
    "v2-S/14": VariantSpec(14, 384, 12, 6, "v2"),
    "v2-B/14": VariantSpec(14, 768, 12, 12, "v2"),
    "v2-L/14": VariantSpec(14, 1024, 24, 16, "v2"),
    "v2-g/14": VariantSpec(14, 1536, 40, 24, "v2", hidden=4096, swiglu=True),
    "v2reg-S/14": VariantSpec(14, 384, 12, 6, "v2", registers=4),
    "v2reg-B/14": VariantSpec(14, 768, 12, 12, "v2", registers=4),
    "v2reg-L/14": VariantSpec(14, 1024, 24, 16, "v2", registers=4),
    "v2reg-g/14": VariantSpec(14, 1536, 40, 24, "v2", registers=4, hidden=4096, swiglu=True),
    # DINOv3 ViTs (LVD-1689M): 4 storage tokens, RoPE; S+ and H+ use SwiGLU.
    "v3-S/16": VariantSpec(16, 384, 12, 6, "v3", registers=4),
    "v3-S+/16": VariantSpec(16, 384, 12, 6, "v3", registers=4, hidden=1536, swiglu=True),
    "v3-B/16": VariantSpec(16, 768, 12, 12, "v3", registers=4),
    "v3-L/16": VariantSpec(16, 1024, 24, 16, "v3", registers=4),
    "v3-H+/16": VariantSpec(16, 1280, 32, 20, "v3", registers=4, hidden=5120, swiglu=True),
    # DINOv3 ViT-7B/16 (``dinov3_vit7b16``): ffn_ratio 3 with SwiGLU, int(3 * 4096 * 2 / 3)
    # aligned to 64 = 8192 hidden; no qkv bias at all (so no key-bias mask either), biases on
    # proj and the SwiGLU; layer scale, 4 storage tokens, LayerNorm eps 1e-5 as the others.
    # Its official file also holds ``local_cls_norm`` (untie_global_and_local_cls_norm: a
    # norm for local crops' CLS token, used only in training), which the converter checks
    # and drops, as transformers does.
    "v3-7B/16": VariantSpec(
        16, 4096, 40, 32, "v3", registers=4, hidden=8192, swiglu=True, qkv_bias=False
    ),
    # Two-block, width-32 variants of each family for tests and the CPU demo.
    "v2-mu/14": VariantSpec(14, 32, 2, 2, "v2"),
    "v2-mug/14": VariantSpec(14, 32, 2, 2, "v2", hidden=88, swiglu=True),
    "v2reg-mu/14": VariantSpec(14, 32, 2, 2, "v2", registers=4),
    "v3-mu/16": VariantSpec(16, 32, 2, 2, "v3", registers=4),
    "v3-mu+/16": VariantSpec(16, 32, 2, 2, "v3", registers=4, hidden=128, swiglu=True),
    # The 7B's structure at width 32: SwiGLU of hidden 2 * dim, no qkv bias.
    "v3-mu7B/16": VariantSpec(
        16, 32, 2, 2, "v3", registers=4, hidden=64, swiglu=True, qkv_bias=False
    ),
}


def get_variant(variant: str) -> VariantSpec:
    """Returns the spec of a variant name, or raises a ValueError naming the known ones."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown ViT variant {variant!r}; known variants: {sorted(VARIANTS)}")
    return VARIANTS[variant]


def patch_size(variant: str) -> int:
    """Patch side in pixels of a variant ("S/8" -> 8)."""
    return get_variant(variant).patch


def embed_dim(variant: str) -> int:
    """Token width of a variant ("S/8" -> 384)."""
    return get_variant(variant).dim


def family(variant: str) -> str:
    """Backbone family of a variant: "v1" (DINO), "v2" (DINOv2) or "v3" (DINOv3)."""
    return get_variant(variant).family


def mlp_hidden(variant: str) -> int:
    """Hidden width of a variant's feed-forward layers."""
    return get_variant(variant).mlp_hidden
