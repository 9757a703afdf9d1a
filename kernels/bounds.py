"""Key-block geometry, mask statistics and the per-(query tile, key block) score bound: the
first three stages of the plan, each one Triton kernel (``plan.plan_attention`` launches them).

1. ``_geometry_kernel``: per key block, centroid mu, radius r, box centre c and half-width h,
   stored as fp16 unit vectors plus fp32 norms (so the bound matmuls run on tensor cores).
2. ``_mask_stats_kernel`` and ``_bool_mask_stats_kernel`` (masks only): per (query tile, key
   block), the mask's maximum (-inf: all masked, so the block is skipped outright) and how many
   entries differ from a causal mask.
3. ``_bounds_kernel``: per query tile and key block, the max over rows of the ball bound (its min
   with the box bound under AETHER_BOX_BOUND=1) plus slack, plus the mask maximum; causal blocks
   past the diagonal get -inf.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .certificate import MASK_FLOOR, RADIUS_INFLATE

# Globals read inside @triton.jit must be constexpr.
_MASK_FLOOR = tl.constexpr(MASK_FLOOR)
_RADIUS_INFLATE = tl.constexpr(RADIUS_INFLATE)


@triton.jit
def _geometry_kernel(
    K, Geo16, GeoNorm,
    stride_kb, stride_kh, stride_kn, stride_kd,
    S, D, n_kb, H_KV,
    BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, WITH_BOX: tl.constexpr,
):
    # One program per (batch, kv head, key block). Geo16: [B*Hkv*nKB, 3, D_PAD] fp16 unit vectors
    # (mu, c, h); GeoNorm: [B*Hkv*nKB, 4] fp32 (|mu|, r, |c|, |h|). Without WITH_BOX (the bounds
    # kernel's USE_BOX off, the default) c, h and their norms are left unwritten: nothing reads
    # them, and the box's two reductions over the block are a third of the work.
    pid = tl.program_id(0).to(tl.int64)
    j = pid % n_kb
    bh = pid // n_kb
    b = bh // H_KV
    h = bh % H_KV
    o_n = j * BLOCK_N + tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, D_PAD)
    m_n = o_n < S
    m_d = o_d < D
    p_k = K + b * stride_kb + h * stride_kh + o_n[:, None] * stride_kn + o_d[None, :] * stride_kd
    b_k = tl.load(p_k, mask=m_n[:, None] & m_d[None, :], other=0.0).to(tl.float32)  # [BN, D]
    count = tl.sum(m_n.to(tl.float32), 0)
    b_mu = tl.sum(b_k, 0) / count  # [D]
    diff = tl.where(m_n[:, None] & m_d[None, :], b_k - b_mu[None, :], 0.0)
    radius = tl.sqrt(tl.max(tl.sum(diff * diff, 1), 0)) * (1.0 + _RADIUS_INFLATE)
    n_mu = tl.sqrt(tl.sum(b_mu * b_mu, 0))
    p_g = Geo16 + pid * 3 * D_PAD + o_d
    p_n = GeoNorm + pid * 4
    tl.store(p_g, (b_mu / tl.where(n_mu > 0, n_mu, 1.0)).to(tl.float16))
    tl.store(p_n, n_mu)
    tl.store(p_n + 1, radius)
    if WITH_BOX:
        lo = tl.min(tl.where(m_n[:, None], b_k, float("inf")), 0)
        hi = tl.max(tl.where(m_n[:, None], b_k, -float("inf")), 0)
        b_c = tl.where(m_d, (lo + hi) * 0.5, 0.0)
        b_h = tl.where(m_d, (hi - lo) * 0.5, 0.0)
        n_c = tl.sqrt(tl.sum(b_c * b_c, 0))
        n_h = tl.sqrt(tl.sum(b_h * b_h, 0))
        tl.store(p_g + D_PAD, (b_c / tl.where(n_c > 0, n_c, 1.0)).to(tl.float16))
        tl.store(p_g + 2 * D_PAD, (b_h / tl.where(n_h > 0, n_h, 1.0)).to(tl.float16))
        tl.store(p_n + 2, n_c)
        tl.store(p_n + 3, n_h)


@triton.jit
def _mask_stats_kernel(
    Mask, MaskMax, NotCausal,
    stride_mb, stride_mh, stride_mm, stride_mn,
    L, S, n_qt, n_kb, H_M, kb_per_prog,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Additive (float) masks; bool masks take _bool_mask_stats_kernel.
    # One program per (mask batch, mask head, query tile) and run of kb_per_prog key blocks (a
    # whole row of blocks per program left too few programs to keep the GPU busy on one shared
    # [L, S] mask). NotCausal (zeroed) accumulates the tile's count of entries that differ from a
    # top-left causal mask (keep j <= i): a zero total lets the dense dispatch run the mask as
    # is_causal (HF materialises causal masks).
    pid = tl.program_id(0).to(tl.int64)
    j_lo = tl.program_id(1) * kb_per_prog
    j_hi = tl.minimum(j_lo + kb_per_prog, n_kb)
    t = pid % n_qt
    bh = pid // n_qt
    b = bh // H_M
    h = bh % H_M
    o_m = t * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < L
    base = Mask + b * stride_mb + h * stride_mh + o_m[:, None] * stride_mm
    not_causal = tl.zeros([BLOCK_M], tl.int32)
    for j in range(j_lo, j_hi):
        o_n = j * BLOCK_N + tl.arange(0, BLOCK_N)
        valid = m_m[:, None] & (o_n[None, :] < S)
        causal_keep = o_n[None, :] <= o_m[:, None]
        add = tl.load(base + o_n[None, :] * stride_mn, mask=valid, other=-float("inf"))
        add = add.to(tl.float32)
        floored = tl.maximum(add, _MASK_FLOOR, propagate_nan=tl.PropagateNan.ALL)  # NaN stays
        # causal as HF writes it: 0 where kept, at most fp16's finfo.min where masked
        differs = tl.where(causal_keep, add != 0.0, ~(add <= -65504.0))
        add = tl.where(add == -float("inf"), add, floored)
        mx = tl.max(tl.max(add, 1), 0)
        # a NaN entry must reach its row (SDPA gives NaN there): never prune its block.
        # Explicit, since whether tl.max propagates NaN differs between backends.
        has_nan = tl.sum(tl.sum((add != add).to(tl.int32), 1), 0) > 0
        mx = tl.where(has_nan, float("inf"), mx)
        not_causal += tl.sum((differs & valid).to(tl.int32), 1)
        tl.store(MaskMax + pid * n_kb + j, mx)
    tl.atomic_add(NotCausal + pid, tl.sum(not_causal, 0))


@triton.jit
def _bool_mask_stats_kernel(
    Mask, MaskMax, NotCausal,
    stride_mb, stride_mh, stride_mm, stride_mn,
    L, S, n_qt, n_kb, H_M,
    ROWS: tl.constexpr, KB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # _mask_stats_kernel's outputs for a bool mask, with as little work per byte as possible: a
    # [B, 1, 32K, 32K + 256] prefill mask is 4 GB, and comparing every entry with the causal
    # pattern and reducing every block in the loop cost ~30 instructions a byte (the kernel ran at
    # ~5% of the bandwidth). One program per (mask batch and head, query tile) and run of KB key
    # blocks. The loop only adds each entry (kept: 1) into a register tile of ROWS rows; the
    # reductions run once, after it. The count of entries unlike top-left causal (keep j <= i)
    # needs no compare per entry either:
    #     unlike = causal_live - kept + 2 * kept_above,
    # where kept_above counts kept entries with j > i: whole columns right of the tile's last row,
    # plus the triangle of the BLOCK_M columns on its diagonal, which one short pass re-reads.
    pid = tl.program_id(0).to(tl.int64)
    t = pid % n_qt
    bh = pid // n_qt
    b = bh // H_M
    h = bh % H_M
    j0 = tl.program_id(1) * KB
    row0 = t * BLOCK_M
    o_n = j0 * BLOCK_N + tl.arange(0, KB * BLOCK_N)
    n_ok = o_n < S
    base = Mask + b * stride_mb + h * stride_mh
    acc = tl.zeros([ROWS, KB * BLOCK_N], tl.int32)
    for r in range(0, BLOCK_M, ROWS):
        o_m = row0 + r + tl.arange(0, ROWS)
        keep = tl.load(base + o_m[:, None] * stride_mm + o_n[None, :] * stride_mn,
                       mask=(o_m[:, None] < L) & n_ok[None, :], other=0)
        acc += (keep != 0).to(tl.int32)
    col_kept = tl.sum(acc, 0)  # [KB * BLOCK_N]
    block_kept = tl.sum(tl.reshape(col_kept, [KB, BLOCK_N]), 1)  # [KB]
    o_j = j0 + tl.arange(0, KB)
    tl.store(MaskMax + pid * n_kb + o_j, tl.where(block_kept > 0, 0.0, -float("inf")),
             mask=o_j < n_kb)
    kept = tl.sum(block_kept, 0)
    kept_above = tl.sum(tl.where(o_n >= row0 + BLOCK_M, col_kept, 0), 0)
    # The diagonal's columns (row0, row0 + BLOCK_M) that fall in this program's range.
    lo = tl.maximum(j0 * BLOCK_N, row0 + 1)
    hi = tl.minimum(tl.minimum((j0 + KB) * BLOCK_N, row0 + BLOCK_M), S)
    if lo < hi:
        o_d = row0 + tl.arange(0, BLOCK_M)
        d_ok = (o_d >= lo) & (o_d < hi)
        for r in range(0, BLOCK_M, ROWS):
            o_m = row0 + r + tl.arange(0, ROWS)
            above = (o_m[:, None] < L) & d_ok[None, :] & (o_d[None, :] > o_m[:, None])
            keep = tl.load(base + o_m[:, None] * stride_mm + o_d[None, :] * stride_mn,
                           mask=above, other=0)
            kept_above += tl.sum(tl.sum((keep != 0).to(tl.int32), 1), 0)
    unlike = 2 * kept_above - kept
    if tl.program_id(1) == 0:  # the tile's causal entries, counted once
        o_r = row0 + tl.arange(0, BLOCK_M)
        unlike += tl.sum(tl.where(o_r < L, tl.minimum(o_r + 1, S), 0).to(tl.int32), 0)
    tl.atomic_add(NotCausal + pid, unlike)


@triton.jit
def _bounds_kernel(
    Q, Geo16, GeoNorm, MaskMax, Bounds,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_xb, stride_xh,  # MaskMax strides over (batch, head); 0 where broadcast
    sm_scale, L, S, D, n_qt, n_kb, H, GROUP,
    HAS_MASK: tl.constexpr, IS_CAUSAL: tl.constexpr, SLACK: tl.constexpr, USE_BOX: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr, D_PAD: tl.constexpr,
):
    sm_scale = tl.cast(sm_scale, tl.float32)  # Inductor may pass floats as fp64 or constants
    pid = tl.program_id(0).to(tl.int64)
    t = pid % n_qt
    bh = pid // n_qt
    b = bh // H
    h = bh % H
    g = b * (H // GROUP) + h // GROUP  # flat (batch, kv head)
    o_m = t * BLOCK_M + tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, D_PAD)
    # Rows past L repeat row L - 1: the max over the tile's rows needs no mask then.
    o_m = tl.minimum(o_m, L - 1)
    p_q = Q + b * stride_qb + h * stride_qh + o_m[:, None] * stride_qm + o_d[None, :] * stride_qd
    b_q = tl.load(p_q, mask=o_d[None, :] < D, other=0.0).to(tl.float32)
    b_q = b_q * sm_scale  # q' = scale * q: the bound is then on the score itself, any sign of scale
    qn = tl.sqrt(tl.sum(b_q * b_q, 1))  # [BM]
    # NaN or inf in q: every block must be visited so it reaches the output, as in SDPA. Such
    # rows are zeroed and flagged here, once, and blocks whose summary is not finite are flagged
    # per block below, so that no NaN reaches the per-entry work of the loop (each entry then
    # costs one multiply-add, one multiply and its share of the max).
    bad_row = ~(qn < float("inf"))
    any_bad_row = tl.max(bad_row.to(tl.int32), 0) > 0
    qn = tl.where(bad_row, 0.0, qn)
    q_unit = tl.where(bad_row[:, None], 0.0, b_q / tl.where(qn > 0, qn, 1.0)[:, None])
    if USE_BOX:
        qa_unit = tl.abs(q_unit).to(tl.float16)
    q_unit = q_unit.to(tl.float16)
    last_row = tl.minimum(t * BLOCK_M + BLOCK_M, L) - 1
    # Key blocks on the matmul's M side, query rows on its N side: the max over the tile's rows
    # is then along N, which each warp group reduces in registers (a max over M crosses warps
    # through shared memory).
    q_unit_t = tl.trans(q_unit)  # [D_PAD, BM]
    if USE_BOX:
        qa_unit_t = tl.trans(qa_unit)
    for j0 in range(0, n_kb, BLOCK_J):
        o_j = j0 + tl.arange(0, BLOCK_J)
        m_j = o_j < n_kb
        p_g = Geo16 + (g * n_kb + o_j)[:, None] * (3 * D_PAD) + o_d[None, :]
        g_mu = tl.load(p_g, mask=m_j[:, None], other=0.0)
        p_n = GeoNorm + (g * n_kb + o_j) * 4
        n_mu = tl.load(p_n, mask=m_j, other=0.0)
        rad = tl.load(p_n + 1, mask=m_j, other=0.0)
        # A key block with NaN or inf holds a non-finite centroid norm or radius (its unit
        # centroid may then be NaN): flagged, so whatever the max makes of its NaN is overridden.
        bad = ~((n_mu < float("inf")) & (rad < float("inf")))
        dot_mu = tl.dot(g_mu, q_unit_t)  # [BJ, BM], fp16 in, fp32 accumulate
        bound = n_mu[:, None] * dot_mu + (rad + SLACK * (n_mu + rad))[:, None]  # the ball
        if USE_BOX:
            g_c = tl.load(p_g + D_PAD, mask=m_j[:, None], other=0.0)
            g_h = tl.load(p_g + 2 * D_PAD, mask=m_j[:, None], other=0.0)
            n_c = tl.load(p_n + 2, mask=m_j, other=0.0)
            n_h = tl.load(p_n + 3, mask=m_j, other=0.0)
            bad = bad | ~((n_c < float("inf")) & (n_h < float("inf")))
            dot_c = tl.dot(g_c, q_unit_t)
            dot_h = tl.dot(g_h, qa_unit_t)
            box = n_c[:, None] * dot_c + n_h[:, None] * dot_h + SLACK * (n_c + n_h)[:, None]
            bound = tl.minimum(bound, box)
        u = tl.max(qn[None, :] * bound, 1)  # [BJ]
        u = tl.where(bad | any_bad_row, float("inf"), u)
        if HAS_MASK:
            mmax = tl.load(MaskMax + b * stride_xb + h * stride_xh + t * n_kb + o_j, mask=m_j,
                           other=-float("inf"))
            u = u + mmax
        if IS_CAUSAL:
            u = tl.where(o_j * BLOCK_N > last_row, -float("inf"), u)
        tl.store(Bounds + pid * n_kb + o_j, u, mask=m_j)
