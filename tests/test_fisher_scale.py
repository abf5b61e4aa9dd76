"""The Fisher at scale: chosen layers, passes of any size, its own out-of-memory fallback (halve
the pass, down to one sample, then a failure naming the memory one sample needs), storage
in bfloat16, and an audit that goes on when the Fisher stage fails.

Out of memory is a real condition here, not a mock: the checkpoints' own model code
(memory_limited.py) runs out of memory above a number of samples at once.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from memory_limited import MemoryLimitedLlama
from prefect import flow
from test_metrics_fisher_weights import batches, tiny_llama

from flows.audit import audit_checkpoint
from tasks._stage import FAULTS_ENV, load_inputs
from tasks.data import prepare_data
from tasks.fisher import (
    MODEL_SUMMARY,
    STORED_DTYPE,
    SUMMARY,
    diagonal,
    fisher,
    read_fisher,
    read_fisher_summary,
)
from tasks.metrics import TABLE
from tasks.report import fisher_status
from unlearning_audit import checkpoints, corpus, data, embedded, plan
from unlearning_audit.config import DataConfig, EmbeddedConfig
from unlearning_audit.metrics import (
    fisher_diagonal,
    fisher_summary,
    fisher_weighted_distance,
    layer_parameters,
    table,
)
from unlearning_audit.metrics.fisher import SampleDoesNotFit, SamplesPerPass, bytes_per_sample
from unlearning_audit.preflight import preflight
from unlearning_audit.report import fisher_line
from unlearning_audit.store import ArtifactRef, Store

STAGE_BATCH = 16
"""The Fisher stage's default batch size (the stages here run with it unless they say)."""

pytestmark = [
    pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning"),
    pytest.mark.usefixtures("one_torch_thread"),
]

ROWS = 24  # forget rows the stage tests' Fisher reads
TINY = EmbeddedConfig(hidden_size=32, intermediate_size=64, layers=2, heads=2, vocab_size=256)
"""The small untrained model whose Fisher the stage tests compute, and its embedded data."""
BF16_ROUNDING = 2.0**-8
"""The largest relative error of rounding a float32 value to bfloat16 (8 significant bits)."""


def limited(model: torch.nn.Module, max_samples: int) -> MemoryLimitedLlama:
    """``model``'s weights in a Llama that runs out of memory above ``max_samples`` samples."""
    config = model.config.to_dict() | {"max_samples": max_samples}
    copy = MemoryLimitedLlama(type(model.config).from_dict(config)).to(model.dtype)
    copy.load_state_dict(model.state_dict())
    return copy


# -- the computation: passes of any size, halved on out-of-memory ---------------------------


def test_passes_of_any_size_give_the_values_of_whole_batches() -> None:
    model = tiny_llama()
    whole = fisher_diagonal(model, batches())
    for size in (1, 2, 64):
        passes = SamplesPerPass(size)
        values = fisher_diagonal(model, batches(), passes=passes)
        assert passes == SamplesPerPass(size)  # nothing ran out of memory
        for layer in whole:
            torch.testing.assert_close(values[layer], whole[layer], rtol=1e-12, atol=0)


def test_out_of_memory_halves_the_pass_and_keeps_the_values() -> None:
    model = tiny_llama()
    whole = fisher_diagonal(model, batches())
    passes = SamplesPerPass(8)  # the first batch has 3 samples: 3 > 2 fails, as does 4 -> 3
    values = fisher_diagonal(limited(model, 2), batches(), passes=passes)
    assert passes == SamplesPerPass(size=2, halvings=2)
    for layer in whole:
        torch.testing.assert_close(values[layer], whole[layer], rtol=1e-12, atol=0)
    with pytest.raises(torch.cuda.OutOfMemoryError, match="3 samples at once, room for 2"):
        fisher_diagonal(limited(model, 2), batches())  # without passes: raised as it came


def test_one_sample_out_of_memory_says_what_one_sample_needs() -> None:
    model = tiny_llama()
    chosen = sum(p.numel() for _, p in layer_parameters(model)[2])
    with pytest.raises(SampleDoesNotFit) as raised:
        fisher_diagonal(limited(model, 0), batches(), layers=[2], passes=SamplesPerPass(4))
    assert raised.value.parameters == chosen and raised.value.bytes == 8 * chosen
    assert f"the chosen layers hold {chosen:,} parameters" in str(raised.value)
    assert f"about {8 * chosen / 2**20:.2f} MiB per sample (parameters x 4 bytes x 2)" in str(
        raised.value
    )
    assert "about 52.15 GiB per sample" in str(SampleDoesNotFit(7 * 10**9))  # a 7B model's


