"""Package metadata: no upper cap on torch (the user's torch is theirs), the development pin
in constraints.txt matching requirements-dev.txt, the license as an SPDX string (issue 9)."""
import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]


def test_torch_floor_without_cap_and_pins_in_the_dev_files():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    torch_req = [d for d in project["dependencies"] if re.match(r"torch\b", d)]
    assert len(torch_req) == 1 and ">=" in torch_req[0] and "<" not in torch_req[0].replace(">=", "")
    assert isinstance(project["license"], str)
    pins = {}
    for name in ("requirements-dev.txt", "constraints.txt"):
        lines = (ROOT / name).read_text().splitlines()
        pins[name] = [ln.strip() for ln in lines if re.match(r"torch==", ln.strip())]
    assert pins["constraints.txt"] and pins["constraints.txt"] == pins["requirements-dev.txt"]
