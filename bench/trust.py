"""What trust costs at scoring time: embeddings with the similar-case and reuse checks, the review checks and the
Grad-CAM overlays, against plain scoring, side by side in one run on the same files (JPEG claims photos, the
engine's inference path, a Parquet sink). Target (issue 12): with embeddings, similar cases, the reuse check and
the run's drift check on, at least 0.8 of plain scoring.

    python bench/trust.py [--model small_cnn] [--size 128] [--n 512] [--review-below 0.6] [--repeat 3]

Rows: plain (`--explain none --no-review-flips`; the drift sample every shard takes is in every row), + embeddings
(`--embeddings`) with the neighbour columns, the reuse check, the run's drift check and the history's extension,
+ the test-time flip check (a second forward pass, only for
models trained with flips), + overlays for the rows needing review (`--explain review`, the default; the share
of such rows is printed, as it decides the cost), + overlays for every row (`--explain all`). Each row prints
images/s (the median of `--repeat` rounds, each round running every case in turn) and its ratio to plain
scoring.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.score import fused, make_jpegs, make_model
from cnn.batch.file_sink import FileSink
from cnn.batch.plan import plan_shards
from cnn.batch.run import ModelRef, ScoringOptions, merged_drift
from cnn.batch.shard import Scorer, extend_history
from cnn.data.augment import load_policy
from cnn.infer.predictor import Predictor
from cnn.io.decode import DecodeSpec, decode_file
from cnn.io.inputs import ScoringInputs
from cnn.metrics.drift import DriftSample, check_drift, reference_sample
from cnn.model.contract import ModelContract
from cnn.similarity.fingerprints import layouts, phashes
from cnn.similarity.history import History
from cnn.similarity.index import VectorIndex
from cnn.similarity.reference import semantic_threshold
from cnn.similarity.reuse import HashTable, Lookup


def run(
    paths: list[str],
    predictor: Predictor,
    explainer: Predictor,
    options: ScoringOptions,
    out: Path,
    lookup: Lookup | None = None,
    reference: tuple[dict[str, object], np.ndarray] | None = None,
) -> tuple[float, float]:
    """(images/s, share of rows needing review) for one scoring run with these options; with a drift `reference`
    (the version's statistics and embeddings), the run's drift check as the score flow runs it."""
    shutil.rmtree(out.parent, ignore_errors=True)
    out.parent.mkdir(parents=True)
    sink, ref = FileSink(out), ModelRef("bench", "1", "")
    start = time.perf_counter()
    plan = plan_shards(ScoringInputs(pd.DataFrame({"path": paths}), []), [sink], ref, 256, out.parent)
    scorer = Scorer(predictor, ref, options, explainer=explainer, lookup=lookup)
    results = [scorer.score_shard(plan, shard, [sink]) for shard in range(plan.shards)]
    sink.finish()
    if reference is not None:  # what the score flow does after the shards
        check_drift(*reference, merged_drift(results))
        extend_history(Path(options.history_dir), History(out.parent / "version-history"))
    rate = len(paths) / (time.perf_counter() - start)
    return rate, float(pd.read_parquet(out)["needs_review"].mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small_cnn")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--review-below", type=float, default=0.6)
    parser.add_argument("--repeat", type=int, default=3, help="rounds of all cases; each prints its median")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-trust-"))
    paths = make_jpegs(work / "jpegs", args.n)
    spec = DecodeSpec(channels=3, size=args.size)
    sample = np.stack([decode_file(p, spec).array for p in paths[:256]])
    weights, contract_path = make_model(work, args.model, args.size, sample, whole=True, epochs=6)  # real confidences
    contract = ModelContract.load(contract_path)
    contract.policy = load_policy("photo").to_dict()  # trained with flips: the flip check applies
    contract.save(contract_path)
    predictor, explainer = fused(weights, contract_path), Predictor.load(weights, contract_path)
    explain_dir, history = str(work / "out" / "overlays"), str(work / "out" / "history")
    # the version's reference: the sample as its training split (index, labels, hashes)
    probs, train_vectors = predictor.predict_with_embeddings(sample)
    labels = [contract.classes[i] for i in probs.argmax(axis=1)]
    drift = DriftSample.of(
        labels, probs.max(axis=1), sample, [(640, 480)] * len(sample), ["JPEG"] * len(sample), train_vectors
    )
    reference = (reference_sample(drift), train_vectors)  # the sample as the version's validation split
    plain, mirrored = phashes(sample)
    train = pd.DataFrame({"image_id": [f"t{i}" for i in range(len(sample))], "label": "none", "phash": plain})
    train = train.assign(phash_mirror=mirrored, layout=[bytes(v) for v in layouts(sample)])
    reuse = semantic_threshold(train_vectors)["semantic_cosine"]  # as registration sets it (None: off)
    lookup = Lookup(HashTable(train), VectorIndex.build(train_vectors), HashTable(train[:0]), semantic=reuse)
    off = dict(review_flips=False, explain="none", embeddings=False)
    on = dict(embeddings=True, history_dir=history)
    cases = [
        ("plain (nothing below)", ScoringOptions(**off), None),
        ("+ embeddings, neighbours, reuse, drift check", ScoringOptions(**{**off, **on}), lookup),
        ("+ flip check", ScoringOptions(**on, review_flips=True, explain="none"), lookup),
        (
            "+ overlays for review rows (default)",
            ScoringOptions(**on, explain="review", explain_dir=explain_dir),
            lookup,
        ),
        (
            "+ overlays for every row (--explain all)",
            ScoringOptions(**on, explain="all", explain_dir=explain_dir),
            lookup,
        ),
    ]
    cases = [(n, ScoringOptions(**{**o.__dict__, "review_below": args.review_below}), k) for n, o, k in cases]
    run(paths[:64], predictor, explainer, cases[-1][1], work / "out" / "warm.parquet", lookup, reference)  # warm-up
    print(f"{args.model} at {args.size} px, {args.n} JPEG files (640x480), {torch.get_num_threads()} threads")
    measured: list[list[float]] = [[] for _ in cases]
    reviews = [0.0] * len(cases)
    for _ in range(args.repeat):  # rounds of every case in turn: drifts of the host's speed hit all cases alike
        for i, (_, options, lookup_or_none) in enumerate(cases):
            checked = reference if lookup_or_none is not None else None  # the run's drift check with the rest
            rate, reviews[i] = run(
                paths, predictor, explainer, options, work / "out" / "p.parquet", lookup_or_none, checked
            )
            measured[i].append(rate)
    rates = [float(np.median(r)) for r in measured]
    for (name, _, _), rate, review in zip(cases, rates, reviews):
        print(f"{name:<44} {rate:8.1f} images/s  {rate / rates[0]:5.2f}x plain   ({review:.0%} of rows need review)")
    per_round = [on / off for on, off in zip(measured[1], measured[0])]  # the same round: the same host speed
    print(
        f"the checks (embeddings, neighbours, reuse, drift, history) against plain, round by round: "
        f"{min(per_round):.2f}-{max(per_round):.2f}x (median {float(np.median(per_round)):.2f}x, "
        f"{len(per_round)} rounds)"
    )
    overlay_ms = 1000 * (1 / rates[4] - 1 / rates[2])  # --explain all over the flip-checked run: per image
    print(
        f"the checks cost {1000 * (1 / rates[1] - 1 / rates[0]):.1f} ms per image; "
        f"one overlay (Grad-CAM, blend, JPEG) {overlay_ms:.1f} ms; the flip check "
        f"{1000 * (1 / rates[2] - 1 / rates[1]):.1f} ms per image"
    )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
