"""Train jaxvid's embedded default model: a tiny CogVideoX (T5 + VAE + DiT) on the synthetic world.

    python -m jaxvid.synthetic.train --out DIR --steps 3000 --seed 0

Two stages, both with optax (Adam, gradient clipping, warm-up then cosine decay):

1. VAE: the CogVideoX VAE (jaxvid.models.vae_cogvideox) learns to reconstruct rendered videos
   (L1 + MSE on [-1, 1] pixels, a small KL term). Its `scaling_factor` is then set to 1 / the
   standard deviation of the posterior means, so the DiT sees unit-variance latents.
2. DiT (jaxvid.models.cogvideox) and, unless --frozen-text-encoder, the T5 encoder
   (jaxvid.models.t5), on the frozen VAE's scaled posterior means: v-prediction under the noise
   schedule of the folder's CogVideoXDDIMScheduler config (scaled-linear betas, zero terminal
   SNR), timesteps uniform in [0, 1000) (or skewed by --timestep-power), captions replaced by ""
   with probability --caption-dropout so classifier-free guidance works. The weights written are an
   exponential moving average of the trained ones. With --pool N the training videos are drawn and
   encoded once (N of them, before the stage) and each step draws its batch from that pool, so a
   step costs only the DiT and T5 instead of rendering and encoding a new batch.

The output folder has diffusers' layout (model_index.json, transformer/, vae/, text_encoder/,
tokenizer/, scheduler/; safetensors in diffusers' / transformers' key layout, written by running
jaxvid's key tables backwards) plus MODEL_CARD.md, so `CogVideoXPipeline.from_pretrained(DIR)`
loads it. It appears whole or not at all (written to a temporary sibling, then renamed).

Deterministic from --seed: data, initialisation, noise and caption dropout all derive from it
(`--time-budget` / `--vae-time-budget` pick the step counts from measured speed; the card records the count, and
`--steps` with that count reproduces the run). On a GPU, bitwise reproducibility also needs
XLA_FLAGS=--xla_gpu_deterministic_ops=true.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxvid.models.cogvideox import CogVideoXConfig, CogVideoXTransformer3D, sincos_table
from jaxvid.models.t5 import T5Config, T5Encoder
from jaxvid.models.vae_cogvideox import AutoencoderKLCogVideoX, CogVideoXVAEConfig
from jaxvid.schedulers.cogvideox_ddim import CogVideoXSchedulerConfig, alphas_cumprod
from jaxvid.synthetic import world
from jaxvid.synthetic.default_model import DEFAULT_GENERATION, GENERATION_FILE
from jaxvid.synthetic.device_data import EMPTY_CAPTION, CaptionTable, sample_batch, sample_indexed_batch

log = logging.getLogger(__name__)

__all__ = ["TrainConfig", "model_configs", "init_position_table", "train", "main", "SCHEDULER_CONFIG", "GENERATION_DEFAULTS"]

MAX_TEXT_TOKENS = 226  # what CogVideoXPipeline tokenizes to by default; training sees the same padding
# diffusers' CogVideoX-5b DDIM scheduler config (the tiny pipeline ships the same one)
SCHEDULER_CONFIG: dict[str, Any] = {
    "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
    "clip_sample_range": 1.0, "num_train_timesteps": 1000, "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True, "sample_max_value": 1.0, "set_alpha_to_one": True, "snr_shift_scale": 1.0,
    "steps_offset": 0, "timestep_spacing": "trailing", "trained_betas": None,
}
# Generation settings the model was trained for (frames and size of the world); steps and guidance
# as measured on the held-out prompts (see the model card).
GENERATION_DEFAULTS = DEFAULT_GENERATION


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class TrainConfig:
    """Hyperparameters of both stages (the defaults are the shipped model's)."""

    seed: int = 0
    vae_steps: int = 1500
    vae_batch: int = 32
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6
    dit_steps: int = 3000
    dit_batch: int = 64
    dit_lr: float = 5e-4
    warmup: int = 100
    caption_dropout: float = 0.1
    two_shape_prob: float = 0.2
    ema_decay: float = 0.998
    shape_weight: float = 4.0  # extra loss weight on pixels / latents the shapes cover (they are ~8% of a frame)
    train_text_encoder: bool = True
    vae_time_budget: float | None = None  # seconds of VAE training: caps vae_steps from the measured step time
    dit_time_budget: float | None = None  # likewise for the DiT stage
    chunk: int = 50  # optimizer steps per jitted call (lax.scan); step counts are whole chunks
    total_budget: float | None = None  # seconds for the whole run: the DiT budget shrinks to fit it
    reserve: float = 130.0  # seconds kept (of total_budget) for the DiT's compile, evaluation, the GIF, writing
    pool: int = 0  # videos drawn and VAE-encoded once before the DiT stage (0: draw and encode every step)
    pool_chunk: int = 1024  # videos per jitted call while the pool is built
    timestep_power: float = 1.0  # DiT timesteps t = 1000 * u ** (1 / power): > 1 favours the noisy end
    dit_layers: int = 4
    dit_heads: int = 4  # of 32 channels each
    # an absolute (learned, sincos-initialised) position table besides the 3D RoPE; see model_configs
    absolute_positions: bool = True

    def __post_init__(self) -> None:
        for name in ("vae_batch", "dit_batch", "warmup", "chunk", "pool_chunk", "dit_layers", "dit_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r}; expected a positive int")
        for name in ("vae_steps", "dit_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r}; expected an int >= 0")
        if self.pool < 0:
            raise ValueError(f"TrainConfig.pool={self.pool!r}; expected an int >= 0")
        if not self.timestep_power > 0.0:
            raise ValueError(f"TrainConfig.timestep_power={self.timestep_power!r}; expected a value > 0")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"TrainConfig.caption_dropout={self.caption_dropout!r}; expected a value in [0, 1)")


