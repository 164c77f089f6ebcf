"""A study's settings, written to its folder before the first trial: every worker (another process, another
machine joining through the storage, a resumed study) reads the same ones."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from tunelab.errors import TunelabError

PLAN_FILE = "tune.json"
LOWER_IS_BETTER = ("loss", "perplexity")


@dataclass
class StudyPlan:
    """What `tunelab tune` was asked: the user's recipe as written, the space, the score and the budget."""

    recipe_path: str
    recipe: dict  # the raw recipe (with --set overrides): trials set their values in it
    space: dict  # {recipe key: {kind: bounds}} (tune/space.py)
    metric: str  # the validation score optimised
    study_name: str
    storage: str  # Optuna storage URL
    trials: int  # trials this study runs in all (on this machine's workers)
    timeout: float | None  # seconds each worker searches at most
    workers: int
    refit: bool  # the final runs train on train + validation (else on train, validation picking the checkpoint)
    seed: int

    @property
    def maximize(self) -> bool:
        """Whether a higher score is better."""
        return self.metric not in LOWER_IS_BETTER

    @property
    def direction(self) -> str:
        """Optuna's name for it."""
        return "maximize" if self.maximize else "minimize"

    def save(self, study_dir: Path) -> None:
        """Write tune.json."""
        (study_dir / PLAN_FILE).write_text(json.dumps(asdict(self), indent=2), encoding="utf-8")

    @classmethod
    def load(cls, study_dir: Path) -> StudyPlan:
        """Read tune.json of a study folder, or refuse a folder that is not one."""
        path = study_dir / PLAN_FILE
        if not path.is_file():
            raise TunelabError(f"'{study_dir}' is not a tunelab study folder (no {PLAN_FILE}); give the folder "
                               f"`tunelab tune` wrote, or start a new study")
        return cls(**json.loads(path.read_text(encoding="utf-8")))
