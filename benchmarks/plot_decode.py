"""The decode benchmark's plot, drawn from its results file: per row (data, keys, batch) at one
eps, the certified step's time split into bounds, selection and attention, beside the fastest
dense step. Plain SVG, no plotting library.

    python benchmarks/plot_decode.py [RESULTS_JSON] [--eps 0.01] [--out docs/decode_step.svg]
"""

from __future__ import annotations

import argparse
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_JSON = os.path.join(ROOT, "benchmarks", "results", "decode_NVIDIA_H100_80GB_HBM3.json")
DEFAULT_OUT = os.path.join(ROOT, "docs", "decode_step.svg")
PARTS = (("bounds_us", "bounds", "#4c72b0"), ("select_us", "selection", "#55a868"),
         ("attend_us", "attention", "#c44e52"))
DENSE = ("fastest_dense_us", "fastest dense", "#8c8c8c")


def rows_at(record: dict, eps: float) -> list[dict]:
    return [r for r in record["rows"] if "error" not in r and r.get("eps") == eps
            and all(r.get(k) is not None for k, _, _ in PARTS + (DENSE,))]


def svg(record: dict, eps: float) -> str:
    rows = rows_at(record, eps)
    if not rows:
        raise SystemExit(f"no rows at eps {eps:g} in the results file")
    width, height, left, top, bottom = 60 + 70 * len(rows), 340, 50, 40, 70
    plot_h = height - top - bottom
    tallest = max(max(sum(r[k] for k, _, _ in PARTS), r[DENSE[0]]) for r in rows)
    y = lambda us: top + plot_h * (1 - us / tallest)  # noqa: E731
    env = record["env"]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width + 140}" height="{height}" '
           'font-family="sans-serif" font-size="11">',
           f'<text x="{left}" y="16" font-size="13">Decode step, µs (eps {eps:g}): certified '
           f'parts beside the fastest dense step</text>',
           f'<text x="{left}" y="30" fill="#555">{env["card"]}, torch {env["torch"]}, Triton '
           f'{env.get("triton")}, commit {env.get("commit")}</text>',
           f'<line x1="{left}" y1="{top + plot_h}" x2="{width}" y2="{top + plot_h}" '
           'stroke="black"/>']
    for i, r in enumerate(rows):
        x = left + 10 + 70 * i
        base = 0.0
        for key, _, color in PARTS:
            out.append(f'<rect x="{x}" y="{y(base + r[key]):.1f}" width="24" '
                       f'height="{y(base) - y(base + r[key]):.1f}" fill="{color}"/>')
            base += r[key]
        out.append(f'<rect x="{x + 26}" y="{y(r[DENSE[0]]):.1f}" width="24" '
                   f'height="{y(0) - y(r[DENSE[0]]):.1f}" fill="{DENSE[2]}"/>')
        out.append(f'<text x="{x + 25}" y="{y(base) - 4:.1f}" text-anchor="middle">'
                   f'{r[DENSE[0]] / base:.2f}×</text>')
        label = f"{r['kind']} {r['kv'] // 1024}K b{r['batch']}"
        out.append(f'<text x="{x + 25}" y="{top + plot_h + 14}" text-anchor="end" '
                   f'transform="rotate(-35 {x + 25} {top + plot_h + 14})">{label}</text>')
    for j, (_, name, color) in enumerate(PARTS + (DENSE,)):
        out.append(f'<rect x="{width + 10}" y="{top + 18 * j}" width="12" height="12" '
                   f'fill="{color}"/>')
        out.append(f'<text x="{width + 28}" y="{top + 10 + 18 * j}">{name}</text>')
    out.append(f'<text x="{width + 10}" y="{top + 18 * 4 + 10}" fill="#555">label: dense / '
               'ours</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="?", default=DEFAULT_JSON)
    ap.add_argument("--eps", type=float, default=1e-2)
    ap.add_argument("--out", default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    with open(args.results) as f:
        record = json.load(f)
    with open(args.out, "w") as f:
        f.write(svg(record, args.eps))
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
