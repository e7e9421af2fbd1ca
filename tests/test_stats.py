"""Tests of vgcore.stats: closed forms, an independent fit, invariances, edge cases, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from vgcore import stats
from vgcore._profile import Profile

# every warning (overflow in exp, invalid value in a subtraction of infinities, ...) is a failure
pytestmark = pytest.mark.filterwarnings("error")

# deterministic and database-free, set per test so no other module's Hypothesis settings change
deterministic = settings(derandomize=True, deadline=None, database=None, max_examples=60)

STATISTICS = [stats.chi, stats.depth_scale, stats.vanishing_depth, stats.imbalance, stats.summary]
SUMMARY_KEYS = {"chi", "depth_scale", "vanishing_depth", "imbalance", "r2", "chi_theory"}


def make_profile(log_grad_norm, *, saturation=None, dead=None, chi_theory=0.5) -> Profile:
    """A Profile around ``log_grad_norm`` (B, L + 1) with plausible other fields."""
    log_grad_norm = np.asarray(log_grad_norm, dtype=np.float64)
    depth = log_grad_norm.shape[-1] - 1
    return Profile(
        log_grad_norm,
        np.zeros(depth),
        np.full(depth, 0.25) if saturation is None else saturation,
        np.full(depth, 0.125) if dead is None else dead,
        chi_theory,
        {"activation": "tanh"},
    )


def line_profile(intercept: float, slope: float, depth: int, batch: int = 1, spread: float = 0.0) -> Profile:
    """Samples whose mean log norm is ``intercept + slope * l`` (up to rounding).

    Sample b is shifted by ``spread * (b - (batch - 1) / 2)``, shifts that sum to zero.
    """
    layers = np.arange(depth + 1, dtype=np.float64)
    shifts = spread * (np.arange(batch) - (batch - 1) / 2)
    return make_profile(intercept + slope * layers[None, :] + shifts[:, None])


def brute_force_vanishing_depth(mean_log_norm: np.ndarray, threshold: float) -> int | None:
    """The definition read literally: walk back from the output, comparing plain norm ratios."""
    depth = len(mean_log_norm) - 1
    for d in range(depth + 1):
        if math.exp(mean_log_norm[depth - d] - mean_log_norm[depth]) < threshold:
            return d
    return None


def far_from_threshold(mean_log_norm: np.ndarray, threshold: float, margin: float = 1e-6) -> bool:
    """True when no layer's log ratio to the output is within ``margin`` of ``ln threshold``.

    Near that boundary, rounding alone may move vanishing_depth by one layer.
    """
    relative = np.asarray(mean_log_norm) - mean_log_norm[-1]
    return bool(np.all(np.abs(relative - math.log(threshold)) > margin))


@st.composite
def noisy_profiles(draw, max_depth: int = 25, max_batch: int = 4) -> Profile:
    """A trend ``slope * l`` plus bounded noise, per sample."""
    depth = draw(st.integers(1, max_depth))
    batch = draw(st.integers(1, max_batch))
    slope = draw(st.floats(-2.0, 2.0))
    noise = draw(
        hnp.arrays(
            np.float64,
            (batch, depth + 1),
            elements=st.floats(-20.0, 20.0, allow_subnormal=False),
        )
    )
    return make_profile(noise + slope * np.arange(depth + 1))


slopes = st.one_of(st.floats(1e-3, 3.0), st.floats(-3.0, -1e-3))
thresholds = st.floats(1e-8, 0.999)


# --------------------------------------------------------------------------
# Closed forms


@deterministic
@given(
    intercept=st.floats(-1e3, 1e3),
    slope=slopes,
    depth=st.integers(1, 40),
    batch=st.integers(1, 5),
    spread=st.floats(0.0, 5.0),
)
def test_line_chi_depth_scale_r2(intercept, slope, depth, batch, spread):
    """m_l = a + s l: one step towards the input scales the norm by e^-s, the squared norm by e^-2s."""
    profile = line_profile(intercept, slope, depth, batch, spread)
    assert stats.chi(profile) == pytest.approx(math.exp(-2 * slope), rel=1e-9)
    assert stats.depth_scale(profile) == pytest.approx(1 / (2 * abs(slope)), rel=1e-9)
    assert stats.summary(profile)["r2"] == pytest.approx(1.0, abs=1e-9)
    assert stats.summary(profile)["slope"] == pytest.approx(slope, rel=1e-9)


@deterministic
@given(intercept=st.floats(-1e3, 1e3), slope=slopes, depth=st.integers(1, 40), data=st.data())
def test_line_imbalance(intercept, slope, depth, data):
    """Imbalance of m_l = a + s l over the L + 1 points l = 0 .. L.

    The last k points are l = L + 1 - k .. L, of mean index ((L + 1 - k) + L) / 2 = L - (k - 1) / 2;
    the first k are l = 0 .. k - 1, of mean index (k - 1) / 2.  The log of the ratio of geometric
    means is s times the difference of mean indices, s (L - (k - 1)), so imbalance = exp(s (L + 1 - k)).
    """
    k = data.draw(st.integers(1, depth + 1), label="k")
    profile = line_profile(intercept, slope, depth)
    expected = math.exp(slope * (depth + 1 - k))
    assert stats.imbalance(profile, k) == pytest.approx(expected, rel=1e-9)
    # default k = max(1, L // 4)
    default_k = max(1, depth // 4)
    assert stats.imbalance(profile) == pytest.approx(math.exp(slope * (depth + 1 - default_k)), rel=1e-9)


@deterministic
@given(intercept=st.floats(-1e3, 1e3), slope=slopes, depth=st.integers(1, 60), threshold=thresholds)
def test_line_vanishing_depth(intercept, slope, depth, threshold):
    """m_l = a + s l: layer L - d has norm ratio e^(-s d) to the output; the answer is the smallest d
    in 0 .. L with -s d < ln threshold, i.e. floor(-ln threshold / s) + 1 when s > 0, else None."""
    profile = line_profile(intercept, slope, depth)
    mean_log_norm = profile.mean_log_grad_norm
    assume(far_from_threshold(mean_log_norm, threshold))
    if slope > 0:
        closed_form = math.floor(-math.log(threshold) / slope) + 1
        closed_form = closed_form if closed_form <= depth else None
    else:
        closed_form = None
    assert brute_force_vanishing_depth(mean_log_norm, threshold) == closed_form
    assert stats.vanishing_depth(profile, threshold) == closed_form


def test_seeds_example_linear_decay_by_0_7_per_layer():
    """20 layers each scaling the gradient by 0.7 leave 0.7^20 = 7.98e-4 of it at the input."""
    depth = 20
    norm_ratio = 0.7 ** (depth - np.arange(depth + 1))  # norm at layer l over the output's
    profile = make_profile(np.log(norm_ratio)[None, :])
    assert stats.vanishing_depth(profile, threshold=1e-3) == 20
    assert stats.vanishing_depth(profile, threshold=1.2e-3) == 19
    assert stats.vanishing_depth(profile, threshold=7e-4) is None
    assert stats.chi(profile) == pytest.approx(0.49, rel=1e-12)
    assert stats.depth_scale(profile) == pytest.approx(1 / abs(math.log(0.49)), rel=1e-12)
    assert stats.imbalance(profile, 1) == pytest.approx(0.7**-20, rel=1e-12)
    summary = stats.summary(profile)
    assert summary["vanishing_depth"] == 20
    assert summary["log_grad_norm_ratio"] == pytest.approx(-20 * math.log(0.7), rel=1e-12)


# --------------------------------------------------------------------------
# Noisy profiles against independent computations and invariances


@deterministic
@given(profile=noisy_profiles())
def test_fit_matches_numpy_polyfit(profile):
    layers = np.arange(profile.depth + 1)
    mean_log_norm = profile.log_grad_norm.mean(axis=0)
    fitted_slope, fitted_intercept = np.polyfit(layers, mean_log_norm, 1)
    summary = stats.summary(profile)
    assert summary["slope"] == pytest.approx(fitted_slope, abs=1e-9)
    assert stats.chi(profile) == pytest.approx(math.exp(-2 * fitted_slope), rel=1e-8)
    residuals = mean_log_norm - (fitted_intercept + fitted_slope * layers)
    total = np.sum((mean_log_norm - mean_log_norm.mean()) ** 2)
    if total > 1e-6:
        assert summary["r2"] == pytest.approx(1 - np.sum(residuals**2) / total, abs=1e-8)
        if profile.depth >= 2:
            assert summary["r2"] == pytest.approx(np.corrcoef(layers, mean_log_norm)[0, 1] ** 2, abs=1e-8)
    assert 0.0 <= summary["r2"] <= 1.0
    assert 1 / stats.depth_scale(profile) == pytest.approx(2 * abs(fitted_slope), abs=1e-9)


@deterministic
@given(profiles=st.lists(noisy_profiles(), min_size=1, max_size=4), threshold=thresholds)
def test_batch_equals_one_by_one(profiles, threshold):
    for statistic in (stats.chi, stats.depth_scale, stats.imbalance):
        batched = statistic(profiles)
        assert isinstance(batched, np.ndarray)
        assert batched.dtype == np.float64
        np.testing.assert_array_equal(batched, [statistic(p) for p in profiles])
    depths = stats.vanishing_depth(profiles, threshold)
    assert isinstance(depths, np.ndarray)
    assert depths.dtype == object
    assert list(depths) == [stats.vanishing_depth(p, threshold) for p in profiles]
    assert stats.summary(tuple(profiles)) == [stats.summary(p) for p in profiles]
    object_array = np.empty(len(profiles), dtype=object)
    object_array[:] = profiles
    np.testing.assert_array_equal(stats.chi(object_array), stats.chi(profiles))


@deterministic
@given(profile=noisy_profiles(), threshold=thresholds)
def test_array_input_equals_profile_input(profile, threshold):
    """A 1-D array of mean log norms (e.g. from a PyTorch monitor) gives the profile's statistics."""
    mean_log_norm = profile.log_grad_norm.mean(axis=0)
    assert stats.chi(mean_log_norm) == stats.chi(profile)
    assert stats.depth_scale(list(mean_log_norm)) == stats.depth_scale(profile)
    assert stats.vanishing_depth(tuple(mean_log_norm), threshold) == stats.vanishing_depth(profile, threshold)
    assert stats.imbalance(mean_log_norm, 1) == stats.imbalance(profile, 1)
    from_array, from_profile = stats.summary(mean_log_norm), stats.summary(profile)
    for key in ("chi", "depth_scale", "vanishing_depth", "imbalance", "r2", "slope", "log_grad_norm_ratio"):
        assert from_array[key] == from_profile[key]
    assert math.isnan(from_array["chi_theory"])
    assert from_profile["chi_theory"] == 0.5


