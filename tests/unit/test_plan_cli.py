"""`dsv3 plan`: JSON and table output, bad input, and the `plan pipeline` pass-through."""

import argparse
import json

import pytest

from dsv3.cli import main
from dsv3.plan import cli as plan_cli

PAPER = [
    "--preset", "deepseek-v3-671b", "--pp", "16", "--ep", "64", "--gpus", "2048", "--schedule", "dualpipe",
    "--tokens", "14.8T", "--hardware", "h800", "--gpu-hours-per-trillion", "180K", "--price", "2",
]  # fmt: skip


def _plan(argv):
    parser = argparse.ArgumentParser(prog="dsv3 plan")
    plan_cli.add_arguments(parser)
    args = parser.parse_args(argv)
    return plan_cli.run(args)


def test_paper_run_json(capsys):
    assert _plan([*PAPER, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in (
        "params_total",
        "params_active",
        "kv_bytes_per_token",
        "train_flops_per_token",
        "gpu_hours",
        "mfu",
    ):
        assert out[key] is not None
    assert out["params_total"] == 671_026_404_352
    assert round(out["params_active"] / 1e9) == 37
    assert out["kv_bytes_per_token"] == 70_272
    assert out["gpu_hours"] == pytest.approx(2_664_000)
    assert out["dollars"] == pytest.approx(5_328_000)
    assert 0.3 < out["mfu"] < 0.5
    assert out["memory"]["layout"]["dp"] == 128 and out["memory"]["fits"]
    assert out["comm"]["nodes"] == 8 and out["comm"]["ib_copies"] == 4  # node limit M = topk_group = 4


def test_paper_run_table_through_dsv3_main(capsys):
    assert main(["plan", *PAPER]) == 0
    out = capsys.readouterr().out
    assert "2,664.0K" in out and "$5.328M" in out and "MFU" in out and "70,272 bytes" in out


def test_throughput_implies_mfu_and_no_cost_without_throughput(capsys):
    assert _plan(["--preset", "tiny", "--tokens-per-gpu-s", "1e5", "--hardware", "h100", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mfu"] == pytest.approx(1e5 * out["train_flops_per_token"] / 989.5e12)
    assert out["gpu_hours"] is None  # no --tokens
    assert _plan(["--preset", "debug", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mfu"] is None and out["cost"] is None and out["comm"] is None


def test_config_file(tmp_path, capsys):
    from dsv3.config import ModelConfig

    path = tmp_path / "config.json"
    path.write_text(json.dumps(ModelConfig.from_preset("small").to_hf()))
    assert _plan(["--config", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["params_total"] == 132_509_184


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--ep", "3"], "does not divide n_routed_experts"),
        (["--pp", "100"], "blocks"),
        (["--pp", "3", "--schedule", "dualpipe"], "even pp"),
        (["--gpus", "10", "--pp", "4"], "not divisible"),
        (["--dp", "-2"], "--dp must be positive"),
        (["--seq-len", "0"], "--seq-len must be positive"),
        (["--tokens", "1T"], "needs a throughput"),
        (["--mfu", "2", "--tokens", "1T"], "<= 1"),
        (["--price", "-1"], "--price"),
        (["--preset", "tiny", "--config", "x.json"], "not both"),
    ],
)
def test_bad_input_is_a_clean_error(argv, match, capsys):
    assert main(["plan", *argv]) == 2
    err = capsys.readouterr().err
    assert "dsv3 plan: error:" in err and match in err and "Traceback" not in err


def test_negative_tokens_rejected_by_parser(capsys):
    with pytest.raises(SystemExit):
        _plan(["--tokens", "-5", "--mfu", "0.4"])
    assert "must be positive" in capsys.readouterr().err
    assert plan_cli.parse_count("14.8T") == 14.8e12 and plan_cli.parse_count("500B") == 5e11


def test_pipeline_subcommand_passes_arguments_through(monkeypatch, capsys):
    from dsv3.parallel.pipeline import cli as pipeline_cli

    seen = {}

    def add_arguments(p):
        p.add_argument("--schedule")
        p.add_argument("--pp", type=int)
        p.add_argument("--microbatches", type=int)

    def run(args):
        seen.update(vars(args))
        return 0

    monkeypatch.setattr(pipeline_cli, "add_arguments", add_arguments)
    monkeypatch.setattr(pipeline_cli, "run", run)
    assert main(["plan", "pipeline", "--schedule", "dualpipe", "--pp", "8", "--microbatches", "20"]) == 0
    assert seen == {"schedule": "dualpipe", "pp": 8, "microbatches": 20}
