"""Linear-probe training time per layer against the extraction it rests on (embedded model).

Extraction: one forward pass over the forget and retain samples capturing every layer to
Parquet. Probe: per layer, the retain-trained probe on forget rows, its permutation baseline
(5 shuffles) and 5-fold cross-validation, for every attribute. Not run in CI.

    python bench/bench_probes.py [--rows 200]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from unlearning_audit import activations, corpus, data, embedded, probes, runtime
from unlearning_audit.config import EmbeddedConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200)
    args = parser.parse_args()
    runtime.setup(0, "cpu")
    config = EmbeddedConfig()
    facts, forget = corpus.embedded(config)
    sets = data.embedded_sets(facts, forget, "text")
    rows = {name: data.sample(sets[name], args.rows) for name in ("forget", "retain")}
    labelled = {name: [{**r, "label": r["answer"]} for r in rs] for name, rs in rows.items()}
    tokenizer = embedded.train_tokenizer(facts, config.vocab_size)
    model = embedded.build_model(tokenizer, config).eval()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        summary = activations.extract(model, tokenizer, rows, Path(tmp))
        extract_s = time.perf_counter() - start
        probe_s = []
        for layer in summary["layers"]:
            X = {
                n: activations.read_layer(activations.layer_path(Path(tmp), n, layer)) for n in rows
            }
            start = time.perf_counter()
            probes.probe_layer(
                X["retain"], labelled["retain"], X["forget"], labelled["forget"], label="label"
            )
            probe_s.append(time.perf_counter() - start)
    n = sum(map(len, rows.values()))
    print("| step | seconds | per layer | ratio to extraction |\n|---|---|---|---|")
    print(
        f"| extract {n} rows, {len(summary['layers'])} layers | {extract_s:.3f} | "
        f"{extract_s / len(probe_s):.3f} | 1.0 |"
    )
    per_layer = sum(probe_s) / len(probe_s)
    print(
        f"| probes (fit + 5 permutations + 5-fold CV, per attribute) | {sum(probe_s):.3f} | "
        f"{per_layer:.3f} | {sum(probe_s) / extract_s:.1f} |"
    )


if __name__ == "__main__":
    main()
