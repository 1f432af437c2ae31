import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(2)

from jobs import run_job  # noqa: E402  (tests/ is on the path from here on)


@pytest.fixture(scope="session")
def completed_job(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``completed_job(*arguments)``: the directory of a run of tests/jobs.py with these arguments, run to the
    end once per session. Tests read it and never write into it."""
    done: dict[tuple[str, ...], Path] = {}

    def complete(*arguments: str) -> Path:
        if arguments not in done:
            root = tmp_path_factory.mktemp("job")
            job = run_job(root, *arguments)
            assert job.returncode == 0, job.stderr[-3000:]
            done[arguments] = root
        return done[arguments]

    return complete
