"""Key table: diffusers' `AutoencoderKLCogVideoX` state dict -> jaxvid's NNX VAE.

Module paths are kept; what changes: the causal convs' inner `.conv.weight` / `.conv.bias`
become the layer's own `kernel` (torch [O, I, D, H, W] -> DHWIO) / `bias`; the samplers' Conv2d
weights become HWIO `kernel`s; the 1x1x1 shortcut conv [O, I, 1, 1, 1] becomes a DHWIO `kernel`.
GroupNorm `weight` / `bias` map as they are.
"""
from __future__ import annotations

from typing import Any

from convert.keymap import Rule
from convert.transforms import conv2d_to_hwio, conv3d_to_dhwio


def _causal_conv(path: str) -> list[Rule]:
    return [Rule(f"{path}.conv.weight", f"{path}.kernel", conv3d_to_dhwio), Rule(f"{path}.conv.bias", f"{path}.bias")]


def _norm(path: str) -> list[Rule]:
    return [Rule(f"{path}.weight", f"{path}.weight"), Rule(f"{path}.bias", f"{path}.bias")]


def _spatial_norm(path: str) -> list[Rule]:
    return _norm(f"{path}.norm_layer") + _causal_conv(f"{path}.conv_y") + _causal_conv(f"{path}.conv_b")


def _resnet(path: str, in_channels: int, out_channels: int, spatial: bool) -> list[Rule]:
    norm = _spatial_norm if spatial else _norm
    rules = norm(f"{path}.norm1") + _causal_conv(f"{path}.conv1")
    rules += norm(f"{path}.norm2") + _causal_conv(f"{path}.conv2")
    if in_channels != out_channels:
        rules += [
            Rule(f"{path}.conv_shortcut.weight", f"{path}.conv_shortcut.kernel", conv3d_to_dhwio),
            Rule(f"{path}.conv_shortcut.bias", f"{path}.conv_shortcut.bias"),
        ]
    return rules


def _sampler(path: str) -> list[Rule]:
    return [Rule(f"{path}.conv.weight", f"{path}.kernel", conv2d_to_hwio), Rule(f"{path}.conv.bias", f"{path}.bias")]


def encoder_rules(cfg: Any) -> list[Rule]:
    ch = cfg.block_out_channels
    rules = _causal_conv("encoder.conv_in")
    for i, out_c in enumerate(ch):
        in_c = ch[max(i - 1, 0)]
        for j in range(cfg.layers_per_block):
            rules += _resnet(f"encoder.down_blocks.{i}.resnets.{j}", in_c if j == 0 else out_c, out_c, spatial=False)
        if i < len(ch) - 1:
            rules += _sampler(f"encoder.down_blocks.{i}.downsamplers.0")
    for j in range(2):
        rules += _resnet(f"encoder.mid_block.resnets.{j}", ch[-1], ch[-1], spatial=False)
    return rules + _norm("encoder.norm_out") + _causal_conv("encoder.conv_out")


def decoder_rules(cfg: Any) -> list[Rule]:
    ch = tuple(reversed(cfg.block_out_channels))
    rules = _causal_conv("decoder.conv_in")
    for j in range(2):
        rules += _resnet(f"decoder.mid_block.resnets.{j}", ch[0], ch[0], spatial=True)
    for i, out_c in enumerate(ch):
        in_c = ch[max(i - 1, 0)]
        for j in range(cfg.layers_per_block + 1):
            rules += _resnet(f"decoder.up_blocks.{i}.resnets.{j}", in_c if j == 0 else out_c, out_c, spatial=True)
        if i < len(ch) - 1:
            rules += _sampler(f"decoder.up_blocks.{i}.upsamplers.0")
    return rules + _spatial_norm("decoder.norm_out") + _causal_conv("decoder.conv_out")


def vae_rules(cfg: Any) -> list[Rule]:
    """Every parameter of `AutoencoderKLCogVideoX(cfg)`, from diffusers' key names."""
    return encoder_rules(cfg) + decoder_rules(cfg)
