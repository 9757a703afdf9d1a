"""Meta-parameter sweeps of the prefill's costliest kernels, where the profiles say the time goes
(docs/results.md): the bool mask statistics on a static cache's prefill mask (27 ms a layer on
the H100 inside a compiled generate with the former kernel, for a 4.3 GB mask that streams in
about 1.3 ms), the op's kernel against that former one; on W2 at 32K and 128K the geometry, the
bounds and the plan kernel (with how many blocks it sorts, and the op's time and kept fraction
for each), then the attention pass over warps and pipeline stages.

    python benchmarks/sweep_prefill_kernels.py --out benchmarks/results [--parts bounds attention]

Each kernel is launched directly on the op's own inputs with every configuration in the grid and
timed with do_bench (median); the op's default configuration is marked. Writes
sweep_prefill_kernels_<card>.json; a cut-short run keeps the cases that finished.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import triton
import triton.language as tl

import aether_compile
from aether_compile.kernels import bounds as kernel_bounds
from aether_compile.kernels import launch
from aether_compile.kernels import plan as kernel_plan
from aether_compile.kernels.certificate import BOUND_REL_SLACK, sort_index_bits
from aether_compile.kernels.plan import BOOL_MASK_BLOCKS, BOOL_MASK_ROWS, MASK_STATS_BLOCKS
from aether_compile.workloads import WORKLOADS

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from profile_stages import STATIC_CACHE_PREFILL  # noqa: E402
from provenance import card_tag, env_record, write_json  # noqa: E402

H, D, BLOCK_M, BLOCK_N = 16, 128, 128, 64


def bench(fn, rep=30) -> float | str:
    try:
        return float(triton.testing.do_bench(fn, warmup=5, rep=rep, return_mode="median"))
    except Exception as e:  # noqa: BLE001  (a configuration that does not compile or fit)
        return f"{type(e).__name__}: {str(e)[:120]}"


def sweep_bounds(N: int) -> dict:
    """The bounds kernel on W2's queries and geometry, over (BLOCK_J, warps, stages)."""
    q, k, _ = WORKLOADS["clustered"](1, H, N, D, dtype=torch.float16, device="cuda", seed=0)
    nqt, nkb = N // BLOCK_M, N // BLOCK_N
    geo16 = torch.empty(H * nkb, 3, D, device="cuda", dtype=torch.float16)
    geo_norm = torch.empty(H * nkb, 4, device="cuda")

    def geometry(warps=4):
        kernel_bounds._geometry_kernel[(H * nkb,)](
            k, geo16, geo_norm, *k.stride(), N, D, nkb, H, BLOCK_N=BLOCK_N, D_PAD=D,
            WITH_BOX=False, num_warps=warps)

    # One per-block reduction chain a program: fewer warps trade barriers for registers.
    row = {"N": N, "geometry_ms": {f"w{w}": bench(lambda: geometry(w)) for w in (1, 2, 4, 8)},
           "geometry_default": f"w{kernel_plan.GEOMETRY_WARPS}"}
    geometry()
    bounds = torch.empty(1, H, nqt, nkb, device="cuda")
    default = launch.bounds_config(D, "cuda", False)
    times = {}
    for block_j in (64, 128, 256):
        for warps in (4, 8):
            for stages in (1, 2, 3, 4):
                config = {"BLOCK_J": block_j, "num_warps": warps, "num_stages": stages}
                times[f"bj{block_j}_w{warps}_s{stages}"] = bench(
                    lambda: kernel_bounds._bounds_kernel[(H * nqt,)](
                        q, geo16, geo_norm, q, bounds, *q.stride(), 0, 0, D ** -0.5, N, N, D,
                        nqt, nkb, H, 1, HAS_MASK=False, IS_CAUSAL=False, SLACK=BOUND_REL_SLACK,
                        USE_BOX=False, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, D_PAD=D, **config))
    row["bounds_ms"] = times
    row["bounds_default"] = (f"bj{default['BLOCK_J']}_w{default['num_warps']}"
                             f"_s{default['num_stages']}")
    # the same product on cuBLAS, [N, D] x [D, nKB] per head (written out, so an upper anchor)
    mu = geo16[:, 0].view(H, nkb, D)
    row["cublas_q_mu_ms"] = bench(lambda: torch.matmul(q[0], mu.transpose(1, 2)))
    # the plan kernel (sort and tail sums) on these bounds, over warps
    kernel_bounds._bounds_kernel[(H * nqt,)](
        q, geo16, geo_norm, q, bounds, *q.stride(), 0, 0, D ** -0.5, N, N, D, nqt, nkb, H, 1,
        HAS_MASK=False, IS_CAUSAL=False, SLACK=BOUND_REL_SLACK, USE_BOX=False, BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N, D_PAD=D, **default)
    order = torch.empty(1, H, nqt, nkb, device="cuda", dtype=torch.int32)
    tail = torch.empty(1, H, nqt, nkb, device="cuda")
    n_live = torch.empty(1, H, nqt, device="cuda", dtype=torch.int32)
    pad = max(16, triton.next_power_of_2(nkb))
    # the plan kernel over warps and how many blocks of a row it sorts (TOP; pad: all of them)
    tops = sorted({pad, pad // 2, pad // 4, pad // 8} & set(range(16, pad + 1)), reverse=True)
    row["plan_ms"] = {f"top{top}_w{warps}": bench(lambda: kernel_plan._plan_kernel[(H * nqt,)](
        bounds, order, tail, n_live, N, N, nqt, nkb, IS_CAUSAL=False, BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N, NKB_PAD=pad, IDX_BITS=sort_index_bits(nkb), TOP=top, num_warps=warps))
        for top in tops for warps in (4, 8, 16)}
    row["plan_default"] = f"top{kernel_plan.sorted_blocks(nkb)}_w{kernel_plan.plan_warps(pad)}"
    # the op (eager, W2's eps) per TOP: a partial sort visits blocks past the sorted ones in
    # block order, so its kept fraction can grow where it saves plan time
    row["op_by_sorted_blocks"] = {}
    v = WORKLOADS["clustered"](1, H, N, D, dtype=torch.float16, device="cuda", seed=0)[2]
    for top in tops:
        os.environ["AETHER_PLAN_SORTED"] = str(0 if top == pad else top)
        try:
            _, st = aether_compile.attention(q, k, v, return_stats=True)
            row["op_by_sorted_blocks"][f"top{top}"] = {
                "ms": bench(lambda: aether_compile.attention(q, k, v)),
                "kept_fraction": float(st.kept_fraction)}
        finally:
            del os.environ["AETHER_PLAN_SORTED"]
    return row


def sweep_attention(N: int) -> dict:
    """The attention pass itself (VISIT_CERTIFY: probe, certified count, re-certified visit) on
    W2's plan, over the kernel's keys per step, warps and pipeline stages (the op's:
    ``launch.key_step``, ``launch.launch_config``)."""
    from aether_compile.kernels import forward as kernel_forward

    q, k, v = WORKLOADS["clustered"](1, H, N, D, dtype=torch.float16, device="cuda", seed=0)
    plan = kernel_plan.plan_attention(q, k, v)
    n_visit = torch.empty(1, H, plan.order.shape[-2], device="cuda", dtype=torch.int32)
    eps = 1e-3
    default = launch.launch_config(plan.block_m, D, D, "cuda")
    times = {}
    real, real_step = kernel_forward.launch_config, launch.KEY_STEP
    steps = sorted({64, plan.block_n})  # keys per online-softmax step (launch.KEY_STEP)
    try:
        for step in steps:
            launch.KEY_STEP = step
            # 4 warps and 1 or 4 stages lost by 10-200 % at 2368903 (or did not fit)
            for warps in (8,):
                for stages in (2, 3):
                    kernel_forward.launch_config = lambda *a, w=warps, st=stages: {
                        "num_warps": w, "num_stages": st}
                    times[f"k{step}_w{warps}_s{stages}"] = bench(
                        lambda: kernel_forward.launch_attention(q, k, v, plan, eps, n_visit, None,
                                                                certify=True), rep=20)
    finally:
        kernel_forward.launch_config, launch.KEY_STEP = real, real_step
    # the visit loops warp-specialized (forward.WARP_SPECIALIZE; loads in producer warps), K and
    # V through tensor descriptors (forward.TMA_LOADS), and both, at the op's own launch
    # configuration: an error string where this Triton or card refuses one
    real_flags = kernel_forward.WARP_SPECIALIZE, kernel_forward.TMA_LOADS
    try:
        for name, ws, tma in (("warp_specialized", True, False), ("tma", False, True),
                              ("tma_warp_specialized", True, True)):
            kernel_forward.WARP_SPECIALIZE, kernel_forward.TMA_LOADS = ws, tma
            times[name] = bench(
                lambda: kernel_forward.launch_attention(q, k, v, plan, eps, n_visit, None,
                                                        certify=True), rep=20)
            print(f"attention {N} {name}: {times[name]}", flush=True)
    finally:
        kernel_forward.WARP_SPECIALIZE, kernel_forward.TMA_LOADS = real_flags
    step = launch.key_step(plan.block_n, "cuda")
    # the probe's length and the re-certification step (forward.PROBE_BLOCKS, RECERT_BLOCKS):
    # the visit is cut into loops of that many blocks, each pipelined apart
    # and whether re-certification tests each row's own tail (AETHER_ROW_TAILS; "_tile": only
    # the tile's), the first pair the row tails' own measurement
    recert = {}
    real_probe = kernel_forward.PROBE_BLOCKS
    try:
        for probe, every, rows in ((8, 8, "0"), (8, 8, "1"), (8, 0, "1"), (8, 16, "1"),
                                   (8, 4, "1"), (4, 8, "1"), (16, 8, "1"), (8, 16, "0")):
            kernel_forward.PROBE_BLOCKS = probe
            os.environ["AETHER_RECERT_BLOCKS"] = str(every)
            os.environ["AETHER_ROW_TAILS"] = rows
            ms = bench(lambda: kernel_forward.launch_attention(q, k, v, plan, eps, n_visit, None,
                                                               certify=True), rep=20)
            kept = float(kernel_plan.kept_map(plan, n_visit).float().mean())
            name = f"probe{probe}_recert{every}" + ("_tile" if rows == "0" and every else "")
            recert[name] = {"ms": ms, "kept": kept}
            print(f"recert {N} {name}: {ms} ms, kept {kept:.4f}", flush=True)
    finally:
        kernel_forward.PROBE_BLOCKS = real_probe
        os.environ.pop("AETHER_RECERT_BLOCKS", None)
        os.environ.pop("AETHER_ROW_TAILS", None)
    # FlexAttention on exactly the blocks this pass visited, in the same run (issue 22's
    # kernel_vs_flex_same_blocks)
    from bench_attention import flex_anchors
    kernel_forward.launch_attention(q, k, v, plan, eps, n_visit, None, certify=True)
    kept = kernel_plan.kept_map(plan, n_visit)
    flex = flex_anchors(q, k, v, kept, plan.block_m, plan.block_n)
    # Below launch.LONG_KEYS the plan's key blocks are 64 keys: the same length on 128-key blocks
    # (coarser, so more keys kept; half the blocks, each visited in 64- or 128-key steps)
    long_blocks = {}
    if plan.block_n < 128:
        plan128 = kernel_plan.plan_attention(q, k, v, block_n=128)
        n_visit128 = torch.empty(1, H, plan128.order.shape[-2], device="cuda", dtype=torch.int32)
        try:
            for keys in (64, 128):
                launch.KEY_STEP = keys
                long_blocks[f"k{keys}_ms"] = bench(lambda: kernel_forward.launch_attention(
                    q, k, v, plan128, eps, n_visit128, None, certify=True), rep=20)
        finally:
            launch.KEY_STEP = real_step
        long_blocks["kept"] = float(kernel_plan.kept_map(plan128, n_visit128).float().mean())
        long_blocks["plan_ms"] = bench(lambda: kernel_plan.plan_attention(q, k, v, block_n=128))
        long_blocks["default_plan_ms"] = bench(lambda: kernel_plan.plan_attention(q, k, v))
        del plan128
    return {"N": N, "block_n": plan.block_n, "attention_ms": times, "probe_recert": recert,
            "blocks_128": long_blocks or None,
            "flex_same_blocks_ms": flex.get("flex_same_blocks"),
            "kept": float(kept.float().mean()),
            "attention_default": f"k{step}_w{default['num_warps']}_s{default['num_stages']}"}


def sweep_row_tails(N: int) -> dict:
    """The pass's row tails on W2's plan (VISIT_CERTIFY, the op's re-certification step): ms and
    kept for the anchor's reach past the tile's count (forward.ROW_ANCHOR_BLOCKS, its tile tail
    2^-ROW_ANCHOR_LOG2 of the threshold), the positions bounded per step (ROW_SCAN_BLOCKS) and
    the least probe-certified count of a tile that searches (ROW_MIN_VISIT_BLOCKS),
    against the tile's tail alone ("tile", the op's default) and no re-certification at all
    ("probe_only")."""
    from aether_compile.kernels import forward as kernel_forward

    q, k, v = WORKLOADS["clustered"](1, H, N, D, dtype=torch.float16, device="cuda", seed=0)
    plan = kernel_plan.plan_attention(q, k, v)
    n_visit = torch.empty(1, H, plan.order.shape[-2], device="cuda", dtype=torch.int32)
    eps, out = 1e-3, {}
    real = (kernel_forward.ROW_ANCHOR_BLOCKS, kernel_forward.ROW_ANCHOR_LOG2,
            kernel_forward.ROW_SCAN_BLOCKS, kernel_forward.ROW_MIN_VISIT_BLOCKS)
    # aA_lL_sS[_mM]: anchor reach A positions, its tile tail 2^-L of the threshold, S positions a
    # step, only tiles whose probe certified at least M blocks
    grid = [("tile", None), ("probe_only", "no recert"), ("a256_l3_s32", (256, 3.0, 32, 0)),
            ("a256_l3_s32_m32", (256, 3.0, 32, 32)), ("a64_l3_s32_m32", (64, 3.0, 32, 32)),
            ("a64_l3_s32", (64, 3.0, 32, 0)), ("a16_l3_s32", (16, 3.0, 32, 0)),
            ("a0_l3_s32", (0, 3.0, 32, 0)), ("a64_l1_s32", (64, 1.0, 32, 0)),
            ("a64_l3_s16", (64, 3.0, 16, 0)), ("a256_l3_s32_m48", (256, 3.0, 32, 48))]
    try:
        for name, cfg in grid:
            os.environ["AETHER_ROW_TAILS"] = "1" if isinstance(cfg, tuple) else "0"
            if cfg == "no recert":  # the count fixed from the probe alone
                os.environ["AETHER_RECERT_BLOCKS"] = "0"
            else:
                os.environ.pop("AETHER_RECERT_BLOCKS", None)
            if isinstance(cfg, tuple):
                (kernel_forward.ROW_ANCHOR_BLOCKS, kernel_forward.ROW_ANCHOR_LOG2,
                 kernel_forward.ROW_SCAN_BLOCKS, kernel_forward.ROW_MIN_VISIT_BLOCKS) = cfg
            ms = bench(lambda: kernel_forward.launch_attention(q, k, v, plan, eps, n_visit, None,
                                                               certify=True), rep=20)
            kept = float(kernel_plan.kept_map(plan, n_visit).float().mean())
            out[name] = {"ms": ms, "kept": kept}
            print(f"row_tails {N} {name}: {ms} ms, kept {kept:.4f}", flush=True)
    finally:
        (kernel_forward.ROW_ANCHOR_BLOCKS, kernel_forward.ROW_ANCHOR_LOG2,
         kernel_forward.ROW_SCAN_BLOCKS, kernel_forward.ROW_MIN_VISIT_BLOCKS) = real
        os.environ.pop("AETHER_ROW_TAILS", None)
        os.environ.pop("AETHER_RECERT_BLOCKS", None)
    return {"N": N, "block_n": plan.block_n, "row_tails": out}


@triton.jit
def _mask_stats_per_entry_kernel(
    Mask, MaskMax, NotCausal,
    stride_mb, stride_mh, stride_mm, stride_mn,
    L, S, n_qt, n_kb, H_M, kb_per_prog,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # The op's bool mask statistics before _bool_mask_stats_kernel (the baseline it is timed
    # against): every block reduced in the loop, every entry compared with the causal pattern.
    pid = tl.program_id(0).to(tl.int64)
    j_lo = tl.program_id(1) * kb_per_prog
    j_hi = tl.minimum(j_lo + kb_per_prog, n_kb)
    t = pid % n_qt
    bh = pid // n_qt
    o_m = t * BLOCK_M + tl.arange(0, BLOCK_M)
    base = Mask + (bh // H_M) * stride_mb + (bh % H_M) * stride_mh + o_m[:, None] * stride_mm
    not_causal = tl.zeros([BLOCK_M], tl.int32)
    for j in range(j_lo, j_hi):
        o_n = j * BLOCK_N + tl.arange(0, BLOCK_N)
        valid = (o_m < L)[:, None] & (o_n[None, :] < S)
        keep = tl.load(base + o_n[None, :] * stride_mn, mask=valid, other=0)
        any_keep = tl.max(tl.max((keep != 0).to(tl.int32), 1), 0)
        differs = (keep != 0) != (o_n[None, :] <= o_m[:, None])
        not_causal += tl.sum((differs & valid).to(tl.int32), 1)
        tl.store(MaskMax + pid * n_kb + j, tl.where(any_keep > 0, 0.0, -float("inf")))
    tl.atomic_add(NotCausal + pid, tl.sum(not_causal, 0))


# Under dynamic shapes Inductor cannot tell that a symbolic length or stride is a multiple of 16,
# so its launch leaves them unspecialised and the loads go byte by byte; Triton's own launch
# specialises them at run time. The sweep times both (the second a copy that never specialises).
_SIZE_ARGS = ["stride_mb", "stride_mh", "stride_mm", "L", "S"]
_KERNELS = {
    (name, specialised): (kernel if specialised
                          else triton.jit(do_not_specialize=_SIZE_ARGS)(kernel.fn))
    for name, kernel in (("per_entry", _mask_stats_per_entry_kernel),
                         ("op", kernel_bounds._bool_mask_stats_kernel))
    for specialised in (True, False)}


def mask_stats_per_entry(m, mask_max, not_causal, L, S, nqt, nkb, kb=MASK_STATS_BLOCKS, warps=4,
                         specialised=True):
    """The former bool kernel on a [B, 1, L, S] bool mask."""
    return _KERNELS["per_entry", specialised][(m.shape[0] * nqt, triton.cdiv(nkb, kb))](
        m, mask_max, not_causal, *m.stride(), L, S, nqt, nkb, 1, kb,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=warps)


def mask_stats_op(m, mask_max, not_causal, L, S, nqt, nkb, rows=BOOL_MASK_ROWS,
                  kb=BOOL_MASK_BLOCKS, warps=4, specialised=True):
    """``plan.mask_statistics``' launch of the op's bool kernel, its meta-parameters exposed."""
    return _KERNELS["op", specialised][(m.shape[0] * nqt, triton.cdiv(nkb, kb))](
        m, mask_max, not_causal, *m.stride(), L, S, nqt, nkb, 1,
        ROWS=rows, KB=kb, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=warps)


def sweep_mask_stats(B, H, Hkv, L, S, D) -> dict:
    """The mask statistics on a static cache's prefill mask: the op's bool kernel over (rows per
    load, key blocks per program, warps) and the former kernel, each launched specialised (as
    Triton launches it) and not (as Inductor does under dynamic shapes)."""
    cols, rows = torch.arange(S, device="cuda"), torch.arange(L, device="cuda")
    mask = (cols[None, :] <= rows[:, None]).expand(B, 1, L, S).contiguous()
    nqt, nkb = triton.cdiv(L, BLOCK_M), triton.cdiv(S, BLOCK_N)
    mask_max = torch.empty(B, 1, nqt, nkb, device="cuda")
    not_causal = torch.zeros(B * nqt, device="cuda", dtype=torch.int32)
    times = {}
    for specialised in (True, False):
        tag = "spec" if specialised else "nospec"
        for kb in (4, 16):
            times[f"per_entry_{tag}_kb{kb}_w4"] = bench(lambda: mask_stats_per_entry(
                mask, mask_max, not_causal, L, S, nqt, nkb, kb, 4, specialised))
        for n_rows in (4, 8, 16):
            for kb in (8, 16, 32):
                for warps in (4, 8):
                    times[f"op_{tag}_rows{n_rows}_kb{kb}_w{warps}"] = bench(lambda: mask_stats_op(
                        mask, mask_max, not_causal, L, S, nqt, nkb, n_rows, kb, warps, specialised))
    return {"B": B, "L": L, "S": S, "mask_bytes": mask.numel(), "mask_stats_ms": times,
            "mask_stats_default": f"op_{{spec,nospec}}_rows{BOOL_MASK_ROWS}_kb{BOOL_MASK_BLOCKS}_w4",
            "read_mask_once_ms": bench(lambda: mask.view(torch.uint8).amax())}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--lengths", type=int, nargs="*", default=[32768, 131072])
    ap.add_argument("--parts", nargs="*", default=["mask", "bounds", "attention"],
                    choices=["mask", "bounds", "attention", "row_tails"])
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("the sweep needs a CUDA GPU")
    record = {"env": env_record(), "bounds": [], "mask_stats": None}
    path = os.path.join(args.out, f"sweep_prefill_kernels_{card_tag(record['env'])}.json")
    if "mask" in args.parts:
        record["mask_stats"] = sweep_mask_stats(**STATIC_CACHE_PREFILL)
        write_json(path, record)
        print("mask stats:", record["mask_stats"], flush=True)
        torch.cuda.empty_cache()
    for N in args.lengths if "bounds" in args.parts else ():
        record["bounds"].append(sweep_bounds(N))
        write_json(path, record)
        print(f"bounds {N}:", record["bounds"][-1], flush=True)
        torch.cuda.empty_cache()
    record["attention"] = []
    for N in args.lengths if "attention" in args.parts else ():
        record["attention"].append(sweep_attention(N))
        write_json(path, record)
        print(f"attention {N}:", record["attention"][-1], flush=True)
        torch.cuda.empty_cache()
    record["row_tails"] = []
    for N in args.lengths if "row_tails" in args.parts else ():
        record["row_tails"].append(sweep_row_tails(N))
        write_json(path, record)
        torch.cuda.empty_cache()
    print(f"-> {path}")


if __name__ == "__main__":
    main()
