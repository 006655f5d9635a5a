"""``python -m vit.engine CONFIG [--set key=value ...] [--metrics FILE]`` — one training run; works under torchrun.

Exit codes: 0 finished, 2 invalid configuration, 3 non-finite loss (last good checkpoint kept),
143 stopped by SIGTERM or Ctrl-C (checkpoint written; run the same command again to resume).
"""

from __future__ import annotations

import argparse
import json
import sys

from vit.engine.callbacks import JsonlLog, ProgressBar
from vit.engine.config import TrainConfig
from vit.engine.distributed import init_distributed, shutdown
from vit.engine.exit_codes import EXIT_INVALID, EXIT_NONFINITE, EXIT_PREEMPTED
from vit.engine.run import decode_device, train
from vit.engine.trainer import NonFiniteLossError, Preempted


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vit.engine", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("config", help="training config, YAML or JSON (fields of vit.engine.TrainConfig)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a field, e.g. --set optim.lr=0.01 --set steps=500 (repeatable)",
    )
    parser.add_argument("--metrics", help="append JSON-lines events (metrics, evals, checkpoints) to this file")
    parser.add_argument("--result", help="write the final result (step, eval metrics, model URI) as JSON here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        cfg = TrainConfig.load(args.config, args.overrides)
        dist = init_distributed(cfg.device)
        cfg.validate(dist.world_size)
        decode_device(cfg, dist.device)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_INVALID
    callbacks = [ProgressBar(disable=args.no_progress)]
    if args.metrics:
        callbacks.append(JsonlLog(args.metrics))
    try:
        outcome = train(cfg, callbacks, dist)
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_NONFINITE
    except Preempted as e:
        print(str(e), file=sys.stderr)
        return EXIT_PREEMPTED
    finally:
        shutdown()
    if args.result and dist.is_main:
        with open(args.result, "w") as f:
            json.dump(
                {
                    "step": outcome.step,
                    "resumed_from": outcome.resumed_from,
                    "eval": outcome.eval,
                    "model_uri": outcome.model_uri,
                    "rank_digests": outcome.rank_digests,
                },
                f,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
