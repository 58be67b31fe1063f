"""``python -m fedllm.cli``: the same CLI as the ``fedllm`` console script."""

from fedllm.cli.app import main

main()
