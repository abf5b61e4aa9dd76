"""Activation extraction: hooks, masked-mean pooling, per-token rows, Parquet round trip."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from unlearning_audit import activations, corpus, data, embedded, prompts


@pytest.fixture(scope="module")
def small(tiny):
    torch.manual_seed(0)
    facts = corpus.generate(0, {"text": 6, "math": 2})
    tok = embedded.train_tokenizer(facts, 300)
    model = embedded.build_model(tok, tiny.model_copy(update={"layers": 3})).eval()
    rows = [{"question": f.question, "answer": f.answer} for f in facts]
    return model, prompts.renderer(tok), rows


def test_pooled_activations_equal_masked_means_of_hidden_states(small, tmp_path):
    model, fmt, rows = small
    summary = activations.extract(
        model, fmt, {"probe": rows}, tmp_path, batch_size=7, flush_rows=10
    )
    assert summary["layers"] == [0, 1, 2, 3]
    batch = data.prompt_batch(fmt, rows)  # one batch: different padding than extraction used
    with torch.no_grad():
        states = model(**batch, output_hidden_states=True).hidden_states
    mask = batch["attention_mask"].unsqueeze(-1).float()
    for layer in (0, 1, 2):  # hidden_states[3] is after the final norm, not the block output
        expected = ((states[layer] * mask).sum(1) / mask.sum(1)).numpy()
        got = activations.read_layer(activations.layer_path(tmp_path, "probe", layer))
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    table = pq.read_table(activations.layer_path(tmp_path, "probe", 3))
    assert table.column("row").to_pylist() == list(range(len(rows)))
    assert table.schema.field("activation").type.list_size == model.config.hidden_size


def test_per_token_rows_cover_every_real_token_and_no_pad(small, tmp_path):
    model, fmt, rows = small
    activations.extract(
        model,
        fmt,
        {"probe": rows},
        tmp_path,
        layers=[2],
        per_token=True,
        dtype="float16",
        batch_size=5,
    )
    table = pq.read_table(activations.layer_path(tmp_path, "probe", 2))
    lengths = data.prompt_batch(fmt, rows)["attention_mask"].sum(1).tolist()
    assert table.num_rows == sum(lengths)
    assert np.bincount(table.column("row").to_numpy()).tolist() == lengths
    assert activations.read_layer(activations.layer_path(tmp_path, "probe", 2)).dtype == np.float16
    assert not (tmp_path / "probe" / "layer=1.parquet").exists()


def test_streamed_batches_equal_the_whole_file(small, tmp_path):
    model, fmt, rows = small
    activations.extract(model, fmt, {"probe": rows}, tmp_path, layers=[1])
    path = activations.layer_path(tmp_path, "probe", 1)
    streamed = np.concatenate(list(activations.iter_layer(path, batch_rows=4)))
    np.testing.assert_array_equal(streamed, activations.read_layer(path))


def test_a_layer_that_does_not_exist_is_named(small, tmp_path):
    model, fmt, rows = small
    with pytest.raises(ValueError, match=r"layer index \[7\] does not exist"):
        activations.extract(model, fmt, {"probe": rows}, tmp_path, layers=[1, 7])


def test_a_failed_write_is_raised_and_every_file_is_closed(tmp_path):
    """Rows of the wrong width fail in a writer thread; close() raises that failure and still
    closes every layer's file, and many flushes keep each file's rows in order."""
    schema = activations.activation_schema(4, "float32", per_token=False)
    writers = activations.LayerWriters(tmp_path, "probe", [0, 1, 2], schema, 6, threads=3)
    for start in range(0, 60, 3):
        values = {layer: np.full((3, 4), start + layer, np.float32) for layer in (0, 1, 2)}
        writers.add([pa.array(np.arange(start, start + 3))], values)
    writers.close()
    for layer in (0, 1, 2):
        table = pq.read_table(activations.layer_path(tmp_path, "probe", layer))
        assert table.column("row").to_pylist() == list(range(60))
    failing = activations.LayerWriters(tmp_path, "bad", [0, 1], schema, 2)
    too_wide = np.zeros((2, 5), np.float32)
    failing.add([pa.array([0, 1])], {0: np.zeros((2, 4), np.float32), 1: too_wide})
    with pytest.raises(pa.ArrowException):
        failing.close()
    assert not any(writer.is_open for writer in failing.writers.values())
