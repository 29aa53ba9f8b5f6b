"""Vision tower (NaViT SigLIP, prefix `vpm.`) and perceiver resampler (prefix `resampler.`)."""

import json
import math
import os
from functools import partial
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from torch.utils.checkpoint import checkpoint
from transformers import SiglipVisionConfig, SiglipVisionModel

from minicpmo.modeling.modeling_resampler import MiniCPMOResampler, ResamplerInputError, get_2d_sincos_pos_embed
from minicpmo.modeling.modeling_vision import (
    MiniCPMOVisionEmbeddings,
    MiniCPMOVisionTransformer,
    VisionInputError,
    bucketized_position_ids,
    patch_mask_from_tgt_sizes,
    vision_batches,
)

PATCH = 14
TSV = Path(__file__).resolve().parents[2] / "shared" / "reference" / "official_state_dict.tsv"
# Slices chosen so that bucketing onto the tiny 5 x 5 table both merges (7, 10, 25 > 5) and repeats (2, 3 < 5)
# rows/columns; (25, 1) contains an exact bucket edge where float32 bucketize differs from floor.
SIZES = [(3, 4), (5, 5), (2, 7), (25, 1), (1, 10)]


def tiny_vision_config(attn_implementation: str = "sdpa") -> SiglipVisionConfig:
    config = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=70,  # 5 x 5 position buckets
        patch_size=PATCH,
    )
    config._attn_implementation = attn_implementation
    return config


def full_vision_config() -> SiglipVisionConfig:
    return SiglipVisionConfig(
        hidden_size=1152, image_size=980, intermediate_size=4304, num_attention_heads=16, num_hidden_layers=27,
        patch_size=PATCH,
    )


def tiny_tower(attn_implementation: str = "sdpa", seed: int = 0) -> MiniCPMOVisionTransformer:
    torch.manual_seed(seed)
    return MiniCPMOVisionTransformer(tiny_vision_config(attn_implementation)).eval()


def tiny_resampler(seed: int = 0, max_size=(5, 5)) -> MiniCPMOResampler:
    torch.manual_seed(seed)
    return MiniCPMOResampler(num_queries=8, embed_dim=64, num_heads=2, kv_dim=32, max_size=max_size).eval()


def image_to_strip(image: torch.Tensor) -> torch.Tensor:
    """(3, h*p, w*p) -> (3, p, h*w*p): patches row-major along the width (the official strip layout)."""
    channels, height, width = image.shape
    h, w = height // PATCH, width // PATCH
    patches = image.reshape(channels, h, PATCH, w, PATCH).permute(0, 1, 3, 2, 4)  # c, h, w, py, px
    return patches.reshape(channels, h * w, PATCH, PATCH).permute(0, 2, 1, 3).reshape(channels, PATCH, h * w * PATCH)


