"""Per-model summary of the rewrite: sites, decisions, error vs eager.

    python -m tests.models.zoo_report                         # CPU, fp32, allow_cpu, eps=0
    python -m tests.models.zoo_report --device cuda --dtype float16 --compiler inductor [--eps none]

Prints one line per model (the closing-note table of issue 3).
"""

from __future__ import annotations

import argparse
from collections import Counter

import torch

from tests.models import spellings, zoo
import aether_compile
from tests.models.harness import max_err, max_rel_err


def _extra_cases(device, dtype):
    torch.manual_seed(0)
    for flash in (True, False):
        block = spellings.NanoGPTBlock(flash=flash).eval().to(device, dtype)
        x = torch.randn(2, 64, 32, device=device, dtype=dtype)
        yield f"nanogpt-{'flash' if flash else 'manual'}", zoo.Case(block, (x,), sites=1,
                                                                     out=lambda o: (o,))
    try:
        yield "all-MiniLM-L6-v2", zoo.minilm_case(device, dtype)
    except ImportError:
        pass
    try:
        import timm

        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
                                  depth=2, num_classes=10).eval().to(device, dtype)
        x = torch.randn(2, 3, 32, 32, device=device, dtype=dtype)
        yield "timm-vit", zoo.Case(model, (x,), sites=2, out=lambda o: (o,))
    except ImportError:
        pass
    try:
        import torchvision

        model = torchvision.models.vit_b_16(image_size=64).eval().to(device, dtype)
        x = torch.randn(2, 3, 64, 64, device=device, dtype=dtype)
        yield "torchvision-vit_b_16", zoo.Case(model, (x,), sites=12, out=lambda o: (o,))
    except ImportError:
        pass


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--eps", type=lambda v: None if v.lower() == "none" else float(v),
                    default=0.0, help="op eps; 'none' = the dtype default")
    ap.add_argument("--compiler", default="aot_eager", choices=("inductor", "aot_eager", "eager"))
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    options = dict(allow_cpu=args.device == "cpu", eps=args.eps, compiler=args.compiler)

    def cases():
        for name in zoo.HF_MODELS:
            for impl in zoo.HF_IMPLS:
                yield f"{name}-{impl}", zoo.hf_case(name, impl, device=args.device, dtype=dtype)
        for name, spec in zoo.EXTRA_HF.items():
            for impl in spec[5]:
                yield f"{name}-{impl}", zoo.extra_case(name, impl, args.device, dtype)
        yield from _extra_cases(args.device, dtype)

    print(f"device={args.device} dtype={args.dtype} options={options} torch={torch.__version__}")
    print(f"{'model':24s} {'sites':>5s} {'expected':>8s}  {'decisions':30s} {'max abs err':>11s} "
          f"{'rel err':>9s}")
    for label, case in cases():
        torch._dynamo.reset()
        with torch.no_grad():
            ref = case.out(case.model(*case.args, **case.kwargs))
            report = aether_compile.explain(case.model, *case.args, options=options,
                                            **case.kwargs)
        out = case.out(report.output)
        abs_err, rel = max_err(out, ref), max_rel_err(out, ref)
        dec = Counter(s.decision if s.rewritten else f"dense({s.code})" for s in report.sites)
        dec = ", ".join(f"{v} {k}" for k, v in sorted(dec.items()))
        print(f"{label:24s} {len(report.sites):5d} {case.sites:8d}  {dec:30s} {abs_err:11.2e} "
              f"{rel:9.2e}")


if __name__ == "__main__":
    main()
