import math

import numpy as np
import pytest
from mlflow import MlflowClient

from cnnpipe import PipelineError
from cnnpipe.stages.promote import verdict
from cnnpipe.tracking.gate import compare
from cnnpipe.tracking.registry import (
    CHALLENGER,
    CHAMPION,
    champion_version,
    settle,
    version_of_run,
)


def one_sided_p(only_new: int, only_champion: int) -> float:
    """McNemar's exact test by hand: P(X >= only_new) for X ~ Binomial(discordant, 1/2)."""
    n = only_new + only_champion
    return sum(math.comb(n, k) for k in range(only_new, n + 1)) / 2**n if n else 1.0


def scored(both: int, only_new: int, only_champion: int, neither: int) -> tuple:
    """Right/wrong per image for two models with these counts, in a shuffled order."""
    new = [True] * both + [True] * only_new + [False] * only_champion + [False] * neither
    old = [True] * both + [False] * only_new + [True] * only_champion + [False] * neither
    order = np.random.default_rng(0).permutation(len(new))
    return np.array(new)[order], np.array(old)[order]


@pytest.mark.parametrize(
    "counts, better",
    [
        ((700, 30, 10, 260), True),  # 20 more right, p = 0.0011
        ((700, 12, 8, 280), False),  # more accurate, but p = 0.25: could be chance
        ((700, 10, 10, 280), False),  # a tie, p = 0.59
        ((700, 0, 0, 300), False),  # the same answers everywhere: p = 1
        ((700, 5, 25, 270), False),  # less accurate
    ],
)
def test_the_gate_is_mcnemars_exact_test_on_the_images_where_they_disagree(counts, better):
    both, only_new, only_champion, neither = counts
    gate = compare(*scored(*counts), alpha=0.05)
    assert gate.images == sum(counts)
    assert (gate.only_new_right, gate.only_champion_right) == (only_new, only_champion)
    assert gate.new_acc == (both + only_new) / sum(counts)
    assert gate.champion_acc == (both + only_champion) / sum(counts)
    assert gate.p_value == pytest.approx(one_sided_p(only_new, only_champion), rel=1e-9)
    assert gate.better is better


def test_a_stricter_level_keeps_the_champion():
    new, old = scored(700, 30, 10, 260)
    assert compare(new, old, alpha=0.05).better
    assert not compare(new, old, alpha=0.001).better


def test_the_decision_reads_as_one_line():
    gate = compare(*scored(7000, 12, 8, 2980), alpha=0.05)
    assert verdict("m", "4", "3", gate) == (
        f"champion stays version 3 ({(7008 / 10000):.2%}): version 4 scores "
        f"{(7012 / 10000):.2%} on the same 10,000 images, p = {gate.p_value:.2g}"
    )
    gate = compare(*scored(7000, 60, 8, 2932), alpha=0.05)
    assert verdict("m", "4", "3", gate) == (
        f"champion moves to version 4 ({(7060 / 10000):.2%}) from version 3 "
        f"({(7008 / 10000):.2%}) on the same 10,000 images, p = {gate.p_value:.2g}"
    )
    assert verdict("m", "1", None, None) == "champion is version 1, the first version of m"


def test_aliases_and_the_gates_record_land_on_the_version(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client.create_registered_model("m")
    experiment = client.create_experiment("e")
    run = client.create_run(experiment).info.run_id

    def new_version() -> str:
        source = (tmp_path / "model").as_uri()
        return str(client.create_model_version("m", source=source, run_id=run).version)

    assert champion_version(client, "m") is None
    first = new_version()
    assert version_of_run(client, "m", run) == first
    settle(client, "m", first, True, {"promotion.decision": "first"})
    second = new_version()
    assert version_of_run(client, "m", run) == second, "the newest"
    settle(client, "m", second, False, {"promotion.p_value": 0.41})
    assert champion_version(client, "m") == first
    assert str(client.get_model_version_by_alias("m", CHALLENGER).version) == second
    assert client.get_model_version("m", second).tags["promotion.p_value"] == "0.41"
    assert CHAMPION in client.get_model_version("m", first).aliases
    with pytest.raises(PipelineError, match="no version of m registered from run nope"):
        version_of_run(client, "m", "nope")