def assert_same_statistics(a: Profile, b: Profile, threshold: float) -> None:
    summary_a, summary_b = stats.summary(a), stats.summary(b)
    assert summary_a["slope"] == pytest.approx(summary_b["slope"], abs=1e-9)
    assert summary_a["chi"] == pytest.approx(summary_b["chi"], rel=1e-8)
    assert summary_a["r2"] == pytest.approx(summary_b["r2"], abs=1e-7)
    # 1 / depth_scale = 2 |slope|, which stays well conditioned near slope 0
    assert 1 / summary_a["depth_scale"] == pytest.approx(1 / summary_b["depth_scale"], abs=1e-9)
    assert math.log(stats.imbalance(a)) == pytest.approx(math.log(stats.imbalance(b)), abs=1e-9)
    if far_from_threshold(a.mean_log_grad_norm, threshold) and far_from_threshold(
        b.mean_log_grad_norm, threshold
    ):
        assert stats.vanishing_depth(a, threshold) == stats.vanishing_depth(b, threshold)


@deterministic
@given(profile=noisy_profiles(), constant=st.floats(-100.0, 100.0), threshold=thresholds)
def test_invariant_to_a_constant_added_to_all_log_norms(profile, constant, threshold):
    """Multiplying every gradient by one factor (e.g. scaling the loss) changes no statistic."""
    shifted = make_profile(profile.log_grad_norm + constant)
    assert_same_statistics(profile, shifted, threshold)


