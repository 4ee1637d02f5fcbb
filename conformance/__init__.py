"""The conformance suite: any backend checked against the refattn reference, forward and gradients.

- :mod:`.checks`: what a check is and how it runs against a backend;
- :mod:`.fsat_cases`, :mod:`.routing_cases`: the checks of each algorithm, generated from fixed seeds;
- :mod:`.oracles`: naive O(L²) definitions, independent of the reference, that the reference is held to;
- :mod:`.gradcheck`: central finite differences;
- :mod:`.tolerances`: the tolerance table of spec/interface.md;
- :mod:`.runner`, :mod:`.report`: ``refattn conformance`` and its table and JSON.

Run it with ``refattn conformance [--backend NAME]`` or ``pytest --pyargs refattn.conformance``.
"""