# -- the stage: layers in the key, batch size not; the fallback's manifest; skipping --------


@pytest.fixture(scope="module")
def stages(prefect_server, tmp_path_factory) -> dict:
    """A store with the embedded data, three checkpoints of one small untrained model (as it
    is, and with room for 2 and for 0 samples at once: its own model code), and the Fisher
    stages the tests read, run in one flow."""
    config = TINY
    facts, _ = corpus.embedded(config)
    tokenizer = embedded.train_tokenizer(facts, config.vocab_size)
    model = embedded.build_model(tokenizer, config)
    store = Store(str(tmp_path_factory.mktemp("fisher-store")))

    def stored(max_samples: int | None) -> ArtifactRef:
        def build(out: Path) -> None:
            checkpoints.save(model, tokenizer, out)
            if max_samples is not None:
                shutil.copy(Path(__file__).with_name("memory_limited.py"), out)
                settings = json.loads((out / "config.json").read_text())
                settings["auto_map"] = {"AutoModelForCausalLM": "memory_limited.MemoryLimitedLlama"}
                settings["max_samples"] = max_samples
                (out / "config.json").write_text(json.dumps(settings))

        return store.cached("checkpoint", {"max_samples": max_samples}, {}, "v", build)[0]

    refs = {name: stored(room) for name, room in (("plain", None), ("room2", 2), ("room0", 0))}
    return {"store": store, **refs, **_fisher_stages(store.url, config, refs)}


@flow
def _fisher_stages(
    store: str, config: EmbeddedConfig, models: dict[str, ArtifactRef]
) -> dict[str, ArtifactRef]:
    """The data stage, and the Fisher stages the tests read, as the audit calls them (on the
    CPU, trusting the test's model code); each one's artifact, also where served from the
    store."""
    data_ref = prepare_data(store, DataConfig(), config, return_state=True).result()

    def run(model: str, **options):
        return fisher(
            store,
            models[model],
            data_ref,
            max_rows=ROWS,
            device="cpu",
            trust_remote_code=True,
            return_state=True,
            **options,
        )

    return {
        "data": data_ref,
        "every": run("plain").result(),
        "some": run("plain", layers=[1, 3]).result(),
        "batch3": run("plain", batch_size=3).result(),
        "room2": run("room2", batch_size=8).result(),
        "room0": run("room0", layers=[0]),  # a failed state
        "summary": run("plain", summary_only=True).result(),
    }


def test_chosen_layers_are_the_all_layer_values_and_part_of_the_key(stages) -> None:
    store, every, some = stages["store"], stages["every"], stages["some"]
    assert some.key != every.key
    assert store.manifest(some.key)["meta"]["layers"] == [1, 3]
    all_values, some_values = read_fisher(store, every), read_fisher(store, some)
    assert sorted(all_values) == [0, 1, 2, 3] and sorted(some_values) == [1, 3]
    for layer in some_values:
        assert torch.equal(some_values[layer], all_values[layer])


def test_batch_size_is_no_part_of_the_key(stages) -> None:
    assert stages["batch3"] == stages["every"]  # served from the store


def test_out_of_memory_halves_the_pass_and_the_manifest_records_it(stages) -> None:
    store, ref = stages["store"], stages["room2"]
    meta = store.manifest(ref.key)["meta"]
    assert (meta["batch_size"], meta["samples_per_pass"], meta["oom_halvings"]) == (8, 2, 2)
    plain, values = read_fisher(store, stages["every"]), read_fisher(store, ref)
    assert sorted(values) == sorted(plain)
    for layer in plain:  # the same float32 values up to rounding, then one bfloat16 rounding
        torch.testing.assert_close(values[layer], plain[layer], rtol=2 * BF16_ROUNDING, atol=0)