def model_configs(scaling_factor: float = 1.0, *, dit_layers: int = 4, dit_heads: int = 4,
                  absolute_positions: bool = True) -> tuple[CogVideoXConfig, CogVideoXVAEConfig, T5Config]:
    """(transformer, VAE, text encoder) configs of the default model: 48 x 48 x 9 videos -> 8 x 3 x 12 x 12
    latents; the DiT's patches are single latent pixels (432 video tokens), so an 18 px shape spans
    ~4.5 x 4.5 tokens instead of ~2 x 2 with CogVideoX's usual patch size 2. The DiT has `dit_layers`
    blocks of `dit_heads` heads of 32 channels.

    absolute_positions: besides the 3D RoPE, a learned table of absolute positions added to the
    tokens (diffusers' `use_learned_positional_embeddings`, as CogVideoX-5b-I2V has; initialised by
    `init_position_table`). RoPE alone only tells attention *relative* offsets and text tokens carry no
    position, so the DiT is translation-equivariant up to edge effects: from pure noise it can only
    predict a position-independent video, while E[x0 | caption] depends on the motion word (a shape
    "moving right" starts in the left part of the frame and ends in the right part). The session-6
    model (RoPE only) predicted the same centred blob at t = 999 for every motion word (its per-frame
    centre of mass never moved) and ignored motion words at every noise level; its videos moved at
    random."""
    vae = CogVideoXVAEConfig(
        latent_channels=8, block_out_channels=(24, 48, 48), layers_per_block=1, norm_num_groups=8,
        sample_height=world.SIZE, sample_width=world.SIZE, scaling_factor=float(scaling_factor),
    )
    t5 = T5Config(vocab_size=200, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                  relative_attention_num_buckets=32, relative_attention_max_distance=64)
    transformer = CogVideoXConfig(
        num_attention_heads=dit_heads, attention_head_dim=32, in_channels=vae.latent_channels, patch_size=1,
        out_channels=vae.latent_channels, time_embed_dim=64, text_embed_dim=t5.d_model, num_layers=dit_layers,
        sample_width=world.SIZE // vae.spatial_compression, sample_height=world.SIZE // vae.spatial_compression,
        sample_frames=world.FRAMES, max_text_seq_length=MAX_TEXT_TOKENS, use_rotary_positional_embeddings=True,
        use_learned_positional_embeddings=absolute_positions,
    )
    return transformer, vae, t5


def init_position_table(transformer: CogVideoXTransformer3D) -> None:
    """Set a transformer's learned position table [1, L + N, D] to what diffusers' CogVideoXPatchEmbed
    starts it with: zeros over the L text slots, the 3D sincos table of the sample grid (latent frames x
    h x w, the config's interpolation scales) over the N video slots. Training then adapts it."""
    cfg = transformer.cfg
    if not cfg.use_learned_positional_embeddings:
        raise ValueError("transformer.cfg.use_learned_positional_embeddings=False; expected a model with a learned table")
    table = np.zeros((1, cfg.learned_pos_tokens, cfg.inner_dim), np.float32)
    table[0, cfg.max_text_seq_length:] = sincos_table(cfg, cfg.sample_latent_frames, cfg.sample_height, cfg.sample_width)
    transformer.patch_embed.pos_embedding[...] = jnp.asarray(table, cfg.param_dtype)


# ============================================================================================ data


def _tokenizer(folder: Path):
    from jaxvid.synthetic.cogvideox import _tokenizer_config, _write_json, tiny_spiece_model
    from jaxvid.tokenizer import cogvideox_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spiece.model").write_bytes(tiny_spiece_model())
    _write_json(folder / "tokenizer_config.json", _tokenizer_config())
    return cogvideox_tokenizer(folder, max_length=MAX_TEXT_TOKENS)


def latent_mask(masks: jax.Array, temporal: int, spatial: int) -> jax.Array:
    """Pixel masks [B, F, H, W] -> latent masks [B, F', H / s, W / s]: latent frame 0 covers frame 0,
    latent frame j >= 1 frames (j - 1) * temporal + 1 .. j * temporal (the causal VAE's grouping)."""
    b, f, h, w = masks.shape
    first = masks[:, :1]
    rest = masks[:, 1:].reshape(b, (f - 1) // temporal, temporal, h, w).any(axis=2)
    m = jnp.concatenate([first, rest], axis=1)
    return m.reshape(b, m.shape[1], h // spatial, spatial, w // spatial, spatial).any(axis=(3, 5))


# ======================================================================================= training


def learning_rate(step: jax.Array, total: jax.Array, peak: float, warmup: int) -> jax.Array:
    """Linear warm-up over `warmup` steps, then cosine decay to 5% of `peak` at `total` (traced)."""
    step = jnp.asarray(step, jnp.float32)
    warm = peak * (step + 1.0) / warmup
    progress = jnp.clip((step - warmup) / jnp.maximum(1.0, jnp.asarray(total, jnp.float32) - warmup), 0.0, 1.0)
    return jnp.where(step < warmup, warm, peak * (0.05 + 0.95 * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))))


_TX = optax.chain(optax.clip_by_global_norm(1.0), optax.scale_by_adam())


def _apply(params: Any, updates: Any, lr: jax.Array) -> Any:
    return jax.tree.map(lambda p, u: p - lr * u, params, updates)


def _scan_steps(step_fn, chunk: int, consts: Any):
    """(state, start, total) -> (state, losses [chunk]): `chunk` optimizer steps in one jitted call
    (lax.scan; the state's buffers are donated), step_fn(state, consts, step index, total) -> (state, loss).
    consts (the caption table, a frozen VAE) are jit arguments, not closed-over constants, which XLA
    would embed in (and constant-fold through) the program."""

    def run(state, consts, start, total):
        return jax.lax.scan(lambda st, i: step_fn(st, consts, start + i, total), state,
                            jnp.arange(chunk, dtype=jnp.int32))

    jitted = jax.jit(run, donate_argnums=0)
    return lambda state, start, total: jitted(state, consts, start, total)