@deterministic
@given(profile=noisy_profiles(), data=st.data(), threshold=thresholds)
def test_invariant_to_sample_permutation(profile, data, threshold):
    order = data.draw(st.permutations(range(profile.batch)), label="order")
    permuted = make_profile(profile.log_grad_norm[list(order)])
    assert_same_statistics(profile, permuted, threshold)


@deterministic
@given(profile=noisy_profiles(max_depth=10), threshold=thresholds)
def test_inputs_never_modified(profile, threshold):
    for name in ("log_grad_norm", "log_weight_grad_norm", "saturation", "dead"):
        getattr(profile, name).flags.writeable = False  # an in-place write would raise
    before = {name: getattr(profile, name).copy() for name in ("log_grad_norm", "saturation", "dead")}
    mean_log_norm = profile.log_grad_norm.mean(axis=0)
    mean_log_norm.flags.writeable = False
    mean_before = mean_log_norm.copy()
    batch = [profile, profile]
    for argument in (profile, batch, mean_log_norm):
        stats.chi(argument)
        stats.depth_scale(argument)
        stats.vanishing_depth(argument, threshold)
        stats.imbalance(argument, 1)
        stats.summary(argument)
    for name, values in before.items():
        np.testing.assert_array_equal(getattr(profile, name), values)
    np.testing.assert_array_equal(mean_log_norm, mean_before)
    assert batch == [profile, profile]
    assert profile.config == {"activation": "tanh"}


