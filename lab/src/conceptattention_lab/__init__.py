"""The lab of conceptattention: how the built-in shapes model is trained, released and studied.

Not part of the ``conceptattention`` package: install it from a clone of the repository with
``pip install -e lab``. Modules: :mod:`.train` (the trainer behind ``conceptattention train-shapes``),
:mod:`.surgery` (changes between stages), :mod:`.binding` (a measure of word binding), :mod:`.card`
(the model card), :mod:`.release` (choosing a release's settings and writing it), :mod:`.gpu_train`
(training a stage inside a fixed budget on a lent GPU).
"""