def test_one_sample_out_of_memory_fails_at_once_and_stores_nothing(stages) -> None:
    """No pass size helps: the stage fails on its first try (a ValueError is not retried) with
    the memory one sample needs and the settings that help, and nothing is stored under its
    key (a rerun with more memory computes it); the report says the audit went on without."""
    store, state = stages["store"], stages["room0"]
    assert state.is_failed()
    reason = state.message
    assert len(list(store.manifests("fisher"))) == 4  # every, some (= batch3), room2, summary
    model, *_ = load_inputs(store, stages["plain"], stages["data"], "cpu")
    embedding = model.get_input_embeddings().weight.numel()
    assert f"about {bytes_per_sample(embedding) / 2**20:.2f} MiB per sample" in reason
    for setting in ("--fisher-layers", "a GPU with more memory", "--no-fisher"):
        assert setting in reason
    assert "--gpus" not in reason  # the stage runs on one GPU, whatever --gpus says
    audit = {"fisher": {"layers": [0]}}
    failed = {"ref": None, "failed": reason}
    run = {"label": "GA", "fisher": {"original": failed, "unlearned": failed}}
    status = fisher_status(store, audit, [run])
    went_on = f"failed, the audit went on without it ({reason})"
    assert status["missing"] == {"original": went_on, "GA": went_on}
    assert fisher_line({"fisher": status}) == (
        "Fisher: diagonal empirical Fisher on the forget set, layers 0, stored in bfloat16; "
        f"none for original: {went_on}; GA: {went_on}"
    )


# -- storage in bfloat16 --------------------------------------------------------------------


def test_bfloat16_keeps_tiny_values_that_float16_would_flush_to_zero() -> None:
    values = torch.tensor([3e-30, 1e-20, 1e-12, 1e-6, 1.0, 1e3])
    stored = values.to(STORED_DTYPE).float()
    assert ((stored - values).abs() <= BF16_ROUNDING * values).all()
    assert (values.half().float()[:3] == 0).all()  # what float16 would have stored


def test_summaries_and_rows_of_the_stored_fisher_match_float32(stages) -> None:
    """The stored Fisher against the stage's own computation in float32, on the same rows."""
    store, checkpoint, data_ref = (stages[k] for k in ("store", "plain", "data"))
    stored = read_fisher(store, stages["every"])
    model, fmt, sets, _ = load_inputs(store, checkpoint, data_ref, "cpu")
    rows = data.sample(sets["forget"], ROWS)
    exact = fisher_diagonal(
        model, (data.train_batch(fmt, c) for c in data.chunks(rows, STAGE_BATCH))
    )
    assert store.manifest(stages["every"].key)["meta"]["stored_dtype"] == str(STORED_DTYPE)
    for layer in exact:
        assert stored[layer].dtype == torch.float32
        torch.testing.assert_close(stored[layer], exact[layer], rtol=BF16_ROUNDING, atol=0)
    ours, theirs = fisher_summary(stored, stored), fisher_summary(exact, exact)
    for layer, entry in theirs.items():
        for key in ("mean", "q50", "q90", "q99"):
            assert ours[layer][key] == pytest.approx(entry[key], rel=BF16_ROUNDING)
        near_edges = _near_decade_edges(exact[layer])
        moved = sum(
            abs(a - b) for a, b in zip(ours[layer]["log10_hist"], entry["log10_hist"], strict=True)
        )
        assert moved <= 2 * near_edges  # only values within the rounding of an edge move
    candidate = _perturbed(model)
    distance_stored = fisher_weighted_distance(stored, candidate, model)
    distance_exact = fisher_weighted_distance(exact, candidate, model)
    rows_stored = table.fisher_rows(stored, fisher_summary(stored), distance_stored)
    rows_exact = table.fisher_rows(exact, fisher_summary(exact), distance_exact)
    assert [r["metric"] for r in rows_stored] == [r["metric"] for r in rows_exact]
    for ours_row, exact_row in zip(rows_stored, rows_exact, strict=True):  # a ratio: two means
        assert ours_row["value"] == pytest.approx(exact_row["value"], rel=2 * BF16_ROUNDING)


