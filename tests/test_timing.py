"""How mla_tutorial.timing measures (chapters 04 and 05): which runs it times, and its errors.

Timings themselves are benchmarks, not tests: a fake clock makes every duration known here.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import pytest
import torch
from matplotlib.ticker import FormatStrFormatter, NullFormatter

from mla_tutorial import MLA_MODES, MLAConfig, MultiHeadLatentAttention
from mla_tutorial import timing
from mla_tutorial.timing import best_times, decode_step_times, plain_ticks


class FakeClock:
    """time.perf_counter that advances only when a timed function says how long it took."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def spend(self, seconds):
        self.now += seconds


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(timing.time, "perf_counter", fake)
    return fake


def test_best_times_is_the_fastest_timed_run_and_skips_the_warm_up(clock):
    durations = {"a": iter([100.0, 5.0, 3.0, 4.0]), "b": iter([50.0, 2.0, 7.0, 1.5])}  # first: warm-up
    fns = {name: (lambda it=it: clock.spend(next(it))) for name, it in durations.items()}
    assert best_times(fns, repeats=3) == {"a": 3.0, "b": 1.5}
    for it in durations.values():
        assert next(it, None) is None, "each function runs repeats + 1 times"


def test_best_times_takes_turns_and_runs_setups_untimed(clock):
    calls = []
    fns = {"a": lambda: (calls.append("a"), clock.spend(1.0)), "b": lambda: (calls.append("b"), clock.spend(2.0))}
    setups = {"a": lambda: (calls.append("setup a"), clock.spend(1000.0))}
    assert best_times(fns, repeats=2, setups=setups) == {"a": 1.0, "b": 2.0}
    assert calls == ["setup a", "a", "b"] * 3, "one run of each per round; the setup right before its function"


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(fns={}, repeats=1), ValueError, "non-empty"),
    (dict(fns={"a": 3}, repeats=1), TypeError, "not a function"),
    (dict(fns={"a": lambda: None}, repeats=0), ValueError, "positive int"),
    (dict(fns={"a": lambda: None}, repeats=2.0), ValueError, "positive int"),
    (dict(fns={"a": lambda: None}, repeats=True), ValueError, "positive int"),
    (dict(fns={"a": lambda: None}, repeats=1, setups={"b": lambda: None}), ValueError, "no function"),
    (dict(fns={"a": lambda: None}, repeats=1, setups={"a": None}), TypeError, "not a function"),
])
def test_best_times_rejects_bad_input_before_running(kwargs, error, match):
    with pytest.raises(error, match=match):
        best_times(**kwargs)


@pytest.fixture(scope="module")
def layer():
    torch.manual_seed(0)
    return MultiHeadLatentAttention(MLAConfig.tiny()).eval()


def test_decode_step_times_times_one_step_per_mode_at_a_fixed_context(layer, monkeypatch):
    seen = []
    real_forward = MultiHeadLatentAttention.forward

    def forward(self, x, cache=None, mode=None, key_mask=None):
        seen.append((cache.mode, len(cache), tuple(x.shape)))
        return real_forward(self, x, cache, mode, key_mask)

    monkeypatch.setattr(MultiHeadLatentAttention, "forward", forward)
    times = decode_step_times(layer, MLA_MODES, context=9, repeats=2)
    assert set(times) == set(MLA_MODES) and all(0 < t < 60 for t in times.values()), times
    hidden = layer.config.hidden_size
    assert seen == [(mode, 9, (1, 1, hidden)) for mode in MLA_MODES] * 3, "every step sees exactly 9 cached tokens"


def test_decode_step_times_gives_the_same_step_in_every_mode(layer, monkeypatch):
    # the three modes decode the same new token over the same cached latents: their outputs agree
    outputs = {}
    real_forward = MultiHeadLatentAttention.forward

    def forward(self, x, cache=None, mode=None, key_mask=None):
        outputs[cache.mode] = real_forward(self, x, cache, mode, key_mask)
        return outputs[cache.mode]

    monkeypatch.setattr(MultiHeadLatentAttention, "forward", forward)
    decode_step_times(layer, MLA_MODES, context=5, repeats=1)
    torch.testing.assert_close(outputs["latent"], outputs["expanded"])
    torch.testing.assert_close(outputs["absorbed"], outputs["expanded"])


@pytest.mark.parametrize("args, error, match", [
    (("not a layer", ["absorbed"], 4, 1), TypeError, "MultiHeadLatentAttention"),
    (("LAYER", [], 4, 1), ValueError, "at least one mode"),
    (("LAYER", ["fast"], 4, 1), ValueError, "unknown MLA mode"),
    (("LAYER", ["absorbed"], 0, 1), ValueError, "context must be a positive int"),
    (("LAYER", ["absorbed"], 4.5, 1), ValueError, "context must be a positive int"),
    (("LAYER", ["absorbed"], 4, 0), ValueError, "repeats must be a positive int"),
])
def test_decode_step_times_rejects_bad_input(layer, args, error, match):
    args = tuple(layer if a == "LAYER" else a for a in args)
    with pytest.raises(error, match=match):
        decode_step_times(*args)


def test_plain_ticks_sets_plain_number_labels_on_both_axes():
    fig, ax = plt.subplots()
    ax.loglog([1, 10, 1000], [0.5, 2, 20])
    plain_ticks(ax)
    for axis in (ax.xaxis, ax.yaxis):
        assert isinstance(axis.get_major_formatter(), FormatStrFormatter)
        assert isinstance(axis.get_minor_formatter(), NullFormatter)
    fig.canvas.draw()
    labels = {t.get_text() for t in ax.xaxis.get_ticklabels() if t.get_text()}
    assert {"1", "10", "1000"} <= labels, labels
    plt.close(fig)