# --------------------------------------------------------------------------
# Edge cases


@pytest.mark.parametrize("depth", [1, 2, 7, 100])
@pytest.mark.parametrize("batch", [1, 3])
def test_flat_profile(depth, batch):
    """Equal norms everywhere: chi exactly 1, infinite depth scale, R^2 = 1 by convention (exact fit)."""
    profile = make_profile(np.full((batch, depth + 1), -1.7))
    summary = stats.summary(profile)
    assert summary["chi"] == 1.0
    assert summary["depth_scale"] == math.inf
    assert summary["r2"] == 1.0
    assert summary["slope"] == 0.0
    assert summary["vanishing_depth"] is None
    assert summary["imbalance"] == 1.0
    assert summary["log_grad_norm_ratio"] == 0.0
    assert not math.copysign(1.0, summary["log_grad_norm_ratio"]) < 0  # no -0.0


def test_never_vanishes():
    depth = 30
    exploding = make_profile(-0.3 * np.arange(depth + 1)[None, :])  # larger towards the input
    assert stats.vanishing_depth(exploding) is None
    assert stats.chi(exploding) == pytest.approx(math.exp(0.6))
    assert stats.imbalance(exploding) < 1
    slow = line_profile(0.0, 0.01, depth)  # 0.99^30 = 0.74 of the norm is left at the input
    assert stats.vanishing_depth(slow) is None
    assert stats.vanishing_depth(slow, threshold=0.75) == 29
    assert stats.summary(slow)["vanishing_depth"] is None


def assert_nan_free(summary: dict) -> None:
    """No NaN but where it means "not known": chi_theory, and for array input the saturation fields
    and the global weight-gradient norm."""
    not_known = {"chi_theory", "mean_saturation", "mean_dead", "log_global_norm"}
    for key, value in summary.items():
        if value is not None and key not in not_known:
            assert not math.isnan(value), key


