"""A config group's unknown choice (`model=does_not_exist`) composes into a marker node instead
of failing in Hydra: `dvc exp run -S` composes conf/ itself and would print Hydra's many-line
error under its own. The marker reaches params.yaml, and cnnpipe's schema check refuses it in
one line naming the group and its options, as it refuses every other bad value."""

from pathlib import Path

from hydra.core.config_search_path import ConfigSearchPath
from hydra.core.object_type import ObjectType
from hydra.plugins.config_source import ConfigResult, ConfigSource
from hydra.plugins.search_path_plugin import SearchPathPlugin
from omegaconf import OmegaConf

UNKNOWN_CHOICE = "unknown_choice"
SCHEME = "cnnpipe-choice"
# Groups whose missing choice is not an error, or that Hydra reads itself.
LEFT_TO_HYDRA = ("hydra", "local")


def is_cnnpipe_conf(folder: Path) -> bool:
    config = folder / "config.yaml"
    return config.is_file() and "cnnpipe" in config.read_text(encoding="utf-8")


class UnknownChoiceSearchPath(SearchPathPlugin):
    """Puts the marker source last, behind cnnpipe's conf/ only."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        for element in search_path.get_path():
            folder = element.path.removeprefix("file://")  # a bare folder is a file:// one
            if element.provider == "main" and "://" not in folder and is_cnnpipe_conf(Path(folder)):
                search_path.append("cnnpipe", f"{SCHEME}://{folder}")


class UnknownChoiceSource(ConfigSource):
    """Answers for `group/name` where conf/group exists and has no name.yaml."""

    @staticmethod
    def scheme() -> str:
        return SCHEME

    def options(self, config_path: str) -> list[str] | None:
        """The options of the group when `config_path` names one conf/ lacks; else None."""
        group, _, name = config_path.removesuffix(".yaml").rpartition("/")
        folder = Path(self.path) / group
        if not group or group.split("/")[0] in LEFT_TO_HYDRA or not folder.is_dir():
            return None
        if (folder / f"{name}.yaml").exists():
            return None
        return sorted(p.stem for p in folder.glob("*.yaml"))

    def load_config(self, config_path: str) -> ConfigResult:
        group, _, name = config_path.removesuffix(".yaml").rpartition("/")
        choice = {"group": group, "name": name, "options": self.options(config_path)}
        return ConfigResult(
            config=OmegaConf.create({UNKNOWN_CHOICE: choice}),
            path=f"{SCHEME}://{self.path}",
            provider=self.provider,
            header={"package": None},  # the group's own package, as for a file without a header
        )

    def available(self) -> bool:
        return Path(self.path).is_dir()

    def is_group(self, config_path: str) -> bool:
        return False

    def is_config(self, config_path: str) -> bool:
        return self.options(config_path) is not None

    def list(self, config_path: str, results_filter: ObjectType | None) -> list[str]:
        return []
