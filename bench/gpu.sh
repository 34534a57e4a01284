#!/usr/bin/env bash
# One prepared GPU check (finishes well within 10 minutes on one GPU): a short resnet18 training with AMP
# (bf16 where supported) and channels_last, then scoring JPEG files to Parquet, printing images/s for both.
#   bash bench/gpu.sh            # uses .venv/bin/python when present, else python3
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export WORK NO_ALBUMENTATIONS_UPDATE=1
"$PY" - <<'PYEOF'
import os, time
from pathlib import Path

import pandas as pd
import torch

from cnn.config import TrainConfig
from cnn.demo_data import generate
from cnn.inference import Predictor
from cnn.ingest import IngestOptions, ingest
from cnn.scoring import ModelRef, score_files
from cnn.sinks import FileSink
from cnn.train import fit

assert torch.cuda.is_available(), "bench/gpu.sh needs a CUDA GPU"
work = Path(os.environ["WORK"])
print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"bf16 {torch.cuda.is_bf16_supported()}")
made = generate("claims", work / "src", n=3000, size=320)
t = time.perf_counter()
ingest(made.source, work / "ds", IngestOptions(image_size=224, channels=3))
print(f"ingest: {3000 / (time.perf_counter() - t):.0f} images/s (CPU decode)")
for policy in ("none", "photo"):
    cfg = TrainConfig(model="resnet18", epochs=3, batch_size=128, lr=1e-3, policy=policy, device="cuda",
                      amp=True, channels_last=True, workers=8, patience=0)
    result = fit(cfg, work / "ds", work / f"run-{policy}")
    rates = [h["train_images_per_s"] for h in result.history[1:]]
    print(f"train resnet18 224px AMP channels_last, policy {policy}: {sum(rates) / len(rates):.0f} images/s")
predictor = Predictor.load(work / "run-none" / "best.pt", work / "run-none" / "contract.json", "cuda",
                           channels_last=True, fuse=True)
paths = sorted(str(p) for p in (work / "src").rglob("*.jpg"))
sink, start = FileSink(work / "preds.parquet"), time.perf_counter()
for shard in range(0, len(paths), 512):
    preds, rejects = score_files(pd.DataFrame({"path": paths[shard:shard + 512]}), [], predictor,
                                 ModelRef("bench", "1", ""), batch_size=256)
    sink.commit(shard // 512, preds, rejects)
sink.finish()
print(f"score JPEG -> Parquet, AMP channels_last: {len(paths) / (time.perf_counter() - start):.0f} images/s")
images = torch.randint(0, 256, (1024, 224, 224, 3), dtype=torch.uint8).numpy()
predictor.predict_arrays(images[:256], 256)
torch.cuda.synchronize()
start = time.perf_counter()
predictor.predict_arrays(images, 256)
torch.cuda.synchronize()
print(f"forward only on tensors in memory: {1024 / (time.perf_counter() - start):.0f} images/s")
compiled = predictor.compiled()  # as cnn score --compile
start = time.perf_counter()
compiled.predict_arrays(images[:256], 256)
torch.cuda.synchronize()
compile_seconds = time.perf_counter() - start
start = time.perf_counter()
compiled.predict_arrays(images, 256)
torch.cuda.synchronize()
print(f"forward only, compiled: {1024 / (time.perf_counter() - start):.0f} images/s "
      f"(compiling took {compile_seconds:.0f} s; fell back to eager: {compiled.compile_failed})")
PYEOF
