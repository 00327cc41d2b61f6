"""Unit tests of entcal.decoding: specs, bad input, known answers, mixed batches."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from entcal.decoding import (
    ChainDecoder,
    Decoder,
    EDTDecoder,
    MirostatDecoder,
    apply_rows,
    methods,
    ops,
    parse,
    register_method,
)
from entcal.decoding import spec as spec_mod

NEG = float("-inf")
ISSUE_SPECS = [
    "ancestral",
    "temperature=0.7",
    "top_k=50",
    "top_p=0.95",
    "min_p=0.05",
    "typical=0.9",
    "epsilon=0.0003",
    "eta=0.0009",
    "top_n_sigma=1.0",
    "temperature=0.8,top_p=0.95",
]


# ---- specs --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        *ISSUE_SPECS,
        "greedy",
        "mirostat",
        "mirostat:tau=2.5,eta=0.2",
        "mirostat:tau=3,eta=0.1,mu=4,temperature=0.9",
        "edt",
        "edt:t0=0.9,theta=0.5,n=0.7",
        "temperature=1.2,top_n_sigma=2,top_k=40,top_p=0.9,min_p=0.01,typical=0.95,"
        "epsilon=1e-4,eta=2e-4,min_tokens_to_keep=2",
    ],
)
def test_canonical_spec_round_trips(text):
    d = parse(text)
    assert isinstance(d, Decoder)
    again = parse(str(d))
    assert again == d and str(again) == str(d)
    assert hash(again) == hash(d)


def test_spec_values_and_aliases():
    assert parse("temperature=0.8,top_p=0.95") == ChainDecoder(temperature=0.8, top_p=0.95)
    assert parse(" top_p = 0.95 , temperature=0.8 ") == parse("temperature=0.8,top_p=0.95")
    assert str(parse("top_p=0.95,temperature=0.8")) == "temperature=0.8,top_p=0.95"
    assert parse("typical_p=0.9") == parse("typical=0.9")
    assert parse("epsilon_cutoff=3e-4") == parse("epsilon=0.0003")
    assert parse("eta_cutoff=9e-4") == parse("eta=0.0009")
    assert str(parse("ancestral")) == "ancestral" and parse("ancestral").is_identity()
    assert str(parse("greedy")) == "top_k=1"
    assert str(parse("top_p=1")) == "ancestral"  # neutral values vanish
    assert str(parse("mirostat")) == "mirostat:tau=3.0,eta=0.1"
    assert parse(parse("top_k=5")) == parse("top_k=5")  # a Decoder passes through
    assert {"ancestral", "greedy", "mirostat", "edt", "calibrated"} <= set(methods())


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ("top_p=1.5", ["top_p", "[0, 1]"]),
        ("top_p=-0.1", ["top_p", "[0, 1]"]),
        ("top_k=-3", ["top_k", ">= 0"]),
        ("top_k=2.5", ["top_k", "integer"]),
        ("temperature=0", ["temperature", "> 0"]),
        ("temperature=-1", ["temperature", "> 0"]),
        ("temperature=nan", ["temperature", "> 0"]),
        ("min_p=2", ["min_p", "[0, 1]"]),
        ("typical=0", ["typical", "(0, 1]"]),
        ("epsilon=1", ["epsilon", "[0, 1)"]),
        ("eta=1.5", ["eta", "[0, 1)"]),
        ("top_n_sigma=0", ["top_n_sigma", "> 0"]),
        ("min_tokens_to_keep=0", ["min_tokens_to_keep", ">= 1"]),
        ("top_p=abc", ["top_p", "not a number"]),
        ("foo=1", ["unknown decoder key 'foo'", "top_p"]),
        ("temperature=0.8,,top_p=0.9", ["malformed", "key=value"]),
        ("temperature=0.8,top_p", ["malformed", "key=value"]),
        ("top_p=", ["malformed"]),
        ("=0.5", ["malformed"]),
        ("top_p=0.9,top_p=0.8", ["top_p", "twice"]),
        ("", ["empty"]),
        ("nosuchmethod", ["unknown decoder 'nosuchmethod'", "mirostat"]),
        ("top_p", ["top_p", "needs a value"]),
        ("mirostat:tau=-1", ["tau", "> 0"]),
        ("mirostat:eta=0", ["eta", "> 0"]),
        ("mirostat:foo=1", ["unknown option 'foo'", "tau"]),
        ("edt:n=1.5", ["n", "(0, 1)"]),
        ("ancestral:x=1", ["ancestral", "no options"]),
        ("top p=0.9", ["unknown decoder key 'top p'"]),
        ("mirostat:tau=3:eta=1", ["tau", "not a number"]),
        ("1bad:x=1", ["malformed", "method name"]),
    ],
)
def test_bad_specs_name_the_parameter_and_its_range(text, needles):
    with pytest.raises(ValueError) as err:
        parse(text)
    for needle in needles:
        assert needle in str(err.value), (needle, str(err.value))


def test_constructor_validates_like_the_parser():
    with pytest.raises(ValueError, match=r"top_p.*\[0, 1\]"):
        ChainDecoder(top_p=1.5)
    with pytest.raises(ValueError, match="temperature"):
        ChainDecoder(temperature=0.0)
    with pytest.raises(ValueError, match="spec must be a string"):
        parse(0.9)  # type: ignore[arg-type]


def test_register_method_extends_the_parser():
    class Shift(Decoder):
        def __init__(self, by: float) -> None:
            self.by = by

        @property
        def spec(self) -> str:
            return f"shift:by={self.by!r}"

        def _process(self, logits, input_ids):
            return logits + self.by

    def factory(options):
        return Shift(float(options.get("by", "1.0")))

    register_method("shift", factory)
    try:
        d = parse("shift:by=2.0")
        assert parse(str(d)) == d
        x = torch.zeros(2, 5)
        assert torch.equal(d(x), x + 2.0)
        with pytest.raises(ValueError, match="already registered"):
            register_method("shift", lambda o: Shift(0.0))
        with pytest.raises(ValueError, match="invalid method name"):
            register_method("top_p", factory)
        # the default group path: a mixed batch of two different Shift instances
        out = apply_rows(torch.zeros(3, 4), [parse("shift:by=1.0"), None, d])
        assert out[:, 0].tolist() == [1.0, 0.0, 2.0]
    finally:
        spec_mod._REGISTRY.pop("shift", None)


# ---- logits contract ----------------------------------------------------------------------------

ALL_SPECS = [*ISSUE_SPECS, "greedy", "mirostat:tau=2", "edt:theta=0.5"]


@pytest.mark.parametrize("text", ALL_SPECS)
def test_nan_row_is_a_clear_error(text):
    x = torch.randn(3, 100)
    x[1, 17] = float("nan")
    with pytest.raises(ValueError, match=r"NaN logits in batch row\(s\) \[1\]"):
        parse(text)(x)
    x[1, 17] = float("inf")
    with pytest.raises(ValueError, match=r"\+inf logits in batch row\(s\) \[1\]"):
        parse(text)(x)


@pytest.mark.parametrize("text", ALL_SPECS)
def test_all_minus_inf_row_stays_all_minus_inf_and_input_is_untouched(text):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1000, generator=g) * 3
    x[1] = NEG
    x[2, 500:] = NEG  # a partly masked row (e.g. after another processor)
    before = x.clone()
    out = parse(text)(x)
    assert torch.equal(x, before)  # never in place
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert not torch.isnan(out).any()
    assert bool((out[1] == NEG).all())
    assert bool((out[[0, 2]] > NEG).any(-1).all())  # other rows keep tokens
    assert bool((out[2, 500:] == NEG).all())  # masked tokens stay masked
    assert out is not x


def test_logits_shape_and_dtype_errors():
    with pytest.raises(ValueError, match="2-D"):
        parse("top_p=0.9")(torch.zeros(5))
    with pytest.raises(ValueError, match="floating-point"):
        parse("top_p=0.9")(torch.zeros(2, 5, dtype=torch.long))


def test_half_precision_input_gives_float32():
    # seeded: unseeded float16 rows sometimes tie at the 5th logit, and top-k keeps such ties
    x = torch.randn(2, 300, generator=torch.Generator().manual_seed(0)).half()
    assert int((x >= x.topk(5).values[:, -1:]).sum()) == 10  # no tie at the 5th place
    out = parse("top_k=5")(x)
    assert out.dtype == torch.float32
    assert int((out > NEG).sum()) == 10


def test_stateless_decoders_work_on_flattened_sequences():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 7, 500, generator=g) * 2
    d = parse("temperature=0.9,top_p=0.9,min_p=0.02")
    assert not d.requires_history
    flat = d(x.view(-1, 500)).view(3, 7, 500)
    for t in range(7):
        assert torch.equal(flat[:, t], d(x[:, t]))


# ---- known answers ------------------------------------------------------------------------------


def test_top_n_sigma_known_answer():
    x = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0, NEG]])
    # finite logits: mean 2, population std sqrt(2)
    assert (~ops.top_n_sigma_mask(x, 1.0)).flatten().tolist() == [0, 0, 0, 1, 1, 0]
    assert (~ops.top_n_sigma_mask(x, 2.0)).flatten().tolist() == [0, 0, 1, 1, 1, 0]
    assert (~ops.top_n_sigma_mask(x, 3.0)).flatten().tolist() == [1, 1, 1, 1, 1, 0]
    # a token exactly at max - n·σ is kept: [0, 0, 2, 2] has mean 1, σ 1 (exact in float)
    y = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    assert (~ops.top_n_sigma_mask(y, 2.0)).flatten().tolist() == [1, 1, 1, 1]
    assert (~ops.top_n_sigma_mask(y, 1.9)).flatten().tolist() == [0, 0, 1, 1]


def test_top_n_sigma_matches_numpy_reference_and_is_temperature_invariant():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(16, 2000, generator=g) * 3
    x[:, :100] = NEG
    ns = torch.rand(16, generator=g) * 3 + 0.1
    ours = ops.top_n_sigma_mask(x, ns)
    a = x.double().numpy()
    for r in range(16):
        f = a[r][np.isfinite(a[r])]
        thr = f.max() - float(ns[r]) * f.std()  # numpy std: population (ddof=0)
        clear = np.abs(a[r] - thr) > 1e-4  # float32 statistics: ignore ~ulp-close tokens
        assert np.array_equal(ours[r].numpy()[clear], ~(a[r] >= thr)[clear])
    ours_t = ops.top_n_sigma_mask(x / 0.37, ns)
    assert int((ours_t != ours).sum()) <= 2  # invariant up to float32 rounding
    # a batch with no masked token takes the Welford path: same answer
    y = x[:, 100:].contiguous()
    f = y.double()
    thr = f.amax(-1, keepdim=True) - ns.double().view(-1, 1) * f.std(-1, correction=0, keepdim=True)
    clear = (f - thr).abs() > 1e-4
    assert torch.equal(ops.top_n_sigma_mask(y, ns)[clear], (f < thr)[clear])


def _dist(probs):
    return torch.tensor([probs]).log()


@pytest.mark.parametrize("surprise", ["truncated", "model"])
def test_mirostat_v2_known_answer(surprise):
    # surprises -log2 p = 1, 2, 3, 4, 4 bits
    x = _dist([0.5, 0.25, 0.125, 0.0625, 0.0625])
    d = MirostatDecoder(tau=3.0, eta=0.1, surprise=surprise)
    d.reset(1)
    assert d.mu_.tolist() == [6.0]  # mu starts at 2·tau
    assert int((d(x) > NEG).sum()) == 5
    d.mu_ = torch.tensor([2.5], dtype=torch.float64)
    assert (d(x) > NEG).flatten().tolist() == [True, True, False, False, False]
    d.observe(torch.tensor([1]))
    # llama.cpp: surprise under the kept set renormalized, q = .25/.75 -> log2(3) bits;
    # under the model's distribution: 2 bits
    s = math.log2(3.0) if surprise == "truncated" else 2.0
    assert d.mu_.item() == pytest.approx(2.5 - 0.1 * (s - 3.0), abs=1e-6)
    d.mu_ = torch.tensor([0.2], dtype=torch.float64)  # below every surprise: keep the top token
    assert (d(x) > NEG).flatten().tolist() == [True, False, False, False, False]
    d.observe(torch.tensor([0]))
    s = 0.0 if surprise == "truncated" else 1.0
    assert d.mu_.item() == pytest.approx(0.2 - 0.1 * (s - 3.0))


def test_mirostat_state_is_per_row_and_uses_the_tempered_distribution():
    x = torch.cat([_dist([0.5, 0.25, 0.125, 0.125]), _dist([0.25, 0.25, 0.25, 0.25])])
    d = parse("mirostat:tau=2,eta=0.5,temperature=2.0")
    d.reset(2)
    d(x)
    d.observe(torch.tensor([2, 0]))
    # row 0 at temperature 2: p ∝ sqrt(p) -> surprise of token 2 under the tempered distribution
    q = torch.tensor([0.5, 0.25, 0.125, 0.125]).sqrt()
    s0 = -math.log2(float(q[2] / q.sum()))
    assert d.mu_.tolist() == pytest.approx([4.0 - 0.5 * (s0 - 2.0), 4.0 - 0.5 * (2.0 - 2.0)])
    d.observe(torch.tensor([1, 1]))  # no step since the last observe: no update
    assert d.mu_.tolist() == pytest.approx([4.0 - 0.5 * (s0 - 2.0), 4.0])


def test_edt_known_answer():
    probs = [0.7, 0.2, 0.05, 0.05]
    x = _dist(probs) + 3.0
    h = -sum(p * math.log(p) for p in probs)
    d = EDTDecoder(t0=0.9, theta=0.6, n=0.8)
    t = 0.9 * 0.8 ** (0.6 / h)
    expected = torch.softmax(_dist(probs).double() / t, -1)
    assert torch.allclose(torch.softmax(d(x).double(), -1), expected, atol=1e-6)
    # confident rows go greedy without overflow; uncertain rows approach t0
    sharp = torch.tensor([[0.0, -40.0, -40.0, NEG]])
    out = d(sharp)
    assert out[0, 0] == 0 and not torch.isnan(out).any()
    assert torch.softmax(out, -1)[0].tolist() == [1.0, 0.0, 0.0, 0.0]
    flat = torch.zeros(1, 50000)
    t_flat = 0.9 * 0.8 ** (0.6 / math.log(50000))
    assert float(ops.edt_temperature(flat, *(torch.tensor([v]) for v in (0.9, 0.8, 0.6)))) == (
        pytest.approx(t_flat, rel=1e-5)
    )


# ---- mixed batches ------------------------------------------------------------------------------


def test_apply_rows_equals_each_decoder_on_its_row():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(9, 3000, generator=g) * 2.5
    decs = [
        parse("top_p=0.9"),
        None,
        parse("temperature=0.7,top_k=20"),
        parse("min_p=0.1,min_tokens_to_keep=3"),
        parse("ancestral"),
        parse("typical=0.8"),
        parse("edt:theta=0.4"),
        parse("top_n_sigma=1.5,epsilon=0.001"),
        parse("temperature=1.4,eta=0.002"),
    ]
    out = apply_rows(x, decs)
    for i, d in enumerate(decs):
        ref = x[i : i + 1] if d is None else d(x[i : i + 1])
        assert torch.equal(out[i : i + 1] == NEG, ref == NEG), i
        fin = ref > NEG
        assert torch.allclose(out[i : i + 1][fin], ref[fin], rtol=1e-6, atol=1e-6), i
    assert torch.equal(out[1], x[1])


def test_apply_rows_mirostat_instances_share_one_pass():
    x = torch.randn(4, 200) * 3
    a, b = parse("mirostat:tau=1"), parse("mirostat:tau=4")
    x[0, 7] = x[0].max() + 0.1  # tokens 7 and 9 top their rows: kept, finite surprises
    x[2, 9] = x[2].max() + 0.1
    out = apply_rows(x, [a, parse("top_k=3"), b, None])
    ref_a = MirostatDecoder(tau=1.0)(x[0:1])
    ref_b = MirostatDecoder(tau=4.0)(x[2:3])
    assert torch.equal(out[0:1], ref_a) and torch.equal(out[2:3], ref_b)
    a.observe(torch.tensor([7]))
    b.observe(torch.tensor([9]))
    # surprise under each row's kept set, renormalized (llama.cpp's measure)
    s_a = -float(torch.log_softmax(ref_a[0].double(), -1)[7]) / math.log(2)
    s_b = -float(torch.log_softmax(ref_b[0].double(), -1)[9]) / math.log(2)
    assert a.mu_.item() == pytest.approx(2.0 - 0.1 * (s_a - 1.0), abs=1e-5)
    assert b.mu_.item() == pytest.approx(8.0 - 0.1 * (s_b - 4.0), abs=1e-5)


def test_apply_rows_validates():
    with pytest.raises(ValueError, match="3 decoders for 2"):
        apply_rows(torch.zeros(2, 5), [None, None, None])
    with pytest.raises(ValueError, match="expected a Decoder"):
        apply_rows(torch.zeros(1, 5), ["top_p=0.9"])  # type: ignore[list-item]
    x = torch.zeros(2, 5)
    x[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        apply_rows(x, [None, None])


def test_per_row_parameters_in_ops():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(5, 4000, generator=g) * 2
    tp = torch.tensor([0.5, 1.0, 0.9, 0.99, 0.0])
    out = ops.top_p_mask(x, tp)
    for i in range(5):
        assert torch.equal(out[i : i + 1], ops.top_p_mask(x[i : i + 1], float(tp[i])))
    assert not out[1].any()  # top_p = 1: untouched
    assert int((~out[4]).sum()) == 1  # top_p = 0: the top token only
    k = torch.tensor([0, 1, 5, 4000, 10])
    kept = (~ops.top_k_mask(x, k)).sum(-1).tolist()
    assert kept == [4000, 1, 5, 4000, 10]


def test_lookahead_parses_in_a_fresh_interpreter():
    # The lazy registry must know every method entcal.calibrators registers, not only the first.
    import subprocess
    import sys

    code = "from entcal.decoding import parse; print(parse('lookahead:alpha=0.1,k=4'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().startswith("lookahead:")


def test_dead_rows_stay_dead_beside_a_nan_row():
    """The dead-row guard finds an all -inf row even when another row's maximum is NaN (the
    isolated serving path passes such maxima)."""
    from entcal.decoding.ops import keep_dead_rows

    out = keep_dead_rows(torch.zeros(3, 2), torch.tensor([float("nan"), NEG, 1.0]))
    assert out[1].tolist() == [NEG, NEG]
    assert out[0].tolist() == [0.0, 0.0] and out[2].tolist() == [0.0, 0.0]


def test_finite_extent_is_none_unless_every_row_maximum_is_finite():
    """The one-synchronization check behind every call: max |row max| when all are finite, and
    None for a NaN, +inf or all -inf row (then the call takes the checking path), or no rows."""
    from entcal.decoding.ops import checked_row_max, finite_extent

    assert finite_extent(torch.tensor([-3.0, 2.0])) == 3.0
    for bad in (float("nan"), float("inf"), NEG):
        assert finite_extent(torch.tensor([1.0, bad])) is None
    assert finite_extent(torch.zeros(0)) is None
    mx, extent = checked_row_max(torch.tensor([[0.0, NEG], [NEG, NEG]]))
    assert mx.tolist() == [0.0, NEG] and extent is None
    dec = parse("temperature=0.5")
    out = dec(torch.tensor([[1.0, 0.0], [NEG, NEG]]))
    assert out[0].tolist() == [2.0, 0.0] and out[1].tolist() == [NEG, NEG]
    with pytest.raises(ValueError, match=r"NaN logits in batch row\(s\) \[1\]"):
        dec(torch.tensor([[1.0, 0.0], [float("nan"), 0.0]]))


@pytest.mark.parametrize("spec", ["top_k=50", "top_k=50,top_p=0.9", "temperature=0.7", "min_p=0.1"])
def test_an_empty_batch_comes_back_empty(spec):
    out = parse(spec)(torch.empty(0, 49152))
    assert out.shape == (0, 49152)


def test_top_k_op_takes_an_integral_float_k():
    x = torch.tensor([[1.0, 3.0, 2.0]])
    assert ops.top_k_mask(x, 2.0).tolist() == [[True, False, False]]
