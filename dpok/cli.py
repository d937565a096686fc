"""The ``dpok`` command line: one subcommand per job, options generated from the typed configs."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import typing
from collections.abc import Iterator, Sequence
from typing import Any

from .options import from_options, option_fields, option_names


def add_dataclass_options(parser: argparse.ArgumentParser, cls: type, skip: Sequence[str] = ()) -> None:
    """One ``--kebab-case`` option per option of settings dataclass ``cls`` (nested groups listed under
    their own heading); help text from the field's ``help``, choices from a ``Literal`` type."""
    groups: dict[str, Any] = {}
    for o in option_fields(cls):
        if o.name in skip:
            continue
        target = parser if not o.title else groups.setdefault(o.title, parser.add_argument_group(o.title))
        kind, default = o.kind, o.default()
        if typing.get_origin(kind) is dict:
            continue  # no command-line form: a config file or Python sets it
        if typing.get_origin(kind) is list:
            item = typing.get_args(kind)[0]
            target.add_argument(o.flag, dest=o.name, action="extend", nargs="+", type=item, default=None,
                                help=f"{o.help} (repeatable)")
        elif kind is bool:
            target.add_argument(o.flag, dest=o.name, action=argparse.BooleanOptionalAction, default=None,
                                help=f"{o.help} (default: {default})")
        elif typing.get_origin(kind) is typing.Literal:
            target.add_argument(o.flag, dest=o.name, choices=typing.get_args(kind), default=None,
                                help=f"{o.help} (default: {default!r})")
        else:
            conv = kind if kind in (int, float, str) else str
            target.add_argument(o.flag, dest=o.name, type=conv, default=None, help=f"{o.help} (default: {default!r})")


def overrides(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The options the user actually gave (not None)."""
    names = set(option_names(cls))
    return {k: v for k, v in vars(args).items() if k in names and v is not None}


def add_config_option(parser: argparse.ArgumentParser) -> None:
    """``--config FILE``: the command's settings from a YAML or TOML file."""
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="YAML (.yaml, .yml) or TOML (.toml) file of settings, keys named like the options "
                             "(learning_rate or learning-rate); options given on the command line override it")


def settings(args: argparse.Namespace, cls: type, extra: dict[str, Any] | None = None) -> tuple[dict[str, Any], Any]:
    """The config file's settings (if ``--config``) overridden by the options given; and the file
    (a :class:`~dpok.configfile.ConfigFile`, or None)."""
    from .configfile import read_config_file

    source = read_config_file(args.config, cls, extra) if getattr(args, "config", None) else None
    values = dict(source.values) if source is not None else {}
    values.update(overrides(args, cls))
    return values, source


@contextlib.contextmanager
def errors_located(source: Any) -> Iterator[None]:
    """A settings error about an option that came from the config file names the file and line."""
    from .configfile import ConfigFileError, annotate_errors

    try:
        yield
    except ConfigFileError:
        raise
    except ValueError as e:
        if source is None:
            raise
        raise ValueError(annotate_errors(str(e), source)) from None


def _cmd_pretrain(args: argparse.Namespace, argv: list[str]) -> int:
    from .embedded.pretrain import run_pretrain
    from .embedded.pretrain_config import PretrainConfig, tiny_config

    values, source = settings(args, PretrainConfig, extra={"preset": str})
    file_preset = values.pop("preset", None)
    preset = args.preset or file_preset or "full"
    with errors_located(source):
        if preset not in ("full", "tiny"):
            raise ValueError(f"--preset must be 'full' or 'tiny' (got {preset!r})")
        work_dir, family = values.get("work_dir") or "pretrain_work", values.get("family", "diffusion")
        base = tiny_config(work_dir, family) if preset == "tiny" else PretrainConfig()
        cfg = dataclasses.replace(base, **values)
        cfg.validate()
    return run_pretrain(cfg, argv)


# what may change on resume: bookkeeping, and speed options that compute the same to float rounding
RESUMABLE_CHANGES = {"reward_overlap", "rounds", "checkpoint_every", "keep_checkpoints", "device", "resume", "report_to",
                     "channels_last", "compile"}
