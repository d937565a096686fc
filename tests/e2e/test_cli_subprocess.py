"""`dpok train` on the embedded model in a subprocess, as a user runs it: every output is written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

TINY_RUN = ["--rounds", "2", "--samples-per-round", "4", "--sample-batch-size", "4", "--minibatch-size", "4",
            "--gradient-steps", "1", "--num-steps", "3", "--eval-images", "2"]


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}


def test_train_on_the_embedded_model_writes_every_output(tmp_path: Path, shipped_model_dir: Path) -> None:
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "run with space"
    proc = subprocess.run([sys.executable, "-m", "dpok", "train", *TINY_RUN, "--output-dir", str(out)],
                          capture_output=True, text=True, env=_env(), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("config.json", "metrics.jsonl", "samples_before.png", "samples_after.png", "curves.png",
                 "summary.json", "lora/pytorch_lora_weights.safetensors", "config.yaml", "lora/lora_kohya.safetensors",
                 "lora/README.md", "lora/samples_after.png"):
        assert (out / name).is_file(), name
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert {"reward/mean", "reward/invalid", "kl/rollout", "train/loss", "train/grad_norm", "time/sample_s"} <= rows[0].keys()
    assert "samples_after" in proc.stdout and str(out) in proc.stdout
    pipe = StableDiffusionPipeline.from_pretrained(shipped_model_dir)
    pipe.load_lora_weights(str(out / "lora"))
    assert json.loads((out / "config.json").read_text())["algorithm"] == "dpok"



def test_help_loads_neither_diffusers_nor_the_pretraining_code() -> None:
    """Start-up: ``dpok --help`` and ``dpok train --help`` read the settings only (they once loaded
    diffusers and the pretraining code: 4 s here, now about 1 s, mostly torch)."""
    probe = ("import sys\nfrom dpok.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
             "heavy = [m for m in ('diffusers', 'transformers', 'peft', 'dpok.embedded.pretrain') if m in sys.modules]\n"
             "print('HEAVY', heavy)")
    for args in ([], ["train"], ["pretrain"]):
        proc = subprocess.run([sys.executable, "-c", probe, *args, "--help"], capture_output=True, text=True,
                              env=_env(), timeout=120)
        assert proc.returncode == 0 and "usage: dpok" in proc.stdout, proc.stderr[-2000:]
        assert "HEAVY []" in proc.stdout, (args, proc.stdout[-500:])
        if args == ["train"]:
            assert "--reward-overlap {auto,on,off}" in proc.stdout and "0: auto, sized to the run" in proc.stdout
