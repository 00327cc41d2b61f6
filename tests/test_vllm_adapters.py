"""entcal's vLLM adapters without an engine: bookkeeping, per-row application, validation.

The V1 bookkeeping is driven by vLLM's real ``InputBatch`` (the persistent batch of the V1 model
runner: its add / remove / condense / swap code emits the ``BatchUpdate``s) and by random
``BatchUpdate``s; the V2 adapter by vLLM's real ``LogitsProcRequestState`` / ``LogitsContext``.
The reference is a plain dict ``request -> spec`` and each decoder applied to its row alone.
"""

from __future__ import annotations

import random
import subprocess
import sys
from typing import ClassVar

import numpy as np
import pytest
import torch

pytest.importorskip("vllm")

from hypothesis import given, settings
from test_contract import ROW_SPECS, _check_contract, logits_rows
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import (
    BatchUpdate,
    LogitsProcessors,
    MoveDirectionality,
)
from vllm.v1.sample.logits_processor import LogitsProcessor as V1Interface
from vllm.v1.worker.gpu.sample.logits_processor import (
    LogitsContext,
    LogitsProcRequestState,
)
from vllm.v1.worker.gpu.sample.logits_processor import (
    LogitsProcessor as V2Interface,
)
from vllm.v1.worker.gpu_input_batch import CachedRequestState, InputBatch

from entcal.decoding import MirostatDecoder, parse
from entcal.decoding.vllm.processor import (
    EntcalLogitsProcessor,
    EntcalPluginLogitsProcessor,
    EntcalRequestError,
    validate_request,
)
from entcal.decoding.vllm.v1 import EntcalV1LogitsProcessor, RowTable
from entcal.decoding.vllm.v2 import EntcalV2LogitsProcessor

SPECS = [
    None,
    "top_k=1",
    "top_k=5",
    "top_p=0.5",
    "min_p=0.2",
    "temperature=0.7,top_p=0.9",
    "typical=0.8",
    "ancestral",
    "edt:t0=0.9",
    "mirostat:tau=2.0",
]
VOCAB = 64
CPU = torch.device("cpu")


def _params(spec: str | None) -> SamplingParams:
    return SamplingParams(extra_args={"entcal": spec} if spec else None)


def _expected(logits: torch.Tensor, specs: list[str | None]) -> torch.Tensor:
    """Each row processed by its own freshly parsed decoder, alone (stateless specs only)."""
    out = logits.clone()
    for i, spec in enumerate(specs):
        if spec is not None:
            out[i] = parse(spec)(logits[i : i + 1])[0]
    return out


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(torch.equal(torch.isinf(a), torch.isinf(b))) and torch.allclose(
        a.nan_to_num(0.0, 0.0, 0.0), b.nan_to_num(0.0, 0.0, 0.0), rtol=1e-5, atol=1e-5
    )


# ---------------------------------------------------------------------------------- V1 runner


def _input_batch(proc) -> InputBatch:
    return InputBatch(
        max_num_reqs=16,
        max_model_len=64,
        max_num_batched_tokens=256,
        device=CPU,
        vocab_size=VOCAB,
        block_sizes=[16],
        max_num_blocks_per_req=[4],
        logitsprocs=LogitsProcessors([proc]),
        logitsprocs_need_output_token_ids=True,
    )


def _cached(req_id: str, spec: str | None) -> CachedRequestState:
    return CachedRequestState(
        req_id=req_id,
        prompt_token_ids=[1, 2, 3],
        mm_features=[],
        sampling_params=_params(spec),
        generator=None,
        block_ids=([0],),
        num_computed_tokens=0,
        output_token_ids=[],
    )


