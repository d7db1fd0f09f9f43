"""`dsv3 plan pipeline`: text, JSON and PNG output of the schedule simulator, and its errors."""

from __future__ import annotations

import argparse
import json

import pytest

from dsv3.parallel.pipeline import cli as pipeline_cli


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    pipeline_cli.add_arguments(parser)
    return pipeline_cli.run(parser.parse_args(argv))


def test_json_has_per_rank_bubbles_activations_and_params(capsys):
    assert _run(["--schedule", "dualpipe", "--pp", "8", "--microbatches", "20", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert len(d["bubble"]) == 8 and len(d["activations"]) == 8
    assert max(d["bubble"]) == pytest.approx(d["table_bubble"]) == pytest.approx(3 * (3 + 2 - 3))
    assert max(d["activations"]) == 9 and d["params"] == [2.0] * 8
    assert "exact" in d["table_exactness"]


def test_dualpipev_pp_counts_stages(capsys):
    assert (
        _run(
            [
                "--schedule",
                "dualpipev",
                "--pp",
                "8",
                "--json",
                "--f",
                "2",
                "--b",
                "3",
                "--w",
                "1",
                "--fb",
                "4",
            ]
        )
        == 0
    )
    d = json.loads(capsys.readouterr().out)
    assert d["devices"] == 4 and d["stages"] == 8 and d["microbatches"] == 16
    assert max(d["bubble"]) == pytest.approx((8 / 2 - 1) * (4 + 3 - 3 * 1))
    help_text = argparse.ArgumentParser()
    pipeline_cli.add_arguments(help_text)
    assert "STAGES" in help_text.format_help() and "pp/2 devices" in help_text.format_help()


def test_text_table_and_png(tmp_path, capsys):
    png = tmp_path / "zb.png"
    assert _run(["--schedule", "zb1p", "--pp", "4", "--microbatches", "8", "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "Table 2 bubble 3" in out and "exact on every rank" in out
    assert png.stat().st_size > 5000 and png.read_bytes()[:4] == b"\x89PNG"


def test_through_the_dsv3_command(capsys):
    from dsv3.cli import main

    assert main(["plan", "pipeline", "--schedule", "1f1b", "--pp", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["bubble"] == [9.0] * 4
    assert main(["plan", "pipeline", "--schedule", "dualpipe", "--pp", "4", "--microbatches", "7"]) == 2
    assert "even number of micro-batches" in capsys.readouterr().err
    assert main(["plan", "pipeline", "--schedule", "zb1p", "--pp", "2", "--b", "1", "--w", "2"]) == 2
    assert "cannot exceed B" in capsys.readouterr().err
