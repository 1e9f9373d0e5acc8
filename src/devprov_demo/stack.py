"""The local stack: the emulator, factory_svc and activation_svc as child processes on loopback, with TLS.

Everything lives in one work directory::

    tls/            development TLS CA (ca.pem, ca.key: the services' client CA too); server certificates of
                    both services; one client certificate per party (``PARTIES``), each naming its
                    ``urn:devprov:<role>:<tenant>`` identity, issued with ``provkit.pki_cli`` (the code of the
                    ``devprov-pki`` command, which issues more for this stack: ``--ca-dir <work>/tls``)
    emulator/       the emulator's data (connection.json, its CA, SQLite)
    factory/        factory_svc data (factory CA, ledger, outbox, renewals)
    activation/     activation_svc data (audit)
    devices/        one state directory per device
    postgres/       with ``replicas`` > 1: the services' PostgreSQL cluster (``pgcluster.kept_cluster``)
    secrets/        in group mode: the allocation webhook's function key (``webhook.key``)
    logs/           one log file per process
    env.sh          variables that point the CLIs at this stack (``source`` it)
    .devprov-stack.lock   held by the running stack (``worklock``): one stack per work directory

Every directory is 0700 (the work directory itself 0710 with group ``postgres`` when root runs replicas:
the server, run as that user, must pass through), keys and stores 0600.  Everything is kept between runs;
``run`` and ``up --fresh`` wipe it all first (the lock file excepted).

factory_svc's EST renewal listener (``est_url``) serves the devices' certificate renewals; every device is
provisioned with it (``renewal.est_url``, trusting the services' TLS CA).  With ``cert_minutes`` the factory
accepts certificates that short (``FACTORY_MINT_MIN_VALIDITY_MINUTES``) and enrolls them.

``mode`` ``group`` (``docs/group-mode.md``): both services in group mode, the device registry in
activation_svc's data directory, activation_svc's allocation webhook on ``webhook_port`` (its gRPC server's
TLS certificate, which the emulator is told to trust), a function key made for the stack, and the
enrollment group written by ``factory-svc enrollment-group`` once the services answer.  With replicas the
registry is in activation_svc's PostgreSQL database (migrated before any replica starts: factory_svc
refuses a registry without its table), every activation_svc replica serves the webhook on
``webhook_port + 1000 * n``, and the enrollment group's one URL names a balancer on ``webhook_port`` that
hands each connection to a replica that answers (on Azure: several Function instances behind one URL).

Prometheus ``/metrics`` of the four programs listen on ``metrics_port`` .. ``metrics_port + 3`` (factory,
activation, portal, emulator; ``StackConfig.metrics_urls()``); ``metrics_port=0`` turns them off.  With
replicas, replica n of a service listens on its program's port + 1000 * n, and ``Stack.deaths()`` tells
which part of the stack died since it was last asked (``up`` prints it).

Each service reads only its own documented settings (FACTORY_*, ACTIVATION_*): the stack is exactly what a
person would run by hand, started in order, each waited for until it answers.

Who uses which certificate (``env.sh`` points each CLI at its party's pair):

    tls/mes.pem       urn:devprov:factory:plant-1   factory-svc (the MES) and device-client provision (bench)
    tls/oem.pem       urn:devprov:oem:acme          activation-svc (the OEM back office)
    tls/portal.pem    urn:devprov:portal:acme       the activation portal (acting for OEM acme)
    tls/operator.pem  urn:devprov:operator:ops      the stack's own readiness probes (health)
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from azure_iot_emulator import config as emulator_config
from azure_iot_emulator.process import EmulatorProcess, spawn, terminate
from devprov_demo import pgcluster
from devprov_demo.worklock import LOCK_FILE, WorkDirLock
from litestore.files import DIRECTORY_MODE, private_directory
from provkit.context import Role
from provkit.devpki import DevTlsAuthority, write_private_file
from provkit.pki_cli import issue_party

SERVICE_START_TIMEOUT = 60.0
MARKER = ".devprov-stack"  # only a directory holding it is ever wiped
# Variables of ours that a caller's shell may hold (e.g. real Azure settings): never leak them into the
# local stack, which must be the same on every machine.
_OWN_PREFIXES = ("FACTORY_", "ACTIVATION_", "DEVICE_CLIENT_", "IOT_EMULATOR_")


@dataclass(frozen=True)
class StackConfig:
    work_dir: Path
    dps_host: str = "localhost"
    hub_hosts: tuple[str, ...] = ("127.0.0.2", "127.0.0.3")
    https_port: int = 443  # Azure's: service REST APIs on the hosts themselves (port-less connection strings)
    service_host: str = "127.0.0.1"
    factory_port: int = 50051
    activation_port: int = 50052
    portal_port: int = 8080
    crl_port: int = 8081  # factory_svc's CRL over HTTP (the URL every certificate names)
    est_port: int = 8443  # factory_svc's EST renewal listener (HTTPS, the device's certificate as client's)
    cert_minutes: int | None = None  # set: the factory may mint certificates this short (renewal demo)
    metrics_port: int = 9101  # /metrics of the 4 programs (METRICS_PROGRAMS) from here on; 0: off
    replicas: int = 1  # >1: PostgreSQL, and that many of each service behind its one address
    mode: str = "individual"  # or "group": one enrollment group and activation_svc's allocation webhook
    webhook_port: int = 8444  # group mode: activation_svc's allocation webhook (HTTPS; replicas: a balancer)
    # The emulator's --assignment-delay: None is its default, Azure's flow (202 assigning, the device polls:
    # the SDK waits 2 s); "immediate" answers each registration at once; else seconds (0-3600).
    assignment_delay: str | None = None

    def __post_init__(self) -> None:
        if self.assignment_delay is not None:
            delay = emulator_config.assignment_delay(self.assignment_delay)  # SettingsError: a ValueError
            if delay is not None and not 0 <= delay <= 3600:
                raise ValueError(f"--assignment-delay must be 'immediate' or 0-3600 seconds, not {delay:g}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {self.mode!r}")

    @property
    def group(self) -> bool:
        return self.mode == "group"

    @property
    def webhook_url(self) -> str:
        """The allocation webhook's URL (the enrollment group's; with replicas their balancer's)."""
        return self.webhook_url_of(0)

    def webhook_url_of(self, replica: int) -> str:
        """Replica n's own webhook URL (port ``webhook_port + 1000 * n``; 0: ``webhook_url``)."""
        return f"https://{self.service_host}:{self.webhook_port + 1000 * replica}/api/allocate"

    @property
    def factory_address(self) -> str:
        return f"{self.service_host}:{self.factory_port}"

    @property
    def activation_address(self) -> str:
        return f"{self.service_host}:{self.activation_port}"

    @property
    def crl_url(self) -> str:
        return f"http://{self.service_host}:{self.crl_port}/crl/issuing-ca.crl"

    @property
    def est_url(self) -> str:
        return f"https://{self.service_host}:{self.est_port}"

    @property
    def portal_url(self) -> str:
        return f"http://{self.service_host}:{self.portal_port}/"

    def metrics_listen(self, program: str, replica: int = 0) -> str:
        """Where ``program`` (one of ``METRICS_PROGRAMS``), or its replica n, serves /metrics (replica n on
        the program's port + 1000 * n, like its gRPC port); empty when metrics are off."""
        if not self.metrics_port:
            return ""
        return f"{self.service_host}:{self.metrics_port + METRICS_PROGRAMS.index(program) + 1000 * replica}"

    def metrics_urls(self) -> dict[str, str]:
        """What serves /metrics -> its URL: the four programs, or with replicas each service's replicas
        (``factory replica 1``, ...; a dead one's URL stops answering, which monitoring notices)."""
        urls: dict[str, str] = {}
        for program in METRICS_PROGRAMS if self.metrics_port else ():
            if self.replicas > 1 and program in REPLICATED:
                for n in range(1, self.replicas + 1):
                    urls[f"{program} replica {n}"] = f"http://{self.metrics_listen(program, n)}/metrics"
            else:
                urls[program] = f"http://{self.metrics_listen(program)}/metrics"
        return urls