@pytest.mark.parametrize("batch", [1, 3])
def test_saturated_below_a_layer(batch):
    """Below a fully dead layer the gradient is exactly zero: log norm -inf at l = 0 .. cut - 1."""
    depth, cut, slope = 12, 5, 0.2
    log_grad_norm = np.tile(slope * np.arange(depth + 1.0), (batch, 1))
    log_grad_norm[:, :cut] = -np.inf
    profile = make_profile(log_grad_norm)
    summary = stats.summary(profile)
    assert_nan_free(summary)
    assert (summary["chi_theory"], summary["mean_saturation"], summary["mean_dead"]) == (0.5, 0.25, 0.125)
    # the fit runs over the finite part, which decays at the line's rate
    assert summary["chi"] == pytest.approx(math.exp(-2 * slope))
    assert summary["r2"] == pytest.approx(1.0)
    # the line alone would vanish (1e-3) after 35 layers; the zero norm at l = cut - 1 comes first
    assert summary["vanishing_depth"] == depth - (cut - 1)
    assert stats.vanishing_depth(profile, threshold=0.5) == 4  # e^(-0.2 d) < 0.5 from d = 4 on
    assert summary["imbalance"] == math.inf
    assert stats.imbalance(profile, k=depth + 1) == 1.0  # a group compared with itself
    assert stats.imbalance(profile, k=depth - cut + 1) == math.inf  # last k finite, first k all zero
    assert summary["log_grad_norm_ratio"] == math.inf


def test_one_sample_zero_makes_the_geometric_mean_zero():
    log_grad_norm = np.zeros((3, 6))
    log_grad_norm[1, :2] = -np.inf  # sample 1's gradient dies below layer 2
    profile = make_profile(log_grad_norm)
    assert stats.vanishing_depth(profile) == 4
    assert stats.chi(profile) == 1.0  # the finite points, l = 2 .. 5, are flat
    assert stats.imbalance(profile, 2) == math.inf


def test_only_the_output_carries_gradient():
    """Fewer than two finite points: chi = 0, depth_scale = 0 (= 1 / |ln 0|), r2 = 1."""
    for depth in (1, 5):
        log_grad_norm = np.full((2, depth + 1), -np.inf)
        log_grad_norm[:, -1] = [0.3, -0.4]
        summary = stats.summary(make_profile(log_grad_norm))
        assert_nan_free(summary)
        assert summary["chi"] == 0.0
        assert summary["depth_scale"] == 0.0
        assert summary["r2"] == 1.0
        assert summary["vanishing_depth"] == 1
        assert summary["imbalance"] == math.inf


def test_zero_inside_a_curve_gives_no_nan():
    """A non-physical curve (zero above nonzero), as array input might hold: still NaN-free."""
    curve = np.array([0.0, 0.0, 0.0, -np.inf, 0.0])
    assert stats.imbalance(curve, 2) == 0.0  # the last two hold the zero
    assert stats.imbalance(curve, 4) == 1.0  # both groups hold it; the finite parts are equal
    assert stats.vanishing_depth(curve) == 1
    assert_nan_free(stats.summary(curve))


def test_output_gradient_zero_raises():
    with pytest.raises(ValueError, match=r"profile\.log_grad_norm.*output"):
        stats.chi(make_profile(np.array([[0.0, 1.0, -np.inf]])))
    with pytest.raises(ValueError, match=r"profile: .*output"):
        stats.summary([0.0, -np.inf])


@pytest.mark.parametrize("slope", [-0.8, 0.0, 1.3])
def test_depth_one(slope):
    profile = make_profile(np.array([[2.0, 2.0 + slope], [1.0, 1.0 + slope]]))
    summary = stats.summary(profile)
    assert summary["chi"] == pytest.approx(math.exp(-2 * slope))
    assert summary["r2"] == 1.0  # a line through two points fits exactly
    assert summary["imbalance"] == pytest.approx(math.exp(slope))  # default k = max(1, 1 // 4) = 1
    assert stats.imbalance(profile, 2) == 1.0
    assert summary["vanishing_depth"] == (1 if -slope < math.log(1e-3) else None)
    assert stats.vanishing_depth(profile, threshold=0.5) == (1 if slope > math.log(2) else None)
    assert summary["depth"] == 1


