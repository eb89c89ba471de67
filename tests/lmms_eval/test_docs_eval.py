"""The Evaluate guide's `# (tested: eval)` block runs as written in the lmms-eval environment, after the
pre-training guide's first block (the model it evaluates); tests/doc_blocks.py runs both."""

import glob
import json
from pathlib import Path

from doc_blocks import DOCS, TESTED_IN_EVAL, run_shell_blocks, shell_blocks


def test_evaluate_guide_block_runs(tmp_path):
    train = next(
        block for block in shell_blocks(DOCS / "guides" / "pretrain.md") if "hive-train --vision_model" in block
    )
    evaluate = shell_blocks(DOCS / "guides" / "evaluate.md", TESTED_IN_EVAL)
    assert len(evaluate) == 1
    run_shell_blocks([train, *evaluate], tmp_path)
    [results] = glob.glob(str(tmp_path / "eval_out" / "**" / "*_results.json"), recursive=True)
    scores = json.loads(Path(results).read_text())["results"]
    assert "mme_perception_score,none" in scores["hive_demo_mme"] and "exact_match,none" in scores["hive_demo_vqa"]
