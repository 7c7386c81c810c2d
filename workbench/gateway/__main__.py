"""``python -m workbench.gateway [--config C] [--port P] [prune|export-audit|add-key ...]``: the
same commands as ``workbench gateway``, without loading the workbench CLI (benchmarks, containers)."""

import argparse
import logging
import sys

from workbench.gateway.cli import add_parser, run

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="workbench")
    sub = parser.add_subparsers(dest="command")
    add_parser(sub)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(run(parser.parse_args(["gateway", *sys.argv[1:]])))
