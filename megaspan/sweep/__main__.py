"""``python -m megaspan.sweep``: the job-array helper the Slurm script calls (stdlib only).

    python -m megaspan.sweep --list sweep.yaml             # table of cells + array size
    python -m megaspan.sweep --count sweep.yaml            # just N
    python -m megaspan.sweep --name sweep.yaml             # just the sweep's name
    python -m megaspan.sweep --cell 3 sweep.yaml           # <sweep>/<cell>, then one train arg per line
    python -m megaspan.sweep --freeze out.json sweep.yaml  # resolved cells as JSON (no PyYAML later)

Users run ``megaspan sweep`` instead; this entry point exists for ``launch/slurm/sweep.sbatch``
and ``launch/submit``, which may run under a python without torch.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megaspan.sweep.spec import SweepError, cell_args, expand, freeze, load, resolve_sweep_file


def main(argv: list[str] | None = None, prog: str = "python -m megaspan.sweep") -> int:
    parser = argparse.ArgumentParser(prog=prog, description="Expand a megaspan sweep into job-array cells.")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--list", action="store_true", help="print the cells and the array size")
    mode.add_argument("--count", action="store_true", help="print the number of cells")
    mode.add_argument("--name", action="store_true", help="print the sweep's name")
    mode.add_argument("--cell", type=int, metavar="I", help="print cell I: its name, then its args")
    mode.add_argument("--freeze", metavar="OUT.json", help="write the resolved cells as JSON")
    parser.add_argument("sweep", help="sweep definition (.yaml/.yml/.json), frozen .json, or shipped name")
    args = parser.parse_args(argv)
    try:
        path = resolve_sweep_file(args.sweep)
        sweep = expand(load(path), str(path), path.parent)
        n = len(sweep["cells"])
        if args.count:
            print(n)
        elif args.name:
            print(sweep["name"])
        elif args.cell is not None:
            out = cell_args(sweep, args.cell)
            print(f"{sweep['name']}/{sweep['cells'][args.cell]['name']}")
            print("\n".join(out))
        elif args.freeze:
            freeze(sweep, Path(args.freeze))
            print(n)
        else:
            for cell in sweep["cells"]:
                print(f"{cell['index']:4d}  {sweep['name']}/{cell['name']}  {' '.join(cell['overrides'])}")
            if sweep.get("config"):
                print(f"config: {sweep['config']}")
            print(f"array size: {n}  (sbatch --array=0-{n - 1} launch/slurm/sweep.sbatch {args.sweep})")
    except SweepError as exc:
        print(f"{parser.prog}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