def test_single_sample():
    rng = np.random.default_rng(0)
    row = rng.normal(size=9) - 0.5 * np.arange(9)
    profile = make_profile(row[None, :])
    assert profile.batch == 1
    assert stats.summary(profile) == {**stats.summary(row), "chi_theory": 0.5, "mean_saturation": 0.25,
                                      "mean_dead": 0.125,
                                      # 8 weight gradients of norm 1 (log 0): total sqrt(8)
                                      "log_global_norm": 0.5 * math.log(8.0)}


def test_summary_keys_and_types():
    summary = stats.summary(line_profile(1.0, 0.5, 16, batch=4, spread=1.0))
    assert SUMMARY_KEYS <= summary.keys()
    assert isinstance(summary["vanishing_depth"], int)
    for key in ("chi", "depth_scale", "imbalance", "r2", "chi_theory", "mean_saturation", "mean_dead"):
        assert isinstance(summary[key], float), key
    assert summary["mean_saturation"] == 0.25
    assert summary["mean_dead"] == 0.125


def test_extreme_slopes_overflow_to_inf_without_warnings():
    exploding = -400.0 * np.arange(11)  # chi = e^800
    assert stats.chi(exploding) == math.inf
    assert stats.depth_scale(exploding) == pytest.approx(1 / 800)
    assert stats.imbalance(exploding) == 0.0
    vanishing = 400.0 * np.arange(11)
    assert stats.chi(vanishing) == 0.0
    assert stats.imbalance(vanishing) == math.inf
    assert stats.vanishing_depth(vanishing) == 1


def test_batch_of_different_depths_uses_each_default_k():
    shallow, deep = line_profile(0.0, 0.1, 4), line_profile(0.0, 0.1, 40)
    np.testing.assert_allclose(
        stats.imbalance([shallow, deep]), [math.exp(0.1 * 4), math.exp(0.1 * (41 - 10))], rtol=1e-12
    )
    with pytest.raises(ValueError, match=r"k: .*profile\[0\]"):
        stats.imbalance([shallow, deep], k=10)


def test_device_arrays_are_moved_to_the_host():
    """Anything CuPy-like (``get()`` and ``__cuda_array_interface__``, no implicit conversion)."""

    class FakeDeviceArray:
        def __init__(self, values):
            self._values = np.asarray(values, dtype=np.float64)
            self.shape = self._values.shape

        @property
        def __cuda_array_interface__(self):
            return {}

        def get(self):
            return self._values.copy()

        def __array__(self, *args, **kwargs):
            raise TypeError("implicit conversion to a NumPy array is not allowed")

    values = np.array([[0.0, 0.5, 1.0, 1.2], [0.1, 0.4, 1.1, 1.3]])
    device = Profile(*(FakeDeviceArray(a) for a in (values, np.zeros(3), np.ones(3), np.zeros(3))), 0.7)
    assert stats.summary(device) == stats.summary(make_profile(values, saturation=np.ones(3),
                                                               dead=np.zeros(3), chi_theory=0.7))
    assert stats.chi(FakeDeviceArray(values.mean(axis=0))) == stats.chi(values.mean(axis=0))


def test_cupy_profile():
    cupy = pytest.importorskip("cupy")
    try:
        values = cupy.asarray([[0.0, 0.5, 1.0, 1.2]])
    except Exception as error:  # CuPy installed but no usable GPU
        pytest.skip(f"no CUDA device: {error}")
    host = make_profile(cupy.asnumpy(values))
    device = Profile(values, cupy.zeros(3), cupy.full(3, 0.25), cupy.full(3, 0.125), 0.5)
    assert stats.summary(device) == stats.summary(host)
    assert stats.chi(values[0]) == stats.chi(host)


# --------------------------------------------------------------------------
# Bad input


GOOD = make_profile(np.zeros((2, 5)))


@pytest.mark.parametrize("statistic", STATISTICS)
@pytest.mark.parametrize(
    "bad",
    [None, "abc", 3.0, {"chi": 1.0}, np.array([1 + 1j, 2.0]), np.array([True, False]), object()],
    ids=["None", "str", "float", "dict", "complex", "bool", "object"],
)
def test_wrong_types_raise_type_error(statistic, bad):
    with pytest.raises(TypeError, match="profile"):
        statistic(bad)