@pytest.mark.parametrize("seed", range(4))
def test_v1_bookkeeping_follows_vllm_input_batch(seed):
    """Random adds, removals (condensed by moves) and swaps through vLLM's real InputBatch:
    row i always gets its own request's decoder, and apply() processes it as that decoder would."""
    rng = random.Random(seed)
    stateless = [s for s in SPECS if s is None or "mirostat" not in s]
    proc = EntcalV1LogitsProcessor(None, CPU, False)
    batch = _input_batch(proc)
    reference: dict[str, str | None] = {}  # the plain-dict reference: request -> spec
    next_id = 0
    swaps = 0
    for _step in range(60):
        live = list(batch.req_id_to_index)
        for req_id in rng.sample(live, rng.randint(0, len(live))):
            batch.remove_request(req_id)
            del reference[req_id]
        for _ in range(rng.randint(0, 16 - len(reference))):
            spec = rng.choice(stateless)
            batch.add_request(_cached(f"r{next_id}", spec))
            reference[f"r{next_id}"] = spec
            next_id += 1
        batch.condense()
        for _ in range(rng.randint(0, 2)):
            if batch.num_reqs >= 2:
                i, j = rng.sample(range(batch.num_reqs), 2)
                batch.swap_states(i, j)
                swaps += 1
        batch.refresh_metadata()  # emits the BatchUpdate to the processor

        specs = [reference[r] for r in batch.req_ids]
        got = [
            proc.table.entries[i].decoder.spec if i in proc.table.entries else None
            for i in range(batch.num_reqs)
        ]
        assert got == [None if s is None else parse(s).spec for s in specs]
        assert set(proc.table.entries) <= set(range(batch.num_reqs))
        if batch.num_reqs:
            logits = torch.randn(batch.num_reqs, VOCAB) * 3
            before = logits.clone()
            out = proc.apply(logits)
            assert _same(out, _expected(before, specs))
    assert swaps > 10 and next_id > 100


class _Ref:
    """A request of the synthetic test: its spec and live output list."""

    def __init__(self, spec):
        self.spec = spec
        self.out: list[int] = []


@pytest.mark.parametrize("seed", range(6))
def test_v1_row_table_random_batch_updates(seed):
    """Arbitrary legal BatchUpdates (moves onto occupied rows, swaps, adds replacing rows)
    against a plain list reference."""
    rng = random.Random(100 + seed)
    table: RowTable = RowTable(lambda params, prompt, out: (params.extra_args or {}).get("entcal"))
    rows: list[_Ref | None] = []  # reference: row -> request
    for _step in range(200):
        removed, added, moved = [], [], []
        size = len(rows)
        for i in range(size):
            if rows[i] is not None and rng.random() < 0.2:
                removed.append(i)
                rows[i] = None
        for _ in range(rng.randint(0, 3)):
            free = [i for i, r in enumerate(rows) if r is None]
            i = rng.choice(free) if free and rng.random() < 0.7 else len(rows)
            if i == len(rows):
                rows.append(None)
            ref = _Ref(rng.choice(SPECS))
            rows[i] = ref
            added.append((i, _params(ref.spec), [1], ref.out))
        for _ in range(rng.randint(0, 3)):
            if len(rows) < 2:
                break
            a, b = rng.sample(range(len(rows)), 2)
            if rng.random() < 0.5:
                moved.append((a, b, MoveDirectionality.SWAP))
                rows[a], rows[b] = rows[b], rows[a]
            else:
                moved.append((a, b, MoveDirectionality.UNIDIRECTIONAL))
                rows[b], rows[a] = rows[a], None
        while rows and rows[-1] is None:
            rows.pop()
        table.update(BatchUpdate(len(rows), removed, added, moved))
        expect = {i: r.spec for i, r in enumerate(rows) if r is not None and r.spec is not None}
        assert table.entries == expect
        assert table.batch_size == len(rows)


def test_v1_update_none_and_version():
    table: RowTable = RowTable(lambda p, q, o: "x")
    assert table.update(None) is False and table.version == 0
    table.update(BatchUpdate(1, [], [(0, _params("top_k=1"), [1], [])], []))
    assert table.version == 1 and table.entries == {0: "x"}


