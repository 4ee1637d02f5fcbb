"""Print the environment of a sanitized run, one NAME=value per line, for example:

    env $(python -m refattn.backends.cuda_emulation) REFATTN_CUDA_EMULATION=1 pytest tests/test_cuda_emulation.py
"""

from refattn.backends.cuda_emulation import sanitizer_environment

for name, value in sanitizer_environment().items():
    print(f"{name}={value}")
