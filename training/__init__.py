"""Training of the bundled tiny models (`tokenzip/assets/`): not part of the installed package.

Run from a checkout of the repository: `python -m training.train --family llava --data-version v2 --out DIR`
(the exact command of each bundle is in its training.json). The synthetic dataset the models are trained and
evaluated on is `tokenzip.synthetic` (installed); this package holds only what rebuilds the weights.
"""
