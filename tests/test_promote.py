"""The promote stage on the tiny data: the first version becomes `@champion`, a version that
scores the same stays `@challenger`, one that is better by more than chance takes the alias, and a
champion of other classes is kept and named."""

import json

import mlflow

from cnnpipe import cli
from cnnpipe.base.config import compose_params
from tests.helpers import CLASSES, export_random_model, store

NAME = "cnnpipe-cifar10"


def promote(capsys) -> tuple[str, dict]:
    capsys.readouterr()
    cli.main(["promote"])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    return line, json.loads(open("metrics/promotion.json").read())


def register(client: mlflow.MlflowClient, folder, class_names: list[str]) -> str:
    """A random network of `class_names`, registered as a version and made `@champion`."""
    folder.mkdir()
    export_random_model(folder / "model.onnx", class_names)
    version = str(client.create_model_version(NAME, source=folder.as_uri()).version)
    client.set_registered_model_alias(NAME, "champion", version)
    return version


def test_the_champion_moves_only_through_the_gate(project, capsys, tmp_path):
    repo, tiny = project
    # Long enough, and without the moving average that lags a short training, to learn the tiny
    # data well above chance.
    tiny = [*tiny, "trainer.max_epochs=10", "optim.ema_decay=null"]
    (repo / "params.yaml").write_text(compose_params(tiny, repo / "conf"))
    for stage in ("train", "evaluate", "export", "parity"):
        cli.main([stage])
    line, first = promote(capsys)
    assert line == f"champion is version 1, the first version of {NAME}"
    assert first["promotion.promoted"] is True and first["promotion.version"] == "1"
    client = store(repo)
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "1"

    # The same model registered again: every image scores alike, a tie, so nothing moves.
    params = compose_params([*tiny, "parity.batch_size=25"], repo / "conf")
    (repo / "params.yaml").write_text(params)
    cli.main(["parity"])
    line, tie = promote(capsys)
    acc = first["promotion.new_acc"]
    assert line == (
        f"champion stays version 1 ({acc:.2%}): version 2 scores {acc:.2%} on the same 50 "
        "images, p = 1"
    )
    assert (tie["promotion.only_new_right"], tie["promotion.only_champion_right"]) == (0, 0)
    assert tie["promotion.p_value"] == 1 and tie["promotion.promoted"] is False
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "1"
    version = client.get_model_version(NAME, "2")
    assert version.aliases == ["challenger"]
    assert version.tags["promotion.decision"] == line
    assert version.tags["promotion.champion_acc"] == str(acc)

    # A champion of other classes cannot be scored on these images: it stays, and the line says so.
    other = register(client, tmp_path / "other", ["cat", "dog", "ship"])
    line, _ = promote(capsys)
    assert line == (
        f"champion stays version {other}: version 2 cannot be compared with it (its classes are "
        "cat, dog, ship); move @champion by hand if version 2 should serve"
    )
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == other

    # An untrained champion of the same classes loses to the trained version beyond chance.
    untrained = register(client, tmp_path / "untrained", CLASSES)
    line, better = promote(capsys)
    assert better["promotion.promoted"] is True, line
    assert better["promotion.p_value"] < 0.05 and better["promotion.new_acc"] == acc
    assert line.startswith(f"champion moves to version 2 ({acc:.2%}) from version {untrained} (")
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "2"