def test_v1_mirostat_state_follows_its_request_through_moves():
    """Stateful decoders: each request's mirostat state sees exactly its own sampled tokens,
    read from the live output list, whatever rows the request occupies."""
    torch.manual_seed(0)
    proc = EntcalV1LogitsProcessor(None, CPU, False)
    batch = _input_batch(proc)
    specs = {"a": "mirostat:tau=2.0", "b": None, "c": "mirostat:tau=4.0,eta=0.5", "d": "top_k=3"}
    reqs = {r: _cached(r, s) for r, s in specs.items()}
    for r in reqs.values():
        batch.add_request(r)
    batch.refresh_metadata()
    refs = {r: parse(s) for r, s in specs.items() if s and "mirostat" in s}
    for d in refs.values():
        d.reset(1)
    for step in range(12):
        n = batch.num_reqs
        logits = torch.randn(n, VOCAB) * 2
        out = proc.apply(logits.clone())
        for i, req_id in enumerate(batch.req_ids):
            if req_id in refs:
                expect = refs[req_id](logits[i : i + 1])[0]
                assert _same(out[i], expect), (step, req_id)
        # sample, append to the live lists (as the engine does), tell the references
        for i, req_id in enumerate(batch.req_ids):
            probs = torch.softmax(out[i], -1)
            tok = int(torch.multinomial(probs, 1))
            reqs[req_id].output_token_ids.append(tok)
            if req_id in refs:
                refs[req_id].observe(torch.tensor([tok]))
        if step == 5:  # reorder: swap two rows (the engine does this between steps)
            batch.swap_states(0, 2)
        if step == 8:  # remove b: c or d is moved down into its row
            batch.remove_request("b")
            batch.condense()
        batch.refresh_metadata()
    mus = {r: float(d.mu_[0]) for r, d in refs.items()}
    assert mus["a"] != 4.0 and mus["c"] != 8.0  # states moved away from their start


def test_v1_untouched_when_no_entcal_rows():
    proc = EntcalV1LogitsProcessor(None, CPU, False)
    proc.update_state(
        BatchUpdate(2, [], [(0, _params(None), [1], []), (1, _params(None), [1], [])], [])
    )
    logits = torch.randn(2, VOCAB)
    assert proc.apply(logits) is logits
    assert proc.is_argmax_invariant() is False


def test_v1_a_poisoned_row_stays_in_its_own_request(caplog):
    """One request's row holds NaN: the other rows still get their decoders (issue 13, case 5);
    the poisoned request is left raw from then on, with an error logged naming its row."""
    proc = EntcalV1LogitsProcessor(None, CPU, False)
    specs = ["top_p=0.5", "mirostat:tau=2.0", "min_p=0.2", None]
    added = [(i, _params(sp), [1, 2], []) for i, sp in enumerate(specs)]
    proc.update_state(BatchUpdate(4, [], added, []))
    logits = torch.randn(4, VOCAB) * 2
    logits[1, 7] = float("nan")
    with caplog.at_level("ERROR"):
        out = proc.apply(logits.clone())
    assert "batch row 1 failed" in caplog.text and "NaN" in caplog.text
    expect = _expected(logits, ["top_p=0.5", None, "min_p=0.2", None])
    assert _same(out[[0, 2, 3]], expect[[0, 2, 3]])
    assert torch.isnan(out[1, 7]) and proc.failures == 1
    clean = torch.randn(4, VOCAB)
    out = proc.apply(clean.clone())  # next step: row 1 raw, the rest as before
    assert _same(out, _expected(clean, ["top_p=0.5", None, "min_p=0.2", None]))


@pytest.mark.parametrize("spec", ROW_SPECS)
@settings(max_examples=6)
@given(x=logits_rows(vocab=VOCAB, max_batch=5))
def test_v1_adapter_keeps_the_contract(spec, x):
    """Every row of a batch through the V1 adapter (vLLM hands processors float32 logits)."""
    x = x.float()
    proc = EntcalV1LogitsProcessor(None, CPU, False)
    n = x.shape[0]
    outputs = [[] for _ in range(n)]
    proc.update_state(
        BatchUpdate(n, [], [(i, _params(spec), [1, 2], outputs[i]) for i in range(n)], [])
    )
    for _ in range(2):
        out = proc.apply(x.clone())
        _check_contract(spec, x, out)
        for i, t in enumerate(out.argmax(-1).tolist()):
            outputs[i].append(t)
        proc.update_state(None)


# ------------------------------------------------------------------------------- Model Runner V2


