"""What a run ran: the commit and whether the code differed from it, and the recipe as params."""

import subprocess

from omegaconf import DictConfig

from cnnpipe.base.schema import recipe

DIRTY = "git.dirty"


def git_commit() -> tuple[str, bool]:
    """HEAD's commit ("unknown" outside git), and whether the code or conf/ differ from it.

    params.yaml, dvc.lock and the stage outputs are left out: DVC changes them in every run, and
    the run records the configuration itself.
    """
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        code = ["src", "conf", "dvc.yaml", "pyproject.toml", "requirements.lock"]
        diff = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", *code], capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown", False
    return commit, diff.returncode != 0


def source_tags(command: str, commit: str, dirty: bool) -> dict[str, str]:
    """The code a run ran: MLflow's source tags, and whether it differed from the commit."""
    return {
        "mlflow.source.git.commit": commit,
        DIRTY: str(dirty).lower(),
        "mlflow.source.name": command,
        "mlflow.source.type": "LOCAL",
    }


def flatten(node: object, prefix: str = "") -> dict:
    """{"optim": {"lr": 0.005}} -> {"optim.lr": 0.005}; lists stay values."""
    if not isinstance(node, dict):
        return {prefix: node}
    out = {}
    for key, value in node.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def recipe_params(cfg: DictConfig) -> dict[str, str]:
    """The recipe as MLflow params: {"optim.lr": "0.005", ...}, without paths and the like."""
    return {key: str(value) for key, value in flatten(recipe(cfg)).items()}
