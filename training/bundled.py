"""The small assets shipped in bundled/ (see bundled/README.md), so that every CLI runs offline
out of the box: a digits network trained by train.py, its training data, and a detector with
reference statistics for the Frechet distance."""

import os

FOLDER   = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'bundled')
NETWORK  = os.path.join(FOLDER, 'edm-digits-16x16.pkl')     # EDMPrecond + DDPM++, 16x16 grayscale, 10 classes.
DATA     = os.path.join(FOLDER, 'digits-16x16.zip')         # UCI optdigits, 1797 images, dataset_tool.py format.
REF      = os.path.join(FOLDER, 'digits-16x16-ref.npz')     # mu, sigma of DATA under DETECTOR (recorded in the file).
DETECTOR = os.path.join(FOLDER, 'digits-detector.pt')       # TorchScript digit classifier's features.
