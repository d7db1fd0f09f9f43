"""`make posttrain` (scripts/posttrain.sh) end to end at toy settings: every stage runs through the dsv3 CLI,
the SFT and GRPO evaluations are written, GRPO ran its steps, and the summary names both accuracies and a
sample. (That GRPO improves on SFT is shown at the script's defaults, not at these settings; the pieces'
behaviour is tested in test_sft.py, test_grpo.py and the task tests.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_posttrain_script_runs_every_stage(tmp_path):
    bin_dir = Path(sys.executable).parent
    env = {
        **os.environ,
        "WORK": str(tmp_path / "pt"),
        "DSV3": str(bin_dir / "dsv3"),
        "PY": sys.executable,
        "SFT_RECORDS": "200",
        "SFT_STEPS": "10",
        "GRPO_STEPS": "2",
        "G": "4",
        "PROMPTS": "2",
        "LIMIT": "8",
    }
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "posttrain.sh")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    work = tmp_path / "pt"
    sft, grpo = (json.loads((work / f"eval_{k}.json").read_text()) for k in ("sft", "grpo"))
    assert sft["problems"] == grpo["problems"] == 8 and sft["task_spec"] == "add:digits=2"
    recs = [json.loads(x) for x in (work / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if r["type"] == "grpo"] == [1, 2]
    out = proc.stdout
    assert f"after SFT {sft['greedy_pass@1']:.3f}, after GRPO {grpo['greedy_pass@1']:.3f}" in out
    assert "What is " in out and "->" in out  # the sample
