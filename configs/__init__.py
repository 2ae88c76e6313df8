"""Training configs (``train.py --config configs/<name>.py[:variant]``). A package so that a config builds on
another by a plain import (``from configs import base``) from the repository root, where ``train.py`` runs."""
