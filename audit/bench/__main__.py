"""``python -m audit.bench <command> [options]``; see :mod:`audit.bench`."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {
        "scoring": ("audit.bench.scoring", "scoring"),
        "arm": ("audit.bench.scoring", "arm"),
        "levers": ("audit.bench.levers", "levers"),
        "stages": ("audit.bench.stages", "stages"),
        "features": ("audit.bench.features", "features"),
        "pixels": ("audit.bench.pixels", "pixels"),
        "gen-images": ("audit.bench.scale", "gen_images"),
        "gen-preds": ("audit.bench.scale", "gen_preds"),
        "scale": ("audit.bench.scale", "scale"),
        "post": ("audit.bench.scale", "post"),
        "heads": ("audit.bench.heads", "heads"),
        "checks": ("audit.bench.checks", "checks"),
        "ray": ("audit.bench.ray", "ray"),
        "ray-arm": ("audit.bench.ray", "arm"),
    }
    if not argv or argv[0] not in commands:
        import audit.bench

        print(audit.bench.__doc__)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    import importlib

    mod, fn = commands[argv[0]]
    return int(getattr(importlib.import_module(mod), fn)(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
