"""``python -m experiments.bench``: see :mod:`experiments.bench.run`."""

from experiments.bench.run import main

if __name__ == "__main__":
    raise SystemExit(main())
