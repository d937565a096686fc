"""The ``dpok`` command line: one subcommand per job, options generated from the typed configs."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from collections.abc import Sequence
from typing import Any


def add_dataclass_options(parser: argparse.ArgumentParser, cls: type, skip: Sequence[str] = ()) -> None:
    """One ``--kebab-case`` option per dataclass field; help text from ``field(metadata={"help"})``."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        kind = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        if typing.get_origin(kind) is list:
            parser.add_argument(flag, dest=f.name, action="append", default=None,
                                help=f"{help_text} (repeatable)")
        elif kind is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                                help=f"{help_text} (default: {default})")
        else:
            conv = kind if kind in (int, float, str) else str
            parser.add_argument(flag, dest=f.name, type=conv, default=None, help=f"{help_text} (default: {default!r})")


def overrides(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The options the user actually gave (not None)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names and v is not None}


def _cmd_pretrain(args: argparse.Namespace, argv: list[str]) -> int:
    from .embedded.pretrain import PretrainConfig, run_pretrain, tiny_config

    base = tiny_config(args.work_dir or "pretrain_work") if args.preset == "tiny" else PretrainConfig()
    cfg = dataclasses.replace(base, **overrides(args, PretrainConfig))
    return run_pretrain(cfg, argv)


RESUMABLE_CHANGES = {"rounds", "checkpoint_every", "keep_checkpoints", "device", "resume"}


def resume_settings(run_dir: str, given: dict[str, Any]) -> dict[str, Any]:
    """The run's saved settings, with the few options that may change on resume."""
    import json
    from pathlib import Path

    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise ValueError(f"--resume {run_dir}: no config.json there; give the folder of an earlier 'dpok train' run")
    saved = json.loads(path.read_text())
    changed = sorted(k for k, v in given.items() if k not in RESUMABLE_CHANGES and saved.get(k) != v)
    if changed:
        raise ValueError(f"--resume keeps the run's settings; these options cannot change: {', '.join(changed)} "
                         f"(only {', '.join(sorted(RESUMABLE_CHANGES - {'resume'}))} can)")
    return {**saved, **given, "resume": run_dir, "output_dir": run_dir}


def _cmd_train(args: argparse.Namespace, argv: list[str]) -> int:
    from .config import TrainConfig, build_config
    from .distributed import shutdown
    from .trainer import describe_result, train

    given = overrides(args, TrainConfig)
    if args.resume:
        given = resume_settings(args.resume, given)
    cfg = build_config(None if args.resume else args.preset, given)
    result = train(cfg)
    if result.main_process:  # one report for a multi-process run
        print(describe_result(result))
    shutdown()
    return 0


def _cmd_sample(args: argparse.Namespace, argv: list[str]) -> int:
    from .generate import write_samples

    index = write_samples(model=args.model, lora=args.lora, prompts=args.prompt, num_images=args.num_images,
                          seed=args.seed, output_dir=args.output_dir, num_steps=args.num_steps,
                          guidance_scale=args.guidance_scale, eta=args.eta, device=args.device,
                          batch_size=args.batch_size)
    print(f"wrote {len(index)} images and index.json to {args.output_dir}")
    return 0


def _cmd_eval(args: argparse.Namespace, argv: list[str]) -> int:
    from .evaluate import EvalConfig, run_eval

    cfg = EvalConfig(**overrides(args, EvalConfig))
    run_eval(cfg)
    return 0


def _cmd_prompts(args: argparse.Namespace, argv: list[str]) -> int:
    from .shapeworld import prompt_sets

    for name, prompts in prompt_sets().items():
        print(f"{name} ({len(prompts)}): " + "; ".join(prompts))
    return 0


def _cmd_rewards(args: argparse.Namespace, argv: list[str]) -> int:
    from .rewards import available_rewards

    for name, description in available_rewards().items():
        print(f"{name:24s} {description}")
    print(f"{'module:function':24s} your own function(images, prompts) -> one score per image")
    print(f"{'a+0.1*b':24s} a weighted sum of any of the above")
    return 0


def _cmd_reward_server(args: argparse.Namespace, argv: list[str]) -> int:
    from .rewards.server import serve

    options = {k: v for k, v in (("alignment_model", args.alignment_model), ("model", args.reward_model),
                                 ("head", args.reward_head), ("processor", args.reward_processor),
                                 ("device", args.device)) if v}
    from .rewards.server import ServerLimits

    limits = ServerLimits(max_body_bytes=int(args.max_body_mb * 2**20), max_images=args.max_images,
                          max_pixels=args.max_pixels, request_timeout_s=args.request_timeout)
    serve(args.reward, host=args.host, port=args.port, token=args.token or None, limits=limits,
          certfile=args.certfile or None, keyfile=args.keyfile or None, **options)
    return 0


