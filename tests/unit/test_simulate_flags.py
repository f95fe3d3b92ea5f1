"""`deeprad simulate` refuses bad numbers and mismatched dataset folders with one line naming
the flag, before any worker starts (found with hand-made folders and a real tabular set)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from deeprad.cli import main
from deeprad.core.errors import ConfigError
from deeprad.simulate.config import DEFAULT_SITES, site_count

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("flag,value,says", [
    ("--image-size", "6", "--image-size 6: input should be greater than or equal to 8"),
    ("--batch-size", "0", "--batch-size 0: input should be greater than or equal to 1"),
    ("--lr", "-1", "--lr -1.0: input should be greater than 0"),
    ("--local-epochs", "-1", "--local-epochs -1: input should be greater than or equal to 1"),
    ("--fedprox-mu", "-0.5", "--fedprox-mu -0.5: input should be greater than or equal to 0"),
])
def test_a_bad_number_is_one_line_naming_its_flag(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str],
                                                  flag: str, value: str, says: str) -> None:
    out = tmp_path / "run"
    assert main(["simulate", flag, value, "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == f"deeprad simulate: {says}\n"  # one line, no traceback
    assert not out.exists()  # nothing ran


def _folder(tmp_path: Path, sites: int) -> Path:
    root = tmp_path / "data"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(sites):
        np.savez(root / f"site_{i}.npz", images=rng.random((8, 16, 16), dtype=np.float32),
                 labels=np.arange(8) % 2)
    return root


def test_the_folder_decides_how_many_hospitals(tmp_path: Path) -> None:
    root = _folder(tmp_path, 5)
    assert site_count(str(root), None) == 5
    assert site_count(str(root), 5) == 5
    assert site_count("phantom", None) == DEFAULT_SITES
    assert site_count("phantom", 7) == 7


def test_a_site_count_that_would_drop_hospitals_is_refused(tmp_path: Path) -> None:
    root = _folder(tmp_path, 5)
    with pytest.raises(ConfigError, match=r"holds 5 site folders / \.npz files but --sites is "
                                          r"4: leave --sites out .* or pass --sites 5"):
        site_count(str(root), 4)


def test_an_empty_dataset_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"no site sub-folders or \.npz files"):
        site_count(str(tmp_path / "empty"), None)
