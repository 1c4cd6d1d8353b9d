"""Two real processes align like one batch.

`accelerate launch --cpu` runs a single process; on a CPU-only machine Accelerate's multi-process launcher is
`--multi_gpu` (torchrun underneath), which falls back to the gloo backend.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from diffusers_fair import DistributionalAlignmentLoss

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "distributed_alignment.py")
sys.path.insert(0, os.path.dirname(SCRIPT))
from distributed_alignment import batch  # noqa: E402


@pytest.mark.slow
def test_two_processes_gather_the_single_process_targets(tmp_path):
    output = tmp_path / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", SCRIPT, str(output)]
    run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(output.read_text())

    logits, mask = batch()
    attributes = {"hair": ["short", "long"], "skin": ["1", "2", "3", "4"]}
    loss, diagnostics = DistributionalAlignmentLoss("hair=uniform;skin=uniform", 0.5, attributes, seed=0)(logits, mask)
    assert result["targets"] == {a: t.tolist() for a, t in diagnostics.targets.items()}
    assert len(result["losses"]) == 2  # two processes really ran
    assert sum(result["losses"]) / 2 == pytest.approx(float(loss), rel=1e-6)
    assert torch.tensor(result["losses"]).ne(0).all()