def _run_stage(name: str, run, state: Any, steps: int, budget: float | None, chunk: int
               ) -> tuple[Any, list[tuple[int, float]], int, float]:
    """Call `run` (see _scan_steps) until `steps` (rounded up to whole chunks) are done; returns
    (state, [(step, mean loss)], steps done, seconds).

    With a time budget the step count becomes min(steps, what fits in the budget), the budget
    counting from the end of the first (compiling) call. It is fixed after the third call from the
    faster of the second and third calls (the second can compile again: on an H200, session 7, it
    took 20.3 s for 100 steps that then ran in 8.5 s, and a step count fixed from it used half the
    budget), before the fourth call (so with warm-up >= 3 chunks the schedule is unaffected).
    """
    total = math.ceil(steps / chunk) * chunk
    curve: list[tuple[int, float]] = []
    pending: list[tuple[int, jax.Array]] = []
    t0 = time.perf_counter()
    t_prev = t_first = t0
    call_seconds: list[float] = []
    every = max(1, total // chunk // 30)
    calls = start = 0
    while start < total:
        state, losses = run(state, jnp.int32(start), jnp.int32(total))
        start += chunk
        calls += 1
        pending.append((start, jnp.mean(losses)))
        if calls <= 3:
            jax.block_until_ready(losses)
            now = time.perf_counter()
            if calls == 1:
                log.info("%s: first call (compiling + %d steps) took %.1f s", name, chunk, now - t0)
                t_first = now
            else:
                call_seconds.append(now - t_prev)
            if calls == 3 and budget is not None:
                per_call = min(call_seconds)
                left = budget - (now - t_first)
                total = max(3 * chunk, min(total, start + max(0, int(left / per_call)) * chunk))
                every = max(1, total // chunk // 30)
                log.info("%s: %.2f ms/step -> %d steps in the %.0f s budget", name, per_call / chunk * 1e3,
                         total, budget)
            t_prev = now
        if calls % every == 0 or start >= total:
            mean = float(np.mean([float(v) for _, v in pending]))
            curve.append((start, mean))
            pending = []
            log.info("%s step %d/%d loss %.5f (%.0f s)", name, start, total, mean, time.perf_counter() - t0)
    jax.block_until_ready(state)
    return state, curve, total, time.perf_counter() - t0


def _vae_loss(params, graphdef, rest, pixels, masks, key, kl_weight, shape_weight):
    vae = nnx.merge(graphdef, params, rest)
    post = vae.encode(pixels)
    recon = vae.decode(post.sample(key))
    err = recon - pixels  # [B, 3, F, H, W]
    weight = 1.0 + shape_weight * masks[:, None].astype(jnp.float32)
    weight = weight / jnp.mean(weight)
    rec = jnp.mean(weight * (jnp.abs(err) + err * err))
    kl = 0.5 * jnp.mean(post.mean ** 2 + jnp.exp(post.logvar) - 1.0 - post.logvar)
    return rec + kl_weight * kl


def _batch_fn(cfg: TrainConfig, seed: int, batch: int, dropout: float):
    """(caption ids, step index) -> that step's batch (a pure function of (seed, step))."""
    return lambda caption_ids, step: sample_batch(jax.random.fold_in(jax.random.key(seed), step), batch, caption_ids,
                                                  dropout=dropout, two_shape_prob=cfg.two_shape_prob)


def train_vae(cfg: TrainConfig, vae: AutoencoderKLCogVideoX, caption_ids: jax.Array
              ) -> tuple[AutoencoderKLCogVideoX, dict]:
    graphdef, params, rest = nnx.split(vae, nnx.Param, ...)
    batch_at = _batch_fn(cfg, cfg.seed * 4 + 0, cfg.vae_batch, 0.0)

    def step(state, caption_ids, i, total):
        params, opt = state
        pixels, _, masks = batch_at(caption_ids, i)
        noise_key = jax.random.fold_in(jax.random.key(cfg.seed * 4 + 1), i)
        loss, grads = jax.value_and_grad(_vae_loss)(params, graphdef, rest, pixels, masks, noise_key,
                                                    cfg.kl_weight, cfg.shape_weight)
        updates, opt = _TX.update(grads, opt, params)
        return (_apply(params, updates, learning_rate(i, total, cfg.vae_lr, cfg.warmup)), opt), loss

    state = (params, _TX.init(params))
    state, curve, steps, seconds = _run_stage("vae", _scan_steps(step, cfg.chunk, caption_ids), state, cfg.vae_steps,
                                              cfg.vae_time_budget, cfg.chunk)
    return nnx.merge(graphdef, state[0], rest), {"steps": steps, "seconds": seconds, "curve": curve}


@jax.jit
def _latent_means(graphdef, state, pixels):
    return nnx.merge(graphdef, state).encode(pixels).mean


@jax.jit
def _reconstruct(graphdef, state, pixels):
    vae = nnx.merge(graphdef, state)
    return vae.decode(vae.encode(pixels).mean)


def latent_std(cfg: TrainConfig, vae: AutoencoderKLCogVideoX, caption_ids: jax.Array, n: int = 8) -> float:
    """Standard deviation of the VAE's posterior means over n batches of 16."""
    graphdef, state = nnx.split(vae)
    batch_at = jax.jit(_batch_fn(cfg, cfg.seed * 4 + 3, 16, 0.0))
    means = [np.asarray(_latent_means(graphdef, state, batch_at(caption_ids, i)[0])) for i in range(n)]
    return float(np.std(np.concatenate([m.ravel() for m in means])))


def vae_check(vae: AutoencoderKLCogVideoX, seeds: Sequence[int] = (0, 1)) -> dict[str, Any]:
    """Reconstruct every held-out combination (one video per seed) and read it back with the
    detector: the DiT cannot draw a shape more precisely than the VAE decodes it."""
    from jaxvid.synthetic.detect import detect_one

    combos = [c for _ in seeds for c in world.HELD_OUT]
    videos = np.concatenate([world.render_batch([world.scene_from_combo(c, np.random.default_rng(s))
                                                 for c in world.HELD_OUT]) for s in seeds])
    pixels = videos.astype(np.float32).transpose(0, 4, 1, 2, 3) / np.float32(127.5) - np.float32(1.0)
    graphdef, state = nnx.split(vae)
    recon = np.asarray(_reconstruct(graphdef, state, jnp.asarray(pixels)))
    frames = np.clip(np.round((recon.transpose(0, 2, 3, 4, 1) + 1.0) * 127.5), 0, 255).astype(np.uint8)
    hits = {"colour": 0, "shape": 0, "motion": 0, "all": 0}
    for combo, video in zip(combos, frames):
        d = detect_one(video)
        got = (d.colour, d.shape, d.motion) if d else (None, None, None)
        for k, name in enumerate(("colour", "shape", "motion")):
            hits[name] += got[k] == combo[k]
        hits["all"] += got == combo[:3]
    return {**{k: v / len(combos) for k, v in hits.items()}, "n": len(combos)}


@dataclasses.dataclass(frozen=True)
class LatentPool:
    """Training videos encoded once by the frozen VAE, row-aligned: latents float32 [N, F', C, h, w]
    (scaled posterior means, the DiT's layout), masks bool [N, F', h, w] (latents a shape touches),
    captions int32 [N] (CaptionTable rows, never the empty one: dropout is applied when a batch is drawn)."""

    latents: jax.Array
    masks: jax.Array
    captions: jax.Array

    def __len__(self) -> int:
        return int(self.captions.shape[0])


jax.tree_util.register_dataclass(LatentPool, data_fields=["latents", "masks", "captions"], meta_fields=[])


def latent_pool(cfg: TrainConfig, vae: AutoencoderKLCogVideoX) -> LatentPool:
    """cfg.pool videos (rounded up to whole cfg.pool_chunk chunks) drawn by device_data as the
    per-step stream draws them (seeded, held-out combinations excluded) and encoded by `vae` (its
    cfg.scaling_factor applied). A DiT step then costs only the DiT and T5: drawing and encoding 128
    videos every step took most of a step's time."""
    vae_def, vae_state = nnx.split(vae)
    scale, temporal, spatial = vae.cfg.scaling_factor, vae.cfg.temporal_compression_ratio, vae.cfg.spatial_compression

    @jax.jit
    def chunk(vae_state, c):
        pixels, captions, masks = sample_indexed_batch(jax.random.fold_in(jax.random.key(cfg.seed * 4 + 5), c),
                                                       cfg.pool_chunk, two_shape_prob=cfg.two_shape_prob)
        mean = nnx.merge(vae_def, vae_state).encode(pixels).mean  # [B, C, F', h, w]
        return LatentPool(mean.transpose(0, 2, 1, 3, 4) * scale, latent_mask(masks, temporal, spatial), captions)

    t0 = time.perf_counter()
    parts = [chunk(vae_state, jnp.int32(c)) for c in range(math.ceil(cfg.pool / cfg.pool_chunk))]
    pool = jax.tree.map(lambda *xs: jnp.concatenate(xs), *parts)
    jax.block_until_ready(pool)
    log.info("latent pool: %d videos encoded in %.1f s (%.0f MB)", len(pool), time.perf_counter() - t0,
             sum(x.nbytes for x in jax.tree.leaves(pool)) / 1e6)
    return pool


def train_dit(cfg: TrainConfig, transformer: CogVideoXTransformer3D, t5: T5Encoder, vae: AutoencoderKLCogVideoX,
              caption_ids: jax.Array, pool: LatentPool | None = None
              ) -> tuple[CogVideoXTransformer3D, T5Encoder, dict]:
    """Train the DiT (and T5) on batches drawn and encoded every step or, given `pool`, drawn from it."""
    scale = vae.cfg.scaling_factor
    vae_def, vae_state = nnx.split(vae)
    dit_def, dit_params, dit_rest = nnx.split(transformer, nnx.Param, ...)
    t5_def, t5_params, t5_rest = nnx.split(t5, nnx.Param, ...)
    table = jnp.asarray(alphas_cumprod(CogVideoXSchedulerConfig.from_hf_config(SCHEDULER_CONFIG)), jnp.float32)
    batch_at = _batch_fn(cfg, cfg.seed * 4 + 0 + 1_000_003, cfg.dit_batch, cfg.caption_dropout)
    n_train = table.shape[0]

    def encode(t5_p, ids):
        return nnx.merge(t5_def, t5_p, t5_rest)(ids)

    def loss_fn(trainable, frozen_text, latents, ids, weight, key):
        text = encode(trainable["t5"], ids) if cfg.train_text_encoder else frozen_text
        dit = nnx.merge(dit_def, trainable["dit"], dit_rest)
        k_t, k_n = jax.random.split(key)
        if cfg.timestep_power == 1.0:
            t = jax.random.randint(k_t, (latents.shape[0],), 0, n_train)
        else:  # density ~ t ** (power - 1): more steps where the layout (place, shape, path) is decided
            u = jax.random.uniform(k_t, (latents.shape[0],), jnp.float32)
            t = jnp.minimum(jnp.floor(n_train * u ** (1.0 / cfg.timestep_power)).astype(jnp.int32), n_train - 1)
        noise = jax.random.normal(k_n, latents.shape, jnp.float32)
        a = table[t][:, None, None, None, None]
        noisy = jnp.sqrt(a) * latents + jnp.sqrt(1.0 - a) * noise
        target = jnp.sqrt(a) * noise - jnp.sqrt(1.0 - a) * latents  # v
        pred = dit(noisy, text, t)
        return jnp.mean(weight * (pred - target) ** 2)

    def draw(consts, i):
        """Step i's (latents [B, F', C, h, w], token ids [B, L], latent masks [B, F', h, w])."""
        caption_ids, vae_state, pool = consts
        if pool is None:
            pixels, ids, masks = batch_at(caption_ids, i)
            m = latent_mask(masks, vae.cfg.temporal_compression_ratio, vae.cfg.spatial_compression)
            mean = nnx.merge(vae_def, vae_state).encode(pixels).mean  # [B, C, F', h, w]
            return jax.lax.stop_gradient(mean.transpose(0, 2, 1, 3, 4) * scale), ids, m
        k_row, k_drop = jax.random.split(jax.random.fold_in(jax.random.key(cfg.seed * 4 + 6), i))
        rows = jax.random.randint(k_row, (cfg.dit_batch,), 0, pool.captions.shape[0])
        captions = jnp.where(jax.random.uniform(k_drop, (cfg.dit_batch,)) < cfg.caption_dropout, EMPTY_CAPTION,
                             pool.captions[rows])
        return pool.latents[rows], caption_ids[captions], pool.masks[rows]

    def step(state, consts, i, total):
        trainable, ema, opt, frozen_t5 = state
        latents, ids, m = draw(consts, i)
        # latents the shapes touch weigh more: the background is most of the loss but the easy part
        weight = 1.0 + cfg.shape_weight * m[:, :, None].astype(jnp.float32)  # [B, F', 1, h, w]
        weight = weight / jnp.mean(weight)
        # a frozen T5 runs outside the gradient trace (its layer scan must see arrays of its own trace level)
        frozen_text = None if cfg.train_text_encoder else encode(frozen_t5, ids)
        loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen_text, latents, ids, weight,
                                                  jax.random.fold_in(jax.random.key(cfg.seed * 4 + 2), i))
        updates, opt = _TX.update(grads, opt, trainable)
        trainable = _apply(trainable, updates, learning_rate(i, total, cfg.dit_lr, cfg.warmup))
        decay = jnp.minimum(cfg.ema_decay, (1.0 + i) / (10.0 + i))  # short warm-up of the average
        ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, trainable)
        return (trainable, ema, opt, frozen_t5), loss

    trainable = {"dit": dit_params, **({"t5": t5_params} if cfg.train_text_encoder else {})}
    # the frozen T5 travels as a jit argument: NNX modules must not close over arrays of another trace
    frozen = None if cfg.train_text_encoder else t5_params
    # the EMA starts as its own copy (the state's buffers are donated)
    state = (trainable, jax.tree.map(jnp.copy, trainable), _TX.init(trainable), frozen)
    consts = (caption_ids, None if pool is not None else vae_state, pool)
    state, curve, steps, seconds = _run_stage("dit", _scan_steps(step, cfg.chunk, consts), state,
                                              cfg.dit_steps,
                                              cfg.dit_time_budget, cfg.chunk)
    ema = state[1]
    transformer = nnx.merge(dit_def, ema["dit"], dit_rest)
    t5 = nnx.merge(t5_def, ema["t5"] if cfg.train_text_encoder else state[3], t5_rest)
    return transformer, t5, {"steps": steps, "seconds": seconds, "curve": curve}