class _HostBuffer:
    """Stands in for vLLM's UVA/staged buffers (which need pinned memory, absent on CPU):
    the same ``.np`` / ``.cpu`` / ``.gpu`` views, here all on the host."""

    def __init__(self, shape, dtype=torch.int32):
        self.cpu = torch.zeros(shape, dtype=dtype)
        self.np = self.cpu.numpy()
        self.gpu = self.cpu


def _req_states(max_reqs: int) -> LogitsProcRequestState:
    return LogitsProcRequestState(
        device=CPU,
        max_num_reqs=max_reqs,
        vocab_size=VOCAB,
        all_token_ids=_HostBuffer((max_reqs, 128)),
        prompt_len=_HostBuffer(max_reqs),
        prefill_len=_HostBuffer(max_reqs),
        total_len=_HostBuffer(max_reqs),
    )


def _ctx(slots: list[int], seq_lens: list[int], input_ids: list[int]) -> LogitsContext:
    idx = np.asarray(slots, dtype=np.int32)
    t = torch.as_tensor(idx, dtype=torch.long)
    return LogitsContext(
        expanded_idx_mapping=t,
        idx_mapping=t,
        idx_mapping_np=idx,
        expanded_local_pos=torch.zeros(len(slots), dtype=torch.long),
        input_ids=torch.as_tensor(input_ids, dtype=torch.long),
        pos=torch.as_tensor(seq_lens, dtype=torch.long) - 1,
        seq_lens_upper_bound_np=np.asarray(seq_lens, dtype=np.int32),
    )


