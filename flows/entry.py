"""The `cnn` console script: it sizes the process's native thread pools to the cores it may use (cnn.cpus) before
any library that starts one is loaded (numpy's OpenBLAS starts its threads on import), then runs the command line."""

from __future__ import annotations

import os


def main() -> None:
    """Console-script entry point."""
    # cnn.cpus needs only the standard library; flows.cli loads numpy, so it comes after the pools are sized
    from cnn.cpus import native_pool_settings

    os.environ.update(native_pool_settings(os.environ))
    from flows.cli import main as run

    run()