# ======================================================================================== writing


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _half(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """float16 copies: halves the shipped size; generation loads them as fp32 (`dtype="fp32"`)."""
    return {k: v.astype(np.float16) for k, v in tensors.items()}


def write_pipeline(folder: Path, transformer: CogVideoXTransformer3D, vae: AutoencoderKLCogVideoX, t5: T5Encoder) -> None:
    """Write the three networks (transformer and VAE as float16, T5 as float32), tokenizer, scheduler and
    model_index.json in diffusers' layout."""
    from convert.keymaps.cogvideox import diffusers_shapes, transformer_rules
    from convert.keymaps.t5 import encoder_rules
    from convert.keymaps.vae_cogvideox import vae_rules
    from convert.safetensors_io import write_safetensors
    from jaxvid.models.loading import model_specs
    from jaxvid.synthetic.cogvideox import _DIFFUSERS_VERSION, _t5_hf_config, _vae_hf_config, _write_json, source_shapes
    from jaxvid.synthetic.export import to_source

    for sub in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    tcfg, vcfg, t5cfg = transformer.cfg, vae.cfg, t5.cfg
    write_safetensors(folder / "transformer" / "diffusion_pytorch_model.safetensors",
                      _half(to_source(transformer, transformer_rules(tcfg), diffusers_shapes(tcfg))))
    _write_json(folder / "transformer" / "config.json", {**tcfg.to_hf_config(), "_diffusers_version": _DIFFUSERS_VERSION})
    rules = vae_rules(vcfg)
    write_safetensors(folder / "vae" / "diffusion_pytorch_model.safetensors",
                      _half(to_source(vae, rules, source_shapes(rules, model_specs(AutoencoderKLCogVideoX, vcfg)))))
    _write_json(folder / "vae" / "config.json", _vae_hf_config(vcfg))
    rules = encoder_rules(t5cfg)
    write_safetensors(folder / "text_encoder" / "model.safetensors",
                      to_source(t5, rules, source_shapes(rules, model_specs(T5Encoder, t5cfg))))
    _write_json(folder / "text_encoder" / "config.json", _t5_hf_config(t5cfg))
    _tokenizer(folder / "tokenizer")
    _write_json(folder / "scheduler" / "scheduler_config.json",
                {"_class_name": "CogVideoXDDIMScheduler", "_diffusers_version": _DIFFUSERS_VERSION, **SCHEDULER_CONFIG})
    _write_json(folder / "model_index.json", {
        "_class_name": "CogVideoXPipeline", "_diffusers_version": _DIFFUSERS_VERSION,
        "scheduler": ["diffusers", "CogVideoXDDIMScheduler"], "text_encoder": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "T5Tokenizer"], "transformer": ["diffusers", "CogVideoXTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLCogVideoX"],
    })


