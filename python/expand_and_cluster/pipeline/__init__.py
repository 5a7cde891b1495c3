"""The paper's steps in order (Martinelli et al. 2024, Sec. 3; docs/method.md):

- :mod:`.stages`: what each stage hands to the next (queries, students, layers, network);
- :mod:`.expand`: stage 1, the expansion search and the students (training in :mod:`.train`);
- :mod:`.cluster` (one layer; the tree cut in :mod:`.cut`) and :mod:`.layerwise` (stage 2, every
  hidden layer in turn);
- :mod:`.reconstruct`: stage 3, the output layer and the fine-tune (fitting in :mod:`.fit`);
- :mod:`.repair`: stage 4, the width repair (residual neurons in :mod:`.residual`);
- :mod:`.recover`: ``recover()``, the stages in sequence (also
  :func:`expand_and_cluster.recover`).
"""
