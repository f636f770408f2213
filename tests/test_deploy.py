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

import aiohttp
import pytest
import yaml
from conftest import SIDECAR, clean_env, free_port, kill_running

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


def test_compose_example_parses_and_wires_cloud_sidecar_and_client() -> None:
    """compose.yaml has the mock cloud, the sidecar seeded with a token the cloud knows, and a client."""
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"cloud", "sidecar", "client"}
    cloud_command = services["cloud"]["command"]
    seed = cloud_command[cloud_command.index("--known-refresh-token") + 1]
    environment = services["sidecar"]["environment"]
    assert environment["SIDECAR_REFRESH_TOKEN"] == seed
    assert environment["SIDECAR_UPSTREAM"].startswith("http://cloud:")
    assert "sidecar" in environment["SIDECAR_ALLOWED_HOSTS"].split(",")
    assert any(volume.endswith(":/var/lib/sidecar") for volume in services["sidecar"]["volumes"])
    assert "http://sidecar:8787/" in " ".join(services["client"]["command"])


def test_compose_example_checks_the_client_key_not_uids() -> None:
    """Across containers no uid can be seen: compose allows any uid, requires the key, and both sides read it from one secret."""
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    sidecar, client = compose["services"]["sidecar"], compose["services"]["client"]
    environment = sidecar["environment"]
    assert environment["SIDECAR_ALLOW_USERS"] == "any"
    assert environment["SIDECAR_CLIENT_KEY"] == "required"
    [secret] = sidecar["secrets"]
    assert client["secrets"] == [secret]
    assert environment["SIDECAR_CLIENT_KEY_SECRET_FILE"] == f"/run/secrets/{secret}"
    assert f"X-Sidecar-Key: $$(cat /run/secrets/{secret})" in " ".join(client["command"])
    assert (ROOT / "docker" / compose["secrets"][secret]["file"]).is_file()


