"""``ravit train``: train or fine-tune any ravit / timm model from a YAML config plus command-line overrides.

Every config key is also a flag (``--batch-size 64``, ``--ema`` / ``--no-ema``, ``--model-kwargs embed_dim=96
depth=6``); a key the config does not know is an error naming it. Runs under ``torchrun`` as DDP.
"""

from __future__ import annotations

import argparse

from ravit.cli._args import parse_model_kwargs

__all__ = ["register", "run"]


def register(subparsers) -> None:
    from ravit.train.config import config_fields

    parser = subparsers.add_parser(
        "train",
        help="train / fine-tune a model (YAML config + overrides; torchrun for DDP)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-c", "--config", help="YAML file of config keys (see ravit/configs/ for examples)")
    group = parser.add_argument_group("config keys (override the YAML file)")
    for name, annotation in config_fields().items():
        flag = "--" + name.replace("_", "-")
        if annotation == "bool":
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS)
        elif annotation == "dict":
            group.add_argument(flag, dest=name, nargs="*", metavar="KEY=VALUE", default=argparse.SUPPRESS)
        elif annotation.startswith("list["):
            group.add_argument(flag, dest=name, nargs="+", metavar="V", default=argparse.SUPPRESS)
        else:
            metavar = annotation.removesuffix(" | None").replace(" | ", "|").upper()  # INT, FLOAT, INT|FLOAT, ...
            group.add_argument(flag, dest=name, metavar=metavar, default=argparse.SUPPRESS)
    parser.set_defaults(func=run)


def run(args) -> int:
    from ravit.train.config import config_fields, load_config
    from ravit.train.loop import train

    overrides = {k: v for k, v in vars(args).items() if k in config_fields()}
    if "model_kwargs" in overrides:
        overrides["model_kwargs"] = parse_model_kwargs(overrides["model_kwargs"])
    cfg = load_config(args.config, overrides)
    train(cfg)  # a full disk, a read-only or unwritable output: one line from ravit.cli.main, other errors stay
    return 0
