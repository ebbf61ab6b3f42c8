"""`python -m impasto_client.bench --target HOST:PORT ...`: see cli.py for the flags."""

import argparse
import sys

from .cli import DESCRIPTION, add_arguments, run_bench


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m impasto_client.bench", description=DESCRIPTION)
    add_arguments(parser)
    return run_bench(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
