"""The deployment artefacts: example config, Dockerfile, compose and Kubernetes examples, README commands.

No Docker engine runs here, so the container's command line is run as a
plain process with the image's environment, and the YAML is parsed.
"""

from __future__ import annotations

import asyncio
import json
import re
import shlex
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from conftest import SIDECAR, clean_env, free_port, kill_running
from helpers.redis_server import RedisServer

from sidecar.config import KEYS, Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "docker" / "Dockerfile"


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            pairs.append((word.upper(), rest.strip()))
    return pairs


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for word, rest in dockerfile_instructions():
        if word == "ENV":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def dockerfile_json(word: str) -> list[str]:
    [rest] = [rest for name, rest in dockerfile_instructions() if name == word]
    words: list[str] = json.loads(rest)
    return words


async def wait_healthy(url: str, process: asyncio.subprocess.Process, host: str | None = None) -> None:
    """Poll ``url`` until it answers 200 (bounded), failing early if the process died."""
    headers = {"Host": host} if host else {}
    async with aiohttp.ClientSession() as session:
        for _ in range(100):
            if process.returncode is not None:
                raise AssertionError(f"process exited with {process.returncode}")
            try:
                async with session.get(url, headers=headers) as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError(f"{url} never became healthy")


class Processes:
    """Subprocesses a test started; all are stopped at the end."""

    def __init__(self) -> None:
        self.started: list[asyncio.subprocess.Process] = []

    async def start(self, argv: list[str], env: dict[str, str]) -> asyncio.subprocess.Process:
        process = await asyncio.create_subprocess_exec(
            *argv,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        self.started.append(process)
        return process


@pytest.fixture
async def processes() -> AsyncIterator[Processes]:
    running = Processes()
    yield running
    await kill_running(running.started)


def test_example_config_loads_with_every_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """config/sidecar.example.toml loads and its uncommented values are exactly the defaults."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    settings = load_settings({}, {}, str(ROOT / "config" / "sidecar.example.toml"))
    assert settings == Settings(store=settings.store)


def test_example_config_documents_every_key() -> None:
    """Every settings key appears in the example config, set or commented out."""
    text = (ROOT / "config" / "sidecar.example.toml").read_text()
    missing = [key for key in KEYS if not re.search(rf"^#? ?{key} = ", text, re.MULTILINE)]
    assert missing == []


def test_dockerfile_runs_as_non_root_with_store_on_a_volume() -> None:
    """The image uses a slim base, a non-root user, the store on its volume and --allow-remote on 0.0.0.0."""
    instructions = dockerfile_instructions()
    assert instructions[0][0] == "FROM" and "slim" in instructions[0][1]
    assert [rest for word, rest in instructions if word == "USER"] == ["sidecar"]
    env = dockerfile_env()
    volume = dockerfile_json("VOLUME")
    assert env["SIDECAR_STORE"].startswith(volume[0] + "/")
    assert env["SIDECAR_LISTEN"].startswith("0.0.0.0:")
    assert env["SIDECAR_ALLOW_REMOTE"] == "true"
    [healthcheck] = [rest for word, rest in instructions if word == "HEALTHCHECK"]
    assert "http://127.0.0.1:8787/_sidecar/health" in healthcheck


async def test_container_command_line_serves_and_passes_its_healthcheck(tmp_path: Path, processes: Processes) -> None:
    """The image's ENTRYPOINT + CMD with its environment serves, and the HEALTHCHECK command exits 0."""
    port = free_port()
    env = clean_env(XDG_CONFIG_HOME=str(tmp_path), **dockerfile_env())
    env["SIDECAR_STORE"] = str(tmp_path / "volume" / "tokens.json")
    env["SIDECAR_LISTEN"] = f"0.0.0.0:{port}"
    argv = dockerfile_json("ENTRYPOINT") + dockerfile_json("CMD")
    assert argv == ["sidecar", "serve"]
    server = await processes.start([*SIDECAR, *argv[1:]], env)
    await wait_healthy(f"http://127.0.0.1:{port}/_sidecar/health", server)
    [healthcheck] = [rest for word, rest in dockerfile_instructions() if word == "HEALTHCHECK"]
    probe = json.loads(healthcheck[healthcheck.index("CMD ") + 4 :])
    assert probe[0] == "python"
    # The image listens on 8787; point the same probe at this test's port.
    patched = [arg.replace(":8787/", f":{port}/") for arg in probe[1:]]
    check = await processes.start([SIDECAR[0], *patched], env)
    assert await asyncio.wait_for(check.wait(), 15) == 0


SHARED_SIDECARS = ("sidecar-a", "sidecar-b")


def compose_example(name: str) -> dict[str, Any]:
    """The compose file ``docker/NAME``, parsed."""
    compose: dict[str, Any] = yaml.safe_load((ROOT / "docker" / name).read_text())
    return compose


def compose_services(name: str) -> dict[str, Any]:
    services: dict[str, Any] = compose_example(name)["services"]
    return services


def kubernetes_documents(name: str) -> dict[str, Any]:
    """The example's documents by kind (each kind appears once)."""
    documents = list(yaml.safe_load_all((ROOT / "docker" / name).read_text()))
    kinds = {document["kind"]: document for document in documents}
    assert len(kinds) == len(documents)
    return kinds


def seed_of(cloud_command: list[str]) -> str:
    return cloud_command[cloud_command.index("--known-refresh-token") + 1]


def test_compose_example_shares_one_redis_login_between_two_sidecars() -> None:
    """compose.yaml: the mock cloud, a Redis with AOF, two sidecars on one Redis store URL seeded with a token the cloud knows, a client calling both."""
    services = compose_services("compose.yaml")
    assert set(services) == {"cloud", "redis", "client", *SHARED_SIDECARS}
    assert "--appendonly" in services["redis"]["command"]
    seed = seed_of(services["cloud"]["command"])
    [store] = {services[name]["environment"]["SIDECAR_STORE"] for name in SHARED_SIDECARS}
    assert store.startswith("redis://") and "?key=" in store
    client_command = " ".join(services["client"]["command"])
    for name in SHARED_SIDECARS:
        sidecar = services[name]
        environment = sidecar["environment"]
        assert environment["SIDECAR_REFRESH_TOKEN"] == seed
        assert environment["SIDECAR_UPSTREAM"].startswith("http://cloud:")
        assert name in environment["SIDECAR_ALLOWED_HOSTS"].split(",")
        assert "--store" not in " ".join(sidecar.get("command", []))  # the password never on a command line
        assert set(sidecar["depends_on"]) == {"cloud", "redis"}
        assert name in services["client"]["depends_on"]
    assert "for s in sidecar-a sidecar-b" in client_command and "http://$$s:8787/" in client_command


def test_compose_single_example_keeps_one_login_in_a_file_store_on_a_volume() -> None:
    """compose.single.yaml: the mock cloud, one sidecar seeded with a token the cloud knows, its store on a volume, a client."""
    services = compose_services("compose.single.yaml")
    assert set(services) == {"cloud", "sidecar", "client"}
    environment = services["sidecar"]["environment"]
    assert environment["SIDECAR_REFRESH_TOKEN"] == seed_of(services["cloud"]["command"])
    assert environment["SIDECAR_UPSTREAM"].startswith("http://cloud:")
    assert "sidecar" in environment["SIDECAR_ALLOWED_HOSTS"].split(",")
    assert "SIDECAR_STORE" not in environment  # the image's default: the file on its volume
    assert any(volume.endswith(":/var/lib/sidecar") for volume in services["sidecar"]["volumes"])
    assert "http://sidecar:8787/" in " ".join(services["client"]["command"])


@pytest.mark.parametrize(
    ("example", "sidecars"), [("compose.yaml", SHARED_SIDECARS), ("compose.single.yaml", ("sidecar",))]
)
def test_compose_examples_check_the_client_key_not_uids(example: str, sidecars: tuple[str, ...]) -> None:
    """Across containers no uid can be seen: compose allows any uid, requires the key, and both sides read it from one secret."""
    compose = compose_example(example)
    client = compose["services"]["client"]
    for name in sidecars:
        sidecar = compose["services"][name]
        environment = sidecar["environment"]
        assert environment["SIDECAR_ALLOW_USERS"] == "any"
        assert environment["SIDECAR_CLIENT_KEY"] == "required"
        [secret] = sidecar["secrets"]
        assert client["secrets"] == [secret]
        assert environment["SIDECAR_CLIENT_KEY_SECRET_FILE"] == f"/run/secrets/{secret}"
    assert f"X-Sidecar-Key: $$(cat /run/secrets/{secret})" in " ".join(client["command"])
    assert (ROOT / "docker" / compose["secrets"][secret]["file"]).is_file()


@pytest.mark.parametrize("example", ["kubernetes.yaml", "kubernetes.single.yaml"])
def test_kubernetes_examples_let_only_the_apps_uid_in(example: str) -> None:
    """In a pod the uids can be seen: the app runs as a fixed uid and allow_users names exactly it."""
    pod = kubernetes_documents(example)["Deployment"]["spec"]["template"]["spec"]
    [sidecar] = pod["initContainers"]
    [app] = pod["containers"]
    environment = {item["name"]: item.get("value") for item in sidecar["env"]}
    assert environment["SIDECAR_ALLOW_USERS"] == str(app["securityContext"]["runAsUser"])
    assert environment.get("SIDECAR_CLIENT_KEY") in (None, "off")
    assert environment["SIDECAR_LISTEN"].startswith("127.0.0.1:")  # the pod's loopback only


@pytest.mark.parametrize("example", ["kubernetes.yaml", "kubernetes.single.yaml"])
def test_kubernetes_examples_run_a_native_sidecar_ready_on_its_ready_endpoint(example: str) -> None:
    """Both run sidecar as an init container with restartPolicy Always, ready on /_sidecar/ready, seeded from a Secret."""
    kinds = kubernetes_documents(example)
    [sidecar] = kinds["Deployment"]["spec"]["template"]["spec"]["initContainers"]
    assert sidecar["restartPolicy"] == "Always"
    assert "/_sidecar/ready" in " ".join(sidecar["readinessProbe"]["exec"]["command"])
    [seed] = [item for item in sidecar["env"] if item["name"] == "SIDECAR_REFRESH_TOKEN"]
    assert seed["valueFrom"]["secretKeyRef"]["name"] == kinds["Secret"]["metadata"]["name"]


def test_kubernetes_example_scales_rolls_and_is_protected() -> None:
    """kubernetes.yaml: 3 replicas, RollingUpdate, a PodDisruptionBudget, the store URL from a Secret, Redis with AOF."""
    kinds = kubernetes_documents("kubernetes.yaml")
    deployment = kinds["Deployment"]
    assert deployment["spec"]["replicas"] == 3
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    assert kinds["PodDisruptionBudget"]["spec"]["selector"] == deployment["spec"]["selector"]
    [sidecar] = deployment["spec"]["template"]["spec"]["initContainers"]
    [store] = [item for item in sidecar["env"] if item["name"] == "SIDECAR_STORE"]
    assert store["valueFrom"]["secretKeyRef"]["name"] == kinds["Secret"]["metadata"]["name"]
    assert kinds["Secret"]["stringData"]["url"].startswith("redis://")
    [redis] = kinds["StatefulSet"]["spec"]["template"]["spec"]["containers"]
    assert "--appendonly" in redis["args"]
    assert kinds["Service"]["spec"]["selector"] == kinds["StatefulSet"]["spec"]["selector"]["matchLabels"]


def test_kubernetes_single_example_keeps_one_pod_and_its_store_on_a_claim() -> None:
    """kubernetes.single.yaml: one replica, Recreate (never two pods on one refresh token), the store on a PVC."""
    kinds = kubernetes_documents("kubernetes.single.yaml")
    spec = kinds["Deployment"]["spec"]
    assert spec["replicas"] == 1 and spec["strategy"]["type"] == "Recreate"
    pod = spec["template"]["spec"]
    [sidecar] = pod["initContainers"]
    [mount] = sidecar["volumeMounts"]
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["persistentVolumeClaim"]["claimName"] == kinds["PersistentVolumeClaim"]["metadata"]["name"]
    assert mount["mountPath"] == "/var/lib/sidecar"


async def test_compose_scenario_runs_without_docker(tmp_path: Path, processes: Processes) -> None:
    """compose.yaml's services as processes: a real Redis with its password, two sidecars seeded from the same token,
    the client (with the key from the secret) answered by both with the cloud's user, and one refresh for both."""
    compose = compose_example("compose.yaml")
    services = compose["services"]
    redis_command = services["redis"]["command"]
    redis = RedisServer(tmp_path, redis_command[redis_command.index("--requirepass") + 1])
    redis.start()
    cloud_port = free_port()
    cloud_args = list(services["cloud"]["command"])
    cloud_args[cloud_args.index("--host") + 1] = "127.0.0.1"
    cloud_args[cloud_args.index("--port") + 1] = str(cloud_port)
    env = clean_env(XDG_CONFIG_HOME=str(tmp_path))
    try:
        cloud = await processes.start([*SIDECAR, *cloud_args], env)
        await wait_healthy(f"http://127.0.0.1:{cloud_port}/_mock/stats", cloud)
        # The compose secret, as the file compose would mount at /run/secrets/.
        [secret] = services["sidecar-a"]["secrets"]
        secret_file = ROOT / "docker" / compose["secrets"][secret]["file"]
        ports = {}
        for name in SHARED_SIDECARS:
            ports[name] = free_port()
            sidecar_env = {**env, **dockerfile_env(), **services[name]["environment"]}
            sidecar_env.update(
                SIDECAR_UPSTREAM=f"http://127.0.0.1:{cloud_port}",
                SIDECAR_STORE=sidecar_env["SIDECAR_STORE"].replace("@redis:6379/", f"@127.0.0.1:{redis.port}/"),
                SIDECAR_LISTEN=f"127.0.0.1:{ports[name]}",
                SIDECAR_CLIENT_KEY_SECRET_FILE=str(secret_file),
            )
            server = await processes.start([*SIDECAR, "serve"], sidecar_env)
            await wait_healthy(f"http://127.0.0.1:{ports[name]}/_sidecar/health", server, host=name)
        key = secret_file.read_text().strip()
        async with aiohttp.ClientSession() as client:
            for name, port in ports.items():
                whoami = f"http://127.0.0.1:{port}/api/v1/auth/whoami"
                async with client.get(whoami, headers={"Host": f"{name}:8787"}) as response:
                    assert response.status == 403  # the client key is required
                async with client.get(whoami, headers={"Host": f"{name}:8787", "X-Sidecar-Key": key}) as response:
                    assert response.status == 200
                    assert (await response.json())["name"] == "alice"
            async with client.get(f"http://127.0.0.1:{cloud_port}/_mock/stats") as response:
                stats = await response.json()
        assert stats["refresh_ok"] == 1 and stats["chain_revocations"] == 0
        seed = services["sidecar-a"]["environment"]["SIDECAR_REFRESH_TOKEN"]
        stored = redis.command("HGET", "sidecar:{team}:pair", "refreshToken")
        assert stored.startswith(b"$") and seed.encode() not in stored  # the rotated token, not the spent seed
    finally:
        redis.stop()


def _readme_block_after(heading: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index(heading) :]
    return re.findall(r"```sh\n(.*?)\n```", section, re.DOTALL)


def test_readme_quickstart_is_two_commands_demo_and_ci() -> None:
    """The Quickstart has exactly two commands: one installs and runs the demo, one runs .ci/run."""
    text = (ROOT / "README.md").read_text()
    quickstart = text[text.index("## Quickstart") : text.index("\n## ", text.index("## Quickstart") + 1)]
    commands = [block.strip() for block in re.findall(r"```sh\n(.*?)\n```", quickstart, re.DOTALL)]
    assert len(commands) == 2 and all("\n" not in command for command in commands)
    assert "pip install" in commands[0] and commands[0].endswith("sidecar demo")
    assert commands[1] == "bash .ci/run"


def test_readme_test_command_is_what_ci_runs() -> None:
    """The command under "Running the tests" is the last command .ci/run executes."""
    [block] = _readme_block_after("## Running the tests")[:1]
    ci_lines = [
        line.strip()
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert ci_lines[-1] == block.strip()