# ===================================================================================== evaluation


def held_out_prompts() -> list[tuple[str, tuple[str, str, str]]]:
    """(caption, (colour, shape, motion)) of every held-out one-shape combination."""
    out = []
    for combo in world.HELD_OUT:
        scene = world.scene_from_combo(combo, np.random.default_rng(0))
        out.append((world.caption(scene), combo[:3]))
    return out


def evaluate(folder: Path, prompts: list[tuple[str, tuple[str, str, str]]], *, seeds: Sequence[int] = (0,),
             guidance_scales: Sequence[float] = (GENERATION_DEFAULTS["guidance_scale"],),
             num_inference_steps: int = GENERATION_DEFAULTS["num_inference_steps"]) -> dict[float, dict[str, Any]]:
    """Generate every prompt with the real pipeline (fp32) and score it with the detector;
    returns {guidance scale: {"colour"/"shape"/"motion"/"all": fraction right, "n", "misses"}}."""
    from jaxvid.pipelines.cogvideox import CogVideoXPipeline
    from jaxvid.synthetic.detect import detect_one

    pipe = CogVideoXPipeline.from_pretrained(folder, dtype="fp32")
    results = {}
    for scale in guidance_scales:
        hits = {"colour": 0, "shape": 0, "motion": 0, "all": 0}
        n = 0
        misses = []
        for seed in seeds:
            videos = pipe([p for p, _ in prompts], num_frames=world.FRAMES, height=world.SIZE, width=world.SIZE,
                          num_inference_steps=num_inference_steps, guidance_scale=scale, seed=seed,
                          progress=False).frames  # uint8 [B, F, H, W, 3]
            for (prompt, want), video in zip(prompts, videos):
                d = detect_one(video)
                got = (d.colour, d.shape, d.motion) if d else (None, None, None)
                for k, name in enumerate(("colour", "shape", "motion")):
                    hits[name] += got[k] == want[k]
                hits["all"] += got == want
                n += 1
                if got != want:
                    misses.append(f"{prompt!r} (seed {seed}): saw {got}")
        results[float(scale)] = {**{k: v / n for k, v in hits.items()}, "n": n, "misses": misses}
    return results


