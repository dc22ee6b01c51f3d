"""What SAEs are trained on: models, corpora and the activations harvested from them.

``corpora`` (offline text), ``language_models`` (SmolLM2, the book's organism, hub models),
``activations`` (harvested caches on disk), ``probes`` (behavioural probes of a model), ``vision``
(the book's ViT, Fashion-MNIST, CLIP), ``image_datasets`` (hub RGB image datasets) and ``prompts``
(deep-prompt adaptation of a ViT).
"""
