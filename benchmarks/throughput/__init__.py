"""The pieces of ``python -m benchmarks.effects_throughput``, one job each:

- ``setup``: the model, SAE, vectors and effect settings a run measures (a params file, or the
  tiny model for ``--smoke``); ``gemma``: the same for a Gemma-2-2B-shaped model with random weights;
- ``reference_loop``: (a), the reference's one-vector loop (its scale sweep of full forwards, then
  ``saets_utils.effects.reference.reference_effects`` with TransformerLens's own sampler);
- ``our_path``: (b), ``calibrate`` + ``measure_effects`` on a block, as notebook 01 calls them;
- ``work``: what each call costs in tokens through the model, for the FLOP estimate;
- ``machine``: a raw batched forward for comparison, the CUDA warm-up, ``--profile``;
- ``report``: the ratios, the printed report and the JSON result.
"""
