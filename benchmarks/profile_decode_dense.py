"""Why the decode op read 0.84x cuDNN on clustered keys at 8.4M cached rows (batch 32 x 32K,
GQA 32/8, D 128, bf16; H100 at 5c1f3a2) while it read 1.00x on uniform keys of the same shape,
taking the dense cuDNN path either way: the op, ``kernels.dense.cudnn_unmasked`` and SDPA's
cuDNN backend, each replayed from a CUDA graph, on both kinds of keys, in one process.

    python benchmarks/profile_decode_dense.py [--batch 32] [--keys 32768] [--out DIR]
"""

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_decode import _bench, op_time, synthetic  # noqa: E402
from provenance import card_tag, env_record, write_json  # noqa: E402

from aether_compile import kv_cache  # noqa: E402
from aether_compile.kernels import dense as kernel_dense  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--keys", type=int, default=32768)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    env = env_record()
    record = {"env": env, "config": vars(args), "rows": []}
    from torch.nn.attention import SDPBackend, sdpa_kernel

    scale, eps = 128 ** -0.5, 1e-2
    # both orders: a clock or thermal drift over the run shows as the second kind's loss
    for kind in ("uniform", "clustered", "uniform", "clustered"):
        q, k, v = synthetic(kind, args.batch, 32, 8, args.keys, 128, torch.bfloat16, "cuda")
        row = {"kind": kind}
        row["cudnn_unmasked_us"] = _bench(lambda: kernel_dense.cudnn_unmasked(q, k, v, scale))
        # cudnn_unmasked asks for the log-sum-exp; SDPA's inference call does not: whether that
        # picks a different (data-dependent) cuDNN engine
        no_lse = lambda: kernel_dense._cudnn_sdpa(q, k, v, False, scale, with_lse=False)[0]  # noqa
        try:
            # another engine may round differently: the largest difference from the op's dense
            # output, not bit equality, tells whether it reads the right heads
            want = kernel_dense.cudnn_unmasked(q, k, v, scale)
            row["cudnn_no_lse_max_diff"] = None if want is None else \
                (no_lse().float() - want.float()).abs().max().item()
            row["cudnn_no_lse_us"] = _bench(no_lse)
        except RuntimeError as e:  # cuDNN refuses these inputs without the lse
            row["cudnn_no_lse_us"] = f"error: {str(e).splitlines()[0][:120]}"
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            row["sdpa_cudnn_us"] = _bench(lambda: F.scaled_dot_product_attention(
                q, k, v, scale=scale, enable_gqa=True))
        op = lambda: torch.ops.aether.decode_attention(q, k, v, None, False, scale, eps)  # noqa
        row["op_us"], row["op_paths"] = op_time(op)  # as bench_decode times it
        row["dense_decode_us"] = _bench(lambda: kv_cache.dense_decode(q, k, v, None, False, scale))
        row["op_again_us"] = _bench(op)
        print(json.dumps(row), flush=True)
        record["rows"].append(row)
        write_json(os.path.join(args.out, f"profile_decode_dense_{card_tag(env)}.json"), record)
        del q, k, v
        kv_cache.forget_summaries()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
