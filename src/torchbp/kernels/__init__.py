"""The fast paths, apart from the reference formulas of :mod:`torchbp.autograd`: fewer-pass
torch-op kernels written for the CPU (:mod:`.cpu_act`, :mod:`.cpu_ce`) and Triton kernels
for CUDA (:mod:`.triton_act`, :mod:`.triton_ce`), each tested against the formula it
accelerates. Nothing here imports Triton at import time: the Triton modules import it
lazily, so that CPU-only installs never need it."""