def _near_decade_edges(values: torch.Tensor) -> int:
    """How many values lie within bfloat16's rounding of a power of ten."""
    logs = values.double().clamp(min=1e-30).log10()
    return int(((logs - logs.round()).abs() < BF16_ROUNDING / 2.302).sum())


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` with every weight moved by a seeded 1% noise."""
    import copy

    generator = torch.Generator().manual_seed(0)
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for param in moved.parameters():
            param.mul_(1 + 0.01 * torch.randn(param.shape, generator=generator))
    return moved


# -- configuration and the flow ---------------------------------------------------------------


def test_fisher_layers_beyond_the_model_are_refused_before_anything_loads(small_audit, tmp_path):
    """The embedded model of two blocks: Fisher layers 0 to 3 (3: the final norm and head),
    activation layers 0 to 2, splice depths 1 to 2."""
    params = small_audit.model_copy(
        update={
            "store": str(tmp_path / "store"),
            "fisher_layers": [3, 4],
            "layers": [2, 3],
            "splice_depths": [2, 3],
        }
    )
    with pytest.raises(ValueError) as refused:
        preflight(params)
    assert "fisher_layers: [4] do not exist; the model has layers 0 to 3" in str(refused.value)
    assert "layers: [3] do not exist; the model has layers 0 to 2" in str(refused.value)
    assert "splice_depths: [3] do not exist; the model has blocks 1 to 2" in str(refused.value)
    preflight(params.model_copy(update={"fisher_layers": [3], "layers": [2], "splice": False}))


def test_a_failing_fisher_stage_does_not_stop_the_audit(
    prefect_server, small_audit, tmp_path, monkeypatch
):
    """The original's Fisher fails on every attempt: the audit completes, its metrics have no
    Fisher rows, and the report says that the Fisher failed and the audit went on."""
    faults = tmp_path / "faults.json"
    faults.write_text(json.dumps({"fisher": ["error"] * (fisher.retries + 1)}))
    monkeypatch.setenv(FAULTS_ENV, str(faults))
    params = small_audit.model_copy(update={"store": str(tmp_path / "store"), "name": "fisher"})
    result = audit_checkpoint(params)
    assert json.loads(faults.read_text()) == {"fisher": []}
    text = Path(result["report_file"]).read_text()
    assert (
        "- Fisher: diagonal empirical Fisher on the forget set, every layer, stored in "
        "bfloat16; none for original: failed, the audit went on without it ("
    ) in text
    assert "injected failure of fisher" in text
    store = Store(params.store)
    (stored,) = store.manifests("fisher")  # the unlearned model's, computed
    assert stored["meta"]["stored_dtype"] == str(STORED_DTYPE)
    for manifest in store.manifests("metrics"):
        with store.open(ArtifactRef(key=manifest["key"], hash=manifest["hash"]), TABLE) as f:
            assert not [r for r in table.read(f) if r["metric"].startswith("fisher")]


def test_a_summary_only_fisher_stores_the_summary_the_metrics_read(stages) -> None:
    """An unlearned model's Fisher is stored as its summary (no values: 13 GB a model at 7B),
    equal to the summary of the values the stage computes, under its own key."""
    store, ref = stages["store"], stages["summary"]
    assert set(store.manifest(ref.key)["files"]) == {SUMMARY, MODEL_SUMMARY}
    assert ref.key != stages["every"].key
    model, fmt, sets, _ = load_inputs(store, stages["plain"], stages["data"], "cpu")
    rows = data.sample(sets["forget"], ROWS)
    exact = fisher_diagonal(
        model, (data.train_batch(fmt, c) for c in data.chunks(rows, STAGE_BATCH))
    )
    summary, expected = read_fisher_summary(store, ref), fisher_summary(exact)
    assert sorted(summary) == sorted(expected)
    for layer, entry in expected.items():
        assert summary[layer]["log10_hist"] == entry["log10_hist"]
        for key in ("mean", "q50", "q90", "q99"):
            assert summary[layer][key] == pytest.approx(entry[key], rel=1e-9)


def test_the_stage_stores_the_model_fisher_summary_beside_the_empirical_one(stages) -> None:
    """The model's Fisher (one label draw per row, the stage's seed) is stored as its summary,
    equal to the summary of the same draws computed here, and differs from the empirical one."""
    store, ref = stages["store"], stages["every"]
    meta = store.manifest(ref.key)["meta"]
    assert (meta["model_samples"], meta["seed"]) == (1, 0)
    model, fmt, sets, _ = load_inputs(store, stages["plain"], stages["data"], "cpu")
    rows = data.sample(sets["forget"], ROWS)
    drawn = fisher_diagonal(
        model,
        (data.train_batch(fmt, c) for c in data.chunks(rows, STAGE_BATCH)),
        labels="model",
        samples=1,
        seed=0,
    )
    summary = read_fisher_summary(store, ref, "model")
    empirical = read_fisher_summary(store, ref)
    assert sorted(summary) == sorted(drawn) == sorted(empirical)
    for layer, values in drawn.items():
        assert summary[layer]["mean"] == pytest.approx(float(values.double().mean()), rel=1e-9)
        assert summary[layer]["mean"] != pytest.approx(empirical[layer]["mean"], rel=1e-3)
    assert read_fisher_summary(store, stages["some"], "model").keys() == {1, 3}


# -- the pass size: chosen for the device, never changing the values ------------------------


def test_the_model_fisher_does_not_depend_on_the_batches_or_passes(stages) -> None:
    """The stage's computation (tasks.fisher.diagonal) in data batches of 16 rows with passes
    of 16, 3 and 1 samples, and in data batches of 5 rows: the same label draws, so the same
    model Fisher up to float summation order (24 rows: two data batches, or five). Neither
    size is in the stage's key."""
    model, fmt, sets, _ = load_inputs(stages["store"], stages["plain"], stages["data"], "cpu")
    rows = data.sample(sets["forget"], ROWS)
    assert len(rows) > STAGE_BATCH
    runs = [
        diagonal(model, fmt, rows, None, batch, SamplesPerPass(size), "model", 1, 0)
        for batch, size in ((STAGE_BATCH, 16), (STAGE_BATCH, 3), (STAGE_BATCH, 1), (5, 5))
    ]
    for values in runs[1:]:
        assert sorted(values) == sorted(runs[0])
        for layer, expected in runs[0].items():
            torch.testing.assert_close(values[layer], expected, rtol=1e-5, atol=1e-12)


def test_the_stage_starts_at_the_pass_size_its_device_fits(stages, tmp_path, monkeypatch) -> None:
    """A device budget whose share auto aims at (plan.auto_budget) is the plan's Fisher
    estimate at 3 samples per pass (the loaded model's shape, its rows' longest rendering):
    the stage passes 3 samples at a time without running
    out of memory, records it, and stores the values (empirical and the model's) of the
    unconstrained stage, which passed 16."""
    model, fmt, sets, _ = load_inputs(stages["store"], stages["plain"], stages["data"], "cpu")
    shape = plan.model_shape(model)
    seq = plan.sequence_length(fmt, {"forget": data.sample(sets["forget"], ROWS)})
    three = plan.fisher_estimate(shape, 3, None, seq).peak
    budget = math.ceil(three / plan.AUTO_SHARE)
    assert three <= plan.auto_budget(budget) < plan.fisher_estimate(shape, 4, None, seq).peak
    monkeypatch.setenv(plan.DEVICE_MEMORY_ENV, str(budget))
    store = Store(str(tmp_path / "store"))
    plain = stages["store"].local_dir(stages["plain"])

    def copy(out: Path) -> None:
        shutil.copytree(plain, out, dirs_exist_ok=True)

    checkpoint = store.cached("checkpoint", {"max_samples": None}, {}, "v", copy)[0]
    ref = _constrained(store.url, checkpoint)
    meta = store.manifest(ref.key)["meta"]
    assert (meta["batch_size"], meta["samples_per_pass"], meta["oom_halvings"]) == (16, 3, 0)
    assert stages["store"].manifest(stages["every"].key)["meta"]["samples_per_pass"] == 16
    expected, values = read_fisher(stages["store"], stages["every"]), read_fisher(store, ref)
    assert sorted(values) == sorted(expected)
    for layer in expected:
        torch.testing.assert_close(values[layer], expected[layer], rtol=2 * BF16_ROUNDING, atol=0)
    drawn = read_fisher_summary(store, ref, "model")
    for layer, entry in read_fisher_summary(stages["store"], stages["every"], "model").items():
        assert drawn[layer]["mean"] == pytest.approx(entry["mean"], rel=1e-5)


@flow
def _constrained(store: str, checkpoint: ArtifactRef) -> ArtifactRef:
    """The data stage and the Fisher stage on ``checkpoint``, as _fisher_stages runs them."""
    data_ref = prepare_data(store, DataConfig(), TINY)
    return fisher(store, checkpoint, data_ref, max_rows=ROWS, device="cpu", trust_remote_code=True)
