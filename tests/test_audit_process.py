"""Real processes: a killed `python -m diffusers_fair.audit` resumes; the report page renders in headless Chromium."""

import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = [
    "--model", "miniature", "--prompts", "miniature-heldout", "--max-prompts", "3", "--classifier", "miniature-eval",
    "--num-images-per-prompt", "4", "--batch-size", "4", "--steps", "4", "--no-progress",
]  # fmt: skip


def _run(output, **kwargs):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "diffusers_fair.audit", *ARGS, "--output", output],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        **kwargs,
    )


@pytest.mark.slow
def test_a_killed_audit_process_resumes_where_it_stopped(tmp_path):
    output = str(tmp_path / "out")
    first_record = os.path.join(output, "cache", "base", "00000.safetensors")
    process = _run(output)
    deadline = time.time() + 240
    while not os.path.exists(first_record) and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert os.path.exists(first_record), process.communicate()[0].decode()[-2000:]
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = sorted(os.listdir(os.path.dirname(first_record)))
    assert not os.path.exists(os.path.join(output, "report.json")) or len(done) == 3
    stamps = {
        name: os.stat(os.path.join(output, "cache", "base", name)).st_mtime_ns for name in done if ".tmp" not in name
    }
    resumed = _run(output)
    log = resumed.communicate(timeout=300)[0].decode()
    assert resumed.returncode == 0, log[-2000:]
    for name, stamp in stamps.items():  # finished prompts were not recomputed
        assert os.stat(os.path.join(output, "cache", "base", name)).st_mtime_ns == stamp
    assert sorted(os.listdir(os.path.join(output, "cache", "base"))) == [f"{i:05d}.safetensors" for i in range(3)]
    assert os.path.isfile(os.path.join(output, "index.html"))


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.browser
@pytest.mark.skipif(_chromium() is None, reason="needs headless Chromium (Debian package `chromium`)")
def test_report_page_renders_in_headless_chromium(tmp_path):
    from PIL import Image

    from diffusers_fair.audit import parse_args, run_audit

    output = str(tmp_path / "out")
    run_audit(parse_args([*ARGS, "--output", output]))
    screenshot = str(tmp_path / "page.png")
    result = subprocess.run(
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1200,1600",
         f"--screenshot={screenshot}", "file://" + os.path.join(output, "index.html")],
        capture_output=True,
        timeout=120,
        env={**os.environ, "HOME": str(tmp_path)},
    )  # fmt: skip
    assert os.path.isfile(screenshot), result.stderr.decode()[-2000:]
    pixels = np.asarray(Image.open(screenshot).convert("RGB")).astype(np.float32)
    assert pixels.shape[:2] == (1600, 1200)
    # Not blank: text, the table and the plot images give many distinct colours and dark pixels.
    assert pixels.std() > 10
    assert (pixels.sum(axis=-1) < 200).mean() > 0.001  # dark text and markers
    colours = np.unique(pixels.reshape(-1, 3).astype(np.uint8), axis=0)
    assert len(colours) > 50
    # The plots were loaded through their relative paths: their markers' blue (#0072B2) is on the page.
    marker_blue = (np.abs(pixels - np.array([0, 114, 178])).max(axis=-1) < 12).sum()
    assert marker_blue > 30, marker_blue
