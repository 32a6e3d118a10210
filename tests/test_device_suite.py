"""``bash benchmarks/device_suite.sh --smoke`` runs the GPU suite's whole pipeline on CPU (issue 17).

GPU time comes as one short call (../shared/guide/GPU.md), so the script it runs is rehearsed here with tiny
budgets: wheels installed from ``.whl`` when carried (into a temporary folder), the tarballs unpacked, every
row of the speed table, the profile, FixMatch's and Supervised's accuracy curves and the EMA overhead table.
On an idle 2-core CPU it takes about a minute and a half; marked ``device_suite`` (run by default, in CI).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.device_suite
def test_the_device_suite_smoke_run_writes_every_table(tmp_path, shared_data):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "TMPDIR": str(tmp_path)}
    run = subprocess.run(["bash", str(REPO / "benchmarks" / "device_suite.sh"), "--smoke"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=330)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = tmp_path / "out"
    assert len(list(out.iterdir())) <= 8  # what a device call brings back
    speed = (out / "speed.md").read_text()
    for row in ("| fp32 |", "| bf16 autocast |", "| + channels_last |", "| + weak view under no_grad |",
                "| + torch.compile |"):
        assert row in speed and f"{row} failed" not in speed, speed
    assert "| EMA |" in speed and "| backward |" in speed  # the profile of the best row
    tta = (out / "tta.md").read_text()
    assert "| FixMatch |" in tta and "| Supervised |" in tta, tta
    assert "EMAModel.update, foreach" in (out / "ema_overhead.md").read_text()
    assert "Self CPU" in (out / "profile.txt").read_text()
