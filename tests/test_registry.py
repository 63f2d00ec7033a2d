from mlflow import MlflowClient

from cnnpipe.tracking.registry import CHAMPION, promote


def test_champion_moves_only_to_a_version_at_least_as_accurate(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client.create_registered_model("m")

    def new_version() -> str:
        return client.create_model_version("m", source=(tmp_path / "model").as_uri()).version

    def champion() -> str:
        return client.get_model_version_by_alias("m", CHAMPION).version

    first, worse, tie, better = new_version(), new_version(), new_version(), new_version()
    assert promote(client, "m", first, 0.70) and champion() == first
    assert not promote(client, "m", worse, 0.69) and champion() == first
    assert promote(client, "m", tie, 0.70) and champion() == tie
    assert promote(client, "m", better, 0.75) and champion() == better
    assert client.get_model_version("m", worse).tags["test_acc"] == "0.69"
