"""The ``ddpm`` command line: ``main`` builds the parser; each command has its module here, its
options beside the function that runs it (``train``, ``sample``, ``eval``, ``distill``, ...).
``options`` holds the option types and groups several commands share, ``common`` what they do
once they run. Nothing in the library imports this package, and it imports the library only
inside the commands, so ``ddpm --help`` starts without torch.
"""
