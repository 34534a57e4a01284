"""A `cnn score` run's fixed cost (imports, the Prefect flow run, model resolution) over the library call, with a
local Prefect server already up, as README's "Keep a server up" describes.

    python bench/cli.py [--n 200] [--repeats 3]

Both contenders are fresh processes scoring the same small folder into Parquet: `cnn score` (the console script,
against the running server), and a Python process that imports the library, loads the version's files from the
local copy and runs plan_shards + score_shard + the merge, both with torch fp32 (so only the overhead differs).
Target: at most 3 s between them. A first `cnn score` before the timed ones fetches the version and pays the one-off
precision measurement (kept as version tags), as a first night would.

Each `cnn score` is also cut into its parts, from the flow run the server recorded: the time before the flow run
starts (the interpreter, imports, the flow run's creation), each task (resolve-model, plan-shards, score-shard,
publish-tables, extend-history, check-drift) and what is left of the flow run and the process after the last task.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

LIBRARY = """
import sys
from pathlib import Path
from cnn.batch.run import ModelRef, ScoringOptions
from cnn.batch.plan import list_inputs, plan_shards
from cnn.infer.predictor import Predictor
from cnn.batch.file_sink import FileSink
from cnn.batch.shard import Scorer
files, source, out = sys.argv[1:4]
predictor = Predictor.load(f"{files}/artifacts/best.pt", f"{files}/artifacts/contract.json", "cpu", True, True)
sink, ref = FileSink(Path(out)), ModelRef("bench", "1", "")
plan = plan_shards(list_inputs(source), [sink], ref, 256, Path(out + ".run"))
scorer = Scorer(predictor, ref, ScoringOptions())
for i in range(plan.shards):
    scorer.score_shard(plan, i, [sink])
sink.finish()
"""


@dataclass
class Run:
    """One timed process: its wall time and, for `cnn score`, its flow run's parts (seconds by name)."""

    seconds: float
    parts: dict[str, float] = field(default_factory=dict)


def timed(command: list[str], env: dict[str, str]) -> Run:
    began = time.time()
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{command[:3]} failed:\n{done.stderr[-3000:]}")
    found = re.search(r"/runs/flow-run/([0-9a-f-]{36})", done.stdout + done.stderr)
    return Run(seconds, flow_parts(found.group(1), began, began + seconds) if found else {})


def flow_parts(flow_run_id: str, began: float, ended: float) -> dict[str, float]:
    """Seconds before the flow run started, in each task (by name, summed over shards), and after the last task."""
    # imported here: the bench talks to the server only once it is up (PREFECT_API_URL set by main)
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(flow_run_id)  # type: ignore[arg-type]  # a UUID's text
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])))
    parts: dict[str, float] = defaultdict(float)
    assert flow_run.start_time is not None
    parts["before the flow (interpreter, imports, flow run)"] = flow_run.start_time.timestamp() - began
    last = flow_run.start_time.timestamp()
    for task in tasks:
        if task.start_time is not None and task.end_time is not None:
            parts[task.name.rsplit("-", 1)[0]] += (task.end_time - task.start_time).total_seconds()
            last = max(last, task.end_time.timestamp())
    parts["after the last task (flow end, exit)"] = ended - last
    return dict(parts)


def best(runs: list[Run]) -> Run:
    return min(runs, key=lambda run: run.seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--port", type=int, default=4277)
    args = parser.parse_args()
    cnn = str(Path(sys.executable).with_name("cnn"))
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        env = {**os.environ, "CNN_HOME": str(home)}
        env.pop("PREFECT_API_URL", None)
        subprocess.run([cnn, "demo-data", "xray", "--out", f"{tmp}/xray", "--n", "240"], env=env, check=True)
        subprocess.run(
            [cnn, "ingest", f"{tmp}/xray/manifest.csv", "--dataset", "xray", "--image-size", "64"], env=env, check=True
        )
        subprocess.run([cnn, "train", "--dataset", "xray", "--epochs", "2"], env=env, check=True, capture_output=True)
        subprocess.run([cnn, "demo-data", "xray", "--out", f"{tmp}/incoming", "--n", str(args.n), "--seed", "9"],
                       env=env, check=True)  # fmt: skip
        os.environ["CNN_HOME"] = str(home)
        from flows import workspace
        from flows.serve import local_server

        with local_server(workspace.configure(), args.port) as api_url:
            env["PREFECT_API_URL"] = api_url
            source = f"{tmp}/incoming/images"

            def cli(i: int, *extra: str) -> Run:
                same = ["--backend", "torch", "--precision", "fp32"]  # the library call's engine
                out = f"{tmp}/cli-{i}-{len(extra)}.parquet"
                return timed([cnn, "score", source, "--model", "xray", *same, *extra, "--output", out], env)

            first = cli(0).seconds  # measures the backends once per version and host type
            files = next(p for p in (home / "models" / "xray").glob("*-*") if not p.name.endswith(".derived"))
            full = best([cli(i + 1) for i in range(args.repeats)])
            bare_flags = ["--explain", "none", "--no-embeddings", "--no-drift"]  # what the library call leaves out too
            bare = best([cli(i + 1, *bare_flags) for i in range(args.repeats)])
            lib_s = min(
                timed([sys.executable, "-c", LIBRARY, str(files), source, f"{tmp}/lib-{i}.parquet"], env).seconds
                for i in range(args.repeats)
            )
            shutil.rmtree(f"{tmp}/lib-0.parquet.run", ignore_errors=True)
        print(f"{args.n} images at 64 px, small_cnn, server up at {api_url}; best of {args.repeats}")
        print(f"first cnn score (measures the backends once): {first:.1f} s")
        print(f"cnn score:    {full.seconds:.1f} s (defaults: heat maps for the review queue, similar cases, drift)")
        print(f"cnn score --explain none --no-embeddings --no-drift: {bare.seconds:.1f} s")
        print(f"library call: {lib_s:.1f} s (fresh process: imports, load, plan, score, merge)")
        print(
            f"fixed cost of the CLI: {bare.seconds - lib_s:.1f} s (target <= 3 s); "
            f"the default checks add {full.seconds - bare.seconds:.1f} s"
        )
        print(f"\n{'part of cnn score':52s} {'bare':>7s} {'defaults':>9s} {'added':>7s}")
        for name in dict.fromkeys([*bare.parts, *full.parts]):
            b, f = bare.parts.get(name, 0.0), full.parts.get(name, 0.0)
            print(f"{name:52s} {b:6.2f}s {f:8.2f}s {f - b:+6.2f}s")


if __name__ == "__main__":
    main()
