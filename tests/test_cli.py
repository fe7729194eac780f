"""Tests of factlin/cli.py and factlin/__main__.py."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest

from factlin.cli import main, parse_rank
from factlin.factorizations import resolve_rank
from factlin.layer import FactorizedLinear
from factlin.tensorized_shape import get_tensorized_shape


def run(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    code = main(argv, out=out)
    return code, out.getvalue()


def test_plan_table():
    code, text = run(["plan", "64", "256", "--rank", "0.1", "--batch", "8", "--repeats", "2"])
    assert code == 0
    assert text.startswith("64 -> 256: tensorized (4, 4, 4) -> (4, 8, 8), rank 0.1, batch 8")
    for factorization in ("cp", "tucker", "tt"):
        assert f"\n{factorization}: rank " in text
    assert text.count("reconstructed") >= 3 and "compression" in text and " ms" in text


@pytest.mark.parametrize("rank", ["same", "0.25", "3"])
def test_plan_json_matches_the_library(rank):
    argv = ["plan", "48", "96", "--rank", rank, "--batch", "16", "--repeats", "1", "--json"]
    code, text = run(argv)
    assert code == 0
    result = json.loads(text)
    in_shape, out_shape = get_tensorized_shape(48, 96, order=3)
    assert result["in_tensorized_features"] == list(in_shape)
    assert result["out_tensorized_features"] == list(out_shape)
    dense = 48 * 96
    assert result["dense"]["params"] == dense and result["dense"]["flops"] == 2 * 16 * dense
    assert result["dense"]["seconds"] > 0
    assert [row["factorization"] for row in result["factorizations"]] == ["cp", "tucker", "tt"]
    for row in result["factorizations"]:
        layer = FactorizedLinear(
            in_shape, out_shape, factorization=row["factorization"], rank=parse_rank(rank)
        )
        resolved, params = resolve_rank(row["factorization"], parse_rank(rank), in_shape, out_shape)
        assert row["params"] == params == layer.weight.num_parameters()
        assert row["rank"] == (list(resolved) if isinstance(resolved, tuple) else resolved)
        assert row["compression"] == pytest.approx(dense / params)
        assert row["flops_factorized"] == layer.weight.contract_flops(16)
        assert row["flops_reconstructed"] == layer.weight.matrix_flops() + 2 * 16 * dense
        assert row["seconds_factorized"] > 0 and row["seconds_reconstructed"] > 0


def test_plan_options():
    code, text = run(
        ["plan", "1024", "1024", "-r", "16,16", "-f", "TT", "-f", "blocktt", "--modes", "3",
         "--repeats", "0", "--json", "--threads", "1"]
    )  # fmt: skip
    assert code == 0
    result = json.loads(text)
    assert [row["factorization"] for row in result["factorizations"]] == ["tt"]
    assert result["factorizations"][0]["rank"] == [1, 16, 16, 1]
    assert result["factorizations"][0]["seconds_factorized"] is None
    assert result["dense"]["seconds"] is None
    code, text = run(["plan", "97", "64", "--modes", "2", "--repeats", "0", "-f", "cp"])
    assert code == 0 and "tensorized (97,) -> (64,)" in text


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["plan", "0", "64"], "argument IN: expected a positive integer, got 0"),
        (["plan", "64", "x"], "argument OUT: expected a positive integer, got 'x'"),
        (["plan", "64", "64", "--rank", "abc"], "argument --rank/-r: expected 'same'"),
        (["plan", "64", "64", "--rank", "-1"], "factlin: error: rank=-1"),
        (["plan", "64", "64", "--rank", "0.0"], "factlin: error: rank=0.0"),
        (["plan", "64", "64", "-r", "2,2,2", "-f", "tt"], "factlin: error: rank=(2, 2, 2)"),
        (["plan", "64", "64", "-f", "foo"], "factorization='foo' is not known"),
        (["plan", "64", "64", "--batch", "0"], "argument --batch/-b"),
        (["plan", "64", "64", "--repeats", "-1"], "argument --repeats"),
        (["plan", "64"], "the following arguments are required: OUT"),
        (["plan", "64", "64", "--bogus"], "unrecognized arguments: --bogus"),
        ([], "the following arguments are required: COMMAND"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["demo", "--plot", "/no/such/dir/x.png"], "factlin: error: --plot"),
    ],
)
def test_bad_arguments_exit_2(capsys, argv, message):
    if argv[:1] == ["demo"]:
        pytest.importorskip("sklearn")  # without the demo extra the missing extra is reported
        pytest.importorskip("matplotlib")
    code, text = run(argv)
    assert code == 2 and text == ""
    err = capsys.readouterr().err
    assert message in err
    assert "error: " in err


def test_too_large_to_time(capsys):
    assert run(["plan", "100000", "100000", "-r", "0.01", "-f", "tt"])[0] == 2
    assert "--repeats 0" in capsys.readouterr().err
    code, text = run(["plan", "100000", "100000", "-r", "0.001", "-f", "tt", "--repeats", "0"])
    assert code == 0 and "tt: rank" in text


def test_help(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "usage: factlin" in text and "examples:" in text and "factlin plan 768 3072" in text
    assert main(["plan", "--help"]) == 0
    text = capsys.readouterr().out
    assert "--rank" in text and "--json" in text and "examples:" in text
    assert main(["demo", "-h"]) == 0
    assert "--quick" in capsys.readouterr().out


def test_python_dash_m():
    result = subprocess.run(
        [sys.executable, "-m", "factlin", "plan", "8", "8", "--rank", "x"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "factlin plan: error: argument --rank/-r" in result.stderr


@pytest.mark.parametrize(
    ("text", "rank"),
    [("same", "same"), ("SAME", "same"), ("0.5", 0.5), ("1e-1", 0.1), ("7", 7), ("4,8", (4, 8))],
)
def test_parse_rank(text, rank):
    assert parse_rank(text) == rank
