"""params.yaml validation: typos and wrong types fail naming the file, the key path and the reason."""

from pathlib import Path

import pytest
import yaml

from fxassets.core.config import ConfigError, Params, fingerprint, load_params

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, data) -> Path:
    p = tmp_path / "params.yaml"
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return p


def base() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def test_shipped_params_validate():
    p = load_params(REPO / "params.yaml")
    assert set(p.effects) == {"cartoon", "sketch"}
    assert p.effects["sketch"].teacher.style == "sketch"


def test_unknown_key_names_file_and_path(tmp_path):
    d = base()
    d["train"]["stpes"] = 10
    with pytest.raises(ConfigError) as e:
        load_params(write(tmp_path, d))
    msg = str(e.value)
    assert str(tmp_path / "params.yaml") in msg and "train.stpes" in msg and "unknown key" in msg


def test_wrong_type_names_path_and_reason(tmp_path):
    d = base()
    d["effects"]["cartoon"]["samples"] = "many"
    with pytest.raises(ConfigError, match=r"effects\.cartoon\.samples: .*integer"):
        load_params(write(tmp_path, d))


def test_typo_inside_teacher_section(tmp_path):
    d = base()
    d["teacher"]["sigma"] = 3
    with pytest.raises(ConfigError, match=r"teacher\.sigma: unknown key"):
        load_params(write(tmp_path, d))


def test_unknown_teacher_kind_and_style(tmp_path):
    d = base()
    d["teacher"]["kind"] = "stable-diffusion-99"
    with pytest.raises(ConfigError, match="teacher"):
        load_params(write(tmp_path, d))
    d = base()
    d["effects"]["sketch"]["teacher"]["style"] = "cubism"
    with pytest.raises(ConfigError, match=r"effects\.sketch\.teacher\.style"):
        load_params(write(tmp_path, d))


def test_bad_yaml_missing_file_and_bad_effect_name(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(write(tmp_path, "faces: [unclosed"))
    with pytest.raises(ConfigError, match="no such params file"):
        load_params(tmp_path / "nope.yaml")
    d = base()
    d["effects"]["Bad Name"] = d["effects"]["cartoon"]
    with pytest.raises(ConfigError, match="effect name"):
        load_params(write(tmp_path, d))


def test_unknown_effect_lists_known():
    p = load_params(REPO / "params.yaml")
    with pytest.raises(ConfigError, match="cartoon, sketch"):
        p.effect("nope")


def test_fingerprint_changes_with_settings():
    p = Params.model_validate(base())
    d = base()
    d["teacher"]["sigma_s"] = 40
    q = Params.model_validate(d)
    assert fingerprint(p.teacher) != fingerprint(q.teacher)
    assert fingerprint(p.teacher) == fingerprint(Params.model_validate(base()).teacher)


def test_per_effect_train_overrides_merge_nested_sections(tmp_path):
    d = base()
    d["effects"]["sketch"]["train"] = {"colour_transform": True, "augment": {"flip": False}}
    p = load_params(write(tmp_path, d))
    sketch, cartoon = p.train_for("sketch"), p.train_for("cartoon")
    assert sketch.colour_transform and not sketch.augment.flip
    assert sketch.augment.rotate_deg == p.train.augment.rotate_deg  # the rest of train.augment kept
    assert cartoon == p.train
    d["effects"]["sketch"]["train"] = {"stpes": 10}
    with pytest.raises(ConfigError, match=r"effects\.sketch\.train: .*unknown train setting\(s\) \['stpes'\]"):
        load_params(write(tmp_path, d))
    d["effects"]["sketch"]["train"] = {"augment": {"flop": True}}
    with pytest.raises(ConfigError, match="flop"):
        load_params(write(tmp_path, d)).train_for("sketch")


def test_a_key_given_twice_is_refused_naming_the_key_and_both_lines(tmp_path):
    text = (REPO / "params.yaml").read_text()
    first = next(i for i, line in enumerate(text.splitlines(), 1) if line.startswith("train:"))
    n = len(text.splitlines())
    path = tmp_path / "params.yaml"
    path.write_text(text + "train:\n  steps: 10\n")  # a second train: block, which would reset the first one's settings
    with pytest.raises(ConfigError, match=rf"params.yaml: not valid YAML: key 'train' is given twice, on lines {first} and {n + 1}"):
        load_params(path)
    path.write_text("effects:\n  fx: {prompt: a, seed: 1, seed: 2}\n")  # twice on one line, in a nested mapping
    with pytest.raises(ConfigError, match="key 'seed' is given twice, on lines 2 and 2"):
        load_params(path)
    path.write_text("base: &b {prompt: a, seed: 1}\neffects:\n  fx: {<<: *b, seed: 2}\n")  # a merge key overrides: fine
    with pytest.raises(ConfigError, match=r"base: unknown key"):
        load_params(path)
