"""unlearning-audit: is "forgotten" knowledge really gone from an unlearned LLM, or only hidden?

The science and the artifact store as plain Python (this package never imports Prefect): the
embedded corpus and model, unlearning methods, relearning, evaluation, activations, metrics,
probes, quantization, the verdict and the reports. Prefect tasks and flows live beside it in
tasks/ and flows/.
"""

__version__ = "0.1.0"