# settings added after runs were already saved: a run folder without them ran with these values
# (not today's defaults), so a resume continues it as it was
SETTINGS_BEFORE_THEY_EXISTED = {"lr_schedule": "constant", "lr_warmup_rounds": 0, "adv_std_floor": 0.0,
                               "shared_noise": False, "adv_global_std": False, "minibatch_draw": "with-replacement",
                               "nft_train_steps": 0, "rollout_solver": "ddim"}


def resume_settings(run_dir: str, given: dict[str, Any]) -> dict[str, Any]:
    """The run's saved settings, with the few options that may change on resume."""
    import json
    from pathlib import Path

    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise ValueError(f"--resume {run_dir}: no config.json there; give the folder of an earlier 'dpok train' run")
    saved = {**SETTINGS_BEFORE_THEY_EXISTED, **json.loads(path.read_text())}
    changed = sorted(k for k, v in given.items() if k not in RESUMABLE_CHANGES and saved.get(k) != v)
    if changed:
        raise ValueError(f"--resume keeps the run's settings; these options cannot change: {', '.join(changed)} "
                         f"(only {', '.join(sorted(RESUMABLE_CHANGES - {'resume'}))} can)")
    return {**saved, **given, "resume": run_dir, "output_dir": run_dir}


def train_config(args: argparse.Namespace) -> tuple[Any, str]:
    """The validated :class:`~dpok.config.TrainConfig` of ``dpok train`` options (defaults, then the
    preset, the config file and the options given), and the format of the run's config file."""
    from .config import TrainConfig, build_config

    given, source = settings(args, TrainConfig, extra={"preset": str})
    file_preset = given.pop("preset", None)
    preset = args.preset or file_preset
    with errors_located(source):
        if given.get("resume"):
            given = resume_settings(given["resume"], given)
        cfg = build_config(None if given.get("resume") else preset, given)
    return cfg, source.format if source is not None else "yaml"


def _cmd_train(args: argparse.Namespace, argv: list[str]) -> int:
    from .distributed import shutdown
    from .trainer import describe_result, train

    cfg, config_format = train_config(args)
    result = train(cfg, config_format=config_format)
    if result.main_process:  # one report for a multi-process run
        print(describe_result(result))
    shutdown()
    return 0


def _cmd_sample(args: argparse.Namespace, argv: list[str]) -> int:
    from .generate import SampleConfig, write_samples

    values, source = settings(args, SampleConfig)
    with errors_located(source):
        cfg = from_options(SampleConfig, values)
        cfg.validate()
        index = write_samples(model=cfg.model, lora=cfg.lora, prompts=cfg.prompt, num_images=cfg.num_images,
                              seed=cfg.seed, output_dir=cfg.output_dir, num_steps=cfg.num_steps,
                              guidance_scale=cfg.guidance_scale, eta=cfg.eta, device=cfg.device,
                              batch_size=cfg.batch_size)
    print(f"wrote {len(index)} images and index.json to {cfg.output_dir}")
    return 0


def _cmd_eval(args: argparse.Namespace, argv: list[str]) -> int:
    from .evaluate import EvalConfig, run_eval

    values, source = settings(args, EvalConfig)
    with errors_located(source):
        run_eval(from_options(EvalConfig, values))
    return 0


def _cmd_prompts(args: argparse.Namespace, argv: list[str]) -> int:
    from .config import TrainConfig
    from .domains import model_domain

    domain = model_domain(args.model or TrainConfig.model)
    if domain is None:
        print(f"{args.model}: no named prompt sets (a model's prompt sets come from its domain)")
        return 0
    for name, prompts in domain.prompt_sets().items():
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
    from .rewards.server import ServerConfig, serve_config

    values, source = settings(args, ServerConfig)
    with errors_located(source):
        serve_config(from_options(ServerConfig, values))
    return 0


def _cmd_export(args: argparse.Namespace, argv: list[str]) -> int:
    from pathlib import Path

    from .export import export_kohya, lora_folder, write_model_card

    folder = lora_folder(args.run)
    print(f"wrote {export_kohya(folder, args.output or None)} (kohya format: ComfyUI, AUTOMATIC1111)")
    if folder != Path(args.run) and not args.no_card:
        print(f"wrote {write_model_card(args.run)} (model card)")
    return 0


