"""``experiments/bench/cases.py``: each system does what its row claims to measure."""

from experiments.bench import cases, harness


def test_inplace_cross_entropy_peak_shows_the_logits_sized_buffer_it_saves():
    # cross_entropy(..., inplace=True) saves one logits-sized allocation: the case must not
    # put one back (a leaf whose gradient is as large as the logits)
    opts = cases.Options(device="cpu", quick=True, compile="none", peers=False)
    logits_bytes = cases.build("cross_entropy", opts).logits_bytes
    kwargs = {"quick": True, "compile_mode": "none"}
    plain = harness.rss_peak_subprocess("cross_entropy", "torchbp", **kwargs)
    inplace = harness.rss_peak_subprocess("cross_entropy", "torchbp_inplace", **kwargs)
    assert plain["peak_extra_bytes"] >= 0.75 * logits_bytes  # the gradient itself
    assert inplace["peak_extra_bytes"] < 0.25 * logits_bytes
