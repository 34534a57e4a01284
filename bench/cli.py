"""A `cnn score` run's fixed cost (imports, the Prefect flow run, model resolution) over the library call, with a
local Prefect server already up, as README's "Keep a server up" describes.

    python bench/cli.py [--n 200] [--repeats 3]

Both contenders are fresh processes scoring the same small folder into Parquet: `cnn score` (the console script,
against the running server), and a Python process that imports the library, loads the version's files from the
local copy and runs plan_shards + score_shard + the merge, both with torch fp32 (so only the overhead differs).
Target: at most 3 s between them. A first `cnn score` before the timed ones fetches the version and pays the one-off
precision measurement (kept as version tags), as a first night would.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
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


def timed(command: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{command[:3]} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


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

            def cli(i: int, *extra: str) -> float:
                same = ["--backend", "torch", "--precision", "fp32"]  # the library call's engine
                out = f"{tmp}/cli-{i}-{len(extra)}.parquet"
                return timed([cnn, "score", source, "--model", "xray", *same, *extra, "--output", out], env)

            first = cli(0)  # measures the backends once per version and host type
            files = next(p for p in (home / "models" / "xray").glob("*-*") if not p.name.endswith(".derived"))
            cli_s = min(cli(i + 1) for i in range(args.repeats))
            bare = ["--explain", "none", "--no-embeddings", "--no-drift"]  # what the library call leaves out too
            bare_s = min(cli(i + 1, *bare) for i in range(args.repeats))
            lib_s = min(
                timed([sys.executable, "-c", LIBRARY, str(files), source, f"{tmp}/lib-{i}.parquet"], env)
                for i in range(args.repeats)
            )
            shutil.rmtree(f"{tmp}/lib-0.parquet.run", ignore_errors=True)
        print(f"{args.n} images at 64 px, small_cnn, server up at {api_url}; best of {args.repeats}")
        print(f"first cnn score (measures the backends once): {first:.1f} s")
        print(f"cnn score:    {cli_s:.1f} s (defaults: heat maps for the review queue, similar cases, drift check)")
        print(f"cnn score --explain none --no-embeddings --no-drift: {bare_s:.1f} s")
        print(f"library call: {lib_s:.1f} s (fresh process: imports, load, plan, score, merge)")
        print(
            f"fixed cost of the CLI: {bare_s - lib_s:.1f} s (target <= 3 s); "
            f"the default checks add {cli_s - bare_s:.1f} s"
        )


if __name__ == "__main__":
    main()