MODES = ("individual", "group")
METRICS_PROGRAMS = ("factory", "activation", "portal", "emulator")
REPLICATED = ("factory", "activation")  # the services --replicas runs several of


# file name -> (role, tenant, who uses it) of the parties the stack starts or points the CLIs at
PARTIES: dict[str, tuple[Role, str, str]] = {
    "mes": (Role.FACTORY, "plant-1", "factory-svc, device-client provision"),
    "oem": (Role.OEM, "acme", "activation-svc"),
    "portal": (Role.PORTAL, "acme", "the portal"),
    "operator": (Role.OPERATOR, "ops", "the stack's readiness probes"),
}


@dataclass(frozen=True)
class TlsFiles:
    """Where the stack's service TLS material is (PEM files; keys 0600)."""

    folder: Path

    @property
    def ca(self) -> Path:
        return self.folder / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.folder / "ca.key"

    def cert(self, name: str) -> Path:
        return self.folder / f"{name}.pem"

    def key(self, name: str) -> Path:
        return self.folder / f"{name}.key"

    def create(self, service_host: str) -> None:
        """A fresh development TLS CA with server certificates for both services and one client certificate
        per party (written anew at every start)."""
        authority = DevTlsAuthority.create("devprov demo TLS CA")
        private_directory(self.folder)
        authority.write(self.ca, self.ca_key)
        names = list(dict.fromkeys([service_host, "127.0.0.1", "localhost"]))
        for server in ("factory", "activation"):
            authority.server_certificate(names).write(self.cert(server), self.key(server))
        for client, (role, tenant, _users) in PARTIES.items():
            pair = issue_party(authority, role, tenant, common_name=f"demo-{client}")
            pair.write(self.cert(client), self.key(client))


