"""Scoring throughput, JPEG files to Parquet, against (a) the same model's forward pass on tensors already
in memory (the limit) and (b) a loop calling the MLflow pyfunc once per file; peak memory at two input
sizes; and the speed-up of the engine's inference path (channels_last, bf16 where approved) over fp32
eager NCHW. With the default `--backend auto`, every backend candidate (torch fp32/bf16, ONNX Runtime fp32/int8,
OpenVINO fp32/bf16/int8) is timed side by side, and each one the auto policy accepts here (top-1 agreement with
fp32 >= 99.5 % on 128 images) is run end to end, against the pyfunc loop.

    python bench/score.py [--model resnet18] [--size 224] [--n 512] [--pyfunc-n 96] [--precision auto|fp32|bf16]
                          [--backend auto|torch|onnxruntime|openvino] [--compile]

`--compile` scores as `cnn score --compile` does (torch.compile, weights frozen), prints the one-off
compilation time separately, and adds the compiled forward passes to the inference-path line.

Targets for resnet18 at 224 px on CPU: engine >= 0.8 x (a), >= 3 x (b), and peak memory that does not
grow with the number of images.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cnn.batch.file_sink import FileSink
from cnn.batch.plan import plan_shards
from cnn.batch.run import ModelRef, ScoringOptions, decode_ahead_helps
from cnn.batch.shard import Scorer
from cnn.data.demo import render_claim
from cnn.infer import backends
from cnn.infer.backends import BackendChoice, Candidate, OnnxEngine
from cnn.infer.predictor import Predictor, bf16_agreement, bf16_speedup, relative_speeds
from cnn.io.decode import decode_file
from cnn.io.inputs import ScoringInputs
from cnn.model.contract import ModelContract
from cnn.model.networks import create_model
from cnn.model.precision import BF16_MIN_AGREEMENT, PrecisionChoice, choose_inference_precision, top1_agreement

CLASSES = ["none", "scratch", "dent", "broken_glass"]


def make_model(
    work: Path, name: str, size: int, images: np.ndarray | None = None, whole: bool = False, epochs: int = 4
) -> tuple[Path, Path]:
    """The bench model; with `images`, its head (with `whole`, the whole network) is trained for a few epochs so
    that it predicts with the confidence of a real model (bf16 is only approved where labels agree with fp32)."""
    if (work / "best.pt").is_file():
        return work / "best.pt", work / "contract.json"
    torch.manual_seed(0)
    mean, std = ModelContract.normalisation(3, pretrained=True)
    contract = ModelContract(name, CLASSES, 3, size, "pad", mean, std, {}, {}, "bench")
    model = create_model(name, len(CLASSES), 3)
    if images is not None:
        _train(model, name, contract, images, whole, epochs)
    contract.save(work / "contract.json")
    torch.save(model.state_dict(), work / "best.pt")
    return work / "best.pt", work / "contract.json"


def _train(
    model: torch.nn.Module, name: str, contract: ModelContract, images: np.ndarray, whole: bool, epochs: int
) -> None:
    """Label i is the class file i was rendered as (i % 4)."""
    from cnn.model.contract import to_model_input
    from cnn.model.networks import freeze_backbone

    freeze_backbone(model, name, frozen=not whole)
    model = model.to(memory_format=torch.channels_last)
    labels = torch.tensor([i % len(CLASSES) for i in range(len(images))])
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    mean, std = torch.tensor(contract.mean), torch.tensor(contract.std)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(images)).split(32):
            x = to_model_input(torch.from_numpy(images[idx.numpy()]), mean, std, torch.device("cpu"), True)
            loss = torch.nn.functional.cross_entropy(model(x), labels[idx])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    model.eval()


def make_jpegs(folder: Path, n: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"{i:05d}.jpg"
        if not path.exists():
            render_claim(CLASSES[i % 4], np.random.default_rng([3, i]), (640, 480)).save(path, quality=88)
        paths.append(str(path))
    return paths


def fused(weights: Path, contract: Path, dtype: torch.dtype | None = None, compiled: bool = False) -> Predictor:
    """The engine's inference path: BN folded, channels_last; optionally autocast and torch.compile."""
    predictor = Predictor.load(weights, contract, "cpu", channels_last=True, fuse=True).with_precision(dtype)
    return predictor.compiled() if compiled else predictor


