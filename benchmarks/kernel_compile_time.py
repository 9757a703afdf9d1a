"""How long Triton takes to compile each of the op's kernels for an H100 (sm_90), per stage,
without a GPU: the attention pass is what Inductor compiles for every attention variant of a graph,
the longest job of a cold compile (issue 5), so its compile time bounds the compile's tail.

    python benchmarks/kernel_compile_time.py [--out DIR]    # any machine with Triton's ptxas

The kernels are those a compiled site asks for (``precompile.compile_requests``: the prepare op's
launches and the traced pass), for a GPT-2-like site: 2 x 4 heads of 16 (or --head-dim) at --seq
tokens, full and causal. Each is compiled twice (always_compile) and the second timing kept: the
first pays one-time imports.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests.sm90
from provenance import git_commit, write_json  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--head-dim", type=int, default=16)
    args = ap.parse_args(argv)

    import triton
    from torch._subclasses.fake_tensor import FakeTensorMode
    from triton import knobs
    from triton.compiler import ASTSource, compile

    from aether_compile.inductor import precompile
    from aether_compile.kernels import launch

    from tests.sm90 import pretend_sm90

    pretend_sm90()  # an H100 as Triton's binder sees it: compiles need only the target
    L, H, D = args.seq, 4, args.head_dim
    with FakeTensorMode():  # a fused qkv projection split into heads, as GPT-2 writes it
        q, k, v = torch.empty(2, L, H, 3 * D, dtype=torch.float16, device="cuda").split(D, dim=-1)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    bm, bn = launch.default_blocks(D, "cuda")
    specs = tuple(precompile._tensor_spec(t) for t in (q, k, v, None))
    rows = []
    knobs.compilation.always_compile = True
    for causal in (False, True):
        precompile._started.clear()
        requests = precompile.compile_requests(
            torch.device("cuda", 0), specs, (causal, D ** -0.5, 1e-3, bm, bn, None, False, False))
        for r in requests:
            times = []
            knobs.compilation.listener = lambda **kw: times.append(kw["times"])
            source = ASTSource(getattr(importlib.import_module(r.module), r.name), r.signature,
                               r.constexprs, r.attrs)
            for _ in range(2):
                t0 = time.perf_counter()
                compile(source, target=r.target, options=r.options)
                wall = time.perf_counter() - t0
            t = times[-1]
            row = {"kernel": r.name, "traced_pass": r.launcher_only, "causal": causal,
                   "wall_s": round(wall, 3), "ir_ms": t.ir_initialization // 1000,
                   "stages_ms": {s: us // 1000 for s, us in t.lowering_stages}}
            rows.append(row)
            print(json.dumps(row), flush=True)
    knobs.compilation.listener = None
    record = {"benchmark": "kernel_compile_time", "target": "cuda sm_90",
              "env": {"torch": torch.__version__, "triton": triton.__version__,
                      "commit": git_commit(short=True, mark_dirty=True),
                      "cpu": os.uname().machine, "cpu_count": os.cpu_count()},
              "config": {"seq": L, "heads": H, "head_dim": D, "block_m": bm, "block_n": bn},
              "rows": rows}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "kernel_compile_time_sm90.json")
    write_json(path, record)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
