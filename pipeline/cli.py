"""The `barlow` command: one thin subcommand per module.

Each module named in COMMANDS provides `add_arguments(parser)` and `run(args) -> int`. Modules are
imported only for the command that runs, so `barlow --help` is instant and `barlow shards` never
imports onnxruntime or bentoml.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from pipeline import storage
from pipeline.errors import UserError

COMMANDS: dict[str, tuple[str, str]] = {
    "shards": ("pipeline.data.shards", "write WebDataset shards from an image folder or Fashion-MNIST"),
    "train": ("pipeline.train.loop", "Barlow Twins pretraining; writes RUN_DIR with checkpoints and encoder.pt"),
    "demo": ("pipeline.demo", "the whole flow on Fashion-MNIST, sized for a laptop"),
    "export": ("pipeline.export", "export RUN_DIR/encoder.pt to MODEL_DIR (ONNX + model.json) with a parity check"),
    "serve": ("pipeline.serve", "serve MODEL_DIR as the /embed HTTP API (bentoml serve serving.service:Embedder)"),
    "eval": ("pipeline.evaluate.run", "kNN or linear-probe accuracy of MODEL_DIR or RUN_DIR features on labelled data"),
    "embed": ("pipeline.embed.embed", "embed image shards, folders or path lists with MODEL_DIR into EMB_DIR (parquet parts)"),
    "index": ("pipeline.embed.index", "build or update a faiss index (cosine; flat or ivf-pq) over EMB_DIR into INDEX_DIR"),
    "search": ("pipeline.embed.search", "nearest neighbours of images (or of an indexed key) in INDEX_DIR, as JSON lines"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="barlow", description="Barlow Twins pretraining and embedding.")
    parser.add_argument("--storage-options", metavar="JSON",
                        help="options for bucket URLs, e.g. '{\"endpoint_url\": \"http://minio:9000\"}' (flat, or "
                             "keyed by scheme: {\"s3\": {...}}); credentials come from each cloud's standard chain")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, summary) in COMMANDS.items():
        commands.add_parser(name, help=summary, add_help=False)
    args, rest = parser.parse_known_args(argv)
    module_name, summary = COMMANDS[args.command]
    module = importlib.import_module(module_name)
    command_parser = argparse.ArgumentParser(prog=f"barlow {args.command}", description=summary)
    module.add_arguments(command_parser)
    command_args = command_parser.parse_args(rest)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        storage.set_options(args.storage_options)
        return int(module.run(command_args) or 0)
    except UserError as exc:
        print(f"barlow {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"barlow {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