def torch_choice(weights: Path, contract: Path, sample: np.ndarray, precision: str = "auto") -> PrecisionChoice:
    """The torch precision through the one precision policy (`cnn score --precision` applies the same), with the
    bf16 agreement and speed measured on `sample` instead of the model's validation split."""
    predictor = fused(weights, contract)
    return choose_inference_precision(
        precision, predictor.device, lambda: bf16_agreement(predictor, sample), lambda: bf16_speedup(predictor, sample)
    )


def candidate_predictors(
    weights: Path, contract: Path, sample: np.ndarray, work: Path, backend: str, precision: str
) -> dict[str, Predictor]:
    """Every ONNX candidate the request admits, as a Predictor (exported and int8-quantized as registration and
    `cnn score` do, calibrated on `sample`)."""
    base = fused(weights, contract)
    exported = backends.export_onnx(weights, contract, work / backends.ONNX_FILE)
    found = {}
    for c in backends.onnx_candidates(backend, precision):
        path = exported
        if c.precision == "int8":
            path = work / backends.INT8_FILE
            if not path.is_file():
                backends.quantize_int8(exported, sample, base.contract, path)
        found[c.key] = base.with_engine(OnnxEngine(path, c.backend, c.precision))
    return found


def engine_choice(
    weights: Path, contract: Path, sample: np.ndarray, work: Path, backend: str, precision: str
) -> tuple[Predictor, BackendChoice, dict[str, Predictor], dict[str, float | None]]:
    """The scoring engine's choice through the one backend policy, measured on `sample`: the chosen Predictor, the
    choice, every candidate's Predictor (torch ones included) and its top-1 agreement with fp32."""
    reference = fused(weights, contract)
    onnx = candidate_predictors(weights, contract, sample, work, backend, precision)
    expected = reference.predict_arrays(sample)
    agreements = {key: top1_agreement(expected, p.predict_arrays(sample)) for key, p in onnx.items()}

    def speedups(passed: list[Candidate]) -> dict[str, float]:
        rates = relative_speeds(reference, [onnx[c.key] for c in passed], sample)
        return {c.key: rate for c, rate in zip(passed, rates)}

    choice = backends.choose_backend(
        backend,
        reference.device,
        lambda: torch_choice(weights, contract, sample, precision),
        [Candidate(*key.split("-")) for key in onnx],
        lambda c: agreements[c.key],
        speedups,
        forced_precision=precision != "auto",
    )
    bf16 = torch_choice(weights, contract, sample, "bf16").agreement
    everyone = {"torch-fp32": reference, "torch-bf16": reference.with_precision(torch.bfloat16), **onnx}
    agreements = {"torch-fp32": 1.0, "torch-bf16": bf16, **agreements}
    chosen = everyone[choice.candidate.key]
    return chosen, choice, everyone, agreements


def run_engine(
    paths: list[str], predictor: Predictor, out: Path, shard: int = 256, batch: int = 64, ahead: bool = True
) -> float:
    """What `cnn score` runs, minus Prefect: plan (hash, duplicates), score each shard (decode workers, batched
    inference, the next shard decoding meanwhile, commit a Parquet part), then the atomic merge. Keeps the share of
    the time inference waited for decoding in DECODE_WAIT."""
    sink, ref = FileSink(out), ModelRef("bench", "1", "")
    start = time.perf_counter()
    plan = plan_shards(ScoringInputs(pd.DataFrame({"path": paths}), []), [sink], ref, shard, out.parent)
    waited = 0.0
    scorer = Scorer(predictor, ref, ScoringOptions(batch_size=batch, decode_ahead=ahead))
    for i in range(plan.shards):
        result = scorer.score_shard(plan, i, [sink])
        waited += result.decode_wait_s
    sink.finish()
    seconds = time.perf_counter() - start
    DECODE_WAIT[out.name] = waited / seconds
    return len(paths) / seconds


DECODE_WAIT: dict[str, float] = {}


