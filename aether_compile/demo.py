"""The demo: ``python -m aether_compile.demo`` (``--help`` for its options)."""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import aether_compile
from aether_compile.kernels.reference import chunked_attention_fp64, dropped_mass
from aether_compile.ops import default_eps
from aether_compile.workloads import clustered_qkv

DESCRIPTION = """\
Shows aether_compile on this machine, in two parts.

1. A model: a transformers Llama-style decoder (4 layers, GQA 8/2 heads, random weights from a
   config: nothing is downloaded), batch 2 with left padding. It is compiled twice, with the
   default torch.compile (Inductor) and with backend="aether", and prints which attention sites
   were rewritten and what the op did at each, the logits' difference from eager, and both
   compiled models' times. On CPU nothing is rewritten unless --allow-cpu (the op then runs its
   plain-torch reference, which is there for testing, not speed).

2. The op alone on clustered attention (whole key blocks provably negligible): the kept
   fraction, the certificate against the measured dropped mass, the error against float64, and
   the time against SDPA (on CUDA its flash and cuDNN kernels).
"""


def _time(fn, reps: int) -> float:
    """Median wall time in ms (device-synchronised), after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def run_op_demo(n: int, heads: int, dim: int, dtype: torch.dtype, device: str,
                eps: float | None) -> None:
    q, k, v = clustered_qkv(1, heads, n, dim, dtype=dtype, device=device, seed=0)
    out, stats = aether_compile.attention(q, k, v, eps=eps, return_stats=True)
    ref = chunked_attention_fp64(q, k, v)
    err = float((out.double() - ref).norm() / ref.norm())
    sdpa_err = float((F.scaled_dot_product_attention(q, k, v).double() - ref).norm() / ref.norm())
    dropped = float(dropped_mass(q, k, stats.kept_blocks, stats.block_m, stats.block_n).max())
    print(f"The op: clustered attention, B=1 H={heads} N={n} D={dim} {dtype} on {device}")
    print(f"  kept blocks      {stats.kept_fraction:.1%}  (tiles {stats.block_m}x{stats.block_n})")
    print(f"  certified bound  every row's dropped mass <= eps = {stats.eps:g}")
    print(f"  measured         max dropped mass {dropped:.2e}; output error vs float64 {err:.2e} "
          f"(SDPA in {dtype}: {sdpa_err:.2e})")
    reps = 10 if device == "cuda" else 3
    t_ours = _time(lambda: aether_compile.attention(q, k, v, eps=eps), reps)
    line = f"  time             aether {t_ours:.2f} ms"
    if device == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        for name, backend in (("flash", SDPBackend.FLASH_ATTENTION),
                              ("cuDNN", SDPBackend.CUDNN_ATTENTION)):
            try:
                with sdpa_kernel(backend):
                    t = _time(lambda: F.scaled_dot_product_attention(q, k, v), reps)
                line += f" | SDPA {name} {t:.2f} ms (aether {t / t_ours:.2f}x as fast)"
            except RuntimeError as e:  # backend unavailable for these inputs
                line += f" | SDPA {name} n/a ({str(e).splitlines()[0][:40]})"
    else:
        t = _time(lambda: F.scaled_dot_product_attention(q, k, v), reps)
        line += f" | SDPA {t:.2f} ms  [on CPU the op runs its plain-torch reference]"
    print(line)


def demo_model(seq: int, device: str, dtype: torch.dtype):
    """A Llama-style decoder (GQA, RoPE, causal + padding mask) from transformers, random init."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=1000, hidden_size=512, intermediate_size=1024,
                                   num_hidden_layers=4, num_attention_heads=8,
                                   num_key_value_heads=2, max_position_embeddings=max(seq, 128),
                                   use_cache=False)
    model = transformers.LlamaForCausalLM(cfg).eval().to(device=device, dtype=dtype)
    ids = torch.randint(0, cfg.vocab_size, (2, seq), device=device)
    mask = torch.ones_like(ids)
    mask[1, : seq // 8] = 0  # left padding on the second row
    return model, dict(input_ids=ids, attention_mask=mask)


def run_model_demo(seq: int, device: str, dtype: torch.dtype, options: dict) -> None:
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("transformers is not installed (pip install -e \".[cpu-models]\"): skipping the "
              "model demo\n")
        return
    model, inputs = demo_model(seq, device, dtype)
    print(f"The model: transformers LlamaForCausalLM (4 layers, GQA 8/2 heads), batch 2 x {seq} "
          f"tokens, {dtype} on {device}\n  torch.compile(model, backend=\"aether\", "
          f"options={options})")
    keep = inputs["attention_mask"].bool()  # padded query rows are not compared
    with torch.no_grad():
        ref = model(**inputs).logits
        t0 = time.perf_counter()
        report = aether_compile.explain(model, inputs, options=options)
        t_compile = time.perf_counter() - t0
        print("\n".join("  " + line for line in str(report).splitlines()))
        err = float((report.output.logits.float() - ref.float())[keep].abs().max())
        scale = float(ref.float()[keep].abs().max())
        print(f"  logits vs eager: max |diff| {err:.2e} (logits up to {scale:.2f}); aether "
              f"compile + first run {t_compile:.1f} s")
        default = torch.compile(model)
        default(**inputs)
        reps = 10 if device == "cuda" else 3
        t_default = _time(lambda: default(**inputs), reps)
        t_aether = _time(lambda: report.compiled(**inputs), reps)
    if report.rewritten:
        verdict = (f"aether {t_default / t_aether:.2f}x the default compile's speed "
                   f"({report.rewritten} of {len(report.sites)} sites rewritten)")
    else:
        verdict = (f"no site was rewritten ({', '.join(sorted(report.fallbacks))}), so both "
                   "compile the same graph: the difference is noise")
    print(f"  time: default torch.compile {t_default:.2f} ms | aether {t_aether:.2f} ms: "
          f"{verdict}\n")


def main(argv=None) -> None:
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(
        prog="python -m aether_compile.demo", description=DESCRIPTION,
        formatter_class=lambda prog: argparse.RawDescriptionHelpFormatter(prog, width=100))
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if cuda else "cpu",
                    help="where to run (default: %(default)s)")
    ap.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default=None,
                    help="default: float16 on cuda, float32 on cpu")
    ap.add_argument("--eps", type=float, default=None,
                    help="certificate tolerance: each row's dropped softmax mass <= eps (default: "
                         "the dtype's: " + ", ".join(f"{str(d).removeprefix('torch.')} "
                                                     f"{default_eps(d):g}" for d in
                                                     (torch.float16, torch.bfloat16,
                                                      torch.float32)) + "; 0 is dense)")
    ap.add_argument("--seq", type=int, default=None,
                    help="model demo tokens per row (default: 16384 on cuda, 256 on cpu)")
    ap.add_argument("--n", type=int, default=None,
                    help="op demo sequence length (default: 32768 on cuda, 2048 on cpu)")
    ap.add_argument("--allow-cpu", action="store_true",
                    help="on CPU, rewrite attention onto the op's reference implementation too")
    ap.add_argument("--skip-model", action="store_true", help="run only the op demo")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not cuda:
        ap.error("--device cuda: torch sees no CUDA device")
    on_cuda = args.device == "cuda"
    dtype = getattr(torch, args.dtype or ("float16" if on_cuda else "float32"))
    options = {"allow_cpu": args.allow_cpu}
    if args.eps is not None:
        options["eps"] = args.eps
    if not args.skip_model:
        # Shorter CUDA attention than 16K here (2 x 8 heads x 64 dims) stays dense in the pass:
        # dense is faster there ("short" in the report).
        run_model_demo(args.seq or (16384 if on_cuda else 256), args.device, dtype, options)
    if on_cuda:
        run_op_demo(args.n or 32768, 16, 128, dtype, "cuda", args.eps)
    else:
        run_op_demo(args.n or 2048, 2, 64, dtype, "cpu", args.eps)


if __name__ == "__main__":
    main()