def _add_sample_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="shapeworld", help="pipeline folder, hub id, or 'shapeworld' (default)")
    p.add_argument("--lora", default="", help="LoRA folder of a run (its 'lora/' folder) to load")
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeatable)")
    p.add_argument("--num-images", type=int, default=4, help="images per prompt (default: 4)")
    p.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    p.add_argument("--output-dir", required=True, help="folder for the PNGs and index.json")
    p.add_argument("--num-steps", type=int, default=20, help="DDIM steps (default: 20)")
    p.add_argument("--guidance-scale", type=float, default=5.0, help="guidance scale (default: 5.0)")
    p.add_argument("--eta", type=float, default=1.0, help="DDIM eta, 0 = deterministic (default: 1.0)")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward batch (default: 16)")
    p.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda[:N]' (default: auto)")


def build_parser() -> argparse.ArgumentParser:
    from .config import PRESETS, TrainConfig
    from .embedded.pretrain import PretrainConfig
    from .evaluate import EvalConfig

    parser = argparse.ArgumentParser(prog="dpok", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pretrain", help="train the embedded ShapeWorld model and alignment reward from scratch",
                       description="Train the embedded ShapeWorld text-to-image model (tokenizer, text encoder, "
                                   "VAE, UNet) and the shapeworld-alignment reward. Resumes from --work-dir.")
    p.add_argument("--preset", choices=["full", "tiny"], default="full",
                   help="'full' made the shipped model; 'tiny' runs a few steps of everything (for tests)")
    add_dataclass_options(p, PretrainConfig)
    p.set_defaults(func=_cmd_pretrain)

    t = sub.add_parser("train", help="fine-tune a diffusion model against a reward (DPOK, DDPO, SFT-KL, RWR, ...)",
                       description="Fine-tune a text-to-image diffusion model with RL from a reward. With no "
                                   "options: DPOK on the embedded ShapeWorld model, prompt 'two white triangles', "
                                   "reward shapeworld-alignment.")
    t.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="named settings applied before your options (e.g. dpok-paper, ddpo-paper)")
    add_dataclass_options(t, TrainConfig)
    t.set_defaults(func=_cmd_train)

    s = sub.add_parser("sample", help="generate images (optionally with a LoRA) into PNGs + index.json")
    _add_sample_options(s)
    s.set_defaults(func=_cmd_sample)

    e = sub.add_parser("eval", help="mean reward per prompt on seen and unseen prompt sets, as a table and JSON")
    add_dataclass_options(e, EvalConfig)
    e.set_defaults(func=_cmd_eval)

    r = sub.add_parser("reward-server", help="serve a registered reward over HTTP (JSON, PNG/base64 images)",
                       description="Serve any reward over HTTP for training jobs elsewhere to call with "
                                   "--reward http --reward-url URL. POST /score, GET /health.")
    r.add_argument("--reward", required=True, help="reward name or spec to serve")
    r.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, loopback only)")
    r.add_argument("--port", type=int, default=8765, help="port (default: 8765)")
    r.add_argument("--token", default="", help="shared token clients must send as 'Authorization: Bearer TOKEN'")
    r.add_argument("--max-body-mb", type=float, default=256.0, help="largest request body in MiB (default: 256)")
    r.add_argument("--max-images", type=int, default=1024, help="most images in one request (default: 1024)")
    r.add_argument("--max-pixels", type=int, default=4096 * 4096,
                   help="most pixels (width x height) of one image, checked before decoding (default: 4096x4096)")
    r.add_argument("--request-timeout", type=float, default=60.0,
                   help="seconds a connection may stay silent before it is closed (default: 60)")
    r.add_argument("--certfile", default="", help="PEM certificate: serve HTTPS (with --keyfile unless it holds the key)")
    r.add_argument("--keyfile", default="", help="PEM private key of --certfile")
    r.add_argument("--alignment-model", default="", help="folder of the shapeworld-alignment weights")
    r.add_argument("--reward-model", default="", help="hub id or folder of the reward's model (see docs/rewards.md)")
    r.add_argument("--reward-head", default="", help="safetensors file of the aesthetic predictor's MLP head")
    r.add_argument("--reward-processor", default="", help="hub id or folder of the reward's tokenizer/processor")
    r.add_argument("--device", default="", help="device for the reward model (default: the reward's choice)")
    r.set_defaults(func=_cmd_reward_server)

    sub.add_parser("prompts", help="list the named prompt sets").set_defaults(func=_cmd_prompts)
    sub.add_parser("rewards", help="list the registered rewards").set_defaults(func=_cmd_rewards)
    return parser


def _quiet_libraries() -> None:
    """Library chatter (progress bars of weight loading, optional-dependency notes) hides our output."""
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()  # "Loading pipeline components" bars


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _quiet_libraries()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "train":
        from .distributed import relaunch_cpu_workers

        relaunch_cpu_workers(argv)  # returns unless 'accelerate launch --cpu' started too few processes
    try:
        return int(args.func(args, argv))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as e:
        print(f"dpok {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
