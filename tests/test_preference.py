"""Blend rule (paper sections 2.4-2.7): coefficients, validation, algebra."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffusion_blend.preference import (
    BASE,
    Preference,
    PreferenceError,
    blend_predictions,
)

finite = st.floats(min_value=-5, max_value=5, allow_nan=False)
scales = st.floats(min_value=0, max_value=5, allow_nan=False)


@given(w1=finite, w2=finite, kl_scale=scales)
def test_coefficients_sum_to_one_and_follow_the_rule(w1, w2, kl_scale):
    coefs = Preference({"a": w1, "b": w2}, kl_scale).coefficients(["a", "b"])
    assert math.isclose(sum(c for _, c in coefs.items()), 1.0, abs_tol=1e-9)
    assert coefs.experts == {"a": kl_scale * w1, "b": kl_scale * w2}
    assert coefs.base == pytest.approx(1 - kl_scale * (w1 + w2))


def test_special_cases():
    mpa = Preference({"a": 0.3, "b": 0.7}).coefficients()
    assert mpa.base == pytest.approx(0.0, abs=1e-12)
    assert [m for m, _ in mpa.active()] == ["a", "b"]  # DB-MPA: the base is not evaluated
    kla = Preference.kl_only("a", 2.0).coefficients()
    assert kla.base == -1.0 and kla.experts == {"a": 2.0}  # DB-KLA extrapolation: 2 eps_ft - eps_pre
    assert Preference.kl_only("a", 0.0).coefficients().active() == [(BASE, 1.0)]  # lambda = 0: base only
    assert not kla.is_convex and mpa.is_convex


def test_unweighted_experts_get_zero_and_are_skipped():
    coefs = Preference({"a": 1.0}).coefficients(["a", "b", "c"])
    assert coefs.experts == {"a": 1.0, "b": 0.0, "c": 0.0}
    assert coefs.active() == [("a", 1.0)]


@given(ws=st.lists(finite, min_size=2, max_size=2), vs=st.lists(finite, min_size=2, max_size=2), t=st.floats(0, 1))
@settings(max_examples=50)
def test_blend_is_affine_in_the_weights(ws, vs, t):
    """eps(t w + (1-t) v) = t eps(w) + (1-t) eps(v) for any predictions (paper section 8, fact 4)."""
    gen = torch.Generator().manual_seed(0)
    preds = [torch.randn(3, 2, generator=gen, dtype=torch.float64) for _ in range(3)]

    def eps(weights):
        coefs = Preference(dict(zip("ab", weights))).coefficients()
        return blend_predictions([c for _, c in coefs.items()], preds)

    mixed = [t * w + (1 - t) * v for w, v in zip(ws, vs)]
    torch.testing.assert_close(eps(mixed), t * eps(ws) + (1 - t) * eps(vs))


@given(kl_scale=scales)
def test_blend_equals_base_plus_scaled_differences(kl_scale):
    """eps = eps_pre + lambda sum_i w_i (eps_i - eps_pre) (DESIGN.md)."""
    gen = torch.Generator().manual_seed(1)
    pre, e1, e2 = (torch.randn(4, generator=gen, dtype=torch.float64) for _ in range(3))
    coefs = Preference({"a": 0.25, "b": 0.6}, kl_scale).coefficients()
    blended = blend_predictions([c for _, c in coefs.items()], [pre, e1, e2])
    torch.testing.assert_close(blended, pre + kl_scale * (0.25 * (e1 - pre) + 0.6 * (e2 - pre)))


@pytest.mark.parametrize(
    "weights, kl_scale, message",
    [
        ({"a": 1.0}, -0.5, "must be >= 0"),
        ({"a": float("nan")}, 1.0, "must be finite"),
        ({"a": float("inf")}, 1.0, "must be finite"),
        ({"a": 1.0}, float("nan"), "must be finite"),
        ({}, 1.0, "at least one reward weight"),
        ({"a": "heavy"}, 1.0, "must be a number"),
    ],
)
def test_invalid_preferences_are_rejected(weights, kl_scale, message):
    with pytest.raises(PreferenceError, match=message):
        Preference(weights, kl_scale)


def test_unknown_expert_names_are_rejected_with_the_available_ones():
    with pytest.raises(PreferenceError, match=r"no expert named 'aesthtic'; available: aesthetic, align"):
        Preference({"aesthtic": 1.0}).coefficients(["aesthetic", "align"])


def test_parse():
    pref = Preference.parse("aesthetic=0.3, align=0.7", kl_scale=1.2)
    assert pref.weights == {"aesthetic": 0.3, "align": 0.7} and pref.kl_scale == 1.2
    for bad in ["aesthetic", "=0.3", "a=1,a=2", "a=x"]:
        with pytest.raises(PreferenceError):
            Preference.parse(bad)


def test_ls_probabilities_refuse_negative_coefficients_and_name_mpa():
    members, probs = Preference({"a": 0.2, "b": 0.3}, 1.0).coefficients().probabilities()
    assert members == [BASE, "a", "b"]
    torch.testing.assert_close(probs, torch.tensor([0.5, 0.2, 0.3], dtype=torch.float64))
    with pytest.raises(PreferenceError, match="DB-MPA"):
        Preference.kl_only("a", 1.5).coefficients().probabilities()
    with pytest.raises(PreferenceError, match="negative weight"):
        Preference({"a": -0.2, "b": 1.2}).coefficients().probabilities()
