"""Population targets of issue 18, measured in one run on this machine:

    PYTHONPATH=. nice -n 19 python benchmarks/population.py --out DIR [--parts build,rounds,agnews]

- build: a 20,000-client Dirichlet population of SST-2 (60,614 training sentences, about 3 a
  client) and a 1,000,000-client synthetic population (`synthetic_population`, one example a
  client on average... see --synthetic-examples), each built from nothing in a fresh cache:
  load or generate the texts, tokenise them into the memory-mapped store, partition. Target:
  <= 5 minutes each.
- rounds: the tiny preset, a cohort of 1,000 SST-2 clients x 2 local steps x batch 8 x length 32:
  a round fed by the prefetching pipeline (cohort drawn and packed on a thread while the
  previous round runs) vs the same round with its data already on the device, alternated round
  by round so both see the same load. Target: ratio <= 1.3. Also the process's peak RSS beyond
  its RSS after the model, engine and a first (compiling) round: target <= 2 GiB.
- agnews: the run that peaked at 15.4 GiB before (AG News, 5,000 Dirichlet clients, cohorts of
  500, tiny preset, 2 rounds of 2 steps), its peak RSS now (`/usr/bin/time -v`), in chunks of
  `--chunk` clients (unset: the automatic CPU chunking, a quarter of RAM of client state).

Each part runs in its own process (its RSS is its own) and writes DIR/<part>.json; the parent
writes DIR/population.md. Timings on a shared 2-core machine are noisy: the load average is
recorded beside each.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATA = os.environ.get("FEDJAX_LM_DATA_DIR", "/work/shared/data")


def _rss() -> dict[str, float]:
    """Current and peak RSS of this process, GiB (VmRSS / VmHWM), and its file-backed part."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssFile"):
            out[key] = int(value.split()[0]) / 2**20
    return out


def build(args: argparse.Namespace) -> dict:
    import numpy as np

    from fedjax_lm import data as fdata
    from fedjax_lm.data.synthetic import synthetic_population
    from fedjax_lm.models import minilm_path

    cache = Path(tempfile.mkdtemp(prefix="popbench-cache-"))
    tokenizer = fdata.load_tokenizer(minilm_path())
    rows = {}
    # SST-2: 20,000 Dirichlet clients
    t0 = time.perf_counter()
    task = fdata.load_task("sst2", DATA)
    t1 = time.perf_counter()
    fdata.tokenize_task(task, tokenizer, args.length, cache_dir=cache)
    t2 = time.perf_counter()
    index = fdata.dirichlet(task.train.labels, 20_000, 0, alpha=1.0)
    t3 = time.perf_counter()
    again = fdata.tokenize_task(task, tokenizer, args.length, cache_dir=cache)
    t4 = time.perf_counter()
    rows["sst2_20k_dirichlet"] = dict(
        examples=len(task.train), clients=len(index), sizes=[int(index.sizes.min()),
                                                             float(index.sizes.mean()),
                                                             int(index.sizes.max())],
        load_s=t1 - t0, tokenise_store_s=t2 - t1, partition_s=t3 - t2, total_s=t3 - t0,
        reopen_s=t4 - t3, reopen_hit=all(s.cache_hit for s in again.values()),
        load_avg=os.getloadavg()[0])
    print(rows["sst2_20k_dirichlet"], flush=True)
    del task, again
    # synthetic: 1,000,000 clients
    n = args.synthetic_examples
    t0 = time.perf_counter()
    syn = synthetic_population(n, 10_000, seed=0)
    t1 = time.perf_counter()
    fdata.tokenize_task(syn, tokenizer, args.length, cache_dir=cache)
    t2 = time.perf_counter()
    index = fdata.make_partitioner(args.synthetic_partition, **(
        {"beta": 1.0} if args.synthetic_partition == "quantity_skew" else {}))(
        syn.train.labels, 1_000_000, 0)
    t3 = time.perf_counter()
    rows["synthetic_1m"] = dict(
        examples=n, clients=len(index), partition=args.synthetic_partition,
        sizes=[int(index.sizes.min()), float(index.sizes.mean()), int(index.sizes.max())],
        generate_s=t1 - t0, tokenise_store_s=t2 - t1, partition_s=t3 - t2, total_s=t3 - t0,
        store_bytes=sum(f.stat().st_size for f in cache.rglob("*.npy")),
        load_avg=os.getloadavg()[0], **{f"{k}_gib": v for k, v in _rss().items()})
    print(rows["synthetic_1m"], flush=True)
    assert int(np.bincount(index.order, minlength=n).max()) == 1
    return rows