@pytest.mark.parametrize("seed", range(3))
def test_v2_adapter_through_vllm_context_classes(seed):
    """Slots are recycled and rows reordered every step; row i gets its slot's decoder; stateful
    decoders see the fed (previously sampled) token of their own request."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    max_reqs = 12
    states = _req_states(max_reqs)
    proc = EntcalLogitsProcessor(None, states)
    assert isinstance(proc, EntcalV2LogitsProcessor) and isinstance(proc, V2Interface)
    slot_spec: dict[int, str | None] = {}
    seq_len: dict[int, int] = {}
    last_tok: dict[int, int] = {}
    refs: dict[int, MirostatDecoder] = {}
    for _step in range(40):
        # finish some requests, admit new ones into free slots
        for s in [s for s in slot_spec if rng.random() < 0.15]:
            del slot_spec[s]
        free = [s for s in range(max_reqs) if s not in slot_spec]
        for s in rng.sample(free, rng.randint(0, len(free))):
            spec = rng.choice(SPECS)
            slot_spec[s] = spec
            states.prompt_len.np[s] = rng.randint(2, 6)
            seq_len[s] = int(states.prompt_len.np[s])
            last_tok[s] = 1
            assert proc.add_request(s, _params(spec)) is (spec is not None)
            if spec and "mirostat" in spec:
                refs[s] = parse(spec)
                refs[s].reset(1)
        if not slot_spec:
            continue
        slots = list(slot_spec)
        rng.shuffle(slots)  # the batch order changes from step to step
        ctx = _ctx(slots, [seq_len[s] for s in slots], [last_tok[s] for s in slots])
        logits = torch.randn(len(slots), VOCAB) * 2
        out = proc.apply(logits.clone(), ctx)
        specs = [slot_spec[s] for s in slots]
        plain = [None if (sp and "mirostat" in sp) else sp for sp in specs]
        expect = _expected(logits, plain)
        for i, s in enumerate(slots):
            if s in refs and slot_spec[s] and "mirostat" in slot_spec[s]:
                expect[i] = refs[s](logits[i : i + 1])[0]
        assert _same(out, expect)
        for i, s in enumerate(slots):  # sample; the token is fed at the next step
            tok = int(torch.multinomial(torch.softmax(out[i], -1), 1))
            last_tok[s] = tok
            seq_len[s] += 1
            if s in refs and slot_spec[s] and "mirostat" in slot_spec[s]:
                refs[s].observe(torch.tensor([tok]))


def test_v2_a_poisoned_row_stays_in_its_own_request(caplog):
    proc = EntcalLogitsProcessor(None, _req_states(4))
    for slot, spec in enumerate(["top_p=0.5", "typical=0.8", "min_p=0.2"]):
        proc.add_request(slot, _params(spec))
    logits = torch.randn(3, VOCAB) * 2
    logits[1, 3] = float("inf")  # row 1 holds slot 0
    with caplog.at_level("ERROR"):
        out = proc.apply(logits.clone(), _ctx([2, 0, 1], [3, 3, 3], [1, 1, 1]))
    assert "slot 0 failed" in caplog.text
    expect = _expected(logits, ["min_p=0.2", None, "typical=0.8"])
    assert _same(out[[0, 2]], expect[[0, 2]]) and out[1, 3] == float("inf")
    clean = torch.randn(3, VOCAB)
    out = proc.apply(clean.clone(), _ctx([2, 0, 1], [4, 4, 4], [1, 1, 1]))
    assert _same(out, _expected(clean, ["min_p=0.2", None, "typical=0.8"]))


@pytest.mark.parametrize("spec", ROW_SPECS)
@settings(max_examples=6)
@given(x=logits_rows(vocab=VOCAB, max_batch=4))
def test_v2_adapter_keeps_the_contract(spec, x):
    x = x.float()
    n = x.shape[0]
    proc = EntcalLogitsProcessor(None, _req_states(8))
    for slot in range(n):
        proc.add_request(slot, _params(spec))
    slots = list(range(n))[::-1]
    for step in range(2):
        out = proc.apply(x.clone(), _ctx(slots, [3 + step] * n, [1] * n))
        _check_contract(spec, x, out)


def test_v2_declines_rows_without_spec():
    proc = EntcalLogitsProcessor(None, _req_states(4))
    assert proc.add_request(0, _params(None)) is False
    logits = torch.randn(1, VOCAB)
    assert proc.apply(logits, _ctx([0], [3], [1])) is logits


# ------------------------------------------------------------------- validation and registration


def test_validate_accepts_and_rejects():
    assert validate_request(_params(None)) is None
    assert validate_request(_params("top_p=0.5")) == parse("top_p=0.5")
    with pytest.raises(EntcalRequestError) as err:
        validate_request(_params("top_p=2"))
    assert err.value.parameter == "vllm_xargs.entcal" and "top_p" in str(err.value)
    with pytest.raises(EntcalRequestError, match="unknown decoder"):
        validate_request(_params("nonsense"))
    import entcal.calibrators.calibrated  # noqa: F401  (registers ``lookahead``)

    with pytest.raises(EntcalRequestError, match="needs the token history"):
        validate_request(_params("lookahead:alpha=0.3"))  # needs input_ids: not in vLLM
    with pytest.raises(EntcalRequestError, match=r"needs the token history.*target=<"):
        validate_request(_params("anchored"))  # target=prompt reads the prompt: not in vLLM
    assert validate_request(_params("anchored:target=2.5")) == parse("anchored:target=2.5")
    # requests with one vetoed spec share the parsed prototype, never the veto's state
    from entcal.decoding.vllm.request import new_request_decoder

    vetoed = _params("anchored:target=2.5,predictor=shipped")
    first, second = new_request_decoder(vetoed), new_request_decoder(vetoed)
    assert first is not second and first._veto is not second._veto
    with pytest.raises(EntcalRequestError, match="does not exist") as err:
        validate_request(_params("calibrated:predictor=/nonexistent/folder"))
    assert err.value.parameter == "vllm_xargs.entcal"
    with pytest.raises(EntcalRequestError, match="must be a decoder spec string"):
        validate_request(SamplingParams(extra_args={"entcal": 3}))
    for field, value in [
        ("temperature", 0.7),
        ("temperature", 0.0),
        ("top_p", 0.9),
        ("top_k", 5),
        ("min_p", 0.1),
        ("repetition_penalty", 1.2),
        ("presence_penalty", 0.5),
        ("frequency_penalty", 0.5),
    ]:
        params = SamplingParams(**{field: value}, extra_args={"entcal": "top_p=0.5"})
        with pytest.raises(EntcalRequestError) as err:
            validate_request(params)
        assert err.value.parameter == field
        # the same field is fine without an entcal spec
        assert validate_request(SamplingParams(**{field: value})) is None
    # constraints and seeds are allowed with a spec
    ok = SamplingParams(
        seed=3, top_k=-1, logit_bias={5: -1.0}, min_tokens=2, extra_args={"entcal": "min_p=0.1"}
    )
    assert validate_request(ok) == parse("min_p=0.1")


def test_dispatch_by_runner_and_plugin_stands_aside():
    v1 = EntcalLogitsProcessor(None, CPU, False)
    assert isinstance(v1, EntcalV1LogitsProcessor) and isinstance(v1, V1Interface)
    assert issubclass(EntcalLogitsProcessor, V1Interface)
    assert issubclass(EntcalLogitsProcessor, V2Interface)

    class _ModelConfig:
        logits_processors: ClassVar[list] = ["entcal.decoding.vllm.processor:EntcalLogitsProcessor"]

    class _Config:
        model_config = _ModelConfig()

    assert EntcalPluginLogitsProcessor(_Config(), CPU, False).active is False
    assert EntcalPluginLogitsProcessor(None, CPU, False).active is True
    _ModelConfig.logits_processors = [EntcalLogitsProcessor]
    assert EntcalPluginLogitsProcessor(_Config(), _req_states(2)).active is False
    # an inactive (standing aside) processor never touches a row
    quiet = EntcalPluginLogitsProcessor(_Config(), CPU, False)
    quiet.update_state(BatchUpdate(1, [], [(0, _params("top_k=1"), [1], [])], []))
    logits = torch.randn(1, VOCAB)
    assert quiet.apply(logits) is logits


def test_entry_point_is_guarded():
    """If entcal's processor cannot be imported, the entry point still loads: an inert processor
    that passes plain requests and rejects entcal requests with the reason."""
    code = (
        "import sys; sys.modules['entcal.decoding.vllm.processor'] = None\n"
        "from importlib.metadata import entry_points\n"
        "ep = [e for e in entry_points(group='vllm.logits_processors') if e.name == 'entcal'][0]\n"
        "cls = ep.load()\n"
        "from vllm import SamplingParams\n"
        "from vllm.v1.sample.logits_processor import LogitsProcessor\n"
        "assert issubclass(cls, LogitsProcessor), cls\n"
        "cls.validate_params(SamplingParams())\n"
        "p = cls(None, 'cpu', False); import torch; x = torch.zeros(1, 3)\n"
        "assert p.apply(x) is x\n"
        "try:\n"
        "    cls.validate_params(SamplingParams(extra_args={'entcal': 'top_k=1'}))\n"
        "except ValueError as e:\n"
        "    print('REJECTED', e)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "REJECTED" in res.stdout and "failed to load" in res.stdout
    from entcal.decoding.vllm import plugin as vllm_plugin

    assert vllm_plugin.load_error is None
    assert vllm_plugin.plugin is EntcalPluginLogitsProcessor


def _sleep_forever() -> None:
    import time

    time.sleep(600)


def test_shutdown_engine_recovers_from_vllms_kill_race():
    """vLLM's force-kill loop names each child before killing it, so a child that exits in
    between raises psutil.NoSuchProcess and the engine process is never killed (seen in CI
    teardown on a busy CPU). shutdown_engine catches that error and kills and reaps the engine
    processes still alive, then runs the client's cleanup. The race itself cannot be timed, so
    the client here raises it; the engine process is a real child process."""
    import multiprocessing

    import psutil

    from entcal.decoding.vllm.engine import shutdown_engine

    proc = multiprocessing.get_context("spawn").Process(target=_sleep_forever, daemon=True)
    proc.start()
    cleaned = []

    class Resources:
        engine_manager = type("Manager", (), {"processes": [proc]})()

        def __call__(self):
            cleaned.append(True)

    class Client:
        resources = Resources()

        def shutdown(self):
            raise psutil.NoSuchProcess(123456, "gone")

    llm = type("LLM", (), {"llm_engine": type("Engine", (), {"engine_core": Client()})()})()
    shutdown_engine(llm)
    assert not proc.is_alive() and proc.exitcode is not None
    assert cleaned == [True]

    class Failing:
        def shutdown(self):
            raise RuntimeError("another error")

    llm.llm_engine.engine_core = Failing()
    with pytest.raises(RuntimeError, match="another error"):  # only the race is swallowed
        shutdown_engine(llm)
