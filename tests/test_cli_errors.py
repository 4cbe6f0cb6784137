"""The CLI's error contract (a user's mistake is one line and exit code 2; a bug keeps its traceback) and the vocabulary
every subcommand shares (MODEL, --data, --output, lists, help)."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

import ravit.cli
from ravit.errors import DataError, InvalidArgumentError, MissingFileError
from ravit.study import DEFAULT_FAN, DEFAULT_VIT


def _parser_raising(exc: BaseException) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ravit")
    sub = parser.add_subparsers(dest="command")
    cmd = sub.add_parser("boom")

    def func(args):
        raise exc

    cmd.set_defaults(func=func)
    return parser


@pytest.mark.parametrize("exc", [InvalidArgumentError("bad --x"), MissingFileError("no such file: f"),
                                 DataError("f is truncated"), NotADirectoryError(20, "Not a directory", "out/x")])
def test_user_errors_are_one_line_exit_2(monkeypatch, capsys, exc):
    monkeypatch.setattr(ravit.cli, "build_parser", lambda: _parser_raising(exc))
    assert ravit.cli.main(["boom"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ravit boom: error: ") and err.count("\n") == 1
    assert "Traceback" not in err


@pytest.mark.parametrize("exc", [ValueError("a bug"), RuntimeError("a bug"), KeyError("k"), OSError(5, "I/O error")])
def test_bugs_keep_their_traceback(monkeypatch, exc):
    monkeypatch.setattr(ravit.cli, "build_parser", lambda: _parser_raising(exc))
    with pytest.raises(type(exc)):
        ravit.cli.main(["boom"])


class _Damaged(Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int):
        raise DataError(f"image {index}.png is damaged")


def test_error_from_a_dataloader_worker_is_still_one_line(monkeypatch, capsys):
    def load(args):
        return list(DataLoader(_Damaged(), num_workers=1))

    parser = _parser_raising(RuntimeError())
    parser._subparsers._group_actions[0].choices["boom"].set_defaults(func=load)
    monkeypatch.setattr(ravit.cli, "build_parser", lambda: parser)
    assert ravit.cli.main(["boom"]) == 2
    assert capsys.readouterr().err == "ravit boom: error: image 0.png is damaged\n"


def test_device_names_are_checked():
    from ravit.cli._args import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    for name in ("banana", "meta", "cuda:99" if torch.cuda.is_available() else "cuda"):
        with pytest.raises(InvalidArgumentError, match="--device"):
            resolve_device(name)


@pytest.mark.parametrize("item", ["a=[1", "img_size", "=3", "a={b"])
def test_model_kwargs_mistakes_are_user_errors(item):
    from ravit.cli._args import parse_model_kwargs

    with pytest.raises(InvalidArgumentError, match="--model-kwargs"):
        parse_model_kwargs([item])


def test_model_kwargs_values_are_yaml():
    from ravit.cli._args import parse_model_kwargs

    assert parse_model_kwargs(["img_size=28", "ratio=0.5", "dims=[1, 2]", "flag=true", "name=x"]) == dict(
        img_size=28, ratio=0.5, dims=[1, 2], flag=True, name="x")


def test_robustness_never_scores_a_random_head(tmp_path, capsys):
    """A checkpoint scored with another class count would get a re-initialised classifier: an error, not a number."""
    import timm

    import ravit

    model = timm.create_model("deit_tiny_patch16_224", img_size=16, in_chans=1, num_classes=10)
    path = ravit.save_checkpoint(model, tmp_path / "ten.safetensors")
    argv = ["robustness", "deit_tiny_patch16_224", "--checkpoint", str(path), "--data", str(tmp_path), "--output",
            str(tmp_path / "out"), "--model-kwargs", "in_chans=1", "img_size=16"]
    assert ravit.cli.main(argv + ["num_classes=5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ravit robustness: error: ") and "Traceback" not in err
    assert "head.weight: checkpoint (10, 192) vs model (5, 192)" in err


def test_pretrained_without_released_weights_is_a_user_error():
    import ravit

    with pytest.raises(InvalidArgumentError, match="has no pretrained weights"):
        ravit.create_model("fan_swin_tiny_patch4_window7_224", pretrained=True)  # never released


# --- the vocabulary every subcommand shares ---------------------------------------------------------------------------
ANALYSES = ["spectra", "perturbation", "clusters", "attention", "ats"]
MODEL_COMMANDS = [["eval"], ["ats"], ["robustness"], *(["analyze", name] for name in ANALYSES)]
DATA_COMMANDS = [[*words, "fmnist_fan_p4"] for words in MODEL_COMMANDS] + [["corrupt"]]


def _parse(argv: list[str]) -> argparse.Namespace:
    return ravit.cli.build_parser().parse_args(argv)


def _parsers(parser: argparse.ArgumentParser, words: tuple[str, ...] = ()):
    """(command words, parser) for ``ravit`` and each of its (nested) subcommands."""
    yield words, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, (*words, name))


def _shows_default(action: argparse.Action) -> bool:
    default = action.default
    empty = isinstance(default, (list, tuple, dict)) and not default
    return not (empty or default is None or default is False or default == argparse.SUPPRESS)


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        ravit.cli.main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"ravit {ravit.__version__}"


def test_every_help_shows_each_default_once():
    from ravit.cli._args import HelpFormatter

    parsers = list(_parsers(ravit.cli.build_parser()))
    assert {words[0] for words, _ in parsers if words} >= {"eval", "ats", "robustness", "corrupt", "analyze", "study",
                                                           "train"}
    for words, parser in parsers:
        assert parser.formatter_class is HelpFormatter, words
        formatter = parser._get_formatter()
        for action in parser._actions:
            text = formatter._expand_help(action) if action.help else ""
            assert text.count("(default") == 1 if _shows_default(action) else text.count("(default") <= 1, (
                words, action.dest, text)
        assert "(default: (default" not in parser.format_help()


@pytest.mark.parametrize("words", MODEL_COMMANDS, ids=" ".join)
def test_model_is_the_positional_argument(words):
    args = _parse([*words, "fmnist_fan_p4", "--pretrained", "--model-kwargs", "num_classes=10"])
    assert args.model == "fmnist_fan_p4" and args.pretrained and args.model_kwargs == {"num_classes": 10}


def test_study_compares_two_positional_models():
    assert (_parse(["study"]).vit, _parse(["study"]).fan) == (DEFAULT_VIT, DEFAULT_FAN)
    args = _parse(["study", "vit_a", "fan_b"])
    assert (args.vit, args.fan) == ("vit_a", "fan_b")


@pytest.mark.parametrize("argv", DATA_COMMANDS, ids=" ".join)
def test_fashion_mnist_has_two_spellings(argv):
    assert _parse([*argv, "--data", "fashion_mnist"]).data == _parse([*argv, "--data", "fashion-mnist"]).data


@pytest.mark.parametrize("argv", DATA_COMMANDS, ids=" ".join)
def test_unknown_data_lists_the_known_names(argv, capsys):
    assert ravit.cli.main([*argv, "--data", "cifar10"]) == 2
    err = capsys.readouterr().err
    known = "neither a dataset name (fashion-mnist) nor a folder"
    assert err == f"ravit {argv[0]}: error: unknown data 'cifar10': {known}\n"


LISTS = [
    (["robustness", "m"], "--severities", "1,3,5", [1, 3, 5]),
    (["corrupt"], "--severities", "2,4", [2, 4]),
    (["study"], "--severities", "1,2", [1, 2]),
    (["robustness", "m"], "--corruptions", "fog,noise,contrast", ["fog", "noise", "contrast"]),
    (["corrupt"], "--corruptions", "benchmark,spatter", ["benchmark", "spatter"]),
    (["ats", "m"], "--blocks", "3-5,8", [3, 4, 5, 8]),
    (["analyze", "spectra", "m"], "--blocks", "0,2", [0, 2]),
    (["analyze", "clusters", "m"], "--blocks", "1,3", [1, 3]),
    (["analyze", "ats", "m"], "--blocks", "1-2,3", [1, 2, 3]),
    (["study"], "--budgets", "all,0.5,7", [None, 0.5, 7]),
    (["ats", "m"], "--budget", "none,5,0.5", [None, 5, 0.5]),
    (["analyze", "ats", "m"], "--budget", "4,0.25", [4, 0.25]),
    (["analyze", "perturbation", "m"], "--noise-std", "0.1,0.5,1", [0.1, 0.5, 1.0]),
    (["analyze", "attention", "m"], "--indices", "1,4,9", [1, 4, 9]),
]


@pytest.mark.parametrize("words,flag,text,expected", LISTS, ids=lambda v: v if isinstance(v, str) else None)
def test_lists_take_commas_or_spaces(words, flag, text, expected):
    first, *rest = text.split(",")
    dest = flag[2:].replace("-", "_")
    for argv in ([flag, text], [flag, *text.split(",")], [flag, first, ",".join(rest)]):
        assert getattr(_parse([*words, *argv]), dest) == expected, argv


DEFAULT_OUTPUTS = [
    (["eval", "fmnist_fan_p4", "--pretrained"], "runs/eval/fmnist_fan_p4"),
    (["ats", "test_vit"], "runs/ats/test_vit"),
    (["robustness", "test_vit"], "runs/robustness/test_vit"),
    (["analyze", "spectra", "test_vit"], "runs/analyze/test_vit"),
    (["corrupt"], "runs/corrupt/fashion-mnist"),
    (["study"], f"runs/study/{DEFAULT_VIT}_vs_{DEFAULT_FAN}"),
]


@pytest.mark.parametrize("argv,expected", DEFAULT_OUTPUTS, ids=lambda v: v[0] if isinstance(v, list) else None)
def test_default_output_folder_is_runs_command_model(argv, expected, monkeypatch, tmp_path, capsys):
    """Each command asks the shared output_dir where to write, before any work: stop it there and look."""
    from ravit.cli import _args

    monkeypatch.chdir(tmp_path)
    asked = []

    def stop_after_resolving(args, command, name):
        asked.append(_args.output_dir(args, command, name))
        raise InvalidArgumentError("stopped after the output folder")

    monkeypatch.setattr(importlib.import_module(f"ravit.cli.{argv[0]}"), "output_dir", stop_after_resolving)
    assert ravit.cli.main(argv) == 2
    assert "stopped after the output folder" in capsys.readouterr().err
    assert asked == [Path(expected)] and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv", [
    ["study", "--out", "x"], ["study", "--vit", "a"], ["robustness", "m", "--out", "x"],
    ["robustness", "m", "--num-classes", "10"], ["eval", "m", "--dataset", "fashion_mnist"],
    ["analyze", "spectra", "m", "--dataset", "fashion_mnist"], ["analyze", "spectra", "m", "--num-images", "3"],
    ["analyze", "ats", "m", "--ats-blocks", "1"], ["ats", "m", "fashion-mnist"], ["ats", "m", "--num-images", "2"],
    ["corrupt", "fashion-mnist", "out"], ["ats", "m", "--outp", "x"],
], ids=" ".join)
def test_old_spellings_and_abbreviations_are_refused(argv, capsys):
    assert ravit.cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"ravit {argv[0]}: error: unrecognized arguments") and err.count("\n") == 1


def test_parse_errors_are_one_line(capsys):
    for argv, message in ((["ats"], "required: MODEL"), (["eval", "--limit", "x"], "invalid int value: 'x'"),
                          (["robustness", "m", "--severities", "6"], "--severities: unknown severity '6'"),
                          ([], "required: COMMAND")):
        assert ravit.cli.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("ravit") and message in err and err.count("\n") == 1, err