def padded_strips(sizes, extra_patches: int = 0, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    max_patches = max(h * w for h, w in sizes) + extra_patches
    pixel_values = torch.randn(len(sizes), 3, PATCH, max_patches * PATCH, generator=generator)
    for row, (h, w) in enumerate(sizes):
        pixel_values[row, :, :, h * w * PATCH :] = 7.0  # junk in the padding must not matter
    return pixel_values, torch.tensor(sizes, dtype=torch.long)


def spec_position_ids(h: int, w: int, side: int) -> torch.Tensor:
    """The spec formula, written out independently of the module: the coordinate step is 1/nb in float32, from
    an integer tensor nb (the official code divides by a patch count read off the mask)."""
    boundaries = torch.arange(1 / side, 1.0, 1 / side)
    rows = torch.bucketize(torch.arange(0, 1 - 1e-6, 1 / torch.tensor(h)), boundaries, right=True)
    cols = torch.bucketize(torch.arange(0, 1 - 1e-6, 1 / torch.tensor(w)), boundaries, right=True)
    return torch.tensor([r * side + c for r in rows.tolist() for c in cols.tolist()])


# ---------------------------------------------------------------------------------------------------- positions
@pytest.mark.parametrize("side", [5, 70])
def test_position_ids_follow_spec_bucketize_and_floor_approximation(side):
    for h, w in [(1, 1), (3, 4), (5, 5), (7, 2), (25, 1), (32, 32), (49, 50), (70, 70), (101, 3)]:
        ids = bucketized_position_ids(h, w, side)
        assert ids.dtype == torch.long and ids.shape == (h * w,)
        assert torch.equal(ids, spec_position_ids(h, w, side))
        rows, cols = ids // side, ids % side
        for axis_ids, n in ((rows.reshape(h, w)[:, 0], h), (cols.reshape(h, w)[0, :], w)):
            floor = torch.tensor([i * side // n for i in range(n)])
            off_edge = torch.tensor([(i * side) % n != 0 for i in range(n)])
            # Away from exact bucket edges the ids are floor(i * side / n) ...
            assert torch.equal(axis_ids[off_edge], floor[off_edge])
            # ... and on an edge float32 rounding can only put a coordinate one bucket lower.
            assert set((axis_ids - floor)[~off_edge].tolist()) <= {0, -1}
    assert ids.max() < side * side


def test_padded_tile_batch_position_ids_follow_the_float32_step_id_by_id():
    """25x10 + 49x7 tiles padded into one batch: the float32 1/nb step (spec section 3), not a Python double.

    A double step gives 44 different ids here (rows 5, 10, 20 of nb=25; rows 7, 42 of nb=49)."""
    embeddings = MiniCPMOVisionEmbeddings(full_vision_config())
    sizes = torch.tensor([[25, 10], [49, 7]])
    max_patches = 343
    ids = embeddings.position_ids(sizes, max_patches)
    assert ids.shape == (2, max_patches)
    side = 70
    boundaries = torch.arange(1 / side, 1.0, 1 / side)
    double_step_differs = 0
    for row, (h, w) in enumerate(sizes.tolist()):
        expected = spec_position_ids(h, w, side)
        assert ids[row, : h * w].tolist() == expected.tolist()
        assert not ids[row, h * w :].any()
        double_rows = torch.bucketize(torch.arange(0, 1 - 1e-6, 1 / h), boundaries, right=True)
        double_cols = torch.bucketize(torch.arange(0, 1 - 1e-6, 1 / w), boundaries, right=True)
        double = (double_rows[:, None] * side + double_cols[None, :]).flatten()
        differs = double != expected
        double_step_differs += int(differs.sum())
        assert sorted(set((torch.nonzero(differs).flatten() // w).tolist())) == ([5, 10, 20] if h == 25 else [7, 42])
    assert double_step_differs == 44


def test_position_ids_keep_float32_edge_rounding():
    # 15/25 = 42/70 exactly, but float32 arange puts it just below the boundary: bucket 41, not floor's 42.
    assert int(bucketized_position_ids(25, 1, 70)[15]) == 41 * 70
    assert int(bucketized_position_ids(1, 25, 70)[15]) == 41
    # An exact side x side grid is the identity.
    assert torch.equal(bucketized_position_ids(70, 70, 70), torch.arange(4900))


def test_embeddings_add_bucketized_positions_per_slice_and_zero_id_for_padding():
    tower = tiny_tower()
    embeddings = tower.embeddings
    pixel_values, tgt_sizes = padded_strips(SIZES, extra_patches=3)
    with torch.no_grad():
        embeddings.patch_embedding.bias.zero_()
        out = embeddings(torch.zeros_like(pixel_values), tgt_sizes)  # only the position term remains
    table = embeddings.position_embedding.weight
    for row, (h, w) in enumerate(SIZES):
        expected_ids = torch.zeros(pixel_values.shape[-1] // PATCH, dtype=torch.long)
        expected_ids[: h * w] = spec_position_ids(h, w, 5)
        torch.testing.assert_close(out[row], table[expected_ids], rtol=0, atol=0)


def test_bucket_table_size_follows_image_size():
    with torch.device("meta"):
        tower = MiniCPMOVisionTransformer(full_vision_config())
    assert tower.embeddings.num_patches_per_side == 70
    assert tuple(tower.embeddings.position_embedding.weight.shape) == (4900, 1152)


# ---------------------------------------------------------------------------------------------------- vision tower
def test_vision_tower_shapes_mask_and_zeroed_padding():
    tower = tiny_tower()
    pixel_values, tgt_sizes = padded_strips(SIZES, extra_patches=4)
    with torch.no_grad():
        hidden, patch_mask = tower(pixel_values, tgt_sizes)
    max_patches = 25 + 4
    assert hidden.shape == (len(SIZES), max_patches, 32)
    assert patch_mask.dtype == torch.bool and patch_mask.shape == (len(SIZES), max_patches)
    assert patch_mask.sum(1).tolist() == [h * w for h, w in SIZES]
    assert torch.equal(patch_mask, patch_mask_from_tgt_sizes(tgt_sizes, max_patches))
    assert torch.all(hidden[~patch_mask] == 0)
    assert torch.isfinite(hidden).all() and hidden[patch_mask].abs().sum() > 0


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_padded_batch_equals_each_slice_alone(attn_implementation):
    tower = tiny_tower(attn_implementation)
    pixel_values, tgt_sizes = padded_strips(SIZES, extra_patches=5)
    with torch.no_grad():
        batched = tower(pixel_values, tgt_sizes).last_hidden_state
        for row, (h, w) in enumerate(SIZES):
            alone = tower(pixel_values[row : row + 1, :, :, : h * w * PATCH], tgt_sizes[row : row + 1])
            torch.testing.assert_close(batched[row, : h * w], alone.last_hidden_state[0], rtol=0, atol=1e-5)


def test_sdpa_and_eager_agree():
    pixel_values, tgt_sizes = padded_strips(SIZES, extra_patches=2)
    with torch.no_grad():
        sdpa = tiny_tower("sdpa")(pixel_values, tgt_sizes).last_hidden_state
        eager = tiny_tower("eager")(pixel_values, tgt_sizes).last_hidden_state
    torch.testing.assert_close(sdpa, eager, rtol=0, atol=1e-5)


def test_vision_batch_size_chunks_do_not_change_the_result():
    assert [(s.start, s.stop) for s in vision_batches(5, 2)] == [(0, 2), (2, 4), (4, 5)]
    assert [(s.start, s.stop) for s in vision_batches(5, None)] == [(0, 5)]
    with pytest.raises(VisionInputError, match="vision_batch_size"):
        list(vision_batches(3, 0))
    tower = tiny_tower()
    pixel_values, tgt_sizes = padded_strips(SIZES, extra_patches=1)
    with torch.no_grad():
        whole = tower(pixel_values, tgt_sizes)
        for batch_size in (1, 2, 16):
            chunked = tower(pixel_values, tgt_sizes, vision_batch_size=batch_size)
            assert torch.equal(chunked.patch_mask, whole.patch_mask)
            torch.testing.assert_close(chunked.last_hidden_state, whole.last_hidden_state, rtol=0, atol=1e-5)


def test_full_grid_slice_matches_transformers_siglip_vision_model():
    """A side x side slice uses the plain position ids, so it must equal SigLIP on the whole image."""
    config = tiny_vision_config("eager")
    config.vision_use_head = False
    torch.manual_seed(1)
    reference = SiglipVisionModel(config).eval()
    tower = MiniCPMOVisionTransformer(tiny_vision_config("eager")).eval()
    missing, unexpected = tower.load_state_dict(reference.state_dict(), strict=False)
    assert missing == [] and set(unexpected) <= {"embeddings.position_ids"}
    image = torch.randn(1, 3, 70, 70, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = reference(pixel_values=image).last_hidden_state
        ours = tower(image_to_strip(image[0])[None], torch.tensor([[5, 5]])).last_hidden_state
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients():
    pixel_values, tgt_sizes = padded_strips(SIZES[:3])

    def grads(use_checkpointing: bool):
        tower = tiny_tower().train()
        layers = tower.encoder.layers
        for layer in layers:
            layer.gradient_checkpointing = use_checkpointing
            layer._gradient_checkpointing_func = partial(checkpoint, use_reentrant=False)
        hidden, mask = tower(pixel_values, tgt_sizes)
        hidden[mask].pow(2).sum().backward()
        return {name: param.grad.clone() for name, param in tower.named_parameters()}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys() and all(g.abs().sum() > 0 for g in plain.values())
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6)


def test_bad_vision_inputs_raise_typed_errors():
    tower = tiny_tower()
    pixel_values, tgt_sizes = padded_strips([(2, 2)])
    with pytest.raises(VisionInputError, match="one-patch-high"):
        tower(torch.zeros(1, 3, 28, 4 * PATCH), tgt_sizes)
    with pytest.raises(VisionInputError, match="more patches than the strip"):
        tower(pixel_values, torch.tensor([[3, 2]]))
    with pytest.raises(VisionInputError, match="integer tensor"):
        tower(pixel_values, tgt_sizes.float())
    with pytest.raises(VisionInputError, match="shape \\[N, 2\\]"):
        tower(pixel_values, torch.tensor([[2, 2], [1, 1]]))
    with pytest.raises(VisionInputError, match="h, w >= 1"):
        tower(pixel_values, torch.tensor([[0, 2]]))
    with pytest.raises(VisionInputError, match="floating-point"):
        tower(pixel_values.long(), tgt_sizes)


# ---------------------------------------------------------------------------------------------------- resampler
def test_2d_sincos_table_layout():
    dim, height, width = 16, 3, 5
    table = get_2d_sincos_pos_embed(dim, height, width)
    assert table.shape == (height, width, dim) and table.dtype == torch.float32
    quarter = dim // 4
    for h in range(height):
        for w in range(width):
            expected = []
            for position in (w, h):  # first half: column, second half: row
                omegas = [1.0 / 10000 ** (i / quarter) for i in range(quarter)]
                expected += [math.sin(position * o) for o in omegas] + [math.cos(position * o) for o in omegas]
            torch.testing.assert_close(table[h, w], torch.tensor(expected), rtol=0, atol=1e-6)
    with pytest.raises(ResamplerInputError, match="divisible by 4"):
        get_2d_sincos_pos_embed(10, 2, 2)


def features(sizes, extra_patches: int = 0, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    length = max(h * w for h, w in sizes) + extra_patches
    x = torch.randn(len(sizes), length, 32, generator=generator)
    tgt_sizes = torch.tensor(sizes, dtype=torch.long)
    mask = patch_mask_from_tgt_sizes(tgt_sizes, length)
    return x.masked_fill(~mask[..., None], 3.0), tgt_sizes, mask


def manual_resample(resampler: MiniCPMOResampler, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """One unpadded slice through the documented formula, attention computed by hand."""
    dim, heads = resampler.embed_dim, resampler.num_heads
    kv = resampler.ln_kv(x @ resampler.kv_proj.weight.T)
    keys_in = kv + get_2d_sincos_pos_embed(dim, h, w).reshape(h * w, dim)
    query = resampler.ln_q(resampler.query)
    w_q, w_k, w_v = resampler.attn.in_proj_weight.chunk(3)
    b_q, b_k, b_v = resampler.attn.in_proj_bias.chunk(3)
    q = (query @ w_q.T + b_q).reshape(-1, heads, dim // heads).transpose(0, 1)
    k = (keys_in @ w_k.T + b_k).reshape(-1, heads, dim // heads).transpose(0, 1)
    v = (kv @ w_v.T + b_v).reshape(-1, heads, dim // heads).transpose(0, 1)
    attention = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(dim // heads), dim=-1) @ v
    attended = resampler.attn.out_proj(attention.transpose(0, 1).reshape(-1, dim))
    return resampler.ln_post(attended) @ resampler.proj


def test_resampler_shapes_and_formula():
    resampler = tiny_resampler()
    x, tgt_sizes, mask = features(SIZES[:3], extra_patches=2)
    with torch.no_grad():
        out = resampler(x, tgt_sizes, mask)
        assert out.shape == (3, 8, 64)
        for row, (h, w) in enumerate(SIZES[:3]):
            expected = manual_resample(resampler, x[row, : h * w], h, w)
            torch.testing.assert_close(out[row], expected, rtol=0, atol=1e-5)


def test_resampler_padded_batch_equals_single_and_ignores_padding_amount():
    resampler = tiny_resampler()
    with torch.no_grad():
        x, tgt_sizes, mask = features(SIZES[:3])
        batched = resampler(x, tgt_sizes, mask)
        more_padding = torch.cat([x, torch.full((3, 9, 32), -5.0)], dim=1)
        padded_more = resampler(more_padding, tgt_sizes, patch_mask_from_tgt_sizes(tgt_sizes, x.shape[1] + 9))
        derived_mask = resampler(x, tgt_sizes)
        for row, (h, w) in enumerate(SIZES[:3]):
            alone = resampler(x[row : row + 1, : h * w], tgt_sizes[row : row + 1])
            torch.testing.assert_close(batched[row], alone[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(padded_more, batched, rtol=0, atol=1e-5)
    torch.testing.assert_close(derived_mask, batched, rtol=0, atol=0)


def test_resampler_position_table_grows_for_large_slices():
    small, large = tiny_resampler(max_size=(5, 5)), tiny_resampler(max_size=(12, 12))
    assert small.pos_embed.shape == (5, 5, 64)
    x, tgt_sizes, mask = features([(7, 3), (2, 9)])
    with torch.no_grad():
        grown_out = small(x, tgt_sizes, mask)
        reference = large(x, tgt_sizes, mask)
    assert small.pos_embed.shape == (7, 9, 64)
    torch.testing.assert_close(small.pos_embed, get_2d_sincos_pos_embed(64, 7, 9), rtol=0, atol=0)
    torch.testing.assert_close(grown_out, reference, rtol=0, atol=1e-6)
    assert "pos_embed" not in small.state_dict()


def test_resampler_rebuilds_buffer_after_meta_init_and_keeps_loaded_tensors():
    with torch.device("meta"):
        resampler = MiniCPMOResampler(num_queries=8, embed_dim=64, num_heads=2, kv_dim=32, max_size=(5, 5))
    assert resampler.pos_embed.is_meta
    resampler.to_empty(device="cpu")
    loaded_query = torch.full_like(resampler.query, 0.5)
    with torch.no_grad():
        resampler.query.copy_(loaded_query)
    resampler.query._is_hf_initialized = True  # what from_pretrained marks on loaded tensors
    torch.manual_seed(0)
    resampler.reset_parameters_and_buffers(std=0.02)
    assert resampler.pos_embed.dtype == torch.float32
    torch.testing.assert_close(resampler.pos_embed, get_2d_sincos_pos_embed(64, 5, 5), rtol=0, atol=0)
    assert torch.equal(resampler.query, loaded_query)
    assert abs(resampler.proj.std().item() - 64**-0.5) < 0.02
    assert torch.equal(resampler.ln_post.weight, torch.ones(64))
    assert torch.equal(resampler.attn.in_proj_bias, torch.zeros(192))
    fresh = tiny_resampler()
    assert 0.01 < fresh.query.std().item() < 0.03 and fresh.pos_embed.shape == (5, 5, 64)


def test_bad_resampler_inputs_raise_typed_errors():
    resampler = tiny_resampler()
    x, tgt_sizes, mask = features([(2, 3), (1, 4)])
    with pytest.raises(ResamplerInputError, match="x must have shape"):
        resampler(x[..., :16], tgt_sizes, mask)
    with pytest.raises(ResamplerInputError, match="needs more patches"):
        resampler(x, torch.tensor([[3, 3], [1, 4]]))
    with pytest.raises(ResamplerInputError, match="first h\\*w"):
        resampler(x, tgt_sizes, ~mask)
    with pytest.raises(ResamplerInputError, match="integer tensor"):
        resampler(x, tgt_sizes.float(), mask)
    with pytest.raises(ResamplerInputError, match="divisible by num_heads"):
        MiniCPMOResampler(num_queries=2, embed_dim=64, num_heads=3, kv_dim=8)


# ---------------------------------------------------------------------------------------------------- full size
def expected_official_rows() -> dict[str, tuple[int, ...]]:
    """vpm./resampler. rows of reference/official_state_dict.tsv (params + the non-persistent pos_embed)."""
    rows = {
        "vpm.embeddings.patch_embedding.weight": (1152, 3, 14, 14),
        "vpm.embeddings.patch_embedding.bias": (1152,),
        "vpm.embeddings.position_embedding.weight": (4900, 1152),
        "vpm.post_layernorm.weight": (1152,),
        "vpm.post_layernorm.bias": (1152,),
        "resampler.query": (64, 4096),
        "resampler.proj": (4096, 4096),
        "resampler.kv_proj.weight": (4096, 1152),
        "resampler.attn.in_proj_weight": (12288, 4096),
        "resampler.attn.in_proj_bias": (12288,),
        "resampler.attn.out_proj.weight": (4096, 4096),
        "resampler.attn.out_proj.bias": (4096,),
        "resampler.pos_embed": (70, 70, 4096),
    }
    for norm in ("ln_q", "ln_kv", "ln_post"):
        rows[f"resampler.{norm}.weight"] = rows[f"resampler.{norm}.bias"] = (4096,)
    for i in range(27):
        prefix = f"vpm.encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            rows[prefix + f"self_attn.{proj}.weight"] = (1152, 1152)
            rows[prefix + f"self_attn.{proj}.bias"] = (1152,)
        for norm in ("layer_norm1", "layer_norm2"):
            rows[prefix + f"{norm}.weight"] = rows[prefix + f"{norm}.bias"] = (1152,)
        rows[prefix + "mlp.fc1.weight"], rows[prefix + "mlp.fc1.bias"] = (4304, 1152), (4304,)
        rows[prefix + "mlp.fc2.weight"], rows[prefix + "mlp.fc2.bias"] = (1152, 4304), (1152,)
    return rows


@pytest.fixture(scope="module")
def full_size_on_meta():
    with torch.device("meta"):
        return MiniCPMOVisionTransformer(full_vision_config()), MiniCPMOResampler(64, 4096, 32, 1152)


def test_full_size_names_shapes_and_counts_equal_official(full_size_on_meta):
    tower, resampler = full_size_on_meta
    ours = {f"vpm.{name}": tuple(t.shape) for name, t in tower.named_parameters()}
    ours.update({f"resampler.{name}": tuple(t.shape) for name, t in resampler.named_parameters()})
    ours.update({f"resampler.{name}": tuple(t.shape) for name, t in resampler.named_buffers()})
    assert ours == expected_official_rows()
    if TSV.exists():  # the reference file itself, when the shared folder sits next to the repository
        official = {}
        for line in TSV.read_text().splitlines():
            name, shape, _dtype = line.split("\t")
            if name.startswith(("vpm.", "resampler.")):
                official[name] = tuple(json.loads(shape))
        assert ours == official
    assert sum(p.numel() for p in tower.parameters()) == 417_792_240
    assert sum(p.numel() for p in resampler.parameters()) == 88_907_776
    persistent = set(resampler.state_dict())
    assert "pos_embed" not in persistent and resampler.pos_embed.dtype == torch.float32
