"""``ravit train``: train or fine-tune any ravit / timm model from a YAML config plus command-line overrides.

``-c`` takes a YAML file or the name of a config shipped in ``ravit/configs/`` (``-c fmnist_fan_p4``), from any
folder. MODEL (given first) replaces the config's model; ``--data`` is a dataset name (``fashion-mnist``, also written
``fashion_mnist``) or an ImageFolder folder (``<folder>/<split>/<class>/<image>``); the run goes to ``--output``
(default ``runs/train/<MODEL>``). Every other config key is also a flag (``--batch-size 64``, ``--ema`` /
``--no-ema``, ``--model-kwargs embed_dim=96 depth=6``); a key the config does not know is an error naming it. Runs
under ``torchrun`` as DDP.

``--max-steps N`` stops after N optimizer steps in all (a quick run), also mid-epoch; the LR schedule stays the one
of ``--epochs``, so ``--resume`` later continues exactly as if the run had never stopped. ``--resume`` may also change
``--epochs`` (not below the epochs already trained): the cosine schedule then spans the new length, so the LR rises
to the new schedule's value at the resume point and decays to ``--min-lr`` at the new end (a warm restart).
"""

from __future__ import annotations

import argparse

from ravit.cli import CLIError
from ravit.cli._args import parse_model_kwargs

__all__ = ["register", "run"]

# Config keys whose flag is not the key's own name: the data flag is shared with the other subcommands.
_FLAGS = {"dataset": "--data"}
_METAVARS = {"dataset": "NAME_OR_FOLDER", "data_dir": "DIR", "output": "DIR", "init_checkpoint": "PATH"}


def register(subparsers) -> None:
    from ravit.train.config import config_fields, packaged_configs

    parser = subparsers.add_parser(
        "train",
        help="train / fine-tune a model (YAML config + overrides; torchrun for DDP)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model_arg", nargs="?", metavar="MODEL", help="model to train (default: the config's)")
    parser.add_argument("-c", "--config", metavar="FILE_OR_NAME",
                        help=f"YAML file of config keys, or a packaged one: {', '.join(packaged_configs())}")
    group = parser.add_argument_group("config keys (override the YAML file)")
    for name, annotation in config_fields().items():
        flag = _FLAGS.get(name, "--" + name.replace("_", "-"))
        if annotation == "bool":
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS)
        elif annotation == "dict":
            group.add_argument(flag, dest=name, nargs="*", metavar="KEY=VALUE", default=argparse.SUPPRESS)
        elif annotation.startswith("list["):
            group.add_argument(flag, dest=name, nargs="+", metavar="V", default=argparse.SUPPRESS)
        else:
            # INT, FLOAT, INT|FLOAT, ... unless the key names what it takes
            metavar = _METAVARS.get(name, annotation.removesuffix(" | None").replace(" | ", "|").upper())
            group.add_argument(flag, dest=name, metavar=metavar, default=argparse.SUPPRESS)
    parser.set_defaults(func=run)


def run(args) -> int:
    from ravit.train.config import config_fields, load_config
    from ravit.train.loop import train

    overrides = {k: v for k, v in vars(args).items() if k in config_fields()}
    if args.model_arg is not None:
        if overrides.get("model", args.model_arg) != args.model_arg:
            raise CLIError(f"MODEL {args.model_arg!r} and --model {overrides['model']!r} disagree; give one")
        overrides["model"] = args.model_arg
    if "model_kwargs" in overrides:
        overrides["model_kwargs"] = parse_model_kwargs(overrides["model_kwargs"])
    cfg = load_config(args.config, overrides)
    train(cfg)  # a full disk, a read-only or unwritable output: one line from ravit.cli.main, other errors stay
    return 0
