"""The slim client installed on its own (a fresh venv, `pip install ./client`, no torch) talks to a live
service: typed results, and a clear error where torch would be needed."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

CLIENT = Path(__file__).resolve().parents[2] / "client"

SCRIPT = textwrap.dedent(
    """
    import json, sys
    from importlib import metadata
    import batchsize_client as bc
    from batchsize_client import BatchsizeClient

    with BatchsizeClient(sys.argv[1]) as client:
        names = [m["name"] for m in client.models()]
        recipe = client.recommend("mlp", config={"hidden_dims": [16]}, dataset_size=2048,
                                  memory_budget_bytes=4 * 2**20, time_budget_s=3, wait_timeout_s=300)
    try:
        bc.recommend(object(), None)
        missing = None
    except bc.ExportError as exc:
        missing = exc.code
    files = metadata.distribution("batchsize-client").files
    print(json.dumps({
        "torch_imported": "torch" in sys.modules,
        "torch_installed": any(d.metadata["Name"] == "torch" for d in metadata.distributions()),
        "top_level": sorted({f.parts[0] for f in files if f.suffix == ".py"}),
        "requires": metadata.requires("batchsize-client"),
        "names": names,
        "micro_batch_size": recipe.micro_batch_size,
        "throughput_type": type(recipe.throughput[0]).__name__,
        "missing": missing,
    }))
    """
)


def _run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout)


def test_the_client_alone_without_torch(service_url: str, tmp_path: Path) -> None:
    source = shutil.copytree(
        CLIENT, tmp_path / "client", ignore=shutil.ignore_patterns("build", "*.egg-info")
    )
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", str(venv)).check_returncode()
    python = str(venv / "bin" / "python")
    install = _run(python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(source))
    if install.returncode != 0:
        if any(word in install.stderr for word in ("Could not find a version", "Network", "connection")):
            pytest.skip(f"pip cannot reach a package index for httpx/pydantic: {install.stderr[-300:]}")
        pytest.fail(install.stderr)
    ran = _run(python, "-c", SCRIPT, service_url)
    assert ran.returncode == 0, ran.stderr
    seen = json.loads(ran.stdout.strip().splitlines()[-1])
    assert not seen["torch_imported"] and not seen["torch_installed"]
    assert seen["top_level"] == ["batchsize_client"]  # no service/, models/ or migrations/
    assert not any(r.split(";")[0].strip().startswith("torch") for r in seen["requires"] if "extra" not in r)
    assert "mlp" in seen["names"] and seen["micro_batch_size"] >= 1
    assert seen["throughput_type"] == "ThroughputPoint" and seen["missing"] == "torch_missing"
