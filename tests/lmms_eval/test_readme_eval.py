"""The README's "Evaluate" block runs as written in the lmms-eval environment (after the hive-train block it uses)."""

import glob
import json
import os
import re
import subprocess
import sys
from pathlib import Path

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()
BLOCKS = re.findall(r"```bash\n(.*?)```", README, flags=re.S)


def test_readme_evaluate_block_runs(tmp_path):
    train = next(b for b in BLOCKS if b.startswith("# (tested)") and "hive-train --vision_model" in b)
    evaluate = [b for b in BLOCKS if b.startswith("# (tested: eval)")]
    assert len(evaluate) == 1
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1"}
    for block in (train, evaluate[0]):
        result = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, capture_output=True, text=True,
                                env=env, timeout=900)  # fmt: skip
        assert result.returncode == 0, block + result.stdout[-2000:] + result.stderr[-3000:]
    [results] = glob.glob(str(tmp_path / "eval_out" / "**" / "*_results.json"), recursive=True)
    scores = json.loads(Path(results).read_text())["results"]
    assert "mme_perception_score,none" in scores["hive_demo_mme"] and "exact_match,none" in scores["hive_demo_vqa"]
