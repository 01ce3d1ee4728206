"""Where BSA's gating time goes: pooling, chunk scores, top-k (Pallas kernel vs lax.top_k + sort).

    python bench/bsa_select.py [--json select.json]
    python bench/bsa_select.py --sweep      # also the top-k kernel's launch settings

LongCat 720p cases of bench/specs.py, random bf16 q/k; median ms of --repeats calls per stage,
and the layout permutes `bsa_attention` adds around the kernel (q, k, v in; output back).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench.attention import make_qkv, median_ms  # noqa: E402
from bench.specs import SPECS  # noqa: E402

log = logging.getLogger("bench.bsa_select")


def stages(spec, q, k, v, repeats: int) -> dict[str, float]:
    from jaxvid.attention.bsa import from_chunk_order, pool_chunks, select_blocks, to_chunk_order, topk_count
    from pallas_kernels.topk_columns import topk_sorted_columns

    lat, ch = spec.latent, spec.chunk
    pool = jax.jit(lambda q, k: (pool_chunks(q, lat, ch), pool_chunks(k, lat, ch)))
    score = jax.jit(lambda a, b: jnp.einsum("bhnd,bhmd->bhnm", a, b, precision=jax.lax.Precision.HIGHEST))
    q_cmp, k_cmp = pool(q, k)
    scores = score(q_cmp, k_cmp)
    count = topk_count(spec.sparsity, scores.shape[-1])
    kernel = jax.jit(lambda s: topk_sorted_columns(s, count))
    ref = jax.jit(lambda s: topk_sorted_columns(s, count, implementation="reference"))
    select = jax.jit(lambda q, k: select_blocks(q, k, lat, lat, sparsity=spec.sparsity,
                                                chunk_3d_shape_q=ch, chunk_3d_shape_k=ch))
    permute_in = jax.jit(lambda q, k, v: tuple(to_chunk_order(x, lat, ch) for x in (q, k, v)))
    permute_out = jax.jit(lambda o: from_chunk_order(o, lat, ch))
    same = bool(jnp.all(kernel(scores) == ref(scores)))
    return {
        "pool q,k": median_ms(pool, q, k, repeats=repeats),
        "scores": median_ms(score, q_cmp, k_cmp, repeats=repeats),
        "top-k kernel": median_ms(kernel, scores, repeats=repeats),
        "lax.top_k+sort": median_ms(ref, scores, repeats=repeats),
        "select (all)": median_ms(select, q, k, repeats=repeats),
        "permute q,k,v in": median_ms(permute_in, q, k, v, repeats=repeats),
        "permute out": median_ms(permute_out, q, repeats=repeats),
        "kernel == lax.top_k": float(same),
    }


def sweep_topk(spec, repeats: int) -> list[tuple[int, int, float]]:
    """(elements per program, warps, ms) of the top-k kernel on this case's chunk scores."""
    from jaxvid.attention.bsa import topk_count
    from pallas_kernels.topk_columns import _topk_pallas

    n = spec.padded_seq // spec.block
    scores = jax.random.normal(jax.random.PRNGKey(0), (spec.batch, spec.heads, n, n), jnp.float32)
    k = topk_count(spec.sparsity, n)
    out = []
    for elements in (2048, 4096, 8192, 16384):
        for warps in (2, 4, 8):
            fn = jax.jit(lambda s, e=elements, w=warps: _topk_pallas(
                s, k=k, interpret=False, elements_per_program=e, num_warps=w))
            out.append((elements, warps, median_ms(fn, scores, repeats=repeats)))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--sweep", action="store_true", help="time the top-k kernel's launch settings")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.sweep:
        for spec in (s for s in SPECS if s.pattern == "bsa" and s.sparsity == 0.9375):
            for elements, warps, ms in sweep_topk(spec, args.repeats):
                print(f"{spec.name}: elements/program {elements:6d} warps {warps}: {ms:.3f} ms")
    results = {}
    for spec in (s for s in SPECS if s.pattern == "bsa"):
        q, k, v = make_qkv(spec)
        results[spec.name] = stages(spec, q, k, v, args.repeats)
        log.info("%s %s", spec.name, results[spec.name])
    names = list(next(iter(results.values())))
    device = jax.devices()[0].device_kind
    print(f"device: {device}, jax {jax.__version__}; ms (last row: 1 = identical selections)")
    print("| stage | " + " | ".join(results) + " |")
    print("|---|" + "---|" * len(results))
    for name in names:
        print(f"| {name} | " + " | ".join(f"{r[name]:.2f}" for r in results.values()) + " |")
    if args.json:
        args.json.write_text(json.dumps({"device": device, "jax": jax.__version__, "ms": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
