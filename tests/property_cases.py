"""Random attention cases for the property tests and the reliability runner.

One case = shapes, dtype, mask (every SDPA broadcast form, bool or float), causal, scale, eps and
input data. ``check_case`` runs one implementation ("op": ``aether_compile.attention``;
"twopass" / "stop": the Triton kernels called directly with 16x16 tiles) on one device and
returns every property it violated:

* the output equals float64 attention restricted to the implementation's own kept blocks, within
  ``helpers.REL_TOL[dtype]`` (and the log-sum-exp agrees where finite);
* the certificate: every row's dropped softmax mass, recomputed in float64, is <= eps;
* no NaN/Inf on finite inputs, SDPA's output shape and dtype; no exception.

Devices (``device_from_env``: env ``AETHER_TEST_DEVICE``, default "cpu"; the runner's
``--device``). Inputs are always drawn on CPU (seeded generators, so a case is the same data on
either device) and then moved; the float64 oracle and the dropped-mass recomputation run on the
inputs' device.
  cpu   "op" is the plain-torch reference behind the registered op; the Triton modes need
        ``TRITON_INTERPRET=1`` (Triton's interpreter).
  cuda  "op" is the registered op as users call it: Triton, with its static and runtime dense
        dispatch (at the default --max-len 200 a case has at most 7 key blocks, <= PROBE_BLOCKS,
        so it takes the static dense choice: cuDNN/flash SDPA where a dense kernel is exact,
        e.g. fp16/bf16 without a mask, else eps-0 Triton), and the plain-torch reference for
        float64 and head dims outside [16, 256]; "twopass" / "stop" are the compiled kernels
        (leave ``TRITON_INTERPRET`` unset).

Used by ``tests/kernels/test_properties.py`` (asserts) and ``benchmarks/run_reliability.py`` (counts).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch
from hypothesis import strategies as st

import aether_compile
from aether_compile.kernels.certificate import MASK_FLOOR
from aether_compile.kernels.reference import dropped_mass
from aether_compile.ops import default_eps
from aether_compile.workloads import adversarial_qkv

from tests.helpers import REL_TOL, rel_err

PATHS = ("op", "twopass", "stop")
# Cases per path in each profile (tests/kernels/test_properties.py, benchmarks/run_reliability.py).
# "fuzz": random modules through the rewrite pass (tests/fuzz_modules.py).
PROFILE_CASES = {"ci": {"op": 200, "twopass": 20, "stop": 20, "fuzz": 40},
                 "large": {"op": 10_000, "twopass": 1_000, "stop": 1_000, "fuzz": 500}}
TRITON_BLOCK = 16  # tiles of the Triton modes (several blocks per case; tl.dot needs >= 16)
DEVICES = ("cpu", "cuda")
DTYPES_OP = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
DTYPES_TRITON = (torch.float32, torch.float16, torch.bfloat16)
HEAD_DIMS = (16, 24, 32, 40, 48, 64, 80, 96, 112, 128, 160, 192, 256)
EPS_CHOICES = (None, 0.0, 1e-6, 1e-4, 1e-3, 1e-2, 0.1, 0.5, 1.0)
DATA_KINDS = ("randn", "clustered", "adversarial", "outliers")
MASK_CONTENTS_BOOL = ("random", "key_padding", "band", "empty_rows", "all_true")
MASK_CONTENTS_FLOAT = ("randn", "neg_inf", "hf_min", "empty_rows_inf", "big")


@dataclass(frozen=True)
class Case:
    B: int
    H: int
    Hkv: int
    L: int
    S: int
    D: int
    DV: int
    dtype: torch.dtype
    is_causal: bool
    eps: float | None
    scale: float | None
    data: str
    magnitude: float
    mask_dtype: str | None  # None, "bool", "float"
    # broadcast form: per trailing dim of [B, H, L, S], True = full size (1-D masks too, which
    # the op broadcasts though SDPA on CPU rejects them; see test_errors.py)
    mask_dims: tuple = ()
    mask_content: str = ""
    mask_p: float = 0.5
    probe: int = 8  # twopass: blocks probed before the visit count is fixed (PROBE_BLOCKS)
    seed: int = 0

    @property
    def enable_gqa(self) -> bool:
        return self.H != self.Hkv

    def mask_shape(self) -> tuple:
        full = (self.B, self.H, self.L, self.S)[4 - len(self.mask_dims):]
        return tuple(n if keep else 1 for n, keep in zip(full, self.mask_dims))

    def id(self) -> str:
        m = "nomask" if self.mask_dtype is None else (
            f"{self.mask_dtype}{list(self.mask_shape())}-{self.mask_content}")
        return (f"B{self.B}-H{self.H}-Hkv{self.Hkv}-L{self.L}-S{self.S}-D{self.D}-DV{self.DV}-"
                f"{str(self.dtype).split('.')[-1]}-{'causal' if self.is_causal else 'full'}-"
                f"eps{self.eps}-scale{self.scale}-{self.data}x{self.magnitude}-{m}-"
                f"probe{self.probe}-seed{self.seed}")


def lengths(max_len: int):
    """0 and 1 often, odd lengths, tile edges, up to max_len."""
    edges = [0, 1, 2, 15, 16, 17, 31, 33, 63, 64, 65, 127, 128, 129]
    return st.one_of(st.sampled_from([n for n in edges if n <= max_len]),
                     st.integers(0, max_len))


@st.composite
def cases(draw, path: str = "op", max_len: int | None = None, max_bh: int = 6) -> Case:
    triton = path != "op"
    max_len = max_len or (48 if triton else 200)
    dtype = draw(st.sampled_from(DTYPES_TRITON if triton else DTYPES_OP))
    Hkv = draw(st.integers(1, 3))
    group = draw(st.integers(1, max(1, max_bh // Hkv)).filter(lambda g: g * Hkv <= max_bh))
    H = Hkv * group
    B = draw(st.integers(1, max(1, max_bh // H)))
    lo = 1 if triton else 0  # zero lengths: the op returns before any kernel (tested via "op")
    L = max(lo, draw(lengths(max_len)))
    S = max(lo, draw(lengths(max_len)))
    if triton or draw(st.booleans()):
        D = draw(st.sampled_from(HEAD_DIMS))
    else:  # the CPU op takes any head dim
        D = draw(st.integers(1, 72))
    DV = D if draw(st.booleans()) else (
        draw(st.sampled_from(HEAD_DIMS)) if triton else draw(st.integers(1, 96)))
    if triton:  # keep interpreter cost down at large head dims
        L, S = (min(L, 24), min(S, 24)) if max(D, DV) > 128 else (L, S)
    mask_dtype = draw(st.sampled_from((None, "bool", "float")))
    mask_dims, content, p = (), "", 0.5
    if mask_dtype is not None:
        ndim = draw(st.integers(1, 4))
        mask_dims = tuple(draw(st.booleans()) for _ in range(ndim))
        contents = MASK_CONTENTS_BOOL if mask_dtype == "bool" else MASK_CONTENTS_FLOAT
        content = draw(st.sampled_from(contents))
        p = draw(st.sampled_from((0.05, 0.3, 0.7, 0.95)))
    scale = draw(st.one_of(st.none(), st.sampled_from((1.0, 0.05, -0.3, 0.0)),
                           st.floats(-2.0, 2.0, allow_nan=False, width=32)))
    return Case(B=B, H=H, Hkv=Hkv, L=L, S=S, D=D, DV=DV, dtype=dtype,
                is_causal=draw(st.booleans()), eps=draw(st.sampled_from(EPS_CHOICES)),
                scale=None if scale is None else float(scale),
                data=draw(st.sampled_from(DATA_KINDS)),
                magnitude=draw(st.sampled_from((0.1, 1.0, 1.0, 3.0, 10.0))),
                mask_dtype=mask_dtype, mask_dims=mask_dims, mask_content=content, mask_p=p,
                # small inputs have few key blocks: probe fewer so two-pass can prune at all
                probe=draw(st.sampled_from((1, 2, 8))) if path == "twopass" else 8,
                seed=draw(st.integers(0, 2 ** 16)))


# -- inputs ----------------------------------------------------------------------------------------
def _clustered(g, B, H, n, D, centers, run):
    c = torch.randn(B, H, centers, D, generator=g) * 1.5
    ids = torch.randint(0, centers, (B, H, n // run + 1), generator=g).repeat_interleave(run, -1)
    x = torch.gather(c, 2, ids[..., :n, None].expand(B, H, n, D))
    return x + 0.3 * torch.randn(B, H, n, D, generator=g)


def make_qkv(case: Case, block_n: int):
    g = torch.Generator().manual_seed(case.seed)
    B, H, Hkv, L, S, D, DV = case.B, case.H, case.Hkv, case.L, case.S, case.D, case.DV
    if case.data == "clustered":
        run = int(torch.randint(4, 33, (1,), generator=g))
        x = _clustered(g, B, H, L + S, D, centers=int(torch.randint(1, 9, (1,), generator=g)),
                       run=run)
        q, k = x[:, :, :L], x[:, :Hkv, L:]
    elif case.data == "adversarial":
        n = max(L, S, 1)
        q, k, _ = adversarial_qkv(B, H, n, D, seed=case.seed, block_n=block_n)
        q, k = q[:, :, :L], k[:, :Hkv, :S]
    else:
        q = torch.randn(B, H, L, D, generator=g)
        k = torch.randn(B, Hkv, S, D, generator=g)
        if case.data == "outliers" and S:  # a few keys of large norm: loose radii, tight boxes
            idx = torch.randint(0, S, (max(1, S // 16),), generator=g)
            k[:, :, idx] *= 8.0
    v = torch.randn(B, Hkv, S, DV, generator=g)
    q = (q * case.magnitude).contiguous()
    k = (k * case.magnitude).contiguous()
    return q.to(case.dtype), k.to(case.dtype), v.to(case.dtype)


def make_mask(case: Case):
    if case.mask_dtype is None:
        return None
    g = torch.Generator().manual_seed(case.seed + 1)
    shape = case.mask_shape()
    full = (1,) * (4 - len(shape)) + shape  # as [B?, H?, L?, S?]
    L, S = full[2], full[3]
    c, p = case.mask_content, case.mask_p
    if case.mask_dtype == "bool":
        if c == "random":
            m = torch.rand(full, generator=g) > p
        elif c == "key_padding":  # per batch a valid prefix of the keys
            n = torch.randint(0, S + 1, (full[0], 1, 1, 1), generator=g)
            m = (torch.arange(S).view(1, 1, 1, S) < n).expand(full)
        elif c == "band":  # sliding window (with L != S)
            i = torch.arange(L).view(L, 1)
            j = torch.arange(S).view(1, S)
            w = int(torch.randint(1, 17, (1,), generator=g))
            m = ((j - i).abs() < w).expand(full)
        elif c == "empty_rows":  # some rows have no key at all
            m = torch.rand(full, generator=g) > 0.2
            m = m & (torch.rand(*full[:3], 1, generator=g) > p)
        else:
            m = torch.ones(full, dtype=torch.bool)
        return m.reshape(shape).contiguous()
    dt = case.dtype
    if c == "randn":
        m = torch.randn(full, generator=g) * 2.0
    elif c == "big":  # large finite biases that swamp the scores
        m = torch.randn(full, generator=g) * 300.0
    elif c == "neg_inf":
        m = torch.randn(full, generator=g).masked_fill(torch.rand(full, generator=g) < p,
                                                       -math.inf)
    elif c == "hf_min":  # HF style 0 / finfo.min (rows of all finfo.min average uniformly)
        m = torch.zeros(full, dtype=dt).masked_fill(torch.rand(full, generator=g) < p,
                                                    torch.finfo(dt).min)
    else:  # empty_rows_inf: whole rows -inf
        m = torch.zeros(full).masked_fill(torch.rand(*full[:3], 1, generator=g) < p, -math.inf)
        m = m.expand(full)
    return m.to(dt).reshape(shape).contiguous()


# -- oracle ----------------------------------------------------------------------------------------
def restricted_oracle(q, k, v, mask, is_causal, scale, kept, block_m, block_n):
    """Float64 attention over the kept blocks only, written independently of kernels/: (out, lse).
    Rows with no unmasked kept key give 0 and lse -inf (SDPA's math backend). Finite mask values
    are floored at ``MASK_FLOOR`` as the op documents: outputs are unchanged by it (below the floor
    every weight is 0 unless the whole row is, and then it averages uniformly either way), but a
    row masked entirely by HF's finfo(float32).min reports lse near -1e30 rather than -3.4e38."""
    B, H, L, E = q.shape
    S = k.shape[-2]
    scale = E ** -0.5 if scale is None else scale
    kd, vd = k.double(), v.double()
    if kd.shape[1] != H:
        kd = kd.repeat_interleave(H // kd.shape[1], 1)
        vd = vd.repeat_interleave(H // vd.shape[1], 1)
    s = (q.double() * scale) @ kd.transpose(-1, -2)
    if mask is not None:
        if mask.dtype == torch.bool:
            s = s.masked_fill(~mask, -math.inf)
        else:  # the op's documented floor on finite mask values (HF finfo.min); -inf stays -inf
            m = mask.double()
            s = s + torch.where(m == -math.inf, m, m.clamp_min(MASK_FLOOR))
    if is_causal:
        s = s.masked_fill(~torch.ones(L, S, dtype=torch.bool, device=s.device).tril(), -math.inf)
    keep = kept.repeat_interleave(block_m, 2)[:, :, :L].repeat_interleave(block_n, 3)[..., :S]
    s = s.masked_fill(~keep, -math.inf)
    # Subtract the row maximum before exp (not the lse): a row of scores all near -1e30 then
    # still normalises to a uniform average instead of losing log(n) to rounding.
    if S == 0:
        return s.new_zeros(B, H, L, v.shape[-1]), s.new_full((B, H, L), -math.inf)
    mx = s.amax(-1, keepdim=True)
    mx = torch.where(torch.isfinite(mx), mx, 0.0)
    e = torch.exp(s - mx)
    z = e.sum(-1, keepdim=True)
    p = e / torch.where(z > 0, z, 1.0)
    lse = (mx + torch.log(z)).squeeze(-1)
    return p @ vd, lse


# -- running and checking --------------------------------------------------------------------------
@dataclass
class CaseResult:
    case: Case
    path: str
    violations: list = field(default_factory=list)
    crash: str | None = None
    rel_err_over_tol: float = 0.0
    dropped_over_eps: float = 0.0  # max dropped mass / eps (0 when eps = 0 and nothing dropped)
    kept_fraction: float = 1.0

    @property
    def ok(self) -> bool:
        return self.crash is None and not self.violations


def run_path(case: Case, path: str, q, k, v, mask):
    """(out, lse, kept, block_m, block_n, eps) of one implementation."""
    eps = default_eps(case.dtype) if case.eps is None else case.eps
    if path == "op":
        out, stats = aether_compile.attention(q, k, v, attn_mask=mask, is_causal=case.is_causal,
                                              scale=case.scale, enable_gqa=case.enable_gqa,
                                              eps=case.eps, return_stats=True)
        plain = aether_compile.attention(q, k, v, attn_mask=mask, is_causal=case.is_causal,
                                         scale=case.scale, enable_gqa=case.enable_gqa,
                                         eps=case.eps)
        if not torch.equal(plain, out):
            raise AssertionError("aether.attention and attention_with_stats disagree")
        assert stats.eps == eps
        return out, stats.lse, stats.kept_blocks, stats.block_m, stats.block_n, eps
    from aether_compile.kernels import forward as kernel_forward
    from aether_compile import triton_forward

    saved = kernel_forward.PROBE_BLOCKS
    kernel_forward.PROBE_BLOCKS = case.probe
    try:
        out, lse, kept = triton_forward.triton_attention(q, k, v, mask, case.is_causal, case.scale,
                                              case.enable_gqa, eps, TRITON_BLOCK, TRITON_BLOCK,
                                              path)
    finally:
        kernel_forward.PROBE_BLOCKS = saved
    return out, lse, kept, TRITON_BLOCK, TRITON_BLOCK, eps


def op_block_n(case: Case) -> int:
    from aether_compile.ops import resolve_blocks

    q = torch.empty(0, 0, 0, case.D)
    v = torch.empty(0, 0, 0, case.DV)
    return resolve_blocks(q, v, None, None)[1]


def score_magnitude(case: Case, q, k, mask) -> float:
    """Largest |score| the computation rounds among the keys that carry weight: per (row, key)
    |scale| sum_d |q_d k_d| + |mask|, over keys within 40 of their row's maximum score (the rest
    have weight < e^-40). Scores are formed in float32 (float64 for float64 inputs), so their
    absolute rounding error, and with it the output's relative error, grows with this."""
    if not (q.numel() and k.numel()):
        return 0.0
    H, E = q.shape[1], q.shape[-1]
    scale = E ** -0.5 if case.scale is None else case.scale
    kd = k.double().repeat_interleave(H // k.shape[1], 1)
    qd = q.double()
    t = (qd * scale) @ kd.transpose(-1, -2)
    a = (qd.abs() * abs(scale)) @ kd.abs().transpose(-1, -2)
    if mask is not None:
        if mask.dtype == torch.bool:
            t = t.masked_fill(~mask, -math.inf)
        else:
            m = mask.double()
            m = torch.where(m == -math.inf, m, m.clamp_min(MASK_FLOOR))
            t = t + m
            a = a + torch.where(torch.isfinite(m), m.abs(), 0.0)
    if case.is_causal:
        t = t.masked_fill(~torch.ones(t.shape[-2:], dtype=torch.bool, device=t.device).tril(),
                          -math.inf)
    a = a.expand(t.shape)
    relevant = t >= t.amax(-1, keepdim=True) - 40.0
    relevant &= torch.isfinite(t)
    return float(a[relevant].max()) if relevant.any() else 0.0


def tolerance(case: Case, q, k, mask) -> float:
    """REL_TOL[dtype] plus the conditioning of softmax in the score's compute precision: a
    relative output error of ~u * |score| is inherent (SDPA in the same precision has it too)."""
    return REL_TOL[case.dtype] + score_rounding(case, q, k, mask)


def score_rounding(case: Case, q, k, mask) -> float:
    """Absolute rounding error allowed on a score (and so on the lse): 4 u |score|."""
    u = 2.0 ** -53 if case.dtype == torch.float64 else 2.0 ** -24
    return 4.0 * u * score_magnitude(case, q, k, mask)


def check_case(case: Case, path: str, device: str = "cpu") -> CaseResult:
    """Run ``case`` through ``path`` on ``device`` ("cpu" or "cuda") and check it."""
    res = CaseResult(case, path)
    try:
        block_n = TRITON_BLOCK if path != "op" else op_block_n(case)
        q, k, v = (t.to(device) for t in make_qkv(case, block_n))
        mask = make_mask(case)
        mask = None if mask is None else mask.to(device)
        out, lse, kept, bm, bn, eps = run_path(case, path, q, k, v, mask)
    except Exception as e:  # noqa: BLE001 - a crash is a result here
        res.crash = f"{type(e).__name__}: {e}"[:500]
        return res
    v_ = res.violations
    B, H, L, S = case.B, case.H, case.L, case.S
    if out.shape != (B, H, L, case.DV) or out.dtype != case.dtype:
        v_.append(f"shape/dtype {tuple(out.shape)} {out.dtype}")
        return res
    if not torch.isfinite(out).all():
        v_.append("non-finite output on finite inputs")
    nqt, nkb = -(-L // bm), -(-S // bn)
    if kept.shape != (B, H, nqt, nkb):
        v_.append(f"kept shape {tuple(kept.shape)} != {(B, H, nqt, nkb)}")
        return res
    res.kept_fraction = float(kept.float().mean()) if kept.numel() else 1.0
    ref, ref_lse = restricted_oracle(q, k, v, mask, case.is_causal, case.scale, kept, bm, bn)
    err = rel_err(out, ref)
    rounding = score_rounding(case, q, k, mask)
    tol = REL_TOL[case.dtype] + rounding
    res.rel_err_over_tol = err / tol
    if not err < tol:
        v_.append(f"rel err {err:.3g} >= tol {tol:g}")
    fin = torch.isfinite(ref_lse)
    if not torch.equal(fin, torch.isfinite(lse)):
        v_.append("lse finite pattern differs from the oracle")
    elif fin.any():
        d = (lse.double()[fin] - ref_lse[fin]).abs()
        lim = 1e-3 + 1e-4 * ref_lse[fin].abs() + rounding
        if case.dtype == torch.float64:
            lim = 1e-5 + 1e-6 * ref_lse[fin].abs()  # lse is stored in float32
        if not bool((d <= lim).all()):
            v_.append(f"lse off by {float(d.max()):.3g}")
    if L and S:
        dropped = dropped_mass(q, k, kept, bm, bn, mask, case.is_causal, case.scale)
        worst = float(dropped.max())
        if not worst <= eps:  # also catches NaN
            v_.append(f"certificate: dropped mass {worst:.3g} > eps {eps:g}")
        res.dropped_over_eps = worst / eps if eps > 0 else (0.0 if worst == 0 else math.inf)
    return res


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def device_from_env(default: str = "cpu") -> str:
    """The device to test on: env ``AETHER_TEST_DEVICE`` ("cpu" or "cuda"), else ``default``.
    Asking for cuda without a GPU is an error, not a silent fallback."""
    device = os.environ.get("AETHER_TEST_DEVICE") or default
    if device not in DEVICES:
        raise ValueError(f"AETHER_TEST_DEVICE must be one of {DEVICES}, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("AETHER_TEST_DEVICE=cuda but torch.cuda.is_available() is False")
    return device


def triton_runs_on(device: str) -> bool:
    """Whether the Triton modes can run on ``device``: natively on CUDA, through the interpreter
    (``TRITON_INTERPRET=1``) on CPU."""
    return device == "cuda" or interpreter_on()
