"""Where a compiled ``generate``'s time goes: the prompt's prefill apart from the decode steps, for
the default compile and for ``backend="aether"`` with and without ``decode=True``, and a profile
(host and GPU time per op) of one whole generate for the backends named in ``--profile``.
bench_generate.py gives tokens/s over the whole call; this splits it.

    python benchmarks/profile_generate.py --ckpt CKPT [--length 32768 --batch 4] [--out DIR]
        [--profile aether_prefill aether]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from unittest import mock

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_generate as bg  # noqa: E402
from provenance import card_tag, env_record, write_json  # noqa: E402

from aether_compile import kv_cache  # noqa: E402


class _Clock:
    """A generate streamer that notes when each token is out (GPU synced): the prompt is put
    first, then each new token, so the first gap is the prefill and the rest are decode steps."""

    def __init__(self):
        self.times = []

    def put(self, value):
        bg._sync()
        self.times.append(time.perf_counter())

    def end(self):
        pass


def _generate(model, ids, new_tokens: int, streamer=None):
    with torch.no_grad():
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=False, cache_implementation="static", streamer=streamer)


def split(ckpt, S, B, backend, eps, steps, profile, device):
    """(prefill seconds, decode ms per step, profile table or None) for one backend:
    "inductor" (the default compile), "aether_prefill" (aether without decode=True: the
    prompt's attention rewritten, decode steps SDPA), "aether" (decode=True) or "aether_exact"
    (decode=True at eps 0: the exact decode op, no summaries, inside CUDA graphs),
    "aether_certified" (decode=True with every decode site certified, AETHER_STATIC_DENSE=0,
    where the default rules make a cache too small to pay exact); with
    "_cudagraphs" appended (the default compile's "inductor_cudagraphs", "aether_cudagraphs"),
    under mode="reduce-overhead" (aether: that mode's Inductor options). Every generate
    makes the same number of tokens: the static cache's length, hence the graphs, stay."""
    import train_stdlib_lm as lm

    torch._dynamo.reset()
    kv_cache.forget_summaries()
    if ckpt == UNTRAINED:  # the long LM's shape with its initial weights: the same kernels,
        torch.manual_seed(0)  # launches and host time, for steps no decode call certifies
        net = lm.ByteLM(lm.LMConfig(n_kv_head=2, mlp="swiglu"))
    else:
        net = lm.load_checkpoint(ckpt)[0]
    model = lm.to_llama(net).to(device, torch.bfloat16)
    graphs = backend.endswith("_cudagraphs")  # mode="reduce-overhead": Inductor's CUDA graphs
    if backend.startswith("aether"):  # "aether_prefill": decode calls left to SDPA
        from aether_compile import _compat

        options = {"eps": 0.0 if backend.startswith("aether_exact") else eps,
                   "decode": backend != "aether_prefill",
                   "allow_cpu": device == "cpu",
                   **(_compat.mode_options("reduce-overhead") if graphs else {})}
        model.forward = torch.compile(model.forward, backend="aether", options=options)
    else:
        model.forward = torch.compile(model.forward, mode="reduce-overhead" if graphs else None)
    ids = bg.prompt_ids(S, B, device) if B > 1 else bg.prompt_ids(S, 2, device)[:1]
    _generate(model, ids, steps)  # compiles prefill and decode
    if graphs:
        _generate(model, ids, steps)  # records the CUDA graphs (the first call warmed up)
    kv_cache.CALLS.clear()
    clock = _Clock()
    bg._sync()
    t0 = time.perf_counter()
    _generate(model, ids, steps, clock)
    t = clock.times  # [prompt, token 1, ..., token steps]
    rec = {"prefill_s": t[1] - t0, "step_ms": 1e3 * (t[-1] - t[1]) / max(1, len(t) - 2),
           "decode_calls": dict(kv_cache.CALLS)}
    table = None
    if profile:
        acts = [torch.profiler.ProfilerActivity.CPU]
        if device == "cuda":
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=acts) as prof:
            _generate(model, ids, steps)
        key = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
        # self host time, then host time with callees (an op's whole Python: aether::*), then
        # GPU time
        table = "\n".join(prof.key_averages().table(sort_by=by, row_limit=rows) for by, rows in
                          (("self_cpu_time_total", 22), ("cpu_time_total", 25), (key, 14)))
    del model
    return rec, table


UNTRAINED = "untrained"
BACKENDS = ["inductor", "aether_prefill", "aether", "aether_exact", "aether_certified",
            "inductor_cudagraphs", "aether_cudagraphs", "aether_exact_cudagraphs",
            "aether_certified_cudagraphs"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", required=True,
                    help=f"the long LM's weights, or '{UNTRAINED}': its shape, initial weights "
                         "(where every decode call goes dense whatever the weights: profiles of "
                         "host time without two minutes of training)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--length", type=int, default=32768)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--tag", default="", help="suffix of the result file's name")
    ap.add_argument("--eps", type=float, default=1e-2)
    ap.add_argument("--profile", nargs="*", default=["aether"],
                    choices=BACKENDS,
                    help="the backends whose steps are profiled (none: --profile alone)")
    ap.add_argument("--backends", nargs="+", default=["inductor", "aether_prefill", "aether"],
                    choices=BACKENDS)
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    record = {"env": env_record(), "config": vars(args), "rows": {}}
    for backend in args.backends:
        # every site certified: the size rules off while the pass traces
        certified = {"AETHER_STATIC_DENSE": "0"} if "_certified" in backend else {}
        with mock.patch.dict(os.environ, certified):
            rec, table = split(args.ckpt, args.length, args.batch,
                               backend.replace("_certified", ""), args.eps, args.steps,
                               backend in args.profile, device)
        record["rows"][backend] = rec
        print(backend, json.dumps(rec), flush=True)
        if table:
            print(f"== profile: {backend}\n{table}", flush=True)
    if args.out:
        write_json(os.path.join(args.out, f"profile_generate_{card_tag(record['env'])}"
                                          f"{args.tag}.json"), record)


if __name__ == "__main__":
    main()
