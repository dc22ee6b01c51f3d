"""The SAE itself, and nothing about where its activations come from.

Modules, bottom up: ``seeding`` (named random streams), ``distributed`` (torchrun helpers),
``progress`` (bars), ``storage`` (cache root, content keys, atomic writes), ``hooks`` (hook-name
parsing), ``allocation`` (the rules and their registry), ``sae`` (the model), ``losses``,
``objectives`` (what an SAE minimises), ``checkpoints`` (saving SAEs and training state),
``training`` (the one SAE trainer), ``metrics``, ``synthetic`` (data with a known dictionary) and
``saelens_io`` (SAELens's folder layout). Nothing here imports from the layers above.
"""
