"""Tests for the progress lines of tensorize_model: per-layer time, elapsed time and ETA."""

from __future__ import annotations

import io
import types

import pytest
from torch import nn

import factlin.convert as convert
from factlin.convert import tensorize_model
from factlin.report import LayerRecord


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(convert, "time", types.SimpleNamespace(perf_counter=fake.perf_counter))
    return fake


def record(name: str, seconds: float, skipped: str | None = None) -> LayerRecord:
    if skipped is not None:
        return LayerRecord(name=name, shape=(8, 8), params_before=72, params_after=72,
                           skipped=skipped)  # fmt: skip
    return LayerRecord(
        name=name,
        shape=(4096, 4096),
        params_before=16_781_312,
        params_after=4_200_000,
        factorization="tt",
        rank=(1, 127, 127, 1),
        rel_error=0.85,
        seconds=seconds,
    )


def progress(mode, total, start=0.0, tty=False):
    out = convert._Progress(mode, total, start)
    out.stream = io.StringIO()
    out.tty = tty
    return out


def test_each_line_has_the_layer_time_elapsed_and_eta(clock):
    log = progress(True, 4)
    for index in range(1, 5):
        clock.now = 30.0 * index  # every layer takes 30 s
        log.layer(index, record(f"layers.{index}.mlp", 30.0))
    lines = log.stream.getvalue().splitlines()
    assert len(lines) == 4
    assert lines[0].startswith("factlin: [1/4] layers.1.mlp: tt rank (1,127,127,1)")
    assert "30.00 s; elapsed 30 s, ETA 1 min 30 s" in lines[0]
    assert lines[1].endswith("30.00 s; elapsed 1 min 00 s, ETA 1 min 00 s")
    assert lines[2].endswith("; elapsed 1 min 30 s, ETA 30 s")
    assert lines[3].endswith("; total 2 min 00 s")


def test_eta_follows_the_mean_time_per_layer(clock):
    log = progress(True, 101)
    clock.now = 5.0  # planning before the first fit is not a layer's time
    clock.now += 2.0
    log.layer(1, record("a", 2.0))
    clock.now += 10.0
    log.layer(2, record("b", 10.0))
    # 12 s for 2 layers since the first fit began, 99 left: 594 s
    assert log.stream.getvalue().splitlines()[-1].endswith("elapsed 17 s, ETA 9 min 54 s")


def test_skipped_layers_are_counted(clock):
    log = progress(True, 2)
    clock.now = 1.0
    log.layer(1, record("head", 0.0, skipped="min(in, out)=8 < min_features=16"))
    assert "[1/2] head: skipped (min(in, out)=8" in log.stream.getvalue()
    assert "ETA" in log.stream.getvalue()


def test_quiet_start_still_times_the_first_layer(clock):
    log = progress(None, 3)  # lines only once the conversion takes more than 2 s
    clock.now = 1.0
    log.layer(1, record("a", 1.0))
    assert log.stream.getvalue() == ""
    clock.now = 5.0
    log.layer(2, record("b", 4.0))
    # 5 s for 2 layers since the first fit began at 0: 2.5 s for the last one
    assert log.stream.getvalue() == (
        "factlin: [2/3] b: tt rank (1,127,127,1), 16,781,312 -> 4,200,000 params, "
        "rel error 0.85, 4.00 s; elapsed 5.0 s, ETA 2.5 s\n"
    )


def test_terminal_line_is_cut_but_keeps_the_eta(clock):
    log = progress(True, 3, tty=True)
    clock.now = 40.0
    log.layer(1, record("model." + "very_long_module_name." * 8 + "proj", 40.0))
    text = log.stream.getvalue()
    assert text.startswith("\r\x1b[K") and text.endswith("; elapsed 40 s, ETA 1 min 20 s")
    assert len(text) == len("\r\x1b[K") + 160
    log.close()
    assert log.stream.getvalue().endswith("\n")


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.04, "0.0 s"), (9.94, "9.9 s"), (42.4, "42 s"), (59.6, "1 min 00 s"), (185, "3 min 05 s"),
     (3720, "1 h 02 min"), (86400 + 60, "24 h 01 min")],
)  # fmt: skip
def test_duration_format(seconds, text):
    assert convert._duration(seconds) == text


def test_tensorize_model_prints_eta(capsys):
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.Linear(64, 32))
    tensorize_model(model, rank=0.5, factorization="tt", progress=True)
    lines = capsys.readouterr().err.splitlines()
    assert lines, "progress=True prints a line per layer"
    assert all(line.startswith("factlin: [") for line in lines)
    assert all(" s; elapsed " in line and ", ETA " in line for line in lines[:-1])
    assert "; total " in lines[-1]