@pytest.mark.parametrize("statistic", STATISTICS)
def test_mixed_batch_raises_type_error(statistic):
    with pytest.raises(TypeError, match=r"profile\[1\]"):
        statistic([GOOD, np.zeros(5)])


@pytest.mark.parametrize("statistic", STATISTICS)
@pytest.mark.parametrize(
    "bad",
    [
        np.zeros(1),
        [],
        np.zeros((3, 4)),
        np.array([0.0, np.nan, 1.0]),
        np.array([0.0, np.inf, 1.0]),
        np.array([0.0, 2e100, 1.0]),
        make_profile(np.array([[0.0, np.nan, 1.0]])),
        make_profile(np.array([[0.0, np.inf, 1.0], [0.0, -np.inf, 1.0]])),  # +inf hidden by a -inf
        make_profile(np.zeros((0, 4))),
        make_profile(np.zeros((3, 1))),
        Profile(np.zeros(5), np.zeros(4), np.zeros(4), np.zeros(4)),
    ],
    ids=["one-layer", "empty", "2-D", "nan", "+inf", "huge", "profile-nan", "profile-+inf", "no-samples",
         "depth-0", "profile-1-D"],
)
def test_bad_values_raise_value_error(statistic, bad):
    with pytest.raises(ValueError, match="profile"):
        statistic(bad)


def test_bad_value_in_a_batch_names_its_index():
    with pytest.raises(ValueError, match=r"profile\[1\]"):
        stats.chi([GOOD, make_profile(np.array([[0.0, np.nan, 1.0]]))])


@pytest.mark.parametrize("field", ["saturation", "dead"])
@pytest.mark.parametrize("values", [np.array([0.1, np.nan, 0.0, 0.0]), np.zeros(3)], ids=["nan", "shape"])
def test_summary_checks_saturation_and_dead(field, values):
    profile = make_profile(np.zeros((2, 5)), **{field: values})
    with pytest.raises(ValueError, match=rf"profile\.{field}"):
        stats.summary(profile)
    assert stats.chi(profile) == 1.0  # the other statistics do not read these fields


@pytest.mark.parametrize("k", [0, -3, 6])
def test_k_out_of_range(k):
    with pytest.raises(ValueError, match="k: "):
        stats.imbalance(GOOD, k)  # depth 4: k in 1 .. 5
    with pytest.raises(ValueError, match="k: "):
        stats.imbalance(GOOD.log_grad_norm[0], k)


@pytest.mark.parametrize("k", [1.0, 2.5, True, "2"])
def test_k_of_wrong_type(k):
    with pytest.raises(TypeError, match="k: "):
        stats.imbalance(GOOD, k)


def test_k_accepts_numpy_integers():
    assert stats.imbalance(GOOD, np.int64(5)) == 1.0


@pytest.mark.parametrize("threshold", [0.0, 1.0, -0.1, 1.5, math.nan, math.inf])
def test_threshold_out_of_range(threshold):
    with pytest.raises(ValueError, match="threshold: "):
        stats.vanishing_depth(GOOD, threshold)


@pytest.mark.parametrize("threshold", ["0.1", None, True, [0.1]])
def test_threshold_of_wrong_type(threshold):
    with pytest.raises(TypeError, match="threshold: "):
        stats.vanishing_depth(GOOD, threshold)


def test_threshold_accepts_numpy_floats_and_fractions():
    from fractions import Fraction

    curve = np.log([0.05, 0.2, 1.0])
    assert stats.vanishing_depth(curve, np.float32(0.1)) == 2
    assert stats.vanishing_depth(curve, Fraction(1, 4)) == 1


def test_vanishing_depth_is_strictly_below():
    """A ratio equal to the threshold has not fallen below it."""
    curve = [math.log(0.25), math.log(0.5), 0.0]
    assert stats.vanishing_depth(curve, 0.5) == 2
    assert stats.vanishing_depth(curve, 0.25) is None
