"""Activation extraction: hooks, masked-mean pooling, per-token rows, Parquet round trip."""

from __future__ import annotations

import archs
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from unlearning_audit import activations, corpus, data, embedded, layers, prompts

ROWS = [
    {"question": "Where was Ada Quill born?", "answer": "Bergen"},
    {"question": "What did Ada Quill write in the year she moved to the coast?", "answer": "A"},
    {"question": "Which prize?", "answer": "Booker"},
    {"question": "Who taught Ada Quill to sail, and where?", "answer": "Her aunt, in Bergen"},
    {"question": "When?", "answer": "1901"},
]


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


def pooled_after_the_pass(net, fmt, rows, chosen, per_token, batch_size):
    """The extraction before the hooks pooled: every chosen layer's full output kept through the
    pass, then stacked (L, b, t, d) and pooled."""
    modules = [net.get_input_embeddings(), *layers.decoder_blocks(net)[1]]
    outputs = {}

    def keep(layer):
        def hook(module, args, output):
            outputs[layer] = output[0] if isinstance(output, tuple) else output

        return hook

    handles = [modules[layer].register_forward_hook(keep(layer)) for layer in chosen]
    parts = {layer: [] for layer in chosen}
    try:
        for chunk in data.chunks(rows, batch_size):
            batch = data.prompt_batch(fmt, chunk)
            mask = batch["attention_mask"]
            with torch.no_grad():
                net(input_ids=batch["input_ids"], attention_mask=mask)
            hidden = torch.stack([outputs[layer] for layer in chosen]).float()
            if per_token:
                values = hidden[:, mask.bool()]
            else:
                m = mask[None, :, :, None].to(hidden.dtype)
                values = (hidden * m).sum(2) / m.sum(2).clamp(min=1)
            for layer, value in zip(chosen, values.numpy(), strict=True):
                parts[layer].append(value)
    finally:
        for handle in handles:
            handle.remove()
    return {layer: np.concatenate(part) for layer, part in parts.items()}


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "gemma"])
@pytest.mark.parametrize("per_token", [False, True])
def test_pooling_in_the_hooks_stores_what_pooling_after_the_pass_stored(arch, per_token, tmp_path):
    """Each hook pools its layer at once instead of keeping it until the pass ends: the stored
    values are bit for bit those of the old path (block outputs as tensors or tuples, GPT-2's
    and OPT's own embeddings), with padding in every batch but the last."""
    tok = archs.tokenizer([r["question"] + " " + r["answer"] for r in ROWS] * 3)
    net, fmt = archs.model(arch, tok), prompts.renderer(tok)
    activations.extract(
        net,
        fmt,
        {"probe": ROWS},
        tmp_path,
        layers=[0, 1, 2],
        per_token=per_token,
        batch_size=2,
        flush_rows=3,
    )
    expected = pooled_after_the_pass(net, fmt, ROWS, [0, 1, 2], per_token, batch_size=2)
    for layer in (0, 1, 2):
        stored = activations.read_layer(activations.layer_path(tmp_path, "probe", layer))
        np.testing.assert_array_equal(stored, expected[layer])


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