def test_kubernetes_example_lets_only_the_apps_uid_in() -> None:
    """In a pod the uids can be seen: the app runs as a fixed uid and allow_users names exactly it."""
    documents = list(yaml.safe_load_all((ROOT / "docker" / "kubernetes.yaml").read_text()))
    [deployment] = [document for document in documents if document["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    [sidecar] = pod["initContainers"]
    [app] = pod["containers"]
    environment = {item["name"]: item.get("value") for item in sidecar["env"]}
    assert environment["SIDECAR_ALLOW_USERS"] == str(app["securityContext"]["runAsUser"])
    assert environment.get("SIDECAR_CLIENT_KEY") in (None, "off")


def test_kubernetes_example_is_a_native_sidecar_with_readiness_and_persistent_store() -> None:
    """kubernetes.yaml runs sidecar as an init container with restartPolicy Always, ready on /_sidecar/ready, store on a PVC."""
    documents = list(yaml.safe_load_all((ROOT / "docker" / "kubernetes.yaml").read_text()))
    kinds = {document["kind"]: document for document in documents}
    assert {"Secret", "PersistentVolumeClaim", "Deployment"} <= set(kinds)
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    [sidecar] = pod["initContainers"]
    assert sidecar["restartPolicy"] == "Always"
    assert "/_sidecar/ready" in " ".join(sidecar["readinessProbe"]["exec"]["command"])
    [mount] = sidecar["volumeMounts"]
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["persistentVolumeClaim"]["claimName"] == kinds["PersistentVolumeClaim"]["metadata"]["name"]
    assert mount["mountPath"] == "/var/lib/sidecar"


async def test_compose_scenario_runs_without_docker(tmp_path: Path, processes: Processes) -> None:
    """The compose services' command lines, run as processes: the seeded sidecar answers the client with the cloud's user."""
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    cloud_port, proxy_port = free_port(), free_port()
    cloud_args = [arg for arg in compose["services"]["cloud"]["command"]]
    cloud_args[cloud_args.index("--host") + 1] = "127.0.0.1"
    cloud_args[cloud_args.index("--port") + 1] = str(cloud_port)
    env = clean_env(XDG_CONFIG_HOME=str(tmp_path))
    cloud = await processes.start([*SIDECAR, *cloud_args], env)
    sidecar_env = {**env, **dockerfile_env(), **compose["services"]["sidecar"]["environment"]}
    # The compose secret, as the file compose would mount at /run/secrets/.
    [secret] = compose["services"]["sidecar"]["secrets"]
    secret_file = ROOT / "docker" / compose["secrets"][secret]["file"]
    sidecar_env.update(
        SIDECAR_UPSTREAM=f"http://127.0.0.1:{cloud_port}",
        SIDECAR_STORE=str(tmp_path / "volume" / "tokens.json"),
        SIDECAR_LISTEN=f"127.0.0.1:{proxy_port}",
        SIDECAR_CLIENT_KEY_SECRET_FILE=str(secret_file),
    )
    await wait_healthy(f"http://127.0.0.1:{cloud_port}/_mock/stats", cloud)
    server = await processes.start([*SIDECAR, "serve"], sidecar_env)
    await wait_healthy(f"http://127.0.0.1:{proxy_port}/_sidecar/health", server, host="sidecar")
    key = secret_file.read_text().strip()
    async with aiohttp.ClientSession() as client:
        whoami = f"http://127.0.0.1:{proxy_port}/api/v1/auth/whoami"
        async with client.get(whoami, headers={"Host": "sidecar:8787"}) as response:
            assert response.status == 403  # the client key is required
        async with client.get(whoami, headers={"Host": "sidecar:8787", "X-Sidecar-Key": key}) as response:
            assert response.status == 200
            assert (await response.json())["name"] == "alice"
    stored = json.loads((tmp_path / "volume" / "tokens.json").read_text())
    assert stored["refreshToken"] != compose["services"]["sidecar"]["environment"]["SIDECAR_REFRESH_TOKEN"]


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


def test_redis_compose_example_shares_one_login_between_two_sidecars() -> None:
    """compose.redis.yaml: a Redis with AOF and two sidecars naming the same Redis store URL (from the environment)."""
    compose = yaml.safe_load((ROOT / "docker" / "compose.redis.yaml").read_text())
    services = compose["services"]
    assert {"cloud", "redis", "sidecar-a", "sidecar-b", "client"} <= set(services)
    assert "--appendonly" in services["redis"]["command"]
    stores = {services[name]["environment"]["SIDECAR_STORE"] for name in ("sidecar-a", "sidecar-b")}
    [store] = stores
    assert store.startswith("redis://") and "?key=" in store
    for name in ("sidecar-a", "sidecar-b"):
        assert "--store" not in " ".join(services[name].get("command", []))  # never on the command line


def test_redis_kubernetes_example_scales_rolls_and_is_protected() -> None:
    """kubernetes-redis.yaml: 3 replicas, RollingUpdate, a PodDisruptionBudget, the store URL from a Secret, Redis with AOF."""
    documents = list(yaml.safe_load_all((ROOT / "docker" / "kubernetes-redis.yaml").read_text()))
    kinds = {document["kind"]: document for document in documents}
    deployment = kinds["Deployment"]
    assert deployment["spec"]["replicas"] == 3
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    assert kinds["PodDisruptionBudget"]["spec"]["selector"] == deployment["spec"]["selector"]
    [sidecar] = deployment["spec"]["template"]["spec"]["initContainers"]
    [store] = [item for item in sidecar["env"] if item["name"] == "SIDECAR_STORE"]
    assert store["valueFrom"]["secretKeyRef"]["name"] == kinds["Secret"]["metadata"]["name"]
    [redis] = kinds["StatefulSet"]["spec"]["template"]["spec"]["containers"]
    assert "--appendonly" in redis["args"]