def write_sample_gif(folder: str | os.PathLike, path: str | os.PathLike, prompt: str | None = None, seed: int = 0) -> Path:
    """Generate `prompt` (default: DEFAULT_PROMPT, a held-out caption) with the pipeline at `folder`
    and its generation settings, and save it as a GIF at `path`, upscaled 4x (nearest) so the 48 px
    frames are visible."""
    from jaxvid.pipelines.cogvideox import CogVideoXPipeline
    from jaxvid.synthetic.default_model import DEFAULT_PROMPT, generation_settings
    from jaxvid.video import save

    settings = generation_settings(folder)
    pipe = CogVideoXPipeline.from_pretrained(folder, dtype="fp32")
    kw = {k: settings[k] for k in ("num_frames", "height", "width", "num_inference_steps", "guidance_scale")}
    frames = pipe(prompt or DEFAULT_PROMPT, seed=seed, progress=False, **kw).frames[0]  # uint8 [F, H, W, 3]
    frames = frames.repeat(4, axis=1).repeat(4, axis=2)
    return save(frames, Path(path).with_suffix(".gif"), fps=settings["fps"])


# ======================================================================================== card


def _card(cfg: TrainConfig, stats: dict[str, Any], sizes: dict[str, int], params: dict[str, int]) -> str:
    vae, dit = stats["vae"], stats["dit"]

    def curve(c: list[tuple[int, float]]) -> str:
        picks = c if len(c) <= 12 else [c[int(round(i * (len(c) - 1) / 11))] for i in range(12)]
        return ", ".join(f"{s}: {v:.4f}" for s, v in picks)

    vae_text = (f"reused from {vae['from']} (its training record did not come with it)." if "from" in vae else
                f"""{vae['steps']} steps of batch {cfg.vae_batch}, lr {cfg.vae_lr:g}, L1 + MSE + {cfg.kl_weight:g} KL, {vae['seconds']:.0f} s;
  pixels under a shape (dilated by 1 px) weigh {1 + cfg.shape_weight:g} x the background's.
  Loss (step: mean loss since the previous entry): {curve(vae['curve'])}.""")
    pool = stats.get("pool")
    pool_text = ("a new batch for every VAE step; for the DiT, a pool of "
                 f"{pool['videos']} videos drawn and VAE-encoded once ({pool['seconds']:.0f} s), batches drawn from it."
                 if pool else "a new batch for every training step.")
    held = "\n".join(f"- a {c} {s} {'standing still' if m == 'still' else 'moving ' + m} on a {b} background"
                     for c, s, m, b in world.HELD_OUT)
    ev_lines = "\n".join(f"- guidance {g}: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                                                       for k, v in r.items())
                         for g, r in stats.get("eval_by_guidance", {}).items())
    return f"""# jaxvid default model: a tiny CogVideoX trained on a synthetic world

A text-to-video CogVideoX pipeline (T5 encoder, CogVideoX VAE, CogVideoX DiT with 3D RoPE; diffusers'
folder layout, DDIM v-prediction scheduler) that draws what its caption says: one or two flat shapes
(circle, square, triangle) in red, green, blue, yellow or white, moving left, right, up or down or
standing still, on a black, white or gray background, as {world.FRAMES} frames of {world.SIZE} x {world.SIZE} pixels.

    a green square moving up on a black background
    a red circle moving right and a blue triangle standing still on a white background

## Data
The world of `jaxvid/synthetic/world.py`, sampled and drawn on the device (`jaxvid/synthetic/device_data.py`,
seeded): {pool_text} Shapes of {world.SHAPE_SIZE} px moving {world.SPEED:g} px per frame, a
caption from the template above; up to {cfg.two_shape_prob:.0%} of the videos hold two shapes.
These {len(world.HELD_OUT)} one-shape combinations never appear in training, alone or inside a two-shape scene
(each of their words, and each pair of them, does):

{held}

## Training ({stats.get('device', 'unknown device')})
- seed {cfg.seed}; optax Adam, global-norm clipping 1, {cfg.warmup} warm-up steps, cosine decay to 5 %.
- VAE: {vae_text}
  scaling_factor = 1 / std of the posterior means = {stats['scaling_factor']:.4f}.
  Its reconstructions of the held-out combinations (2 positions each), read by the detector, fraction
  right: {', '.join(f'{k} {v:.2f}' if isinstance(v, float) else f'{k} {v}' for k, v in stats['vae_check'].items())}.
- DiT{' + T5' if cfg.train_text_encoder else ' (T5 frozen at its random init)'} ({cfg.dit_layers} blocks, {cfg.dit_heads} heads of 32, 3D RoPE{
  ' + a learned absolute position table (sincos init)' if cfg.absolute_positions else ' alone'}): {dit['steps']} steps of batch {cfg.dit_batch}, lr {cfg.dit_lr:g},
  v-prediction MSE (latents a shape touches weigh {1 + cfg.shape_weight:g} x), timesteps 1000 u^(1/{cfg.timestep_power:g}) for
  uniform u, caption dropout {cfg.caption_dropout:g}, EMA {cfg.ema_decay:g}, {dit['seconds']:.0f} s.
  Loss: {curve(dit['curve'])}.

## Evaluation
The held-out captions, each with {len(stats.get('eval_seeds', ()))} noise seeds, generated with
`CogVideoXPipeline.from_pretrained` (fp32, DDIM; {GENERATION_DEFAULTS['num_inference_steps']} steps unless the line says) and read back by
`jaxvid/synthetic/detect.py` (colour masks, centroid track, bounding-box fill ratio); fraction right
by guidance scale (and DDIM steps):

{ev_lines or '(not evaluated)'}

Shipped generation settings (`jaxvid_generation.json`; the best guidance above):
{json.dumps(stats.get('generation', GENERATION_DEFAULTS))}

## Size
{json.dumps(params)} parameters; transformer and VAE stored as float16, T5 as float32; files:
{json.dumps(sizes)} bytes.

## Retrain

    python -m jaxvid.synthetic.train --out DIR --seed {cfg.seed} --vae-steps {vae['steps']} --steps {dit['steps']} \\
        --vae-batch {cfg.vae_batch} --dit-batch {cfg.dit_batch} --chunk {cfg.chunk} \\
        --vae-lr {cfg.vae_lr:g} --dit-lr {cfg.dit_lr:g} --warmup {cfg.warmup} --pool {cfg.pool} \\
        --timestep-power {cfg.timestep_power:g} --dit-layers {cfg.dit_layers} --dit-heads {cfg.dit_heads} \\
        --ema-decay {cfg.ema_decay:g} --shape-weight {cfg.shape_weight:g}{'' if cfg.train_text_encoder else ' --frozen-text-encoder'}{
        '' if cfg.absolute_positions else ' --rope-only'}

({stats.get('device', 'unknown device')}: about {vae['seconds'] + dit['seconds']:.0f} s of training; set
XLA_FLAGS=--xla_gpu_deterministic_ops=true for bitwise-identical weights).
"""


