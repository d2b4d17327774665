"""``python -m genattr.bench <name> [options]``: write throughput / memory figures as JSON."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m genattr.bench", description=__doc__)
    sub = parser.add_subparsers(dest="bench", required=True)
    from genattr.bench import lorax, unlearn

    lorax.add_arguments(sub.add_parser("lorax", help=lorax.__doc__.splitlines()[0]))
    unlearn.add_arguments(sub.add_parser("unlearn", help=unlearn.__doc__.splitlines()[0]))
    args = parser.parse_args(argv)
    return {"lorax": lorax.main, "unlearn": unlearn.main}[args.bench](args)


if __name__ == "__main__":
    sys.exit(main())
