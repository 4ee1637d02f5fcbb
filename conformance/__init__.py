"""The conformance suite: any backend checked against the refattn reference, forward, gradients and autograd.

- :mod:`.checks`: what a check is and how it runs against a backend (outputs, their dtypes and shapes);
- :mod:`.fsat_cases`, :mod:`.routing_cases`: the checks of each algorithm, generated from fixed seeds,
  in four parts: ``base``, ``ties`` (deliberate ties of every discrete choice), ``extreme`` (values
  near the limits of the softmax and of the dtypes) and ``large`` (L = 64, D = 32);
- :mod:`.oracles`: naive O(L²) definitions, independent of the reference, that the reference is held to;
- :mod:`.gradcheck`: central finite differences, whole or along one direction;
- :mod:`.tolerances`: the tolerance table of spec/interface.md, relative to each output's magnitude;
- :mod:`.runner`, :mod:`.report`: ``refattn conformance`` and its table and JSON.

Run it with ``refattn conformance [--backend NAME] [--quick] [--part PART]`` or
``pytest --pyargs refattn.conformance --refattn-backend NAME``.

What a backend provides (a :class:`refattn.backends.Backend`; spec/interface.md, "What the
conformance suite needs from a backend", is the full text):

- the namespaces ``fsat`` and ``routing`` and ``capabilities`` (dtypes, devices, gradients, algorithms);
- the array bridge ``from_numpy(array, dtype, device)``, ``to_numpy(x)`` (float64 or int64 NumPy) and
  ``dtype_of(x)`` (the dtype's name, e.g. ``"bfloat16"``; the default reads ``x.dtype``): every output's
  dtype is checked, floating outputs in the inputs' dtype, discrete ones int64;
- optionally ``autodiff(function, inputs, cotangents)``: the gradients of ``function(*inputs)`` against
  one cotangent per output (None to ignore one), one per input. Its presence declares autograd: the
  suite then differentiates the forward functions themselves (checks ``<function>:autodiff``) and
  compares with the reference's VJPs;
- optionally ``strategies``, a tuple of :class:`refattn.backends.Strategy` (name, the
  ``"algorithm.function"`` names it changes, ``force()`` a context manager taking that path): each
  check calling one of those functions runs once under each. Every device in
  ``capabilities.devices`` is checked; each report row names its device and strategy.
"""
