"""The CLI's error contract: a user's mistake is one line and exit code 2; a bug keeps its traceback."""

from __future__ import annotations

import argparse

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

import ravit.cli
from ravit.errors import DataError, InvalidArgumentError, MissingFileError


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
    argv = ["robustness", "deit_tiny_patch16_224", "--checkpoint", str(path), "--in-chans", "1", "--img-size", "16",
            "--data", str(tmp_path), "--out", str(tmp_path / "out")]
    assert ravit.cli.main(argv + ["--num-classes", "5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ravit robustness: error: ") and "Traceback" not in err
    assert "head.weight: checkpoint (10, 192) vs model (5, 192)" in err


def test_pretrained_without_released_weights_is_a_user_error():
    import ravit

    with pytest.raises(InvalidArgumentError, match="has no pretrained weights"):
        ravit.create_model("fan_tiny_12_p16_224", pretrained=True)
