"""Benchmarks whose output lands in ``reports/``: ``python -m audit.bench <command>``.

Commands:

* ``scoring``: timm's validate.py loop once per model vs ``audit run``'s scoring
  path, side by side (images/s, ratio, peak memory, argmax agreement).
* ``levers``: each speed lever measured on its own.
* ``features``: scoring with features on vs off, side by side (the cost of features).
* ``pixels``: scoring with pixel statistics (the image checks' inputs) off vs on, side by side.
* ``stages``: where the time of a scoring run goes, and the forward-only ceiling.
* ``gen-images`` / ``gen-preds``: synthetic ImageNet-sized data sets and prediction files.
* ``scale``: 50,000 images end to end, and post-processing of 50,000 x 1,000 x 3 predictions.
* ``checks``: every default check on 50,000 images' inputs after scoring (the 60 s / 4 GiB bars).
* ``heads``: cross-validated softmax and sigmoid heads on M models' features, and their growth.
* ``ray``: the local engine vs ``--engine ray`` on one node vs two "nodes" on this host (wall, images/s,
  overhead, peak memory per process); needs the ``[ray]`` extra.
"""
