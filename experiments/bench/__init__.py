"""Side-by-side benchmark suite for torchbp (issue 5, section 1).

One command regenerates the results files::

    python -m experiments.bench --device cpu            # or: python experiments/bench/run.py
    python -m experiments.bench --device cuda --quick   # small shapes, smoke test

Per op, forward+backward: torchbp vs native eager vs ``torch.compile(native)`` (compile
time excluded from the timings and reported separately), and on CUDA vs Liger-Kernel and
cut-cross-entropy when they import. Timings are taken A B B A ... in one process and
reported as ratios torchbp / reference. Memory: bytes saved for backward
(``saved_tensors_hooks``), peak extra RSS of a fresh subprocess (CPU) or
``max_memory_allocated`` above the inputs (CUDA).

Modules: :mod:`.cases` (shapes, inputs, implementations), :mod:`.harness` (timing and
memory), :mod:`.targets` (issue 5 / issue 6 goals), :mod:`.report` (md / json / png),
:mod:`.run` (the CLI), :mod:`.peak` (the per-case subprocess for peak RSS).
"""
