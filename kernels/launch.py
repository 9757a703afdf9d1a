"""Launch plumbing shared by the Triton kernels: how a launch is issued (eager, traced through
``wrap_triton``, or handed to a hook), tile sizes and launch shapes, the inputs the Triton path
accepts, and small device constants shared by eager calls."""

from __future__ import annotations

import contextlib
import threading

import torch
import triton

from aether_compile import settings

from .certificate import num_blocks


INTERPRET = settings.interpret()  # Triton's interpreter (CPU CI): read once, as Triton does


def traceable(kernel):
    """The kernel as torch.compile can trace it: while tracing, ``wrap_triton`` makes each launch
    a node that Inductor lowers to this very kernel (its source lands in the generated code).
    Otherwise the plain kernel: an eager launch through wrap_triton's higher-order op costs about
    0.2 ms of host time on an H100 (Torch skips it only inside a triton_op's own eager call, not
    in the runtime dense choice's custom op; measured by the retired benchmarks/profile_host.py).
    The interpreter's kernels cannot be traced, only launched. Under ``launches_to`` each launch
    goes to its hook."""
    hook = getattr(_LAUNCH_HOOK, "fn", None)
    if hook is not None:
        return _HookedLauncher(kernel, hook)
    if INTERPRET or not tracing_now():
        return kernel
    return torch.library.wrap_triton(kernel)


_LAUNCH_HOOK = threading.local()


@contextlib.contextmanager
def launches_to(hook):
    """In this thread, ``traceable(kernel)[grid](*args, **kwargs)`` calls
    ``hook(kernel, grid, args, kwargs)`` instead of launching (``inductor/precompile.py``
    compiles each launch of a replay on fake tensors; tests record launches)."""
    previous = getattr(_LAUNCH_HOOK, "fn", None)
    _LAUNCH_HOOK.fn = hook
    try:
        yield
    finally:
        _LAUNCH_HOOK.fn = previous


class _HookedLauncher:
    def __init__(self, kernel, hook):
        self._kernel, self._hook = kernel, hook

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self._hook(self._kernel, grid, args, kwargs)


