"""The example scripts users copy run end to end and report what they claim."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_trains_saves_and_reloads(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py"), "--output_dir", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "AutoModel reload gives identical logits: True" in result.stdout
    assert (tmp_path / "out" / "model.safetensors").is_file()
