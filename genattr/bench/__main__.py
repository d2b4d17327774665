"""``python -m genattr.bench <name> [options]``: write throughput / memory figures as JSON."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m genattr.bench", description=__doc__)
    sub = parser.add_subparsers(dest="bench", required=True)
    from genattr.bench import detector, gslora, lorax, unlearn

    benches = {"lorax": lorax, "detector": detector, "gslora": gslora, "unlearn": unlearn}
    for name, module in benches.items():
        module.add_arguments(sub.add_parser(name, help=module.__doc__.splitlines()[0]))
    args = parser.parse_args(argv)
    return benches[args.bench].main(args)


if __name__ == "__main__":
    sys.exit(main())