def rounds(args: argparse.Namespace) -> dict:
    import jax
    import numpy as np

    from fedjax_lm.runner import privacy
    from fedjax_lm.runner.config import RunConfig
    from fedjax_lm.runner.experiment import build_engine, build_experiment, round_data
    from fedjax_lm.runner.prefetch import RoundFeeder

    rss = {"start": _rss()}
    cfg = RunConfig(task="sst2", data_dir=DATA, model="preset:tiny", clients=20_000,
                    partition="dirichlet", alpha=1.0, cohort_size=1000, local_epochs=None,
                    local_steps=2, batch_size=8, max_length=32, lr=0.05, rounds=1000,
                    clients_per_chunk=args.chunk)
    t0 = time.perf_counter()
    exp = build_experiment(cfg)
    engine = build_engine(cfg, exp)
    base_key = jax.random.key(cfg.seed)
    state = engine.init(exp.params, base_key)
    setup_s = time.perf_counter() - t0

    def make(r: int):
        cohort = privacy.draw_cohort(cfg, base_key, r)
        return cohort, jax.device_put(round_data(cfg, exp, r, cohort.ids))

    def run(state, cohort, data):
        state, metrics, _ = engine.run_round(state, data, client_ids=cohort.ids)
        jax.block_until_ready((state, metrics.loss))
        return state

    t0 = time.perf_counter()
    state = run(state, *make(0))  # compiles
    compile_s = time.perf_counter() - t0
    rss["after_first_round"] = _rss()
    # Blocks alternate so both kinds see the same load: a pipeline block of m rounds (the
    # first, with nothing prefetched yet, untimed) then m - 1 rounds whose data was made and
    # put on the device before the clock starts (no packing thread running meanwhile).
    fed, resident, waits = [], [], []
    m, r = args.block, 1
    for _ in range(args.blocks):
        with RoundFeeder(make, ahead=True) as feeder:
            for i, (_, (cohort, data), wait) in enumerate(feeder.rounds(r, r + m)):
                t = time.perf_counter()
                state = run(state, cohort, data)
                if i:
                    fed.append(time.perf_counter() - t + wait)
                    waits.append(wait)
        r += m
        ready = [make(k) for k in range(r, r + m - 1)]
        jax.block_until_ready([d for _, d in ready])
        for cohort, data in ready:
            t = time.perf_counter()
            state = run(state, cohort, data)
            resident.append(time.perf_counter() - t)
        r += m - 1
        del ready
    rss["end"] = _rss()
    beyond = rss["end"]["VmHWM"] - rss["after_first_round"]["VmHWM"]
    return dict(cohort=1000, steps=2, batch=8, length=32,
                clients_per_chunk=engine.config.clients_per_chunk, setup_s=setup_s,
                compile_round_s=compile_s, pipeline_round_s=fed, resident_round_s=resident,
                host_wait_s=waits, ratio_median=float(np.median(fed) / np.median(resident)),
                peak_rss_beyond_first_round_gib=beyond, rss_gib=rss,
                load_avg=os.getloadavg()[0])


def agnews(args: argparse.Namespace) -> dict:
    out = Path(tempfile.mkdtemp(prefix="popbench-agnews-"))
    cmd = [sys.executable, "-m", "fedjax_lm.cli", "train", "--task", "ag_news", "--data-dir", DATA,
           "--clients", "5000", "--partition", "dirichlet", "--alpha", "1", "--cohort-size",
           "500", "--model", "preset:tiny", "--rounds", "2", "--local-steps", "2",
           "--local-epochs", "none", "--batch-size", "8", "--out", str(out / "run"),
           "--no-progress"] + ([] if args.chunk is None else ["--clients-per-chunk",
                                                               str(args.chunk)])
    t = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - t
    peak = next((int(line.split(":")[1]) for line in proc.stderr.splitlines()
                 if "Maximum resident set size" in line), None)
    return dict(command=" ".join(cmd[2:]), returncode=proc.returncode, wall_s=wall,
                peak_rss_gib=None if peak is None else peak / 2**20,
                stdout_tail=proc.stdout[-600:], load_avg=os.getloadavg()[0])


