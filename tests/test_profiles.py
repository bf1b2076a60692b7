"""Profiles and their command-line overrides (fast)."""

import pytest

from pneumoray.profiles import ProfileError, load_profile


def test_overrides_are_yaml_values_and_exponents_are_numbers():
    p = load_profile("tiny", ["train.lr=1e-4", "train.epochs=3", "diffusion.lr=2E-3", "train.seed=-1",
                              "tune.space.lr={loguniform: [1e-5, 1e-3]}", "train.class_words={}", "train.templates=[a]"])
    assert p["train"]["lr"] == 1e-4 and isinstance(p["train"]["lr"], float)  # PyYAML alone reads "1e-4"
    assert p["diffusion"]["lr"] == 2e-3 and p["train"]["epochs"] == 3 and p["train"]["seed"] == -1
    assert p["tune"]["space"]["lr"] == {"loguniform": [1e-5, 1e-3]}
    assert p["train"]["class_words"] == {} and p["train"]["templates"] == ["a"]
    assert load_profile("tiny", ["train.synthetic=1e4x"])["train"]["synthetic"] == "1e4x"  # not a number: a string


def test_an_unknown_key_or_profile_is_an_error_that_names_what_exists():
    with pytest.raises(ProfileError, match="no key 'lrr' in train; known keys: .*lr"):
        load_profile("tiny", ["train.lrr=1e-4"])
    with pytest.raises(ProfileError, match="write it as section.key=value"):
        load_profile("tiny", ["train.lr"])
    with pytest.raises(ProfileError, match="unknown profile 'tinyy': give one of rtx3090, tiny"):
        load_profile("tinyy")
