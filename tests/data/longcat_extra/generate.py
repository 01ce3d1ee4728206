"""Make tests/data/longcat_extra from the upstream LongCat-Video code (run outside the repo).

Usage (see README.md beside this file):
    PYTHONPATH=<upstream checkout>:<dir with einops> python generate.py <fixtures>/longcat/dit_dense <out dir>

Upstream = meituan-longcat/LongCat-Video at 6b3f4b8582a8bc3f20f795735f5383716c4ba794, unmodified.
Substitutions to run it on a CPU (no maths changed): flash_attn's `flash_attn_func` /
`flash_attn_varlen_func` become torch SDPA (varlen: one call per batch item over its own keys);
the BSA module (Triton) is replaced by a stub that raises, since every case here is dense.
"""
from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file


def _install_stubs() -> None:
    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, **_):
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           scale=softmax_scale)
        return o.transpose(1, 2)

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, **_):
        outs = []
        for i in range(len(cu_seqlens_q) - 1):
            qs, qe = int(cu_seqlens_q[i]), int(cu_seqlens_q[i + 1])
            ks, ke = int(cu_seqlens_k[i]), int(cu_seqlens_k[i + 1])
            o = F.scaled_dot_product_attention(q[None, qs:qe].transpose(1, 2), k[None, ks:ke].transpose(1, 2),
                                               v[None, ks:ke].transpose(1, 2))
            outs.append(o.transpose(1, 2)[0])
        return torch.cat(outs, 0)

    fa = types.ModuleType("flash_attn")
    fa.flash_attn_func, fa.flash_attn_varlen_func = flash_attn_func, flash_attn_varlen_func
    sys.modules["flash_attn"] = fa
    bsa = types.ModuleType("longcat_video.block_sparse_attention.bsa_interface")

    def flash_attn_bsa_3d(*a, **k):
        raise RuntimeError("BSA is not used by these cases")

    bsa.flash_attn_bsa_3d = flash_attn_bsa_3d
    sys.modules["longcat_video.block_sparse_attention.bsa_interface"] = bsa


def _lora_state(model, modules: dict[str, int], rank: int, alpha_scale: float, gen: torch.Generator) -> dict:
    """An upstream-layout LoRA state dict: {lora_name}.lora_down.weight, .lora_up[.blocks.j].weight, .alpha_scale."""
    state = {}
    for module_name, n_sep in modules.items():
        lin = model.get_submodule(module_name)
        name = "lora___lorahyphen___" + module_name.replace(".", "___lorahyphen___")
        state[f"{name}.lora_down.weight"] = torch.randn(n_sep * rank, lin.in_features, generator=gen) * 0.3
        if n_sep > 1:
            for j in range(n_sep):
                state[f"{name}.lora_up.blocks.{j}.weight"] = torch.randn(lin.out_features // n_sep, rank,
                                                                         generator=gen) * 0.3
        else:
            state[f"{name}.lora_up.weight"] = torch.randn(lin.out_features, rank, generator=gen) * 0.3
        state[f"{name}.alpha_scale"] = torch.tensor(alpha_scale)
    return state


def main(fixture: Path, out: Path) -> None:
    import diffusers.models.modeling_utils  # noqa: F401  (before the flash_attn stub: diffusers probes it)

    _install_stubs()
    from longcat_video.modules.longcat_video_dit import LongCatVideoTransformer3DModel

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1234)
    out.mkdir(parents=True, exist_ok=True)
    model = LongCatVideoTransformer3DModel.from_pretrained(fixture / "transformer").float().eval()
    model_zp = LongCatVideoTransformer3DModel.from_pretrained(fixture / "transformer",
                                                              text_tokens_zero_pad=True).float().eval()
    B, C, T, H, W, L, D_txt = 2, 4, 3, 8, 8, 7, 32
    x = torch.randn(B, C, T, H, W, generator=gen)
    y = torch.randn(B, 1, L, D_txt, generator=gen)
    # A hole in item 0's mask: valid tokens need not be a prefix.
    mask = torch.tensor([[1, 1, 0, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1]], dtype=torch.int64)
    t_frames = torch.tensor([[0.0, 500.0, 730.0], [0.0, 120.0, 999.0]])
    with torch.no_grad():
        # 1. per-frame timesteps, masks with holes; and text_tokens_zero_pad=True
        varlen = model(x, t_frames, y, encoder_attention_mask=mask)
        zeropad = model_zp(x, t_frames, y, encoder_attention_mask=mask)
        # 2. KV cache: cache the first (clean) frame, then denoise the other two against it
        nc = 1
        cond_out, cache = model(x[:, :, :nc], torch.zeros(B, nc), torch.zeros(B, 1, L, D_txt),
                                return_kv=True, skip_crs_attn=True)
        cont = model(x[:, :, nc:], t_frames[:, nc:], y, encoder_attention_mask=mask, num_cond_latents=nc,
                     kv_cache_dict=cache)
        # same without the cache (conditioning frames in hidden_states)
        cond_full = model(x, t_frames, y, encoder_attention_mask=mask, num_cond_latents=nc)
        # 3. LoRA: two networks in upstream's layout, enabled together and alone
        lora_a = _lora_state(model, {"blocks.0.attn.qkv": 3, "blocks.1.ffn.w2": 1, "blocks.0.cross_attn.kv_linear": 2,
                                     "final_layer.linear": 1, "t_embedder.mlp.0": 1,
                                     "blocks.1.adaLN_modulation.1": 1, "y_embedder.y_proj.2": 1}, 4, 0.5, gen)
        lora_b = _lora_state(model, {"blocks.0.attn.qkv": 1, "blocks.1.attn.proj": 1, "blocks.0.ffn.w1": 1}, 2, 2.0, gen)
        save_file(lora_a, str(out / "lora_a.safetensors"))
        save_file(lora_b, str(out / "lora_b.safetensors"))
        # The alpha arguments differ from the files' alpha_scale buffers: upstream uses the files' values.
        model.load_lora(str(out / "lora_a.safetensors"), "a", multiplier=0.7, lora_network_dim=4, lora_network_alpha=1)
        model.load_lora(str(out / "lora_b.safetensors"), "b", multiplier=1.0, lora_network_dim=2, lora_network_alpha=1)
        model.enable_loras(["a", "b"])
        lora_ab = model(x, t_frames, y, encoder_attention_mask=mask)
        model.enable_loras(["b"])
        lora_b_only = model(x, t_frames, y, encoder_attention_mask=mask)
        model.disable_all_loras()
        no_lora = model(x, t_frames, y, encoder_attention_mask=mask)
    assert torch.equal(no_lora, varlen)
    arrays = dict(
        hidden_states=x, timestep=t_frames, encoder_hidden_states=y, encoder_attention_mask=mask,
        out_varlen=varlen, out_zeropad=zeropad, num_cond_latents=torch.tensor(nc),
        out_cache_call=cond_out, out_continuation=cont, out_cond_full=cond_full,
        out_lora_ab=lora_ab, out_lora_b=lora_b_only,
    )
    for i, (k, v) in cache.items():
        arrays[f"cache_k_{i}"], arrays[f"cache_v_{i}"] = k, v  # [B, heads, tokens, head_dim]
    np.savez_compressed(out / "io.npz", **{k: v.numpy() for k, v in arrays.items()})


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
