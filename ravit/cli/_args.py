"""The vocabulary every ``ravit`` subcommand shares, built in one place so a flag means the same thing everywhere.

- the model: the positional ``MODEL`` with ``--checkpoint PATH`` / ``--pretrained`` / ``--model-kwargs KEY=VALUE ...``;
- the data: ``--data NAME_OR_FOLDER`` (``fashion-mnist``, also spelt ``fashion_mnist``, or an image folder), with
  ``--data-dir`` (where the Fashion-MNIST files are) and ``--split``;
- ``--output DIR``, by default ``runs/<command>/<MODEL>``; ``--limit N``, ``--batch-size``, ``--workers``, ``--device``;
- lists (``--severities``, ``--corruptions``, ``--blocks``, ``--budgets`` ...) written ``1,3,5`` or ``1 3 5``.

Values are checked while the command line is parsed, so a mistake is one line (an ``InvalidArgumentError``, exit code
2) before any model is built or image read. One parser class and one help formatter serve every subcommand.
"""

from __future__ import annotations

import argparse
import math
import re
import textwrap
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

from ravit.errors import InvalidArgumentError, MissingFileError

__all__ = [
    "ArgumentParser",
    "HelpFormatter",
    "ListAction",
    "add_count_argument",
    "add_data_arguments",
    "add_device_argument",
    "add_list_argument",
    "add_model_arguments",
    "add_output_argument",
    "add_value_argument",
    "block_indices",
    "budget",
    "build_model",
    "corruption",
    "model_input",
    "noise_std",
    "output_dir",
    "parse_model_kwargs",
    "resolve_device",
    "severity",
]


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written; each option's default appended once, as ``(default: X)`` (a list as ``1,2,3``),
    unless its help already speaks of its default or there is none to show (None, False, an empty list)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        empty = isinstance(default, (list, tuple, dict)) and not default
        if empty or default is None or default is False or default == argparse.SUPPRESS or "default" in text:
            return text
        if not action.option_strings and action.nargs not in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return text
        value = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default: {value.replace('%', '%%')})"

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)  # fashion-mnist stays whole


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser with ravit's help formatter, no abbreviated flags (``--out`` is not ``--output``), and a
    mistake raised as an ``InvalidArgumentError`` (one line, exit code 2 from ``ravit.cli.main``) instead of the usage
    text and ``SystemExit``."""

    def __init__(self, *args, **kwargs):
        kwargs["formatter_class"] = HelpFormatter
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise InvalidArgumentError(f"{message} (see --help)")


# --- lists ------------------------------------------------------------------------------------------------------------
class ListAction(argparse.Action):
    """A list written ``1,3,5``, ``1 3 5`` or both; ``item`` turns one piece into a value, or into a ``range`` of them
    (block ranges such as ``3-11``), and raises ``ValueError`` for a bad piece (reported with the flag)."""

    def __init__(self, option_strings, dest, item: Callable[[str], object] = str, **kwargs):
        kwargs.setdefault("nargs", "+")
        super().__init__(option_strings, dest, **kwargs)
        self.item = item

    def __call__(self, parser, namespace, values, option_string=None):
        flag = option_string or self.metavar or self.dest
        pieces = [piece.strip() for value in values for piece in value.split(",") if piece.strip()]
        if not pieces:
            raise InvalidArgumentError(f"{flag}: no value given in {' '.join(values)!r}")
        items = []
        for piece in pieces:
            try:
                value = self.item(piece)
            except ValueError as err:
                raise InvalidArgumentError(f"{flag}: {err}") from None
            items.extend(value if isinstance(value, range) else [value])
        setattr(namespace, self.dest, items)


def add_list_argument(parser, flag: str, item: Callable[[str], object], help: str, default=None,
                      metavar: str = "V") -> None:
    """``flag`` as a list (``1,3,5`` or ``1 3 5``) of ``item(piece)`` values; ``default`` is already parsed."""
    parser.add_argument(flag, action=ListAction, item=item, default=default, metavar=metavar, help=help)


class _Value(argparse.Action):
    """One value, ``item(text)``; a ``ValueError`` is reported with the flag."""

    def __init__(self, option_strings, dest, item: Callable[[str], object] = str, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.item = item

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            setattr(namespace, self.dest, self.item(values))
        except ValueError as err:
            raise InvalidArgumentError(f"{option_string}: {err}") from None


def add_value_argument(parser, flag: str, item: Callable[[str], object], help: str, default=None,
                       metavar: str = "V") -> None:
    """``flag`` with one ``item(text)`` value (the item parsers of the lists); ``default`` is already parsed."""
    parser.add_argument(flag, action=_Value, item=item, default=default, metavar=metavar, help=help)


def severity(text: str) -> int:
    """One corruption severity, 1..5."""
    if text not in ("1", "2", "3", "4", "5"):
        raise ValueError(f"unknown severity {text!r}; valid severities: 1, 2, 3, 4, 5")
    return int(text)


def corruption(text: str) -> str:
    """One corruption name or group (``all``, ``benchmark``, ``extra``, ``noise``, ``blur``, ``weather``,
    ``digital``); ``ravit.robustness.resolve_corruptions`` expands the list."""
    from ravit.robustness import resolve_corruptions

    resolve_corruptions([text])  # an unknown name: its error lists the valid names and groups
    return text


def block_indices(text: str) -> int | range:
    """A block index (``4``, ``-1`` for the last) or an inclusive range (``3-11``)."""
    match = re.fullmatch(r"(\d+)-(\d+)", text)
    if match:
        return range(int(match[1]), int(match[2]) + 1)
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"expected block indices or ranges like 3-11, got {text!r}") from None


def budget(text: str):
    """An ATS budget: ``none``/``all``, an int token count or a ratio (``ravit.ats.parse_budget``)."""
    from ravit.ats import parse_budget

    return parse_budget(text)


def noise_std(text: str) -> float:
    """A Gaussian noise std: a finite number >= 0."""
    value = float(text)
    if not 0 <= value < math.inf:
        raise ValueError(f"must be finite and >= 0, got {text!r}")
    return value


# --- counts and the device --------------------------------------------------------------------------------------------
class _AtLeast(argparse.Action):
    """An integer flag that must be at least ``least``."""

    def __init__(self, option_strings, dest, least: int = 1, **kwargs):
        kwargs.setdefault("type", int)
        super().__init__(option_strings, dest, **kwargs)
        self.least = least

    def __call__(self, parser, namespace, values, option_string=None):
        if values < self.least:
            raise InvalidArgumentError(f"{option_string} must be >= {self.least}, got {values}")
        setattr(namespace, self.dest, values)


def add_count_argument(parser, flag: str, default: int | None, help: str, least: int = 1) -> None:
    """An integer ``flag`` >= ``least`` (``--limit``, ``--batch-size``, ``--workers`` ...)."""
    parser.add_argument(flag, action=_AtLeast, least=least, default=default, metavar="N", help=help)


def resolve_device(name: str | None) -> torch.device:
    """``--device``: 'auto'/None (CUDA when available, else CPU), or a torch device string that exists here."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise InvalidArgumentError(
            f"--device {name!r} is not a device; use 'auto', 'cpu', 'cuda' or 'cuda:N'"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidArgumentError(f"--device {name!r}: CUDA is not available on this machine; use 'cpu' or 'auto'")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise InvalidArgumentError(f"--device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type not in ("cpu", "cuda"):
        raise InvalidArgumentError(f"--device {name!r}: ravit runs on 'cpu' or 'cuda'")
    return device


class _Device(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        resolve_device(values)
        setattr(namespace, self.dest, values)


def add_bf16_argument(parser) -> None:
    """``--bf16``: the model under bf16 autocast (the data pipeline stays fp32)."""
    parser.add_argument("--bf16", action="store_true",
                        help="run the model under bf16 autocast: on a CPU with AVX512-BF16 or AMX 1.1-1.2x faster "
                             "for FAN-T/S than fp32 (benchmarks/cpu_bf16.py), top-1 within a few hundredths of fp32")


def add_device_argument(parser, default: str = "auto") -> None:
    """``--device``: 'auto' (CUDA when available), 'cpu', 'cuda' or 'cuda:N'; checked when parsed."""
    parser.add_argument("--device", action=_Device, default=default,
                        help="'auto' (cuda when available), 'cpu', 'cuda' or 'cuda:N'")


# --- the model --------------------------------------------------------------------------------------------------------
def parse_model_kwargs(items: list[str] | None) -> dict:
    """``['img_size=28', 'in_chans=1']`` -> ``{'img_size': 28, 'in_chans': 1}`` (values parsed as YAML scalars)."""
    kwargs = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidArgumentError(f"--model-kwargs expects KEY=VALUE, got {item!r}")
        try:
            kwargs[key] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            problem = getattr(err, "problem", None) or "not a YAML value"
            raise InvalidArgumentError(
                f"--model-kwargs {item!r}: {problem} (values are YAML: 3, 0.5, true, [1, 2])"
            ) from None
    return kwargs


class _ModelKwargs(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, parse_model_kwargs(values))


class _Checkpoint(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        if not Path(values).is_file():
            raise MissingFileError(f"checkpoint not found: {values}")
        setattr(namespace, self.dest, values)


def add_model_arguments(parser, model_help: str | None = None, optional: bool = False) -> None:
    """``MODEL`` (positional; ``optional``: it may be left out), ``--checkpoint``, ``--pretrained``,
    ``--model-kwargs``."""
    parser.add_argument("model", metavar="MODEL", nargs="?" if optional else None,
                        help=model_help or "ravit / timm / zoo model name, e.g. fmnist_fan_p4 or fan_tiny_12_p16_224")
    parser.add_argument("--checkpoint", action=_Checkpoint, metavar="PATH",
                        help="weights to load: .safetensors, .pth / .pth.tar (official FAN keys are mapped) or a ravit "
                             "train checkpoint")
    parser.add_argument("--pretrained", action="store_true", help="load the model's released weights (the zoo ships "
                                                                  "with ravit)")
    parser.add_argument("--model-kwargs", action=_ModelKwargs, nargs="*", default={}, metavar="KEY=VALUE",
                        help="model arguments as YAML values, e.g. img_size=28 in_chans=1 num_classes=10")


def build_model(args, seed: int | None = None) -> torch.nn.Module:
    """``MODEL`` with its ``--model-kwargs``, ``--pretrained`` and ``--checkpoint`` weights, in eval mode. A scoring
    command never uses a re-initialised classifier (``new_head=False``); ``seed`` makes random weights reproducible."""
    import ravit

    if seed is not None:
        torch.manual_seed(seed)
    return ravit.create_model(args.model, pretrained=args.pretrained, checkpoint_path=args.checkpoint,
                              new_head=False, **args.model_kwargs).eval()


# --- the data ---------------------------------------------------------------------------------------------------------
class _Data(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        from ravit.data import check_data

        setattr(namespace, self.dest, check_data(values))


def add_data_arguments(parser, default: str | None = "fashion-mnist", data_help: str | None = None) -> None:
    """``--data NAME_OR_FOLDER`` (``fashion_mnist`` is ``fashion-mnist``), ``--data-dir`` and ``--split``."""
    from ravit.data import data_names

    names = ", ".join(data_names())
    parser.add_argument("--data", action=_Data, default=default, metavar="NAME_OR_FOLDER",
                        help=data_help or f"a dataset name ({names}) or an image folder: <folder>/<class>/<image>, or "
                                          "<folder>/<split>/<class>/<image>")
    parser.add_argument("--data-dir", metavar="DIR",
                        help="folder holding the Fashion-MNIST IDX files (default: $RAVIT_FMNIST_DIR, else the Debian "
                             "package's /usr/share/datasets/fashion-mnist)")
    parser.add_argument("--split", default="test",
                        help="the split: train or test (Fashion-MNIST), or an image folder's <split> subfolder")


def model_input(model: torch.nn.Module, data: str, pretrained: bool, img_size: int | None = None):
    """What ``model`` is fed on ``data`` (``ravit.data.ModelInput``). Weights other than the released ones
    (``pretrained``) on a named dataset were made by ``ravit train`` on it, the only way to train on one, so they see
    that dataset's normalisation; released weights, and any weights on an image folder (the authors' checkpoints on
    ImageNet), their pretrained config's."""
    from ravit.data import ModelInput, data_name, dataset_info

    name = data_name(data)
    trained_on = dataset_info(name) if name is not None and not pretrained else None
    return ModelInput.from_model(model, img_size=img_size, trained_on=trained_on)


# --- the output -------------------------------------------------------------------------------------------------------
def add_output_argument(parser, command: str, name: str = "<MODEL>") -> None:
    """``--output DIR``, by default ``runs/<command>/<name>`` (see ``output_dir``)."""
    parser.add_argument("--output", metavar="DIR", help=f"output folder (default: runs/{command}/{name})")


def output_dir(args, command: str, name: str) -> Path:
    """``--output``, else ``runs/<command>/<name>``, checked (``ravit.outputs.check_output_dir``), not created."""
    from ravit.outputs import check_output_dir

    path = Path(args.output) if args.output else Path("runs") / command / name.replace("/", "_").replace(":", "_")
    return check_output_dir(path, "output folder")


def positive(text: str) -> float:
    """A finite number > 0."""
    value = float(text)
    if not 0 < value < math.inf:
        raise ValueError(f"must be finite and > 0, got {text!r}")
    return value


def non_negative(text: str) -> float:
    """A finite number >= 0."""
    value = float(text)
    if not 0 <= value < math.inf:
        raise ValueError(f"must be finite and >= 0, got {text!r}")
    return value