def tracing_now() -> bool:
    """Dynamo is tracing, or a dispatch mode (fake, functional, proxy: AOTAutograd, make_fx) is
    active; eager calls on real tensors have neither."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    return torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None


def plain_eager(*tensors) -> bool:
    """Plain tensors (no subclass: fake, functional, DTensor, Parameter) outside Dynamo and any
    functorch transform: an eager call whose host-side choices (a host read, skipping a dispatch
    or an output) are safe."""
    return (all(type(t) is torch.Tensor for t in tensors) and not torch.compiler.is_compiling()
            and not torch._C._are_functorch_transforms_active())


SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256


def unsupported_reason(query, key, value) -> str | None:
    """Why the Triton path cannot run these inputs, or None."""
    if query.dtype not in SUPPORTED_DTYPES:
        return f"dtype {query.dtype} not in {SUPPORTED_DTYPES}"
    for name, t in (("query/key", query), ("value", value)):
        d = t.shape[-1]
        if not MIN_HEAD_DIM <= d <= MAX_HEAD_DIM:
            return f"{name} head dim {d} outside [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}]"
    if query.device.type != "cuda" and not INTERPRET:
        return f"device {query.device.type} (Triton runs on CUDA, or on CPU with TRITON_INTERPRET=1)"
    return None


_EAGER_CONSTANTS: dict = {}


def eager_constant(key: tuple, make):
    """``make()``, a device tensor its callers only read, shared by eager calls with the same key
    (the last entry, the device): a few shapes and values recur, and making one is tiny kernels
    and host time on every call. Traced code builds it in the graph, and so does a CUDA-graph
    capture (kernels captured there would run only at replay)."""
    device = key[-1]
    if tracing_now() or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        return make()
    value = _EAGER_CONSTANTS.get(key)
    if value is None:
        if len(_EAGER_CONSTANTS) >= 64:  # do not grow without bound
            _EAGER_CONSTANTS.clear()
        with torch.inference_mode(False):  # shared later outside inference mode too
            value = _EAGER_CONSTANTS[key] = make()
    return value


def clear_eager_constants() -> None:
    """Forget the shared constants (a benchmark measuring a new process's first call)."""
    _EAGER_CONSTANTS.clear()


def read_only_flag(value: int, device) -> torch.Tensor:
    """int32[1] holding ``value``, for kernels that only read it (a Skip flag); shared by eager
    calls (``eager_constant``) instead of allocated and filled per launch: the runtime dense
    choice's sample is issued from Python."""
    device, value = torch.device(device), int(value)  # an IntEnum (Skip) as a plain int
    return eager_constant(("flag", value, device),
                           lambda: torch.full((1,), value, device=device, dtype=torch.int32))


def is_static(*sizes) -> bool:
    """True when every size is a plain int (not a SymInt of a dynamic-shape trace)."""
    return all(isinstance(n, int) for n in sizes)


def next_pow2(n):
    """``triton.next_power_of_2`` for host code. Triton's is a constexpr function: unwrapping its
    argument costs about 2 µs a call, and a decode step's launches asked a dozen times (a step
    is host-bound in a compiled generate). SymInts go to Triton's."""
    if isinstance(n, int) and n >= 0:
        return 0 if n == 0 else 1 << (n - 1).bit_length()
    return triton.next_power_of_2(n)


# ``triton.cdiv`` for host code (ints or SymInts), without its constexpr wrapper: the same
# ceiling division as the block counts.
cdiv = num_blocks


def pad_pow2(d: int) -> int:
    return max(16, next_pow2(d))


# From this many keys a call without a mask plans and computes key blocks of 128 (head dims up to
# 128): the plan's bounds product and sort grow as L * S / block_n and come to dominate it. W2 at
# 128K keys took 13.0 ms with blocks of 128 against 15.3 ms with 64 (bounds 1.32 against 2.35 ms,
# sort 0.44 against 1.14), at 32K 4.63 against 4.55 ms (H200, 2f919b2, profile_stages.py
# run_block_n). The backward keeps its own tiles (the kept map is regridded, backward.py).
LONG_KEYS = 65536


def default_blocks(head_dim: int, device_type: str, keys=None,
                   masked: bool = False) -> tuple[int, int]:
    """(block_m, block_n) tiles for the attention kernel; geometry uses block_n keys. ``keys``: the
    call's key length (None: not known, the short-sequence tiles); a symbolic length guards on
    LONG_KEYS."""
    if device_type != "cuda":  # interpreter: small tiles keep CPU tests quick yet multi-block
        return 16, 16
    if head_dim <= 128:
        if keys is not None and not masked and keys >= LONG_KEYS:
            return 128, 128
        return 128, 64
    return 64, 32


def launch_config(block_m: int, d_pad: int, dv_pad: int, device_type: str):
    if device_type != "cuda":
        return {}
    warps = 8 if block_m >= 128 else 4
    stages = 3 if max(d_pad, dv_pad) <= 128 else 2
    return {"num_warps": warps, "num_stages": stages}


# Keys per online-softmax step of the attention kernel: a key block larger than this is visited
# in steps of this many keys (the same keys, in order; the plan's blocks stay whole).
KEY_STEP = 128


def key_step(block_n: int, device_type: str) -> int:
    return block_n if device_type != "cuda" else min(block_n, KEY_STEP)


def bounds_config(d_pad: int, device_type: str, use_box: bool) -> dict:
    """Key blocks per bounds-kernel step and launch shape, chosen from sm_90 compiles (ptxas: no
    register spills, shared memory within 227 KB; the box bound at head dim 256 spills least at
    this shape). With 8 warps the key-block side needs 128 rows for both warp groups to split it,
    which keeps the max over query rows inside each warp group."""
    if device_type != "cuda":
        return {"BLOCK_J": 16}
    if d_pad > 128:
        return {"BLOCK_J": 64, "num_warps": 8 if use_box else 4, "num_stages": 1}
    return {"BLOCK_J": 64 if use_box else 128, "num_warps": 8, "num_stages": 2}


def _zero(stride) -> bool:
    """A stride known to be 0 (a symbolic one is not asked: that would guard on it)."""
    return isinstance(stride, int) and stride == 0


def mask_as_4d(attn_mask: torch.Tensor, B: int, H: int, L: int, S: int) -> torch.Tensor:
    """A broadcastable SDPA mask as a 4-D view [Bm, Hm, L, S] (Bm in {1, B}, Hm in {1, H});
    broadcast row/key dims become stride-0 views, nothing is copied. Batch and head dims of
    stride 0 count as broadcast (Bm, Hm = 1)."""
    m = attn_mask
    while m.dim() < 4:
        m = m.unsqueeze(0)
    # A batch or head dim expanded with stride 0 holds one mask: read it once. (transformers
    # expands one mask over the batch; the mask statistics would otherwise read it B times.)
    if m.shape[0] != 1 and _zero(m.stride(0)):
        m = m[:1]
    if m.shape[1] != 1 and _zero(m.stride(1)):
        m = m[:, :1]
    Bm = B if m.shape[0] != 1 else 1
    Hm = H if m.shape[1] != 1 else 1
    # Bool masks go to Triton as they are (it loads i1 through a byte pointer); a uint8 view
    # would be free in eager, but Inductor on torch 2.11 cannot lower a bool bitcast.
    return m.expand(Bm, Hm, L, S)
