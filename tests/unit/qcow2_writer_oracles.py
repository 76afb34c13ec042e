"""QEMU's tools as oracles for the qcow2 writer's tests: check, compare, info."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any


def qemu_img_check(image: Path) -> dict[str, Any]:
    """`qemu-img check --output=json`; asserts no errors, corruptions or leaks."""
    result = subprocess.run(
        ["qemu-img", "check", "--output=json", str(image)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, f"qemu-img check failed: {result.stdout}{result.stderr}"
    report: dict[str, Any] = json.loads(result.stdout)
    assert report["check-errors"] == 0, report
    assert report.get("corruptions", 0) == 0, report
    assert report.get("leaks", 0) == 0, report
    return report


def qemu_img_compare(expected_raw: Path, image: Path) -> None:
    """`qemu-img compare` of a raw file with our image (through its backing chain)."""
    result = subprocess.run(
        ["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(expected_raw), str(image)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, f"qemu-img compare: {result.stdout}{result.stderr}"
    assert "Images are identical" in result.stdout


def qemu_img_info(image: Path) -> dict[str, Any]:
    result = subprocess.run(
        ["qemu-img", "info", "--output=json", str(image)],
        capture_output=True,
        text=True,
        check=True,
    )
    info: dict[str, Any] = json.loads(result.stdout)
    return info


def make_qcow2_backing(raw: Path, image: Path, cluster_size: int = 65536) -> None:
    """A qcow2 backing image with the content of ``raw``, written by qemu-img itself."""
    subprocess.run(
        [
            "qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2",
            "-o", f"cluster_size={cluster_size}", str(raw), str(image),
        ],
        check=True,
    )  # fmt: skip
