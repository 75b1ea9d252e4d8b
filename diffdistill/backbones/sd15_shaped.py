"""An SD1.5-architecture UNet at reduced width: the real block layout, small enough for a CPU training step.

Memory and speed findings on it carry over to SD1.5 in structure (the same blocks, attention at the same levels,
the same 8 heads and 77 x 768 text conditioning), so a CPU test can exercise what an SD1.5 run does.
"""

from __future__ import annotations

SD15_BLOCK_OUT_CHANNELS = (320, 640, 1280, 1280)


def sd15_shaped_unet_config(width_scale: float = 0.1) -> dict:
    """SD1.5's UNet2DConditionModel config (CrossAttnDownBlock2D x 3 + DownBlock2D, 2 layers per block, attention at the
    first three levels, ``attention_head_dim`` 8 as SD1.5 sets it, i.e. 8 heads, cross_attention_dim 768) with every width
    scaled by ``width_scale``: 0.1 gives (32, 64, 128, 128).

    Widths are rounded to multiples of 8 so the 8 heads divide them; GroupNorm's 32 groups shrink until each group keeps at
    least 4 channels at the narrowest level (8 groups at 0.1), since a group of one channel normalizes nothing away.
    """
    if width_scale <= 0:
        raise ValueError(f"width_scale={width_scale} must be positive")
    widths = [max(8, round(c * width_scale / 8) * 8) for c in SD15_BLOCK_OUT_CHANNELS]
    groups = next(g for g in (32, 16, 8, 4, 2, 1) if all(w % g == 0 for w in widths) and widths[0] // g >= 4)
    return {
        "_class_name": "UNet2DConditionModel",
        "sample_size": 64,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "block_out_channels": widths,
        "layers_per_block": 2,
        "attention_head_dim": 8,
        "cross_attention_dim": 768,
        "norm_num_groups": groups,
        "norm_eps": 1e-5,
        "act_fn": "silu",
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "center_input_sample": False,
        "use_linear_projection": False,
    }