# =========================================================================================== main


def _count(model: nnx.Module) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


def train(out: str | os.PathLike, cfg: TrainConfig, *, vae_from: str | os.PathLike | None = None,
          eval_seeds: Sequence[int] = (0,), eval_guidance: Sequence[float] = (GENERATION_DEFAULTS["guidance_scale"],),
          eval_steps: Sequence[int] = (GENERATION_DEFAULTS["num_inference_steps"],)) -> dict[str, Any]:
    """Train both stages (or load the VAE from `vae_from`, a pipeline's vae/ folder) and write `out`.
    The held-out evaluation runs every (DDIM steps, guidance scale) pair of eval_steps x eval_guidance;
    the best pair (the first of equals) becomes the folder's generation settings."""
    from jaxvid.models.loading import load_model

    t_start = time.perf_counter()
    out = Path(out)
    if out.exists():
        raise ValueError(f"out={str(out)!r} exists; expected a new folder (nothing is overwritten)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tokenizer = _tokenizer(tmp / "tokenizer")
        tcfg, vcfg, t5cfg = model_configs(dit_layers=cfg.dit_layers, dit_heads=cfg.dit_heads,
                                          absolute_positions=cfg.absolute_positions)
        keys = np.random.SeedSequence(cfg.seed).generate_state(3)
        stats: dict[str, Any] = {"device": jax.devices()[0].device_kind}

        caption_ids = jnp.asarray(CaptionTable.build(tokenizer).ids)
        if vae_from is None:
            vae = AutoencoderKLCogVideoX(vcfg, rngs=nnx.Rngs(int(keys[0])))
            vae, stats["vae"] = train_vae(cfg, vae, caption_ids)
        else:
            vae = load_model(vae_from, dtype="fp32", expect=("AutoencoderKLCogVideoX",))  # stored as float16
            card = Path(vae_from).parent / "train_stats.json"  # the VAE's own training record, if it came along
            stats["vae"] = (json.loads(card.read_text())["vae"] if card.is_file()
                            else {"steps": 0, "seconds": 0.0, "curve": [], "from": str(vae_from)})
        stats["vae_check"] = vae_check(vae)
        log.info("VAE reconstructions of the held-out combinations, fraction right: %s", stats["vae_check"])
        std = latent_std(cfg, vae, caption_ids)
        # only the top-level config's scaling_factor is read (by the pipeline and the writer)
        vae.cfg = dataclasses.replace(vae.cfg, scaling_factor=float(1.0 / std))
        stats["scaling_factor"] = 1.0 / std

        pool = None
        if cfg.dit_steps and cfg.pool:
            t_pool = time.perf_counter()
            pool = latent_pool(cfg, vae)
            stats["pool"] = {"videos": len(pool), "seconds": time.perf_counter() - t_pool}
        transformer = CogVideoXTransformer3D(tcfg, rngs=nnx.Rngs(int(keys[1])))
        if cfg.absolute_positions:
            init_position_table(transformer)
        t5 = T5Encoder(t5cfg, rngs=nnx.Rngs(int(keys[2])))
        if cfg.total_budget is not None:
            left = cfg.total_budget - (time.perf_counter() - t_start) - cfg.reserve
            budget = max(10.0, min(left, cfg.dit_time_budget or math.inf))
            log.info("dit: %.0f s of training left in the %.0f s total budget", budget, cfg.total_budget)
            cfg = dataclasses.replace(cfg, dit_time_budget=budget)
        if cfg.dit_steps:
            transformer, t5, stats["dit"] = train_dit(cfg, transformer, t5, vae, caption_ids, pool)
            del pool
        else:
            stats["dit"] = {"steps": 0, "seconds": 0.0, "curve": []}

        write_pipeline(tmp, transformer, vae, t5)
        (tmp / "train_stats.json").write_text(json.dumps({k: v for k, v in stats.items()}, indent=1) + "\n")
        generation = dict(GENERATION_DEFAULTS)
        stats["eval_seeds"] = list(eval_seeds)
        if cfg.dit_steps and eval_seeds:
            t_eval = time.perf_counter()
            results: dict[tuple[int, float], dict[str, Any]] = {}
            try:
                for n in eval_steps:
                    for scale, result in evaluate(tmp, held_out_prompts(), seeds=eval_seeds, guidance_scales=eval_guidance,
                                                  num_inference_steps=n).items():
                        results[(n, scale)] = result
            except Exception:  # the trained weights are worth keeping even so; the card says it was not measured
                log.exception("held-out evaluation failed; writing the model unevaluated")
                results = {}
            for (n, scale), result in results.items():
                for m in result["misses"]:
                    log.info("miss at %d steps, guidance %g: %s", n, scale, m)
            for (n, scale), result in results.items():
                log.info("HELD-OUT ACCURACY %d steps, guidance %g: all %.3f (colour %.3f shape %.3f motion %.3f, n=%d)",
                         n, scale, result["all"], result["colour"], result["shape"], result["motion"], result["n"])
                key = str(scale) if len(eval_steps) == 1 else f"{scale} at {n} steps"
                stats.setdefault("eval_by_guidance", {})[key] = {k: v for k, v in result.items() if k != "misses"}
            if results:  # ship the best pair (the first of equals, in the order given)
                best_n, best = max(results, key=lambda k: results[k]["all"])
                generation["guidance_scale"] = best
                generation["num_inference_steps"] = best_n
                stats["eval"] = {"guidance_scale": best, "num_inference_steps": best_n, **results[(best_n, best)]}
                log.info("HELD-OUT ACCURACY shipped %d steps, guidance %g: %.3f (%d prompts x %d seeds)", best_n, best,
                         results[(best_n, best)]["all"], len(world.HELD_OUT), len(eval_seeds))
            stats["eval_seconds"] = time.perf_counter() - t_eval
        stats["generation"] = generation
        (tmp / GENERATION_FILE).write_text(json.dumps(generation, indent=2, sort_keys=True) + "\n")
        sizes = {p.relative_to(tmp).as_posix(): p.stat().st_size for p in sorted(tmp.rglob("*.safetensors"))}
        params = {"transformer": _count(transformer), "vae": _count(vae), "text_encoder": _count(t5)}
        (tmp / "MODEL_CARD.md").write_text(_card(cfg, stats, sizes, params))
        (tmp / "train_stats.json").write_text(json.dumps(stats, indent=1) + "\n")
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote %s (%d bytes)", out, _folder_bytes(out))
    return stats


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(prog="python -m jaxvid.synthetic.train", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="new folder to write the pipeline to")
    p.add_argument("--steps", type=int, default=d.dit_steps, help="DiT steps")
    p.add_argument("--vae-steps", type=int, default=d.vae_steps)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dit-batch", type=int, default=d.dit_batch)
    p.add_argument("--vae-batch", type=int, default=d.vae_batch)
    p.add_argument("--frozen-text-encoder", action="store_true", help="keep T5 at its random init")
    p.add_argument("--time-budget", type=float, default=None, help="seconds of DiT training (caps --steps)")
    p.add_argument("--vae-time-budget", type=float, default=None, help="seconds of VAE training (caps --vae-steps)")
    p.add_argument("--vae-from", default=None, help="reuse a trained vae/ folder (skips the VAE stage)")
    p.add_argument("--eval-seeds", type=int, default=2, help="held-out evaluation: seeds per prompt (0 = none)")
    p.add_argument("--gif", default=None, help="also write a GIF of the default prompt to this path")
    p.add_argument("--eval-guidance", default=str(GENERATION_DEFAULTS["guidance_scale"]),
                   help="comma-separated guidance scales to evaluate at; the best is shipped (generation file, card)")
    p.add_argument("--eval-steps", default=str(GENERATION_DEFAULTS["num_inference_steps"]),
                   help="comma-separated DDIM step counts to evaluate at (with each --eval-guidance); the best pair "
                   "is shipped. More steps end the trailing schedule at a cleaner timestep (sharper shapes)")
    p.add_argument("--chunk", type=int, default=d.chunk, help="optimizer steps per jitted call (lax.scan)")
    p.add_argument("--vae-lr", type=float, default=d.vae_lr)
    p.add_argument("--dit-lr", type=float, default=d.dit_lr)
    p.add_argument("--total-budget", type=float, default=None,
                   help="seconds for the whole run (from the start of training): the DiT's budget shrinks so that "
                   "--reserve seconds are left for its compile, the evaluation and the GIF")
    p.add_argument("--reserve", type=float, default=d.reserve)
    p.add_argument("--warmup", type=int, default=d.warmup, help="warm-up steps (keep >= 3 chunks with a time budget)")
    p.add_argument("--pool", type=int, default=d.pool,
                   help="DiT stage: encode this many videos once and draw batches from them (0: draw and encode "
                   "a new batch every step)")
    p.add_argument("--pool-chunk", type=int, default=d.pool_chunk, help="videos per call while the pool is built")
    p.add_argument("--timestep-power", type=float, default=d.timestep_power,
                   help="DiT timesteps 1000 * u ** (1 / power), u uniform: > 1 trains the noisy end more")
    p.add_argument("--dit-layers", type=int, default=d.dit_layers)
    p.add_argument("--dit-heads", type=int, default=d.dit_heads, help="DiT heads (32 channels each)")
    p.add_argument("--ema-decay", type=float, default=d.ema_decay)
    p.add_argument("--shape-weight", type=float, default=d.shape_weight)
    p.add_argument("--rope-only", action="store_true",
                   help="no absolute position table, 3D RoPE alone (the session-6 design; see model_configs)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = TrainConfig(seed=args.seed, dit_steps=args.steps, vae_steps=args.vae_steps, dit_batch=args.dit_batch,
                      vae_batch=args.vae_batch, train_text_encoder=not args.frozen_text_encoder,
                      dit_time_budget=args.time_budget, vae_time_budget=args.vae_time_budget, chunk=args.chunk,
                      vae_lr=args.vae_lr, dit_lr=args.dit_lr, warmup=args.warmup, total_budget=args.total_budget,
                      reserve=args.reserve, pool=args.pool, pool_chunk=args.pool_chunk,
                      timestep_power=args.timestep_power, dit_layers=args.dit_layers, dit_heads=args.dit_heads,
                      ema_decay=args.ema_decay, shape_weight=args.shape_weight,
                      absolute_positions=not args.rope_only)
    guidance = tuple(float(g) for g in args.eval_guidance.split(","))
    steps = tuple(int(n) for n in args.eval_steps.split(","))
    train(args.out, cfg, vae_from=args.vae_from, eval_seeds=tuple(range(args.eval_seeds)), eval_guidance=guidance,
          eval_steps=steps)
    if args.gif:
        log.info("wrote %s", write_sample_gif(args.out, args.gif))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
