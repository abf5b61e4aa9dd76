"""Quantization's references in a whole audit: the original and the never-learned control are
evaluated quantized once per audit, and the verdict and the report read them."""

from __future__ import annotations


def test_the_audit_quantizes_the_original_and_the_control_beside_the_unlearned(first_run):
    state, _ = first_run
    result = state.result()
    (row,) = result["rows"]
    for bits in ("8", "4"):
        for key in (f"forget_q{bits}", f"forget_q{bits}_original", f"forget_q{bits}_control"):
            assert 0.0 <= row[key] <= 1.0, key
        assert isinstance(row[f"q{bits}_recovered"], bool)
    with open(result["report_file"]) as f:
        text = f.read()
    for bits in ("8", "4"):
        (line,) = [x for x in text.splitlines() if x.startswith(f"- {bits}-bit quantization")]
        assert "the never-learned control" in line and "the original" in line
        assert f"-> {row[f'forget_q{bits}_control']:.2f}" in line
        assert f"-> {row[f'forget_q{bits}_original']:.2f}" in line
        assert "recovery under quantization" in line
