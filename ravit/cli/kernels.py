"""``ravit kernels [build|status]``: compile ravit's CPU kernels for FAN inference and ATS's static Top-K for this
machine, or say whether they are built and in use (:mod:`ravit.layers.cpu_kernels`, :mod:`ravit.ats.cpu_select`).

``build`` compiles once (about 20 s) into a cache folder (``RAVIT_KERNEL_DIR``, else ``~/.cache/ravit/kernels``);
``scripts/setup.sh`` runs it. Without the kernels FAN runs its oneDNN path and ATS its torch ops: same outputs, slower
on a CPU. ``build``
exits with code 1 and the reason when this machine cannot build them (no AVX2/AVX-512, no C++ compiler).
"""

from __future__ import annotations

import json
import sys

__all__ = ["register", "run"]


def register(subparsers) -> None:
    p = subparsers.add_parser("kernels", description=__doc__,
                              help="build ravit's CPU kernels for FAN and ATS, or show whether they are in use")
    p.add_argument("action", nargs="?", choices=("build", "status"), default="status",
                   help="'build': compile for this machine unless already built; 'status' (default): print JSON")
    p.add_argument("--force", action="store_true", help="with build: compile again even if built")
    p.set_defaults(func=run)


def run(args) -> int:
    from ravit.layers import cpu_kernels

    if args.action == "build":
        try:
            path = cpu_kernels.build(force=args.force)
        except cpu_kernels.KernelBuildError as err:
            print(f"ravit kernels: cannot build here: {err}", file=sys.stderr)
            return 1
        print(f"ravit kernels: built {path}")
        return 0
    path = cpu_kernels.library_path()
    print(json.dumps({"capability": cpu_kernels.capability(), "library": None if path is None else str(path),
                      "built": path is not None and path.is_file(), "in_use": cpu_kernels.available()}, indent=1))
    return 0
