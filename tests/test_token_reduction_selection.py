"""How ``benchmarks/token_reduction.py`` picks the best ATS setting per GMACs level: on the test images themselves
(the envelope), on a validation split, or on one half of the test images reported on the other (cross-fitting)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import timm
import torch

from ravit.errors import InvalidArgumentError

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "token_reduction.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("token_reduction_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _row(method, ratio, top1, halves, val=None):
    row = dict(method=method, setting=f"{method}@{ratio}", gmacs=ratio, dense_gmacs=1.0, top1=top1,
               top1_halves=halves)
    if val is not None:
        row["val_top1"] = val
    return row


def _rows(with_val=True):
    # ToMe: 82.5 at 0.5 on every split. ATS "x" wins on the test images and on the even half but loses on the
    # validation split and the odd half; "y" the reverse.
    return [
        _row("tome", 0.4, 80.0, [80.0, 80.0], 80.0 if with_val else None),
        _row("tome", 0.6, 85.0, [85.0, 85.0], 85.0 if with_val else None),
        _row("ats-x", 0.5, 86.0, [90.0, 82.0], 80.0 if with_val else None),
        _row("ats-y", 0.5, 84.0, [83.0, 85.0], 85.0 if with_val else None),
    ]


def test_the_envelope_picks_on_the_test_images_by_default(bench):
    ats, label = bench.envelope(_rows(), 0.5)
    assert ats == pytest.approx(86.0) and label == "ats-x ats-x@0.5"
    assert bench.interpolate(_rows(), "tome", 0.5) == pytest.approx(82.5)


def test_held_out_selection_reports_the_setting_picked_elsewhere(bench):
    margins = bench.held_out_margins(_rows(), 0.5)
    # validation picks y (85 > 80), whose test top-1 is 84: 1.5 above ToMe, not the test-picked 3.5
    assert margins["val"] == pytest.approx(84.0 - 82.5)
    # the even half picks x, which scores 82 on the odd half (-0.5); the odd half picks y, 83 on the even (+0.5)
    assert margins["halves"] == pytest.approx(0.0)


def test_held_out_margins_need_the_accuracies_and_the_range(bench):
    assert bench.held_out_margins(_rows(with_val=False), 0.5)["val"] is None
    assert bench.held_out_margins(_rows(), 0.7) == {"val": None, "halves": None}  # past ToMe's last point


def test_a_mix_of_two_settings_is_selected_and_reported_at_the_same_weights(bench):
    rows = [_row("tome", 0.4, 80.0, [80.0, 80.0], 80.0), _row("tome", 0.8, 88.0, [88.0, 88.0], 88.0),
            _row("ats-a", 0.4, 82.0, [82.0, 82.0], 90.0), _row("ats-b", 0.8, 90.0, [90.0, 90.0], 70.0),
            _row("ats-c", 0.6, 87.0, [87.0, 87.0], 75.0)]
    # at 0.6 the test images prefer c (87 against the a/b mix's 86), the validation split the mix (80 > 75),
    # which is reported at the same weights on the test images: 86
    assert bench.envelope(rows, 0.6) == (pytest.approx(87.0), "ats-c ats-c@0.6")
    assert bench.held_out_margins(rows, 0.6)["val"] == pytest.approx(86.0 - 84.0)


def test_a_validation_split_the_model_trained_on_is_refused(bench):
    with pytest.raises(InvalidArgumentError, match="trained on 'train'"):
        bench._val_split("fmnist_deit_p4", "holdout")
    with pytest.raises(InvalidArgumentError, match="test"):
        bench._val_split("fmnist_deit12_p4", "test")
    assert bench._val_split("fmnist_deit12_p4", "holdout") == "holdout"
    assert bench._val_split("fmnist_deit12_p4", None) is None


def test_summary_reprints_the_table_and_refuses_other_json(bench, tmp_path, capsys):
    good, bad = tmp_path / "rows.json", tmp_path / "bad.json"
    good.write_text(json.dumps(_rows()))
    bench.main(["summary", str(good)])
    line = next(row for row in capsys.readouterr().out.splitlines() if row.strip().startswith("0.50"))
    assert line.split()[1:5] == ["82.50", "86.00", "+1.50", "+0.00"]  # ToMe, best ATS, val-picked, half-picked
    bad.write_text(json.dumps([{"method": "tome"}]))
    with pytest.raises(SystemExit, match="not an accuracy JSON"):
        bench.main(["summary", str(bad)])
    with pytest.raises(SystemExit, match="not a readable accuracy JSON"):
        bench.main(["summary", str(tmp_path / "missing.json")])


def test_the_few_block_families_place_ats_where_their_settings_say(bench):
    """Every other block (from 0 or 1) and the pair placement (block 1, then every other block from 2) apply ATS to
    exactly the blocks their setting names, with K patch tokens (and the class token) left after the last one."""
    model = timm.create_model("vit_tiny_patch16_224", depth=12, img_size=32, patch_size=4, num_classes=3).eval()
    expected = {"0-10/2": (0, 2, 4, 6, 8, 10), "1-11/2": (1, 3, 5, 7, 9, 11), "1-2,4-10/2": (1, 2, 4, 6, 8, 10)}
    seen = set()
    for m in bench.methods(model):
        if not m.method.endswith(("-alt", "-pair")):
            continue
        placement, k = str(m.setting).split(":")
        reduced = m.apply(bench.copy.deepcopy(model))
        assert tuple(reduced.ats_config.blocks) == expected[placement], m
        counts = bench.trace(reduced, torch.randn(2, 3, 32, 32), count_gmacs=False).kept_tokens
        assert counts[:, -1].eq(int(k) + model.num_prefix_tokens).all(), (m, counts)
        seen.add(placement)
    assert seen == set(expected)
