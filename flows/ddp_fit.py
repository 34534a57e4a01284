"""Entry point of each torchrun process: `fit` under DDP; rank 0 alone logs to MLflow and writes results."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from cnn.config import TrainConfig
from cnn.errors import UserError
from cnn.model.distributed import Dist
from cnn.model.run import EpochRecord
from cnn.model.train import fit


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset-dir", required=True)
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--config", required=True, help="TrainConfig as a JSON file")
    parser.add_argument("--run-id", default="")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    cfg = TrainConfig.model_validate_json(Path(args.config).read_text())
    dist = Dist.from_env()
    on_epoch = None
    if dist.main and args.run_id:
        from flows import tracking

        def on_epoch(record: EpochRecord) -> None:
            tracking.log_epoch(args.run_id, record)
            print(
                f"epoch {record.epoch}/{cfg.epochs}: "
                + ", ".join(f"{k} {v:.4f}" for k, v in record.metrics().items() if k in ("train_loss", "val_macro_f1")),
                flush=True,
            )

    try:
        result = fit(cfg, args.dataset_dir, args.run_dir, resume=args.resume, on_epoch=on_epoch)
    except UserError as exc:
        print(f"error: {exc}", flush=True)
        return 2
    if dist.main:
        result.save()
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: with gloo, C++ threads destroyed at exit can abort the process
    # ("terminate called without an active exception") after all work is done and saved.
    os._exit(code)
