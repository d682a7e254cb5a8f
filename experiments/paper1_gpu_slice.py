"""Paper 1's GPU slice (`paper1_gpu_slice.yaml`): prepare what travels here, run it there.

    python experiments/paper1_gpu_slice.py prepare --data-dir ../shared/data   # this machine
    python3 experiments/paper1_gpu_slice.py run                                # the GPU machine

The GPU machine reaches no network and takes at most 64 MiB of working tree, so `prepare`
writes `.gpu_slice/` (git-ignored, ~55 MiB): all-MiniLM-L6-v2 with its weights stored as
float16 (45 MiB instead of 91; loaded back as float32), IMDB's parquet cut to a seeded 6,000 /
2,000 of its official train / test rows (same schema, so the `imdb` loader reads it unchanged),
and wheels of the packages that machine lacks (datasets and its dill / multiprocess,
tensorboardX). `run` installs the wheels under /tmp, records the card, runs the sweep
vectorized and copies the report, the results table, the plots and the log to $OUT.
With the device tool: command `python3 experiments/paper1_gpu_slice.py run`, carry `.gpu_slice`.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SLICE = REPO / ".gpu_slice"
CONFIG = REPO / "experiments" / "paper1_gpu_slice.yaml"
IMDB = "imdb/imdb_50k.parquet"
ROWS = {"train": 6000, "test": 2000}
WHEELS = ("datasets==5.2.0", "dill==0.4.1", "multiprocess==0.70.19", "tensorboardX==2.6.5")
TOKENIZER_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "vocab.txt")


def prepare(data_dir: Path) -> None:
    import numpy as np
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    from safetensors.numpy import load_file, save_file

    from fedjax_lm.models import minilm_path

    model = SLICE / "minilm"
    model.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copy(minilm_path() / name, model / name)
    weights = load_file(minilm_path() / "model.safetensors")
    save_file({k: v.astype(np.float16) if v.dtype == np.float32 else v
               for k, v in weights.items()}, model / "model.safetensors")

    table = pq.read_table(data_dir / IMDB)
    rng = np.random.default_rng(20)
    keep = []
    for split, n in ROWS.items():
        rows = np.flatnonzero(pc.equal(table["orig_split"], split).to_numpy(zero_copy_only=False))
        keep.append(np.sort(rng.choice(rows, n, replace=False)))
    (SLICE / "data" / "imdb").mkdir(parents=True, exist_ok=True)
    pq.write_table(table.take(np.concatenate(keep)), SLICE / "data" / IMDB)

    wheels = SLICE / "whl"
    shutil.rmtree(wheels, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                    "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
                    "--platform", "manylinux2014_x86_64", "--platform", "any",
                    "-d", str(wheels), *WHEELS], check=True)
    size = sum(f.stat().st_size for f in SLICE.rglob("*") if f.is_file())
    print(f"{SLICE}: {size / 2**20:.1f} MiB (the device tool carries at most 64 MiB with the "
          "repository)")


# `run --check`: the same pipeline at a size a CPU finishes in minutes (not a result)
CHECK = ("--rounds", "1", "--max-train-examples", "256", "--max-test-examples", "64",
         "--batch-size", "8",
         "--max-length", "32")


def run(check: bool) -> int:
    out = Path(os.environ.get("OUT", "/tmp/paper1_gpu_slice_out"))
    out.mkdir(parents=True, exist_ok=True)
    site = "/tmp/site"
    if not all(importlib.util.find_spec(m) for m in ("datasets", "tensorboardX")):
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                        "--no-compile", "--no-cache-dir", "--target", site,
                        *glob.glob(str(SLICE / "whl" / "*.whl"))], check=True)
    env = {**os.environ, "PYTHONPATH": f"{site}:{REPO}", "PYTHONUNBUFFERED": "1",
           "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    with open(out / "gpu.txt", "w") as f:
        if shutil.which("nvidia-smi"):
            subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                            "--format=csv"], stdout=f, stderr=subprocess.STDOUT, check=False)
        else:
            f.write("no nvidia-smi: not a GPU machine\n")
    runs = Path("/tmp/paper1_gpu_slice")
    cmd = [sys.executable, "-m", "fedjax_lm.cli", "sweep", "--config", str(CONFIG),
           "--data-dir", str(SLICE / "data"), "--out-dir", str(runs), "--no-progress",
           *(CHECK if check else ())]
    with open(out / "sweep.log", "w") as log:
        code = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                              check=False).returncode
    for name in ("summary.md", "results.csv", "accuracy_vs_round.png",
                 "final_accuracy_vs_clients.png"):
        if (runs / name).is_file():
            shutil.copy(runs / name, out / name)
    print((out / "sweep.log").read_text()[-4000:])
    return code


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    prep = sub.add_parser("prepare", help="write .gpu_slice/ here")
    prep.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    go = sub.add_parser("run", help="run the slice (on the GPU machine); results to $OUT")
    go.add_argument("--check", action="store_true", help="a tiny size, to check on a CPU")
    args = p.parse_args()
    if args.what == "prepare":
        prepare(args.data_dir)
        return 0
    return run(args.check)


if __name__ == "__main__":
    sys.exit(main())
