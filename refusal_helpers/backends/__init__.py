"""The same experiment through other interpretability libraries, checked against the main path.

The main path of this package puts plain PyTorch hooks on the Hugging Face model (see
`refusal_helpers.interventions`). These modules redo its steps with the two libraries learners are
most likely to meet, on the model a `ChatModel` already holds (nothing is downloaded):

- `refusal_helpers.backends.transformer_lens`: TransformerLens 4.x's `TransformerBridge`
  (mean activations with ``run_with_cache``, directional ablation as ``fwd_hooks``, generation);
- `refusal_helpers.backends.nnsight`: nnsight 0.8's `TransformersModel` (mean activations with
  ``.save()``, ablated generation with ``tracer.iter``, and how the same trace runs on NDIF).

Each backend imports its library only when one of its functions is called, so
``import refusal_helpers`` stays light. ``tests/test_backends.py`` checks every function against the
main path: equal means, and greedy completions equal token for token.
"""