PARTS = {"build": build, "rounds": rounds, "agnews": agnews}


def report(out: Path) -> str:
    parts = {p: json.loads((out / f"{p}.json").read_text()) for p in PARTS
             if (out / f"{p}.json").is_file()}
    lines = ["# Population targets (issue 18), this CPU", ""]
    if "build" in parts:
        lines += ["| population | examples | clients | examples/client min·mean·max | "
                  "texts s | tokenise+store s | partition s | total s | target | load avg |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for name, r in parts["build"].items():
            texts = r.get("load_s", r.get("generate_s"))
            sizes = "·".join(f"{s:g}" for s in r["sizes"])
            lines.append(f"| {name} | {r['examples']:,} | {r['clients']:,} | {sizes} | "
                         f"{texts:.1f} | {r['tokenise_store_s']:.1f} | {r['partition_s']:.1f} | "
                         f"{r['total_s']:.1f} | {'met' if r['total_s'] <= 300 else 'MISSED'} "
                         f"(<= 300 s) | {r['load_avg']:.1f} |")
        lines.append("")
    if "rounds" in parts:
        r = parts["rounds"]
        lines += [f"Rounds: cohort {r['cohort']} x {r['steps']} steps x batch {r['batch']} x "
                  f"length {r['length']}, chunks of {r['clients_per_chunk']}; "
                  f"setup {r['setup_s']:.1f} s, first (compiling) round "
                  f"{r['compile_round_s']:.1f} s.", "",
                  "| round | pipeline (prefetched) s | data on device s | host wait s |",
                  "|---|---|---|---|"]
        for i, (a, b, w) in enumerate(zip(r["pipeline_round_s"], r["resident_round_s"],
                                          r["host_wait_s"], strict=True)):
            lines.append(f"| {i + 1} | {a:.2f} | {b:.2f} | {w:.3f} |")
        lines += ["", f"Median ratio pipeline / on-device: **{r['ratio_median']:.2f}** "
                  f"(target <= 1.3: {'met' if r['ratio_median'] <= 1.3 else 'MISSED'}); "
                  f"peak RSS beyond the first round's: "
                  f"**{r['peak_rss_beyond_first_round_gib']:.2f} GiB** (target <= 2 GiB); "
                  f"RSS (GiB) {json.dumps(r['rss_gib'])}; load avg {r['load_avg']:.1f}.", ""]
    if "agnews" in parts:
        r = parts["agnews"]
        lines += [f"AG News 5,000 Dirichlet clients, cohorts of 500, tiny, 2 rounds x 2 steps: "
                  f"peak RSS **{r['peak_rss_gib']:.2f} GiB** (was 15.4 GiB), exit "
                  f"{r['returncode']}, {r['wall_s']:.0f} s wall, load avg {r['load_avg']:.1f}.",
                  f"`fedjax-lm {r['command']}`", ""]
    text = "\n".join(lines)
    (out / "population.md").write_text(text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--parts", default="build,rounds,agnews")
    ap.add_argument("--part", help=argparse.SUPPRESS)  # a child process: run this part
    ap.add_argument("--length", type=int, default=32)
    ap.add_argument("--synthetic-examples", type=int, default=1_000_000)
    ap.add_argument("--synthetic-partition", default="iid")
    ap.add_argument("--blocks", type=int, default=2, help="pipeline/resident block pairs")
    ap.add_argument("--block", type=int, default=3, help="rounds per pipeline block")
    ap.add_argument("--chunk", type=int, default=None, help="clients per chunk (None: auto)")
    ap.add_argument("--report", action="store_true", help="only rebuild population.md")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.part:
        result = PARTS[args.part](args)
        (args.out / f"{args.part}.json").write_text(json.dumps(result, indent=1) + "\n")
        return
    if not args.report:
        for part in args.parts.split(","):
            argv = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                    if k not in ("parts", "part", "report") and v is not None]
            subprocess.run([sys.executable, __file__, *argv, "--part", part], check=False)
    print(report(args.out))


if __name__ == "__main__":
    main()
