"""Data sources: what a run trains on, as uint8 or float tensors in [-1, 1].

Where things are:

- ``sources``: ``open_source`` for the bundled MNIST, CIFAR-10 pickles, image folders, ``.npz``
  arrays and Hugging Face sets (``hf``); ``readers``: the IDX and pickle readers.
- ``images``: decoding, resizing and ``IMAGE_SUFFIXES``; ``labels``: class labels, checked.
- ``loader``: the order of the data and batches fetched ahead of the training step.
- ``toy``: 2-D toy distributions for the MLP.
"""
