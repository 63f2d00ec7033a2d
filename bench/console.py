"""What the benches' command lines share: the CPU's name for their reports, and a problem the user
can fix (no pipeline outputs yet: `make run` first) as one line instead of a traceback."""

import platform
import sys
from collections.abc import Callable
from pathlib import Path

from cnnpipe import PipelineError


def cpu_name() -> str:
    """The CPU, as "AMD EPYC (family 25, model 1)": its name alone does not tell Zen 3 from 5."""
    cpuinfo = dict(
        line.split(":", 1) for line in Path("/proc/cpuinfo").read_text().splitlines() if ":" in line
    )
    cpuinfo = {k.strip(): v.strip() for k, v in cpuinfo.items()}
    cpu = f"{cpuinfo.get('model name', platform.processor())} (family {cpuinfo.get('cpu family')}"
    return cpu + f", model {cpuinfo.get('model')})"


def run(main: Callable[[], None]) -> None:
    """`main()`, ending in one line on stderr where it raises a PipelineError."""
    try:
        main()
    except PipelineError as error:
        sys.exit(f"{Path(sys.argv[0]).name}: error: {error}")
