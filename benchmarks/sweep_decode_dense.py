"""The decode op's dense path with a mask, swept: ``kernels.decode.attend_all`` (the split-K
kernel the op runs where transformers passes a mask at each decode step) over its
meta-parameters, against cuDNN without the mask (the fastest dense, what the op is held to) and
SDPA with it, at the decode grid's shapes. Also the op without a mask on uniform and clustered
keys of one shape, where the decode grid read 0.84x on clustered data only.

    python benchmarks/sweep_decode_dense.py --out benchmarks/results

Times are CUDA-graph replays (bench_decode._bench). Writes sweep_decode_dense_<card>.json; the
defaults in kernels/decode.py (ATTEND_CONFIG, ATTEND_ALL_CONFIG) come from it.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_decode import _bench, synthetic  # noqa: E402
from provenance import card_tag, env_record, write_json  # noqa: E402

from aether_compile import kv_cache  # noqa: E402
from aether_compile.kernels import decode, dense  # noqa: E402

HQ, HKV, D = 32, 8, 128
SHAPES = [(1, 8192), (1, 32768), (1, 131072), (8, 32768), (8, 8192), (32, 32768)]


def _repeat_kv(x, n: int):
    """transformers' repeat_kv: each KV head's cache once per query head of its group (a copy)."""
    B, H, S, D = x.shape
    return x[:, :, None].expand(B, H, n, S, D).reshape(B, H * n, S, D)


def _us(t) -> str:
    return f"{t:.1f}" if isinstance(t, float) else str(t)


def timed(fn):
    try:
        return _bench(fn)
    except Exception as e:  # noqa: BLE001 (a configuration the compiler refuses)
        return f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"


def sweep_shape(B: int, S: int, quick: bool = False) -> dict:
    q, k, v = synthetic("uniform", B, HQ, HKV, S, D, torch.bfloat16, "cuda")
    scale = D ** -0.5
    mask = torch.ones(B, 1, 1, S, dtype=torch.bool, device="cuda")  # transformers' decode mask
    bias = kv_cache._kernel_bias(mask, B, 1, S, False, q.device)
    row = {"batch": B, "kv": S,
           "cudnn_unmasked_us": timed(lambda: dense.cudnn_unmasked(q, k, v, scale)),
           "sdpa_masked_us": timed(lambda: F.scaled_dot_product_attention(
               q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)),
           # what the default compile runs where transformers repeats K and V per query head
           # (its SDPA path with a mask): the expansion's copy and SDPA, then SDPA alone
           "sdpa_repeat_kv_us": timed(lambda: F.scaled_dot_product_attention(
               q, _repeat_kv(k, HQ // HKV), _repeat_kv(v, HQ // HKV), attn_mask=mask,
               scale=scale)),
           "default": dict(decode.ATTEND_ALL_CONFIG),
           "default_us": timed(lambda: decode.attend_all(q, k, v, scale, bias))}
    k_all, v_all = _repeat_kv(k, HQ // HKV), _repeat_kv(v, HQ // HKV)
    row["sdpa_expanded_us"] = timed(lambda: F.scaled_dot_product_attention(
        q, k_all, v_all, attn_mask=mask, scale=scale))
    del k_all, v_all
    grid = []
    # keys per split = min_steps * keys: the split count follows from it (default_splits)
    for keys, warps, stages, split_keys, per_sm in () if quick else itertools.product(
            (64, 128), (4, 8), (2, 3), (512, 1024, 2048), (8, 16)):
        cfg = {"keys": keys, "num_warps": warps, "stages": stages, "programs_per_sm": per_sm,
               "min_steps": split_keys // keys}
        grid.append({**cfg, "us": timed(lambda: decode.attend_all(q, k, v, scale, bias,
                                                                  config=cfg))})
    from torch.nn.attention import SDPBackend, sdpa_kernel
    for name in ("CUDNN_ATTENTION", "EFFICIENT_ATTENTION", "FLASH_ATTENTION", "MATH"):
        with sdpa_kernel([getattr(SDPBackend, name)]):
            row[f"sdpa_masked_{name.split('_')[0].lower()}_us"] = timed(
                lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                                       enable_gqa=True))
    row["grid"] = grid
    best = min((r for r in grid if isinstance(r["us"], float)), key=lambda r: r["us"],
               default={**row["default"], "us": row["default_us"]})
    row["best"] = best
    print({n: r for n, r in row.items() if n.startswith("sdpa")}, flush=True)
    print(f"B{B} S{S} H{HQ}/{HKV} D{D}: cudnn unmasked {_us(row['cudnn_unmasked_us'])} us, "
          f"SDPA masked {_us(row['sdpa_masked_us'])}, attend_all default "
          f"{_us(row['default_us'])}, best {_us(best['us'])} {best}; repeat_kv and SDPA "
          f"{_us(row['sdpa_repeat_kv_us'])} (SDPA alone {_us(row['sdpa_expanded_us'])})",
          flush=True)
    return row


def clustered_against_uniform(B: int, S: int) -> dict:
    """The op without a mask and cuDNN on uniform and clustered keys of one shape."""
    row = {"batch": B, "kv": S}
    scale = D ** -0.5
    for kind in ("uniform", "clustered"):
        q, k, v = synthetic(kind, B, HQ, HKV, S, D, torch.bfloat16, "cuda")
        kv_cache.forget_summaries()
        op = lambda: torch.ops.aether.decode_attention(q, k, v, None, False, scale, 1e-2)  # noqa: E731
        for _ in range(2):
            op()
        row[kind] = {"cudnn_unmasked_us": timed(lambda: dense.cudnn_unmasked(q, k, v, scale)),
                     "sdpa_us": timed(lambda: F.scaled_dot_product_attention(
                         q, k, v, scale=scale, enable_gqa=True)),
                     "op_us": timed(op),
                     "k_stride": list(k.stride()), "calls": dict(kv_cache.CALLS)}
        kv_cache.CALLS.clear()
        print(f"{kind} B{B} S{S}: {row[kind]}", flush=True)
        del q, k, v
    return row


def main(argv=None):
    global HQ, HKV, D
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--shapes", nargs="*", default=[f"{b}x{s}" for b, s in SHAPES])
    ap.add_argument("--quick", action="store_true",
                    help="the defaults and SDPA's backends only, no meta-parameter grid")
    ap.add_argument("--heads", type=int, nargs=3, metavar=("HQ", "HKV", "D"), default=None,
                    help=f"query heads, KV heads, head dim (default {HQ} {HKV} {D}; the long LM "
                         "that bench_generate runs: 8 2 64); another than the default tags the "
                         "file")
    ap.add_argument("--no-clustered", action="store_true",
                    help="leave out the op on clustered against uniform keys")
    args = ap.parse_args(argv)
    tag = ""
    if args.heads and tuple(args.heads) != (HQ, HKV, D):
        HQ, HKV, D = args.heads
        tag = f"_h{HQ}_{HKV}_d{D}"
    record = {"env": env_record(), "heads": {"query": HQ, "kv": HKV, "dim": D}, "shapes": [],
              "clustered": None}
    path = os.path.join(args.out, f"sweep_decode_dense_{card_tag(record['env'])}{tag}.json")
    for shape in args.shapes:
        B, S = map(int, shape.split("x"))
        record["shapes"].append(sweep_shape(B, S, args.quick))
        write_json(path, record)
    if not args.no_clustered:
        record["clustered"] = clustered_against_uniform(8, 131072)
        write_json(path, record)


if __name__ == "__main__":
    main()