def forward_rate(predictor: Predictor, images: np.ndarray, repeats: int = 2) -> float:
    predictor.predict_arrays(images[:64])  # warm-up
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        predictor.predict_arrays(images, 64)
        best = max(best, len(images) / (time.perf_counter() - start))
    return best


def pyfunc_loop(paths: list[str], weights: Path, contract: Path, work: Path) -> float:
    """What a user writes by hand: load the MLflow model, call predict once per file."""
    import mlflow

    from flows import tracking

    os.environ.setdefault("MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK", "true")
    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
    mlflow.create_experiment("bench", artifact_location=(work / "mlartifacts").as_uri())
    mlflow.set_experiment("bench")
    run_dir = weights.parent
    with mlflow.start_run() as run:
        pass
    uri = tracking.log_model(run.info.run_id, run_dir)
    model = mlflow.pyfunc.load_model(uri)
    model.predict(pd.DataFrame({"path": paths[:1]}))
    start = time.perf_counter()
    for path in paths:
        model.predict(pd.DataFrame({"path": [path]}))
    return len(paths) / (time.perf_counter() - start)


def child_peak_rss(n: int, args: argparse.Namespace, work: Path, candidate: str) -> tuple[float, float]:
    """Run the engine with `candidate` (torch-fp32, openvino-int8, ...) on n images in a fresh process; return
    (images/s, peak RSS MiB of that process)."""
    cmd = [
        sys.executable,
        __file__,
        "--child",
        str(n),
        "--work",
        str(work),
        "--model",
        args.model,
        "--size",
        str(args.size),
        "--child-candidate",
        candidate,
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, check=True)
    data = json.loads(result.stdout.strip().splitlines()[-1])
    return data["rate"], data["rss_mib"]