def _cmd_presets(args: argparse.Namespace, argv: list[str]) -> int:
    from .config import PRESETS
    from .configfile import preset_file, write_preset_files

    if args.write:
        for path in write_preset_files(args.write):
            print(f"wrote {path}")
        return 0
    for name, fn in PRESETS.items():
        summary = " ".join((fn.__doc__ or "").split())
        summary = summary if len(summary) <= 100 else summary[:97] + "..."
        print(f"{name:18s} {preset_file(name)}\n{'':18s} {summary}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .config import PRESETS, TrainConfig
    from .embedded.pretrain_config import PretrainConfig
    from .evaluate import EvalConfig
    from .generate import SampleConfig
    from .rewards.server import ServerConfig

    parser = argparse.ArgumentParser(prog="dpok", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pretrain", help="train the embedded ShapeWorld model and alignment reward from scratch",
                       description="Train the embedded ShapeWorld text-to-image model (tokenizer, text encoder, "
                                   "VAE, UNet) and the shapeworld-alignment reward. Resumes from --work-dir.")
    p.add_argument("--preset", choices=["full", "tiny"], default=None,
                   help="'full' (default) made the shipped model; 'tiny' runs a few steps of everything (for tests)")
    add_config_option(p)
    add_dataclass_options(p, PretrainConfig)
    p.set_defaults(func=_cmd_pretrain)

    t = sub.add_parser("train", help="fine-tune a diffusion model against a reward (DPOK, DDPO, SFT-KL, RWR, ...)",
                       description="Fine-tune a text-to-image diffusion model with RL from a reward. With no "
                                   "options: DPOK on the embedded ShapeWorld model, prompt 'two white triangles', "
                                   "reward shapeworld-alignment.")
    t.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="named settings applied before the config file and your options (e.g. dpok-paper, "
                        "ddpo-paper; each is also a config file to copy, see 'dpok presets')")
    add_config_option(t)
    add_dataclass_options(t, TrainConfig)
    t.set_defaults(func=_cmd_train)

    s = sub.add_parser("sample", help="generate images (optionally with a LoRA) into PNGs + index.json")
    add_config_option(s)
    add_dataclass_options(s, SampleConfig)
    s.set_defaults(func=_cmd_sample)

    e = sub.add_parser("eval", help="mean reward per prompt on seen and unseen prompt sets, as a table and JSON")
    add_config_option(e)
    add_dataclass_options(e, EvalConfig)
    e.set_defaults(func=_cmd_eval)

    r = sub.add_parser("reward-server", help="serve a registered reward over HTTP (JSON, PNG/base64 images)",
                       description="Serve any reward over HTTP for training jobs elsewhere to call with "
                                   "--reward http --reward-url URL. POST /score, GET /health.")
    add_config_option(r)
    add_dataclass_options(r, ServerConfig)
    r.set_defaults(func=_cmd_reward_server)

    x = sub.add_parser("export", help="write a run's LoRA in the kohya format (ComfyUI, A1111) and its model card",
                       description="Write RUN/lora/lora_kohya.safetensors (lora_unet_... keys with .alpha, as ComfyUI "
                                   "and AUTOMATIC1111 load them) and the model card RUN/lora/README.md.")
    x.add_argument("run", help="run folder of 'dpok train' (or its lora/ folder: then no model card)")
    x.add_argument("--output", default="", help="kohya file to write (default: RUN/lora/lora_kohya.safetensors)")
    x.add_argument("--no-card", action="store_true", help="do not (re)write the model card")
    x.set_defaults(func=_cmd_export)
    pr = sub.add_parser("presets", help="list the named training presets and their config files")
    pr.add_argument("--write", default="", metavar="DIR", help="write every preset's config file into DIR (to copy)")
    pr.set_defaults(func=_cmd_presets)
    ps = sub.add_parser("prompts", help="list the named prompt sets of a model's domain")
    ps.add_argument("--model", default="", help="pipeline folder or 'shapeworld' (default: the embedded model)")
    ps.set_defaults(func=_cmd_prompts)
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
    parser = build_parser()
    args = parser.parse_args(argv)  # --help ends here, before any heavy library loads
    _quiet_libraries()
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
