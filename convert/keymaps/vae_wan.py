"""Key table: diffusers AutoencoderKLWan checkpoint -> jaxvid.models.vae_wan.AutoencoderKLWan.

Names are identical except `weight` -> `kernel` (convs transposed to DHWIO / HWIO), the RMS-norm
`gamma` [C, 1, 1(, 1)] flattened to [C], and a resample block's 2D conv `resample.1` -> `resample`
(diffusers keeps it at index 1 of an nn.Sequential). The layout comes from the config's
`encoder_layout()` / `decoder_layout()` (duck-typed, so this module imports nothing from jaxvid).
"""
from __future__ import annotations

from typing import Any

from convert.keymap import Rule
from convert.transforms import conv2d_to_hwio, conv3d_to_dhwio, identity, reshape


def _conv3d(src: str, dst: str | None = None) -> list[Rule]:
    dst = src if dst is None else dst
    return [Rule(f"{src}.weight", f"{dst}.kernel", conv3d_to_dhwio), Rule(f"{src}.bias", f"{dst}.bias", identity)]


def _conv2d(src: str, dst: str | None = None) -> list[Rule]:
    dst = src if dst is None else dst
    return [Rule(f"{src}.weight", f"{dst}.kernel", conv2d_to_hwio), Rule(f"{src}.bias", f"{dst}.bias", identity)]


def _rms(name: str, dim: int) -> list[Rule]:
    return [Rule(f"{name}.gamma", f"{name}.gamma", reshape((dim,), name=f"flatten_gamma[{dim}]"))]


def _resnet(p: str, in_dim: int, out_dim: int) -> list[Rule]:
    rules = [*_rms(f"{p}.norm1", in_dim), *_conv3d(f"{p}.conv1"), *_rms(f"{p}.norm2", out_dim), *_conv3d(f"{p}.conv2")]
    if in_dim != out_dim:
        rules += _conv3d(f"{p}.conv_shortcut")
    return rules


def _attention(p: str, dim: int) -> list[Rule]:
    return [*_rms(f"{p}.norm", dim), *_conv2d(f"{p}.to_qkv"), *_conv2d(f"{p}.proj")]


def _resample(p: str, mode: str) -> list[Rule]:
    rules = _conv2d(f"{p}.resample.1", f"{p}.resample")
    if mode.endswith("3d"):
        rules += _conv3d(f"{p}.time_conv")
    return rules


def _mid(p: str, dim: int) -> list[Rule]:
    return [*_resnet(f"{p}.resnets.0", dim, dim), *_attention(f"{p}.attentions.0", dim), *_resnet(f"{p}.resnets.1", dim, dim)]


def vae_rules(cfg: Any) -> list[Rule]:
    """Every parameter of AutoencoderKLWan(cfg) from diffusers' state-dict keys (no buffers exist)."""
    rules: list[Rule] = _conv3d("encoder.conv_in")
    for i, (kind, a, b) in enumerate(cfg.encoder_layout()):
        p = f"encoder.down_blocks.{i}"
        rules += _resnet(p, a, b) if kind == "res" else _resample(p, b)
    top = cfg.encoder_out_dim
    rules += _mid("encoder.mid_block", top)
    rules += _rms("encoder.norm_out", top) + _conv3d("encoder.conv_out")
    rules += _conv3d("quant_conv") + _conv3d("post_quant_conv")

    layout = cfg.decoder_layout()
    rules += _conv3d("decoder.conv_in") + _mid("decoder.mid_block", layout[0][0])
    for i, (in_dim, out_dim, mode) in enumerate(layout):
        p = f"decoder.up_blocks.{i}"
        for j in range(cfg.num_res_blocks + 1):
            rules += _resnet(f"{p}.resnets.{j}", in_dim if j == 0 else out_dim, out_dim)
        if mode is not None:
            rules += _resample(f"{p}.upsamplers.0", mode)
    rules += _rms("decoder.norm_out", layout[-1][1]) + _conv3d("decoder.conv_out")
    return rules