def child(n: int, work: Path, model: str, size: int, candidate: str) -> None:
    weights, contract = make_model(work, model, size)
    paths = make_jpegs(work / "jpegs", n)
    backend, precision = candidate.split("-")
    predictor = fused(weights, contract, torch.bfloat16 if candidate == "torch-bf16" else None)
    if backend != "torch":  # the parent exported (and quantized) the model into `work`
        onnx = work / (backends.INT8_FILE if precision == "int8" else backends.ONNX_FILE)
        predictor = predictor.with_engine(OnnxEngine(onnx, backend, precision))
    rate = run_engine(paths, predictor, work / f"child-{n}.parquet")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"rate": rate, "rss_mib": rss}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--pyfunc-n", type=int, default=96)
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--backend", default="auto", choices=["auto", "torch", "onnxruntime", "openvino"])
    parser.add_argument("--compile", action="store_true", help="score with torch.compile, as cnn score --compile")
    parser.add_argument("--rss-n", default="1000,10000", help="image counts for the peak-memory runs (comma-separated)")
    parser.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--child-candidate", default="torch-fp32", help=argparse.SUPPRESS)
    parser.add_argument("--work", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, Path(args.work), args.model, args.size, args.child_candidate)
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        paths = make_jpegs(work / "jpegs", max(args.n, 4 * 256))
        spec = ModelContract(args.model, CLASSES, 3, args.size, "pad", [0.0] * 3, [1.0] * 3).decode_spec()
        images = np.stack([decode_file(p, spec).array for p in paths[: args.n]])
        weights, contract = make_model(work, args.model, args.size, images[128:384])
        plain = Predictor.load(weights, contract, "cpu")
        backend = "torch" if args.compile else args.backend
        engine, choice, everyone, agreements = engine_choice(
            weights, contract, images[:128], work, backend, args.precision
        )
        precision = choice.candidate.key
        print(
            f"{args.model} at {args.size}px, 640x480 JPEGs, {torch.get_num_threads()} torch threads; "
            f"engine: {choice.describe()}{', compiled' if args.compile else ''}"
        )
        print(
            "top-1 agreement with fp32 on 128 images: "
            + ", ".join(f"{key} {'-' if a is None else f'{a:.4f}'}" for key, a in agreements.items())
        )

        scoring, compile_seconds = engine, 0.0
        if args.compile:  # once per process (and faster again with inductor's on-disk cache warm)
            scoring = engine.compiled()
            start = time.perf_counter()
            scoring.predict_arrays(images[:64], 64)
            compile_seconds = time.perf_counter() - start
        run_engine(paths[:64], scoring, work / "warm.parquet")  # decode workers up, as in a process that runs on
        rates: dict[bool, list[float]] = {True: [], False: []}
        waits: dict[bool, list[float]] = {True: [], False: []}
        for r in range(2):  # decoding ahead and in turn, interleaved: a drift of the host hits both alike
            for ahead in (True, False) if r == 0 else (False, True):
                out = work / f"engine-{ahead}-{r}.parquet"
                rates[ahead].append(run_engine(paths[: args.n], scoring, out, ahead=ahead))
                waits[ahead].append(DECODE_WAIT[out.name])
        used = decode_ahead_helps("cpu")  # what `cnn score` does on this host
        end_to_end, in_turn, ahead_rate = (float(np.median(rates[k])) for k in (used, False, True))
        limit = forward_rate(scoring, images)
        by_hand = pyfunc_loop(paths[: args.pyfunc_n], weights, contract, work)
        fp32_nchw = forward_rate(plain, images)
        paths_rates = {
            "fused channels_last fp32": forward_rate(fused(weights, contract), images),
            "fused channels_last bf16": forward_rate(fused(weights, contract, torch.bfloat16), images),
            **{key: forward_rate(p, images) for key, p in everyone.items() if not key.startswith("torch-")},
        }
        if args.compile:
            for dtype, name in ((None, "fp32"), (torch.bfloat16, "bf16")):
                paths_rates[f"compiled {name}"] = forward_rate(fused(weights, contract, dtype, True), images)
        rows = [
            ("(a) forward pass on tensors in memory (limit)", limit),
            (f"engine: {args.n} JPEG files -> Parquet", end_to_end),
            (f"(b) MLflow pyfunc, one call per file ({args.pyfunc_n} files)", by_hand),
        ]
        width = max(len(r[0]) for r in rows)
        for name, rate in rows:
            print(f"{name:<{width}}  {rate:8.1f} images/s")
        if args.compile:
            print(
                f"compiling (first batch): {compile_seconds:.1f} s once per process; with it the engine run "
                f"above takes {args.n / end_to_end + compile_seconds:.1f} s instead of {args.n / end_to_end:.1f} s"
            )
        print(
            f"\nengine / (a) = {end_to_end / limit:.2f} (target >= 0.8); engine / (b) = {end_to_end / by_hand:.1f}x "
            f"(target >= 3x)"
        )
        print(
            f"decoding (the engine row decodes ahead: {used}): inference waited for it "
            f"{np.median(waits[True]):.0%} of the run with the next shard decoding during inference "
            f"({ahead_rate:.1f} images/s), {np.median(waits[False]):.0%} decoding in turn ({in_turn:.1f} images/s): "
            f"ahead / in turn = {ahead_rate / in_turn:.2f}"
        )
        print(
            f"inference path, forward only: fp32 NCHW {fp32_nchw:.1f}/s; "
            + "; ".join(f"{name} {rate:.1f}/s ({rate / fp32_nchw:.2f}x)" for name, rate in paths_rates.items())
            + f"; engine's choice ({precision}) {limit / fp32_nchw:.2f}x"
        )
        accepted = [
            key
            for key, a in agreements.items()
            if key not in (precision, "torch-fp32") and (a or 0.0) >= BF16_MIN_AGREEMENT and backend == "auto"
        ]
        for key in accepted:  # every other candidate auto could pick on a host where it is the fastest
            rate = run_engine(paths[: args.n], everyone[key], work / f"{key}.parquet")
            forward = paths_rates.get(key, paths_rates["fused channels_last bf16"])  # torch-bf16's is the latter
            print(f"engine with {key}: {rate:.1f} images/s = {rate / by_hand:.1f}x (b); {rate / forward:.2f} of (a)")
        for n in [int(x) for x in args.rss_n.split(",") if x] if args.precision == "auto" else []:
            rate, rss = child_peak_rss(n, args, work, precision)
            print(f"peak RSS scoring {n:5d} images: {rss:7.1f} MiB  ({rate:.1f} images/s)")


if __name__ == "__main__":
    main()
