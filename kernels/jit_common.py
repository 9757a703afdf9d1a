"""``@triton.jit`` helpers shared by the forward and backward kernels."""

from __future__ import annotations

import triton
import triton.language as tl

from .certificate import MASK_FLOOR

_MASK_FLOOR = tl.constexpr(MASK_FLOOR)  # globals read inside @triton.jit must be constexpr


@triton.jit
def scores_log2(b_q, b_kt, o_m, o_n, m_m, m_n, m_ptr, stride_mm, stride_mn, sm_scale_log2,
                 HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, IS_CAUSAL: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):
    """Scores of a [BM, BN] tile in log2 units, -inf where masked (causal, mask, padding rows
    and keys). Shared by the forward and both backward kernels, so they see one function."""
    s = tl.dot(b_q, b_kt, input_precision=DOT_PRECISION) * sm_scale_log2
    keep = m_m[:, None] & m_n[None, :]
    if IS_CAUSAL:
        keep = keep & (o_n[None, :] <= o_m[:, None])
    if HAS_MASK:
        p_msk = m_ptr + o_m[:, None] * stride_mm + o_n[None, :] * stride_mn
        if MASK_IS_BOOL:
            keep = keep & (tl.load(p_msk, mask=m_m[:, None] & m_n[None, :], other=0) != 0)
        else:
            add = tl.load(p_msk, mask=m_m[:, None] & m_n[None, :], other=0.0).to(tl.float32)
            floored = tl.maximum(add, _MASK_FLOOR, propagate_nan=tl.PropagateNan.ALL)  # NaN stays
            add = tl.where(add == -float("inf"), add, floored)
            s = s + add * 1.4426950408889634
    return tl.where(keep, s, -float("inf"))
