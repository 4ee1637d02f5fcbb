"""Does it learn? The learning benchmark (issue 15, spec/quality.md): small Transformers with dense, FSAT,
routing (ours and lucidrains'), and local attention trained side by side on long-range tasks, on torch.

- :mod:`.tasks` (and :mod:`.listops`): the synthetic tasks, generated from explicit seeds;
- :mod:`.config`: the attention names and the model, attention and training configurations;
- :mod:`.attentions`, :mod:`.model`: the swappable attentions and the Transformer around them;
- :mod:`.trainer`: training under step and time budgets, held-out evaluation, costs;
- :mod:`.analysis`: what the attention learned against the tasks' true offsets;
- :mod:`.report`: the table, the learning curves and FSAT's pictures;
- :mod:`.runner`: ``refattn quality``.

Importing this package, :mod:`.tasks`, :mod:`.config`, :mod:`.report` or :mod:`.runner` imports
neither torch nor matplotlib.
"""