# A service started and not yet waited for: its label, process, gRPC address and log file.
_Starting = tuple[str, "subprocess.Popen[bytes]", str, Path]
STOP_GRACE_S = 15.0  # as azure_iot_emulator.process.terminate: SIGKILL for what has not stopped by then


def _terminate_together(procs: list[subprocess.Popen[bytes]], grace: float = STOP_GRACE_S) -> None:
    """SIGTERM to each running process at once, then wait for them all; SIGKILL for any still running
    ``grace`` seconds after the signal.  Raises nothing."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _clean_environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(_OWN_PREFIXES)}


class Stack:
    def __init__(self, config: StackConfig) -> None:
        self.config = config
        self.root = config.work_dir.resolve()
        self.tls = TlsFiles(self.root / "tls")
        self.emulator = EmulatorProcess(
            self.root / "emulator",
            dps_host=config.dps_host,
            hub_hosts=config.hub_hosts,
            https_port=config.https_port,
            log_path=self.logs / "emulator.log",
            extra_args=[
                *(["--metrics-listen", config.metrics_listen("emulator")] if config.metrics_port else []),
                *(["--allocation-webhook-ca", str(self.tls.ca)] if config.group else []),
                *(["--assignment-delay", config.assignment_delay] if config.assignment_delay else []),
            ],
        )
        self._services: dict[str, subprocess.Popen[bytes]] = {}
        self._database = contextlib.ExitStack()  # the PostgreSQL cluster of a replicated stack
        self.database_urls: dict[str, str] = {}
        self.database_directory: Path | None = None  # the PostgreSQL cluster's (kept, <work>/postgres)
        self._lock: WorkDirLock | None = None
        self._titles: dict[str, str] = {}  # label -> what to call the part in a message
        self._reported: set[str] = set()  # labels whose end was told

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def device_root(self) -> Path:
        return self.root / "devices"

    # ------------------------------------------------------------------------------------ lifecycle
    def claim(self, command: str = "devprov-demo") -> None:
        """Make the work directory this stack's, before anything under it is written: refuse a foreign
        non-empty directory (``RuntimeError``), then take its lock, held until ``stop`` (``StackRunning``
        when another stack holds it: nothing touched).  ``command`` is what the next one's refusal names."""
        if self._lock is not None:
            return
        marker = self.root / MARKER
        if self.root.exists() and not marker.exists() and any(
            entry.name != LOCK_FILE for entry in self.root.iterdir()
        ):
            raise RuntimeError(f"{self.root} is not empty and not a stack's work directory; choose another")
        # Missing parents (a checkout's var/) are ordinary directories: with replicas, run as root, the
        # PostgreSQL server's user must pass through them.  The work directory itself is private.
        self.root.parent.mkdir(parents=True, exist_ok=True)
        private_directory(self.root)
        self._lock = WorkDirLock.acquire(self.root, command)

    def start(self, *, fresh: bool) -> None:
        """Start everything and wait until each part answers; on any failure stop what was started."""
        self.claim()
        if fresh:
            self._wipe()
        marker = "a devprov demo stack's work directory (wiped by `run` and `up --fresh`)\n"
        (self.root / MARKER).write_text(marker)
        os.chmod(self.root, DIRECTORY_MODE)  # ours: narrowed also when it was made before
        self.tls.create(self.config.service_host)
        if self.config.group:
            self._webhook_key()
        try:
            self.emulator.start()
            connection = str(self.emulator.connection_file)
            if self.config.replicas > 1:
                self._start_database()
            # The services and the portal depend on the emulator (its connection file) and the database,
            # not on each other: each is started, then each is waited for until it answers (their start-ups
            # overlap; the portal dials activation_svc only when a page asks).  A service's first replica
            # makes what its replicas share in the data directory (the development CA): the others start
            # once it answers.
            services = (
                ("factory", "factory_svc", "FACTORY", self.config.factory_port),
                ("activation", "activation_svc", "ACTIVATION", self.config.activation_port),
            )
            extras = {
                name: self._service_extra(name, module, prefix, port, connection)
                for name, module, prefix, port in services
            }
            replicated = self.config.replicas > 1

            def start_replicas(numbers: range) -> list[_Starting]:
                """Replica n of each service (0: the one service without replicas), on port + 1000 * n."""
                return [
                    self._start_service(name, module, prefix, port + 1000 * n, extras[name], replica=n)
                    for name, module, prefix, port in services
                    for n in numbers
                ]

            starting = start_replicas(range(1, 2) if replicated else range(1))
            portal = self._start_portal(connection)
            for service in starting:
                self._wait_serving(*service)
            self._wait_logged("portal", *portal, "portal listening on")
            if replicated:
                for service in start_replicas(range(2, self.config.replicas + 1)):
                    self._wait_serving(*service)
                for name, _, _, port in services:
                    self._start_balancers(name, port)
            if self.config.group:
                self._apply_group(connection)
        except BaseException:
            self.stop()
            raise

    def _wipe(self) -> None:
        """Everything in the work directory but its lock (held: a second stack must find the same file)."""
        for entry in self.root.iterdir():
            if entry.name == LOCK_FILE:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()

    def _service_environment(self, name: str, prefix: str, port: int, metrics: str) -> dict[str, str]:
        return {
            **_clean_environment(),
            f"{prefix}_DATA_DIR": str(self.root / name),
            f"{prefix}_SERVER_HOST": self.config.service_host,
            f"{prefix}_SERVER_PORT": str(port),
            f"{prefix}_SERVER_TLS_CERT_FILE": str(self.tls.cert(name)),
            f"{prefix}_SERVER_TLS_KEY_FILE": str(self.tls.key(name)),
            f"{prefix}_SERVER_CLIENT_CA_FILE": str(self.tls.ca),
            f"{prefix}_METRICS_LISTEN": metrics,
            **(self._factory_environment(port) if prefix == "FACTORY" else {}),
            **(self._group_environment(prefix, port) if self.config.group else {}),
        }

    @property
    def webhook_key_file(self) -> Path:
        return self.root / "secrets" / "webhook.key"

    def _webhook_key(self) -> None:
        """Group mode: the allocation webhook's function key (made once, kept with the stack, 0600)."""
        if not self.webhook_key_file.exists():
            private_directory(self.webhook_key_file.parent)
            write_private_file(self.webhook_key_file, secrets.token_urlsafe(32).encode())

    def _group_environment(self, prefix: str, port: int) -> dict[str, str]:
        """Group mode: the factory writes each device's record to the device registry in activation_svc's
        data directory (with replicas its PostgreSQL database), activation_svc reads it there and serves the
        allocation webhook (the replica on ``port + 1000 * n`` on ``webhook_port + 1000 * n``); one key."""
        if prefix == "FACTORY":
            replicated = self.config.replicas > 1
            return {
                "FACTORY_MODE": "group",
                "FACTORY_REGISTRY_DATABASE_URL": (
                    self.database_urls["activation"]
                    if replicated
                    else f"sqlite:///{self.root / 'activation'}"
                ),
                "FACTORY_GROUP_WEBHOOK_URL": self.config.webhook_url,
                "FACTORY_GROUP_FUNCTION_KEY_FILE": str(self.webhook_key_file),
            }
        return {
            "ACTIVATION_MODE": "group",
            "ACTIVATION_ALLOCATION_LISTEN": (
                f"{self.config.service_host}:{self.config.webhook_port + port - self.config.activation_port}"
            ),
            "ACTIVATION_ALLOCATION_FUNCTION_KEY_FILE": str(self.webhook_key_file),
        }

    def _apply_group(self, connection: str) -> None:
        """Group mode: the enrollment group, written by the operator's command (idempotent)."""
        env = {
            **self._service_environment("factory", "FACTORY", self.config.factory_port, metrics=""),
            "FACTORY_CLOUD_EMULATOR_CONNECTION_FILE": connection,
        }
        log = self.logs / "enrollment-group.log"
        with log.open("ab") as out:
            applied = subprocess.run(
                [sys.executable, "-m", "factory_svc", "enrollment-group"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=SERVICE_START_TIMEOUT,
            )
        if applied.returncode != 0:
            raise RuntimeError(f"factory-svc enrollment-group failed; its log:\n{_tail(log)}")

    def _factory_environment(self, port: int) -> dict[str, str]:
        """The factory's CRL over HTTP and its EST renewal listener (with its gRPC server's TLS certificate;
        a replica on ``port + 1000 * n`` serves them on their ports + 1000 * n, behind the balancers), and
        with ``cert_minutes`` the shortest validity lowered to allow such certificates."""
        offset = port - self.config.factory_port
        env = {
            **self._crl_environment(port),
            "FACTORY_RENEWAL_LISTEN": f"{self.config.service_host}:{self.config.est_port + offset}",
        }
        if self.config.cert_minutes is not None:
            env["FACTORY_MINT_MIN_VALIDITY_MINUTES"] = str(min(60, self.config.cert_minutes))
            env["FACTORY_ENROLL_MIN_REMAINING_VALIDITY_DAYS"] = "0"
        return env

    def _crl_environment(self, port: int) -> dict[str, str]:
        """The factory's CRL over HTTP (a replica on ``port + 1000 * n`` serves it on ``crl_port + 1000 * n``,
        behind the balancer on ``crl_port``), and its URL in every certificate."""
        return {
            "FACTORY_CRL_HTTP_HOST": self.config.service_host,
            "FACTORY_CRL_HTTP_PORT": str(self.config.crl_port + port - self.config.factory_port),
            "FACTORY_CRL_URL": self.config.crl_url,
        }

    def _start_service(
        self,
        name: str,
        module: str,
        prefix: str,
        port: int,
        extra: Mapping[str, str],
        *,
        replica: int = 0,
    ) -> _Starting:
        """Start a service; what ``_wait_serving`` waits on until it answers."""
        metrics = self.config.metrics_listen(name, replica)
        env = {**self._service_environment(name, prefix, port, metrics), **extra}
        label = f"{name}-{replica}" if replica else name
        log = self.logs / f"{label}.log"
        proc = spawn([sys.executable, "-m", module, "serve"], log, env)
        self._add(label, f"{module} replica {replica}" if replica else module, proc)
        return label, proc, f"{self.config.service_host}:{port}", log

    def _start_database(self) -> None:
        """The replicas' PostgreSQL cluster, in ``postgres/`` of the work directory and kept between runs
        like the SQLite files (``--fresh`` wipes it with the rest), one database per service.  As root the
        server runs as user ``postgres``: the work directory lets that group through (0710), nobody else."""
        why = pgcluster.unavailable()
        if why is not None:
            raise RuntimeError(f"--replicas needs PostgreSQL: {why}")
        top = self.root / "postgres"
        server_user = pgcluster.server_user()
        if server_user is not None:
            os.chown(self.root, -1, server_user.pw_gid)
            os.chmod(self.root, 0o710)  # noqa: S103 - search only, for the server's group
        cluster = self._database.enter_context(pgcluster.kept_cluster(top, self.logs / "postgres.log"))
        self.database_directory = top
        if cluster.server is not None:
            self._add("postgres", "PostgreSQL", cluster.server)
        for name in REPLICATED:
            self.database_urls[name] = cluster.database(name)

    def _service_extra(
        self, name: str, module: str, prefix: str, port: int, connection: str
    ) -> dict[str, str]:
        """What a service gets besides its own settings: the emulator's connection file, and with replicas
        the service's database, migrated here (``migrate``) before any replica starts."""
        extra = {f"{prefix}_CLOUD_EMULATOR_CONNECTION_FILE": connection}
        if self.config.replicas == 1:
            return extra
        extra[f"{prefix}_DATABASE_URL"] = self.database_urls[name]
        log = self.logs / f"{name}-migrate.log"
        with log.open("ab") as out:
            migrated = subprocess.run(
                [sys.executable, "-m", module, "migrate"],
                env={**self._service_environment(name, prefix, port, metrics=""), **extra},
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        if migrated.returncode != 0:
            raise RuntimeError(f"{name} migrate failed; its log:\n{_tail(log)}")
        return extra

    def _start_balancers(self, name: str, port: int) -> None:
        """The replicas' one address (``port``), waited for until it answers; the factory's CRL and EST
        listeners get one each too."""
        self._start_balancer(name, port)
        self._wait_serving(
            f"{name} (balancer)",
            self._services[f"{name}-balancer"],
            f"{self.config.service_host}:{port}",
            self.logs / f"{name}-balancer.log",
        )
        if name == "factory":
            self._start_balancer("factory-crl", self.config.crl_port)
            self._start_balancer("factory-est", self.config.est_port)
        elif self.config.group:
            self._start_balancer("activation-webhook", self.config.webhook_port)

    def _start_balancer(self, name: str, port: int) -> None:
        """One address (``port``) in front of the replicas' ``port + 1000 * n``, waited for until it
        listens."""
        host = self.config.service_host
        backends: list[str] = []
        for n in range(1, self.config.replicas + 1):
            backends += ["--backend", f"{host}:{port + 1000 * n}"]
        command = [sys.executable, "-m", "devprov_demo.balancer", "--listen", f"{host}:{port}", *backends]
        label = f"{name}-balancer"
        proc, offset = self._spawn(command, label, f"the balancer of {name}")
        self._wait_logged(label, proc, offset, "balancer listening on")

    def _wait_serving(self, name: str, proc: subprocess.Popen[bytes], address: str, log: Path) -> None:
        creds = grpc.ssl_channel_credentials(
            root_certificates=self.tls.ca.read_bytes(),
            private_key=self.tls.key("operator").read_bytes(),
            certificate_chain=self.tls.cert("operator").read_bytes(),
        )
        deadline = time.monotonic() + SERVICE_START_TIMEOUT
        with grpc.secure_channel(address, creds) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}; its log:\n{_tail(log)}")
                try:
                    # types-grpcio-health-checking declares HealthStub without its methods.
                    check = health.Check  # type: ignore[attr-defined]
                    reply = check(health_pb2.HealthCheckRequest(), timeout=1.0)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name} did not answer on {address}; its log:\n{_tail(log)}")
                time.sleep(0.1)

    def _start_portal(self, connection: str) -> tuple[subprocess.Popen[bytes], int]:
        """The activation portal: plain HTTP on loopback, a client of activation_svc with its own
        certificate; it offers the hubs of the same cloud settings.  ``_wait_logged`` waits for it."""
        env = {
            **_clean_environment(),
            "ACTIVATION_PORTAL_HOST": self.config.service_host,
            "ACTIVATION_PORTAL_PORT": str(self.config.portal_port),
            "ACTIVATION_PORTAL_TARGET": self.config.activation_address,
            "ACTIVATION_PORTAL_CA_FILE": str(self.tls.ca),
            "ACTIVATION_PORTAL_CERT_FILE": str(self.tls.cert("portal")),
            "ACTIVATION_PORTAL_KEY_FILE": str(self.tls.key("portal")),
            "ACTIVATION_CLOUD_EMULATOR_CONNECTION_FILE": connection,
            "ACTIVATION_PORTAL_METRICS_LISTEN": self.config.metrics_listen("portal"),
        }
        return self._spawn([sys.executable, "-m", "activation_svc", "portal"], "portal", "the portal", env)

    def _spawn(
        self, command: list[str], label: str, title: str, env: Mapping[str, str] | None = None
    ) -> tuple[subprocess.Popen[bytes], int]:
        """Start a part of the stack logging to ``<label>.log``; with where this run's lines begin in it (the
        log is appended to from run to run), for ``_wait_logged``."""
        log = self.logs / f"{label}.log"
        offset = log.stat().st_size if log.exists() else 0
        proc = spawn(command, log, env)
        self._add(label, title, proc)
        return proc, offset

    def _wait_logged(self, label: str, proc: subprocess.Popen[bytes], offset: int, line: str) -> None:
        """Wait until a part wrote ``line`` to its log in this run; ``RuntimeError`` when it exits first or
        takes too long."""
        log = self.logs / f"{label}.log"
        title = self._titles[label]
        deadline = time.monotonic() + SERVICE_START_TIMEOUT
        while line not in _since(log, offset):
            if proc.poll() is not None:
                raise RuntimeError(f"{title} exited with {proc.returncode}; its log:\n{_tail(log)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{title} did not start; its log:\n{_tail(log)}")
            time.sleep(0.1)

    def _add(self, label: str, title: str, proc: subprocess.Popen[bytes]) -> None:
        self._services[label] = proc
        self._titles[label] = title

    def pid(self, label: str) -> int:
        """The process id of a part of the stack (e.g. ``factory-2``), to kill one by hand."""
        return self._services[label].pid

    def deaths(self) -> list[str]:
        """A line for each part of the running stack that ended since the last call (which part, its pid,
        its exit status or signal): nothing stops a part but ``stop``, so each is news to the operator."""
        parts = [("emulator", "the emulator", self.emulator.proc), *(
            (label, self._titles[label], proc) for label, proc in self._services.items()
        )]
        lines = []
        for label, title, proc in parts:
            if proc is None or label in self._reported or proc.poll() is None:
                continue
            self._reported.add(label)
            code = proc.returncode
            how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
            lines.append(f"{title} (pid {proc.pid}) died: {how}")
        return lines

    def stop(self) -> None:
        """Stop the services, then the emulator (each SIGTERM, graceful; SIGKILL after a grace period), then
        PostgreSQL."""
        # Each service is told at once and stops on its own (nothing of the stack calls another while it
        # stops): the wait is the slowest one's graceful stop, not the sum of them.
        _terminate_together([proc for label, proc in self._services.items() if label != "postgres"])
        self._services.clear()
        terminate(self.emulator.proc)
        self._database.close()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    # --------------------------------------------------------------------------------- what to tell
    def client_environment(self) -> dict[str, str]:
        """Variables that point the CLIs at this stack, each with its party's certificate: factory-svc and
        device-client (the bench) as the factory, activation-svc as the OEM."""
        tls = self.tls
        return {
            "FACTORY_CLIENT_TARGET": self.config.factory_address,
            "FACTORY_CLIENT_CA_FILE": str(tls.ca),
            "FACTORY_CLIENT_CERT_FILE": str(tls.cert("mes")),
            "FACTORY_CLIENT_KEY_FILE": str(tls.key("mes")),
            "ACTIVATION_CLIENT_TARGET": self.config.activation_address,
            "ACTIVATION_CLIENT_CA_FILE": str(tls.ca),
            "ACTIVATION_CLIENT_CERT_FILE": str(tls.cert("oem")),
            "ACTIVATION_CLIENT_KEY_FILE": str(tls.key("oem")),
            "DEVICE_CLIENT_STATE_ROOT": str(self.device_root),
            "DEVICE_CLIENT_FACTORY_ADDRESS": self.config.factory_address,
            "DEVICE_CLIENT_FACTORY_TLS": "mtls",
            "DEVICE_CLIENT_FACTORY_CA_FILE": str(tls.ca),
            "DEVICE_CLIENT_FACTORY_CLIENT_CERT_FILE": str(tls.cert("mes")),
            "DEVICE_CLIENT_FACTORY_CLIENT_KEY_FILE": str(tls.key("mes")),
            "DEVICE_CLIENT_ID_SCOPE": self.emulator.id_scope,
            "DEVICE_CLIENT_GLOBAL_ENDPOINT": self.emulator.global_endpoint,
            "DEVICE_CLIENT_TRUSTED_CA_FILE": str(self.emulator.ca_path),
            # `provision` writes these into the device's settings.toml (the listener's TLS certificate is
            # the factory's gRPC one, under the services' TLS CA, copied beside the device's identity)
            "DEVICE_CLIENT_RENEWAL_EST_URL": self.config.est_url,
            "DEVICE_CLIENT_RENEWAL_CA_FILE": str(tls.ca),
            "IOT_EMULATOR_DATA_DIR": str(self.emulator.data_dir),  # `iot-emulator monitor` / `messages`
        }

    def write_env_file(self) -> Path:
        bin_dir = Path(sys.executable).parent
        lines = [
            "# Generated by the devprov demo stack: `source` this file to point the CLIs at it.",
            f'export PATH={shlex.quote(str(bin_dir))}:"$PATH"',
        ]
        lines += [f"export {k}={shlex.quote(v)}" for k, v in self.client_environment().items()]
        path = self.root / "env.sh"
        path.write_text("\n".join(lines) + "\n")
        return path


def _since(path: Path, offset: int) -> str:
    """What ``path`` holds after its first ``offset`` bytes."""
    try:
        with path.open("rb") as file:
            file.seek(offset)
            return file.read().decode(errors="replace")
    except OSError:
        return ""


def _tail(path: Path, limit: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return "(no log)"
